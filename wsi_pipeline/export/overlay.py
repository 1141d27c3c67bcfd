"""Overview PNGs: the slide thumbnail with outlines (tissue, tiles, regions) drawn on it."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont

from wsi_pipeline.core.atomic import atomic_path


class Overview:
    """Draws level-0 geometry on a thumbnail whose pixel (0, 0) is level-0 `origin` and whose px is `scale`."""

    def __init__(self, thumbnail: np.ndarray, origin: tuple[float, float], scale: tuple[float, float]) -> None:
        self.image = Image.fromarray(thumbnail).convert("RGB")
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        self.origin = origin
        self.scale = scale

    def _to_px(self, coords: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        ox, oy = self.origin
        sx, sy = self.scale
        return [((x - ox) / sx, (y - oy) / sy) for x, y in coords]

    def outline(self, geometry: shapely.Geometry, color: tuple[int, int, int], width: int = 2) -> None:
        for poly in getattr(geometry, "geoms", [geometry]):
            if poly.is_empty:
                continue
            for ring in [poly.exterior, *poly.interiors]:
                self.draw.line(self._to_px(ring.coords), fill=(*color, 255), width=width)

    def boxes(
        self, x: np.ndarray, y: np.ndarray, w: float, h: float, color: tuple[int, int, int, int], fill: bool = False
    ) -> None:
        for x0, y0 in zip(x.tolist(), y.tolist(), strict=True):
            (a, b), (c, d) = self._to_px([(x0, y0), (x0 + w, y0 + h)])
            if fill:
                self.draw.rectangle([a, b, c, d], fill=color)
            else:
                self.draw.rectangle([a, b, c, d], outline=color)

    def legend(self, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
        """A box in the top-left corner: a colour swatch and a name per entry (Pillow's own font, no system fonts)."""
        if not entries:
            return
        font = ImageFont.load_default()
        line = 14
        width = 24 + max(int(self.draw.textlength(name, font=font)) for name, _ in entries)
        self.draw.rectangle([4, 4, 8 + width, 8 + line * len(entries)], fill=(255, 255, 255, 210))
        for i, (name, colour) in enumerate(entries):
            y = 7 + i * line
            self.draw.rectangle([8, y + 2, 18, y + 11], fill=(*colour, 255))
            self.draw.text((24, y), name, fill=(0, 0, 0, 255), font=font)

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path) as tmp:  # zlib's fastest level: a slide photo shrinks little more at 6, 2x slower
            self.image.save(tmp, format="PNG", compress_level=1)


def save_mask_png(mask: np.ndarray, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")


def sample_on_grid(
    values: np.ndarray,
    origin: tuple[float, float],
    scale: tuple[float, float],
    grid_origin: tuple[float, float],
    grid_scale: tuple[float, float],
    shape: tuple[int, int],
    fill: float = 0.0,
) -> np.ndarray:
    """`values` (pixel edges at level-0 `origin` + index * `scale`) sampled at the centres of a grid of `shape`
    whose pixel (0, 0) starts at `grid_origin`, `grid_scale` level-0 px per pixel (nearest value; `fill` outside)."""
    h, w = shape
    cols = np.floor(((grid_origin[0] + (np.arange(w) + 0.5) * grid_scale[0]) - origin[0]) / scale[0]).astype(np.int64)
    rows = np.floor(((grid_origin[1] + (np.arange(h) + 0.5) * grid_scale[1]) - origin[1]) / scale[1]).astype(np.int64)
    inside_c = (cols >= 0) & (cols < values.shape[1])
    inside_r = (rows >= 0) & (rows < values.shape[0])
    sampled = np.full((h, w), fill, np.float32)
    sampled[np.ix_(inside_r, inside_c)] = values[np.ix_(rows[inside_r], cols[inside_c])]
    return sampled


def heat_overlay(
    overview: Overview,
    values: np.ndarray,
    origin: tuple[float, float],
    scale: tuple[float, float],
    color: tuple[int, int, int],
    alpha: float = 0.5,
    where: np.ndarray | None = None,
) -> None:
    """Blend `color` over the overview in proportion to a heatmap's value (nearest heatmap px per overview px), only
    on the overview px `where` is true (all when None)."""
    base = np.asarray(overview.image, dtype=np.float32)
    sampled = sample_on_grid(values, origin, scale, overview.origin, overview.scale, base.shape[:2])
    if where is not None:
        sampled = np.where(where, sampled, 0.0)
    weight = (np.clip(sampled, 0, 1) * alpha)[..., None]
    blended = base * (1 - weight) + np.asarray(color, np.float32) * weight
    overview.image = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    overview.draw = ImageDraw.Draw(overview.image, "RGBA")


def draw_points(
    overview: Overview, x: np.ndarray, y: np.ndarray, color: tuple[int, int, int], radius: float = 3
) -> None:
    for px, py in overview._to_px(zip(x.tolist(), y.tolist(), strict=True)):
        overview.draw.ellipse([px - radius, py - radius, px + radius, py + radius], outline=(*color, 255), width=2)
