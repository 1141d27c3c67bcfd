"""Tile plans: where to read tiles for a task (µm/px, tile px, overlap), with each tile's tissue fraction.

The grid lives in target-resolution pixels anchored at the slide's bounds corner: tile (col, row) covers target
pixels [col*stride, col*stride + tile_px) and its level-0 origin is bounds + col*stride*downsample, kept fractional:
regions are read through one global transform (`slide.resample`), so tiles agree wherever they overlap. Tiles
are ordered row by row, so a plan is deterministic. Plans are saved with their parameters so that a later stage can
refuse a plan made for another configuration.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from wsi_pipeline.core.atomic import write_text
from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tissue import TissueMask

PLAN_FORMAT = "wsi-pipeline/tile-plan@1"


@dataclass(frozen=True)
class TileSpec:
    """Everything that decides a plan's grid: what a tile is (µm/px, px, overlap), which tiles are kept, and the
    slide geometry it was made for. Two plans with equal specs read identical tiles."""

    mpp: float  # target µm/px
    tile_px: int
    overlap_px: int
    min_tissue: float
    slide_mpp: tuple[float, float]  # (x, y) µm per level-0 px
    downsample: tuple[float, float]  # (x, y) level-0 px per target px
    bounds: tuple[int, int, int, int]  # x, y, width, height in level-0 px

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def tile_size_level0(self) -> tuple[float, float]:
        """Tile edge in level-0 px (x, y)."""
        return self.tile_px * self.downsample[0], self.tile_px * self.downsample[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "mpp": self.mpp,
            "tile_px": self.tile_px,
            "overlap_px": self.overlap_px,
            "min_tissue": self.min_tissue,
            "slide_mpp": list(self.slide_mpp),
            "downsample": list(self.downsample),
            "bounds": list(self.bounds),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TileSpec:
        return cls(
            mpp=float(data["mpp"]),
            tile_px=int(data["tile_px"]),
            overlap_px=int(data["overlap_px"]),
            min_tissue=float(data["min_tissue"]),
            slide_mpp=(float(data["slide_mpp"][0]), float(data["slide_mpp"][1])),
            downsample=(float(data["downsample"][0]), float(data["downsample"][1])),
            bounds=cast(tuple[int, int, int, int], tuple(int(v) for v in data["bounds"])),  # x, y, width, height
        )


@dataclass
class TilePlan:
    spec: TileSpec
    grid: tuple[int, int]  # (n_cols, n_rows) of the full grid before tissue filtering
    cols: np.ndarray  # int32, kept tiles only
    rows: np.ndarray
    x: np.ndarray  # float64 level-0 origin (OpenSlide coordinates), fractional where the downsample is
    y: np.ndarray
    tissue_fraction: np.ndarray  # float32 in [0, 1]
    slide: dict[str, Any] = field(default_factory=dict)
    tissue_params: dict[str, Any] | None = None  # the tissue detection the plan was made on (saved with it)

    def __len__(self) -> int:
        return int(self.cols.size)

    @property
    def stride_px(self) -> int:
        return self.spec.stride_px

    @property
    def tile_size_level0(self) -> tuple[float, float]:
        return self.spec.tile_size_level0

    @property
    def saved_params(self) -> dict[str, Any]:
        """The spec (and tissue parameters, when known) as saved in the plan file and heatmap attributes."""
        params = self.spec.to_json()
        if self.tissue_params is not None:
            params["tissue"] = self.tissue_params
        return params

    def check_compatible(self, expected: dict[str, Any]) -> None:
        """Raise ConfigError naming the first parameter that differs from `expected`."""
        params = self.saved_params
        for key, value in expected.items():
            have = params.get(key)
            if have != value:
                raise ConfigError(
                    f"tile plan was made with {key}={have!r} but the configuration asks for {value!r}; "
                    "re-plan with the current settings (or run with --overwrite)"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "params": self.saved_params,
            "slide": self.slide,
            "grid": list(self.grid),
            "count": len(self),
            "columns": ["col", "row", "x", "y", "tissue_fraction"],
            "tiles": [
                [int(c), int(r), float(x), float(y), round(float(f), 4)]
                for c, r, x, y, f in zip(self.cols, self.rows, self.x, self.y, self.tissue_fraction, strict=True)
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        write_text(path, json.dumps(self.to_json(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TilePlan:
        data = json.loads(Path(path).read_text())
        if data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{path} is not a wsi-pipeline tile plan ({PLAN_FORMAT}); make it with `tiles`")
        table = np.asarray(data["tiles"], dtype=np.float64).reshape(-1, 5)
        return cls(
            spec=TileSpec.from_json(data["params"]),
            grid=tuple(data["grid"]),
            cols=table[:, 0].astype(np.int32),
            rows=table[:, 1].astype(np.int32),
            x=table[:, 2].copy(),
            y=table[:, 3].copy(),
            tissue_fraction=table[:, 4].astype(np.float32),
            slide=data.get("slide", {}),
            tissue_params=data["params"].get("tissue"),
        )


def tile_spec(slide: Slide, mpp: float, tile_px: int, overlap_px: int, min_tissue: float) -> TileSpec:
    slide_mpp = slide.mpp
    b = slide.bounds
    return TileSpec(
        mpp=float(mpp),
        tile_px=int(tile_px),
        overlap_px=int(overlap_px),
        min_tissue=float(min_tissue),
        slide_mpp=(slide_mpp.x, slide_mpp.y),
        downsample=(mpp / slide_mpp.x, mpp / slide_mpp.y),
        bounds=(b.x, b.y, b.width, b.height),
    )


def _summed_area(mask: np.ndarray) -> np.ndarray:
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    return table


def _area_under(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Integral of the mask over [0,u) x [0,v) in (fractional) mask px: bilinear in a summed-area table is exact
    for a piecewise-constant image."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    u = np.clip(u, 0, w)
    v = np.clip(v, 0, h)
    u0 = np.minimum(np.floor(u).astype(np.int64), w - 1)
    v0 = np.minimum(np.floor(v).astype(np.int64), h - 1)
    fu, fv = u - u0, v - v0
    return (
        table[v0, u0] * (1 - fu) * (1 - fv)
        + table[v0, u0 + 1] * fu * (1 - fv)
        + table[v0 + 1, u0] * (1 - fu) * fv
        + table[v0 + 1, u0 + 1] * fu * fv
    )


def tissue_fractions(tissue: TissueMask, x0: np.ndarray, y0: np.ndarray, width: float, height: float) -> np.ndarray:
    """Fraction of each level-0 box [x0, x0+width) x [y0, y0+height) covered by tissue (outside the mask = 0)."""
    table = _summed_area(tissue.mask)
    sx, sy = tissue.scale
    u0 = (x0 - tissue.origin[0]) / sx
    v0 = (y0 - tissue.origin[1]) / sy
    u1, v1 = u0 + width / sx, v0 + height / sy
    area = (
        _area_under(table, u1, v1)
        - _area_under(table, u0, v1)
        - _area_under(table, u1, v0)
        + _area_under(table, u0, v0)
    )
    return np.clip(area / ((u1 - u0) * (v1 - v0)), 0.0, 1.0).astype(np.float32)


def plan_tiles(
    slide: Slide, tissue: TissueMask, mpp: float, tile_px: int, overlap_px: int = 0, min_tissue: float = 0.0
) -> TilePlan:
    """All grid tiles over the slide's bounds whose tissue fraction is at least `min_tissue`, row by row."""
    if tile_px <= 0:
        raise ConfigError(f"tile_px must be positive, got {tile_px}")
    if not 0 <= overlap_px < tile_px:
        raise ConfigError(f"overlap_px must be in [0, tile_px), got {overlap_px} with tile_px {tile_px}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue must be in [0, 1], got {min_tissue}")
    spec = tile_spec(slide, mpp, tile_px, overlap_px, min_tissue)
    dsx, dsy = spec.downsample
    b = slide.bounds
    stride = tile_px - overlap_px
    width_t, height_t = b.width / dsx, b.height / dsy  # bounds size in target px
    n_cols = max(1, math.ceil((width_t - overlap_px) / stride))
    n_rows = max(1, math.ceil((height_t - overlap_px) / stride))
    col_x = b.x + np.arange(n_cols) * (stride * dsx)
    row_y = b.y + np.arange(n_rows) * (stride * dsy)
    rows, cols = np.divmod(np.arange(n_rows * n_cols, dtype=np.int64), n_cols)
    x, y = col_x[cols], row_y[rows]
    fraction = tissue_fractions(tissue, x, y, tile_px * dsx, tile_px * dsy)
    keep = fraction >= min_tissue if min_tissue > 0 else np.ones(fraction.shape, bool)
    return TilePlan(
        spec=spec,
        grid=(n_cols, n_rows),
        cols=cols[keep].astype(np.int32),
        rows=rows[keep].astype(np.int32),
        x=x[keep],
        y=y[keep],
        tissue_fraction=fraction[keep],
        slide={"path": str(slide.path), "slide_id": slide.slide_id, "dimensions": list(slide.dimensions)},
    )
