"""Heatmaps as OME-Zarr (NGFF 0.5, zarr v3) multiscale images inside `OUT/<slide_id>/heatmaps.zarr/<name>/`.

Writing: one writer (this process) per output; blocks arrive in non-decreasing row order and are gathered in a
band of whole chunk rows, which is written once when no later tile can touch it. So every zarr write covers whole
chunks (zarr v3 has no locks: two writers of one chunk lose data), and memory is one band: it grows with the slide's
width, never with its area. Each output is built in a temporary folder and renamed into the store when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from wsi_pipeline.core.errors import OutputError, write_failure
from wsi_pipeline.core.layout import heatmap_temporary

CHUNK = 512
AXES = ("c", "y", "x")  # NGFF 0.5: every array's zarr v3 dimension_names equal the multiscale's axes
MIN_LEVELS = 3
FORMAT = "wsi-pipeline/heatmap@1"
STORE_FORMAT = "wsi-pipeline/heatmaps@1"  # the root of a slide's heatmaps.zarr: complete once all its images are


@dataclass(frozen=True)
class HeatmapGeometry:
    """How heatmap pixels map onto the slide.

    Heatmap pixel (row, col) of level 0 covers target-resolution pixels [origin_px + col*px, ... + px) of the tile
    grid, whose pixel 0 is the slide's bounds corner (QuPath's origin). `target_mpp` is the tiles' µm/px and
    `slide_downsample` the level-0 px per target px (x, y).
    """

    height: int
    width: int
    px: float  # target px per heatmap px
    origin_px: float  # target px from the bounds corner to the heatmap's pixel-0 edge
    target_mpp: tuple[float, float]  # (y, x) µm per target px
    slide_downsample: tuple[float, float]  # (x, y) level-0 px per target px

    @property
    def mpp(self) -> tuple[float, float]:
        return self.px * self.target_mpp[0], self.px * self.target_mpp[1]

    def level0_transform(self) -> dict[str, list[float]]:
        """Heatmap px -> level-0 px of the slide as QuPath opens it: x = origin + col * scale (pixel edges)."""
        sx, sy = self.slide_downsample
        return {"origin": [self.origin_px * sx, self.origin_px * sy], "scale": [self.px * sx, self.px * sy]}


def _ngff_multiscales(name: str, geometry: HeatmapGeometry, levels: int) -> dict[str, Any]:
    datasets = []
    my, mx = geometry.mpp
    ty0 = (geometry.origin_px + (geometry.px - 1) / 2) * geometry.target_mpp[0]
    tx0 = (geometry.origin_px + (geometry.px - 1) / 2) * geometry.target_mpp[1]
    for level in range(levels):
        factor = 2**level
        # a level-l pixel averages factor x factor level-0 pixels: its centre sits (factor - 1) / 2 px further on
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, my * factor, mx * factor]},
                    {
                        "type": "translation",
                        "translation": [0.0, ty0 + (factor - 1) / 2 * my, tx0 + (factor - 1) / 2 * mx],
                    },
                ],
            }
        )
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": AXES[0], "type": "channel"},
                    {"name": AXES[1], "type": "space", "unit": "micrometer"},
                    {"name": AXES[2], "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
            }
        ],
    }


class HeatmapWriter:
    """Streams one output with channels `channels` into `store/<name>` (see the module docstring)."""

    def __init__(
        self,
        store: Path,
        name: str,
        channels: list[str],
        geometry: HeatmapGeometry,
        dtype: str = "float16",
        chunk: int = CHUNK,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in ("float16", "float32", "uint8"):
            raise ValueError(f"dtype must be float16, float32 or uint8, got {dtype}")
        self.store = Path(store)
        self.name = name
        self.channels = list(channels)
        self.geometry = geometry
        self.dtype = dtype
        self.chunk = chunk
        self.attrs = dict(attrs or {})
        self.tmp = heatmap_temporary(self.store, name)
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        shape = (len(self.channels), geometry.height, geometry.width)
        self.array = self.group.create_array(
            "0", shape=shape, chunks=(1, chunk, chunk), dtype=dtype, fill_value=0, dimension_names=AXES
        )
        self._bands: dict[int, np.ndarray] = {}
        self._flushed_below = 0  # rows below this are final
        self.closed = False

    # --- streaming ----------------------------------------------------------------------------------------------
    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Place `block` (C, h, w) at heatmap (y0, x0). Rows already flushed may not be written again."""
        c, h, w = block.shape
        if c != len(self.channels):
            raise ValueError(f"block has {c} channels, heatmap {self.name} has {len(self.channels)}")
        if y0 < self._flushed_below:
            raise RuntimeError(f"row {y0} of {self.name} was already written; tiles must come in row order")
        y1, x1 = min(y0 + h, self.geometry.height), min(x0 + w, self.geometry.width)
        for band in range(y0 // self.chunk, (y1 - 1) // self.chunk + 1):
            buf = self._bands.get(band)
            if buf is None:
                buf = self._bands[band] = np.zeros((c, self.chunk, self.geometry.width), np.float32)
            top = band * self.chunk
            a, b = max(y0, top), min(y1, top + self.chunk)
            buf[:, a - top : b - top, x0:x1] = block[:, a - y0 : b - y0, : x1 - x0]

    def advance(self, next_row: int) -> None:
        """No later block starts above `next_row`: write every band that ends at or above it."""
        for band in sorted(self._bands):
            if (band + 1) * self.chunk <= next_row:
                self._flush(band)
        self._flushed_below = max(self._flushed_below, next_row - next_row % self.chunk)

    def _flush(self, band: int) -> None:
        buf = self._bands.pop(band)
        top = band * self.chunk
        bottom = min(top + self.chunk, self.geometry.height)
        values = buf[:, : bottom - top]
        if self.dtype == "uint8":
            values = np.clip(np.rint(values * 255.0), 0, 255)
        self.array[:, top:bottom, :] = values.astype(self.dtype)

    # --- finishing ------------------------------------------------------------------------------------------------
    def close(self) -> Path:
        """Flush, build the pyramid, write the metadata, and move the finished output into the store."""
        for band in sorted(self._bands):
            self._flush(band)
        levels = build_pyramid(self.group, self.chunk)
        self.group.attrs.update(
            {
                "ome": _ngff_multiscales(self.name, self.geometry, levels),
                "wsi_pipeline": {
                    "format": FORMAT,
                    "name": self.name,
                    "channels": self.channels,
                    "dtype": self.dtype,
                    "value_scale": 1 / 255 if self.dtype == "uint8" else 1.0,
                    "level0_px": self.geometry.level0_transform(),
                    "mpp": list(self.geometry.mpp),
                    **self.attrs,
                    "complete": True,
                },
            }
        )
        final = self.store / self.name
        try:
            _ensure_root(self.store)
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.tmp, final)
            list_images(self.store)
        except OSError as exc:
            self.abort()
            failure = write_failure(exc, final)
            raise failure or OutputError(f"could not write heatmap {final}: {exc}; check the folder") from exc
        self.closed = True
        return final

    def abort(self) -> None:
        """Discard the partial output (a failed slide leaves nothing that looks complete): for good, since a failed
        write of one chunk leaves the other chunks of that write landing on zarr's I/O thread (a full disk under
        `predict` once left `.heatmaps.zarr.mitosis.tmp-*` behind)."""
        discard_for_good(self.tmp)
        self._bands.clear()


def _ensure_root(store: Path) -> None:
    if not (store / "zarr.json").exists():
        zarr.open_group(str(store), mode="a", zarr_format=3)


def begin_store(store: Path) -> None:
    """Mark the store incomplete before images are added to it: a reader of the root learns that the set of images
    is being changed (`finish_store` marks it complete when every image of the command is in place)."""
    root = zarr.open_group(str(store), mode="a", zarr_format=3)
    root.attrs["wsi_pipeline"] = {"format": STORE_FORMAT, "complete": False}


def finish_store(store: Path) -> list[str]:
    names = list_images(store)
    root = zarr.open_group(str(store), mode="a", zarr_format=3)
    root.attrs["wsi_pipeline"] = {"format": STORE_FORMAT, "complete": True, "images": names}
    return names


def list_images(store: Path) -> list[str]:
    """Record the store's finished images so that viewers find them: the root says it is a collection of images
    (NGFF 0.5's bioformats2raw layout) and its `OME` group lists their paths (`series`)."""
    names = sorted(p.name for p in store.iterdir() if p.is_dir() and p.name != "OME" and (p / "zarr.json").exists())
    root = zarr.open_group(str(store), mode="a", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    ome = zarr.open_group(str(store / "OME"), mode="a", zarr_format=3)
    ome.attrs["ome"] = {"version": "0.5", "series": names}
    return names


IN_MEMORY_LEVEL_BYTES = 64 * 2**20  # a level up to this size is averaged in memory; a larger one by dask, in chunks


def build_pyramid(group: zarr.Group, chunk: int) -> int:
    """Levels 1.. by 2x2 mean (chunk-aligned writes) until the level fits in one chunk; at least 3 levels."""
    level = 0
    while True:
        src = cast(zarr.Array, group[str(level)])  # the levels are arrays (zarr types an item Array | Group)
        _, h, w = src.shape
        if level + 1 >= MIN_LEVELS and max(h, w) <= chunk:
            break
        if min(h, w) < 2:
            break
        in_memory = src.nbytes <= IN_MEMORY_LEVEL_BYTES
        if in_memory:  # the same means as dask's, in one step; dask's graph costs ~0.1 s a level (most heatmaps)
            c, h2, w2 = src.shape[0], h // 2, w // 2
            pairs = np.asarray(src[:, : 2 * h2, : 2 * w2], np.float32).reshape(c, h2, 2, w2, 2)
            coarse: Any = np.mean(pairs, axis=(2, 4))
            if src.dtype == np.uint8:
                coarse = np.clip(np.round(coarse), 0, 255)
            coarse = coarse.astype(src.dtype)
        else:  # imported here: dask.array takes ~0.35 s to import, and most heatmaps never come here
            import dask.array as da

            arr = da.from_zarr(src).astype(np.float32)
            coarse = da.coarsen(np.mean, arr, {1: 2, 2: 2}, trim_excess=True)
            if src.dtype == np.uint8:
                coarse = da.clip(da.round(coarse), 0, 255)
            coarse = coarse.astype(src.dtype).rechunk((1, chunk, chunk))
        dst = group.create_array(
            str(level + 1),
            shape=coarse.shape,
            chunks=(1, chunk, chunk),
            dtype=src.dtype,
            fill_value=0,
            dimension_names=AXES,
        )
        if in_memory:
            dst[...] = coarse
        else:
            # dask types `targets` as numpy's ArrayLike, which zarr.Array (its __array__ gives NDArrayLike) is not
            # by type; dask only needs a target's __setitem__, which zarr.Array has
            da.store(coarse, dst, lock=False)  # type: ignore[arg-type]
        level += 1
    return level + 1


@dataclass
class Heatmap:
    """A finished heatmap read back: level arrays (lazy zarr) and the metadata needed to place them."""

    path: Path
    channels: list[str]
    levels: list[zarr.Array]
    attrs: dict[str, Any]

    def channel(self, name: str, level: int = 0) -> np.ndarray:
        """Values of one channel as float32 probabilities in [0, 1]."""
        index = self.channels.index(name)
        values = np.asarray(self.levels[level][index], dtype=np.float32)
        return values * float(self.attrs["value_scale"])


def open_heatmap(path: str | os.PathLike[str]) -> Heatmap:
    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    meta: dict[str, Any] = dict(group.attrs)  # JSON values, read by key below
    attrs = meta.get("wsi_pipeline")
    if not attrs or not attrs.get("complete"):
        raise OutputError(f"{path} is not a complete wsi-pipeline heatmap; re-run predict")
    count = len(meta["ome"]["multiscales"][0]["datasets"])
    # the levels are arrays, as `build_pyramid` wrote them (zarr types an item Array | Group)
    return Heatmap(path, attrs["channels"], [cast(zarr.Array, group[str(i)]) for i in range(count)], attrs)


def settle_pending_writes(timeout_s: float = 30.0) -> None:
    """Wait until every write zarr has already started has landed. zarr runs its I/O on its own event-loop thread;
    an interrupt (SIGINT, SIGTERM) raised in the thread waiting for a write leaves that write running, and a
    temporary folder removed before it lands is created again by it (seen as a leftover `.case.tmp-*` after Ctrl-C
    in tests/test_faults.py). Reaches into `zarr.core.sync`, which has no public way to say "wait for pending I/O";
    where that is missing (another zarr), nothing is waited for."""
    import asyncio

    from zarr.core import sync as zarr_sync

    loop = getattr(zarr_sync, "loop", [None])[0]
    if loop is None or loop.is_closed():
        return

    async def others_done() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    try:
        asyncio.run_coroutine_threadsafe(others_done(), loop).result(timeout_s + 1)
    except Exception as exc:  # a write that failed is the failed slide's business, not this cleanup's
        logging.getLogger("wsi_pipeline").debug("pending zarr writes not settled: %s", exc)


def discard_for_good(folder: Path, rounds: int = 5) -> None:
    """Remove a temporary folder so that it stays removed. Writes already started (zarr's I/O thread finishing the
    other chunks of a failed or interrupted write, a dask worker finishing its chunk of a pyramid) can create it
    again after a first removal: wait for zarr's pending writes, remove, and look again a few times (0.05 s apart)."""
    for _ in range(rounds):
        settle_pending_writes()
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.05)
        if not folder.exists():
            return
