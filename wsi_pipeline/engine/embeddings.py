"""Tile embeddings of a slide as the engine makes them: one row per planned tile, in plan order, written as they
come (`features` N x D, `coords` N x 2 level-0 px of each tile's top-left corner) to a zarr group or, with format
h5, to the HDF5 layout TRIDENT and CLAM write and read (the same two datasets, their geometry in attributes), so
existing MIL code opens our files unchanged. Rows are buffered one chunk at a time, never the whole slide."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from wsi_pipeline.models.encoders import LoadedEncoder, resized
from wsi_pipeline.models.predictor import use_bf16
from wsi_pipeline.slide.tiling import TilePlan

EmbedFormat = Literal["zarr", "h5"]
FORMAT_VERSION = "wsi-pipeline embeddings 1"
CHUNK_ROWS = 1024  # rows per zarr chunk and per buffered write


@dataclass(frozen=True)
class EmbeddingTarget:
    """Where one encoder's embeddings of one slide go, and as what."""

    encoder: str
    path: Path  # <slide folder>/embeddings/<encoder>.zarr or .h5
    file_format: EmbedFormat = "zarr"
    dtype: str = "float16"


def embedding_file(folder: Path, encoder: str, file_format: EmbedFormat) -> Path:
    return folder / f"{encoder}.{file_format}"


def embedding_attributes(plan: TilePlan, encoder: dict[str, Any], slide_mpp: float) -> dict[str, Any]:
    """The geometry readers need: our own names, and TRIDENT's and CLAM's (`patch_size`, `patch_size_level0`,
    `patch_level`, `level0_magnification`, `target_magnification`, `overlap`), magnification as 10 / µm per px."""
    spec = plan.spec
    level0 = round(spec.tile_px * spec.mpp / slide_mpp)
    return {
        "format": FORMAT_VERSION,
        "encoder": encoder,
        "mpp": spec.mpp,
        "tile_px": spec.tile_px,
        "overlap_px": spec.overlap_px,
        "slide_mpp": slide_mpp,
        "patch_size": spec.tile_px,
        "patch_size_level0": level0,
        "patch_level": 0,
        "level0_magnification": round(10.0 / slide_mpp, 3),
        "target_magnification": round(10.0 / spec.mpp, 3),
        "overlap": spec.overlap_px,
        "downsample": [spec.mpp / slide_mpp, spec.mpp / slide_mpp],
    }


class EmbeddingWriter:
    """A `Stitcher` for an encoder: takes the predictor's {"features": (B, D)} and writes rows to a temporary file
    renamed into place by `finalize` (a file that exists is complete)."""

    def __init__(self, target: EmbeddingTarget, plan: TilePlan, dim: int, attrs: dict[str, Any]) -> None:
        self.target = target
        self.rows = len(plan)
        self.dim = dim
        self.tmp = target.path.with_name(f".{target.path.name}.partial")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self._remove(self.tmp)
        coords = np.stack([np.round(plan.x), np.round(plan.y)], axis=1).astype(np.int64)
        self.buffer = np.zeros((min(CHUNK_ROWS, max(1, self.rows)), dim), np.float32)
        self.start = 0  # first row of the buffer
        self.filled = 0
        if target.file_format == "h5":
            self._open_h5(coords, attrs)
        else:
            self._open_zarr(coords, attrs)

    def _open_zarr(self, coords: np.ndarray, attrs: dict[str, Any]) -> None:
        import zarr

        group = zarr.open_group(str(self.tmp), mode="w")
        group.attrs.update(attrs)
        shape = (self.rows, self.dim)
        self.features: Any = group.create_array(
            "features", shape=shape, chunks=(CHUNK_ROWS, self.dim), dtype=self.target.dtype, fill_value=0
        )
        group.create_array("coords", shape=coords.shape, chunks=(max(1, self.rows), 2), dtype="int64")[...] = coords
        self.h5: Any = None

    def _open_h5(self, coords: np.ndarray, attrs: dict[str, Any]) -> None:
        import h5py

        self.h5 = h5py.File(self.tmp, "w")
        self.h5.attrs.update({k: _h5_value(v) for k, v in attrs.items()})
        self.features = self.h5.create_dataset("features", shape=(self.rows, self.dim), dtype=self.target.dtype)
        dataset = self.h5.create_dataset("coords", data=coords)
        for key in ("patch_size", "patch_size_level0", "patch_level", "level0_magnification", "target_magnification"):
            dataset.attrs[key] = attrs[key]
        dataset.attrs["overlap"] = attrs["overlap"]
        dataset.attrs["name"] = attrs["encoder"]["name"]
        dataset.attrs["downsample"] = attrs["downsample"]
        self.features.attrs["encoder"] = attrs["encoder"]["name"]
        self.features.attrs["mpp"] = attrs["mpp"]

    def aggregate(self, indices: np.ndarray, outputs: dict[str, torch.Tensor]) -> None:
        values = outputs["features"].numpy()
        for row, value in zip(indices.tolist(), values, strict=True):
            if row - self.start >= len(self.buffer):
                self._flush()
            self.buffer[row - self.start] = value
            self.filled = max(self.filled, row - self.start + 1)

    def advance(self, next_index: int | None) -> None:
        """Rows arrive in plan order: nothing to settle between batches (the buffer flushes when full)."""

    def _flush(self) -> None:
        if self.filled:
            self.features[self.start : self.start + self.filled] = self.buffer[: self.filled].astype(self.target.dtype)
        self.start += len(self.buffer)
        self.filled = 0

    def finalize(self) -> list[Path]:
        self._flush()
        if self.h5 is not None:
            self.h5.close()
        self._remove(self.target.path)
        os.replace(self.tmp, self.target.path)
        return [self.target.path]

    def abort(self) -> None:
        if self.h5 is not None:
            self.h5.close()
        self._remove(self.tmp)

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _h5_value(value: Any) -> Any:
    """HDF5 attributes take numbers, strings and arrays; a dict (the encoder's record) is stored as JSON."""
    import json

    return json.dumps(value) if isinstance(value, dict) else value


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features float32 N x D, coords int64 N x 2, attributes) of a zarr or h5 embeddings file."""
    import json

    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:  # TRIDENT and CLAM keep the geometry on `coords`, we on the file too
            merged = {**f["coords"].attrs, **f.attrs}
            attrs = {k: (json.loads(v) if k == "encoder" and isinstance(v, str) else v) for k, v in merged.items()}
            return np.asarray(f["features"][...], np.float32), np.asarray(f["coords"][...]), attrs
    import zarr

    group = zarr.open_group(str(path), mode="r")
    features: Any = group["features"]
    coords: Any = group["coords"]
    return np.asarray(features[...], np.float32), np.asarray(coords[...]), dict(group.attrs)


class EncoderPredictor:
    """uint8 tiles on the device -> {"features": (B, dim) float32 on the CPU}: resized to the card's input size,
    normalised, run in bf16 autocast where `use_bf16` says so (CUDA; CPUs with native bf16), channels_last."""

    def __init__(self, encoder: LoadedEncoder, device: torch.device, precision: str = "auto") -> None:
        self.card = encoder.card
        self.device = device
        self.bf16 = use_bf16(device, precision)
        self.module = encoder.module.to(device).eval()
        if self.card.architecture == "model-folder":
            self.module = self.module.to(memory_format=torch.channels_last)
        norm = self.card.normalisation
        self.mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        x = resized(batch.float().div_(255.0), self.card)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module(x)
        return out.float().cpu()

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.features(batch)}
