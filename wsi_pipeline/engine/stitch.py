"""Stitchers turn a task's batch outputs into heatmaps (MONAI's merger): aggregate, advance, finalize.

A classifier's tile (col, row) becomes heatmap pixel (row, col), which stands for the tile's central stride x
stride square. A dense network's tile contributes only its centre (the overlap/2 border is cut, except at the grid's
outer edges), so with overlap/2 >= the model's halo the stitched map equals the network run on the whole region.
One single-channel heatmap per written class; a new output kind is a new stitcher in `STITCHERS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.heatmap import Heatmap, HeatmapGeometry, HeatmapWriter
from wsi_pipeline.models.card import DOMAIN_HEATMAP_PREFIX, ModelCard
from wsi_pipeline.models.domain import DOMAIN_KEY
from wsi_pipeline.slide.tiling import TilePlan, TileSpec


class Stitcher(Protocol):
    def aggregate(self, indices: np.ndarray, outputs: dict[str, torch.Tensor]) -> None:
        """Place the outputs of the tiles `indices` (plan order)."""

    def advance(self, next_index: int | None) -> None:
        """No later batch starts before tile `next_index`: finished rows may be written."""

    def finalize(self) -> list[Path]:
        """Write what is left and publish the heatmaps."""

    def abort(self) -> None:
        """Discard everything (a failed slide leaves nothing that looks complete)."""


@dataclass(frozen=True)
class DenseCrop:
    """Where a dense tile's output lands, in output px: `out_tile` per tile, grid `step`, and the `margin` cut on
    inner edges (overlap/2 at the output stride)."""

    out_tile: int
    margin: int
    step: int

    def first_row(self, row: int) -> int:
        """The first heatmap row a tile of grid row `row` writes."""
        return row * self.step + (0 if row == 0 else self.margin)


def dense_crop(spec: TileSpec, output_stride: int) -> DenseCrop:
    return DenseCrop(
        spec.tile_px // output_stride, spec.overlap_px // 2 // output_stride, spec.stride_px // output_stride
    )


class _WritingStitcher:
    """Writers for every written class, and what every stitcher does with them."""

    def __init__(self, task: str, card: ModelCard, plan: TilePlan, store: Path, dtype: str) -> None:
        self.card, self.plan = card, plan
        attrs = {"task": task, "model_card": card.model_dump(mode="json"), "plan": plan.saved_params}
        geometry = self.geometry()
        self.writers = {
            name: HeatmapWriter(store, name, [name], geometry, dtype, attrs=attrs) for name in card.written_classes
        }

    def geometry(self) -> HeatmapGeometry:
        raise NotImplementedError

    def first_row(self, tile_row: int) -> int:
        raise NotImplementedError

    @staticmethod
    def check(card: ModelCard, tile_px: int, overlap_px: int, key: str) -> None:
        """Refuse tiles of this size and overlap that `card`'s model cannot be stitched from (ConfigError)."""
        raise NotImplementedError

    def aggregate(self, indices: np.ndarray, outputs: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _own(self, outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The outputs this stitcher writes (a predictor's batch may carry others: the domain guard's values)."""
        return {name: outputs[name].numpy() for name in self.writers}

    def _put(self, y: int, x: int, blocks: dict[str, np.ndarray]) -> None:
        for name, writer in self.writers.items():
            writer.write(y, x, blocks[name][None])

    def advance(self, next_index: int | None) -> None:
        if next_index is None:
            return
        first = self.first_row(int(self.plan.rows[next_index]))
        for writer in self.writers.values():
            writer.advance(first)

    def finalize(self) -> list[Path]:
        return [writer.close() for writer in self.writers.values()]

    def abort(self) -> None:
        for writer in self.writers.values():
            if not writer.closed:
                writer.abort()


def tile_grid_geometry(plan: TilePlan) -> HeatmapGeometry:
    """One heatmap px per tile of `plan` (a classifier's outputs, the domain and QC images)."""
    spec = plan.spec
    n_cols, n_rows = plan.grid
    return HeatmapGeometry(n_rows, n_cols, spec.stride_px, spec.overlap_px / 2, (spec.mpp, spec.mpp), spec.downsample)


class ClassifierStitcher(_WritingStitcher):
    """One heatmap pixel per tile."""

    @staticmethod
    def check(card: ModelCard, tile_px: int, overlap_px: int, key: str) -> None:
        if tile_px != card.tile_px:
            raise ConfigError(f"{key}.tile_px is {tile_px} but classifier {card.name} expects {card.tile_px} px tiles")

    def geometry(self) -> HeatmapGeometry:
        return tile_grid_geometry(self.plan)

    def first_row(self, tile_row: int) -> int:
        return tile_row

    def aggregate(self, indices: np.ndarray, outputs: dict[str, torch.Tensor]) -> None:
        values = self._own(outputs)
        if any(v.ndim != 1 for v in values.values()):
            shape = next(iter(values.values())).shape
            raise ConfigError(f"classifier {self.card.name} returned shape {tuple(shape)}; expected (batch, classes)")
        for j, i in enumerate(indices.tolist()):
            self._put(
                int(self.plan.rows[i]), int(self.plan.cols[i]), {n: v[j : j + 1, None] for n, v in values.items()}
            )


class DenseStitcher(_WritingStitcher):
    """The halo-free centre of every tile's map."""

    @staticmethod
    def check(card: ModelCard, tile_px: int, overlap_px: int, key: str) -> None:
        stride = card.output_stride
        if tile_px % stride or overlap_px % (2 * stride):
            raise ConfigError(
                f"{key}: tile_px ({tile_px}) must be a multiple of the output stride {stride} and "
                f"overlap_px ({overlap_px}) a multiple of {2 * stride}"
            )
        if overlap_px // 2 < card.halo_px:
            raise ConfigError(
                f"{key}.overlap_px is {overlap_px} but model {card.name} needs at least "
                f"{2 * card.halo_px} (twice its halo of {card.halo_px} px) to stitch without seams"
            )

    @property
    def crop(self) -> DenseCrop:
        return dense_crop(self.plan.spec, self.card.output_stride)

    def geometry(self) -> HeatmapGeometry:
        spec, os_ = self.plan.spec, self.card.output_stride
        n_cols, n_rows = self.plan.grid
        height = ((n_rows - 1) * spec.stride_px + spec.tile_px) // os_
        width = ((n_cols - 1) * spec.stride_px + spec.tile_px) // os_
        return HeatmapGeometry(height, width, os_, 0.0, (spec.mpp, spec.mpp), spec.downsample)

    def first_row(self, tile_row: int) -> int:
        return self.crop.first_row(tile_row)

    def aggregate(self, indices: np.ndarray, outputs: dict[str, torch.Tensor]) -> None:
        crop = self.crop
        out_tile, margin, step = crop.out_tile, crop.margin, crop.step
        values = self._own(outputs)
        shape = next(iter(values.values())).shape
        if shape[-2:] != (out_tile, out_tile):
            raise ConfigError(
                f"dense model {self.card.name} returned {shape[-2:]} per tile; expected {(out_tile, out_tile)} for "
                f"{self.plan.spec.tile_px} px tiles at output stride {self.card.output_stride}"
            )
        n_cols, n_rows = self.plan.grid
        for j, i in enumerate(indices.tolist()):
            col, row = int(self.plan.cols[i]), int(self.plan.rows[i])
            x0 = 0 if col == 0 else margin
            x1 = out_tile if col == n_cols - 1 else margin + step
            y0 = 0 if row == 0 else margin
            y1 = out_tile if row == n_rows - 1 else margin + step
            self._put(row * step + y0, col * step + x0, {n: v[j, y0:y1, x0:x1] for n, v in values.items()})


class DomainStitcher(ClassifierStitcher):
    """The domain guard's value per tile, one px per tile whatever the model's kind (a dense model's tile is scored
    as a whole): score / threshold, above 1 out of the model's domain (models/domain.py). Written as the image
    `domain-<task>` beside the task's own heatmaps."""

    def __init__(self, task: str, card: ModelCard, plan: TilePlan, store: Path, dtype: str = "float32") -> None:
        self.card, self.plan = card, plan
        name = domain_heatmap(task)
        attrs = {"task": task, "kind": "domain", "plan": plan.saved_params}
        self.writers = {DOMAIN_KEY: HeatmapWriter(store, name, [name], self.geometry(), "float32", attrs=attrs)}


def domain_heatmap(task: str) -> str:
    return f"{DOMAIN_HEATMAP_PREFIX}{task}"


STITCHERS: dict[str, type[_WritingStitcher]] = {"classifier": ClassifierStitcher, "dense": DenseStitcher}


def stitcher_class(card: ModelCard) -> type[_WritingStitcher]:
    try:
        return STITCHERS[card.kind]
    except KeyError:
        raise ConfigError(f"model {card.name}: no stitcher for output kind {card.kind!r}") from None


# heatmap values per class read at once by `tile_measurements` (32 MB as float32): each zarr read cost ~1.7 ms, and a
# read per tile row was most of the time of a small slide's qupath.geojson (61 rows: 0.21 of its 0.26 s)
MEASURED_VALUES_AT_ONCE = 1 << 23


def tile_measurements(
    plan: TilePlan, card: ModelCard, heats: dict[str, Heatmap]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Per kept tile (plan index), the task's probabilities over the tile's own heatmap area: a classifier's value,
    or a dense map's mean and max. Reads as many tile rows of the heatmaps at a time as MEASURED_VALUES_AT_ONCE
    allows (memory stays bounded on any slide)."""
    crop = dense_crop(plan.spec, card.output_stride) if card.kind == "dense" else None
    step, margin = (1, 0) if crop is None else (crop.step, crop.margin)
    rows = np.unique(plan.rows)
    width = max((heat.levels[0].shape[-1] for heat in heats.values()), default=1)
    group = max(1, MEASURED_VALUES_AT_ONCE // (step * width))
    for first in range(0, len(rows), group):
        top = int(rows[first]) * step + margin
        bottom = int(rows[min(first + group, len(rows)) - 1]) * step + margin + step
        stored: dict[str, Any]  # what zarr reads back (typed as any of its element and array types)
        stored = {c: heat.levels[0][0, top:bottom] for c, heat in heats.items()}
        bands: dict[str, np.ndarray] = {
            c: np.asarray(v, np.float32) * heats[c].attrs["value_scale"] for c, v in stored.items()
        }
        for row in rows[first : first + group].tolist():
            y0 = row * step + margin - top
            for i in np.flatnonzero(plan.rows == row).tolist():
                col = int(plan.cols[i])
                measurements: dict[str, float] = {"Tissue fraction": float(plan.tissue_fraction[i])}
                for c, band in bands.items():
                    values = band[y0 : y0 + step]
                    if crop is None:
                        measurements[f"{c} probability"] = float(values[0, col])
                    else:
                        block = values[:, col * crop.step + crop.margin : col * crop.step + crop.margin + crop.step]
                        measurements[f"{c} mean"] = float(block.mean()) if block.size else 0.0
                        measurements[f"{c} max"] = float(block.max()) if block.size else 0.0
                yield i, measurements
