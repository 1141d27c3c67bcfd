"""Overview PNGs: the slide thumbnail with outlines (tissue, tiles, regions) drawn on it."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import shapely
from PIL import Image, ImageDraw

from ..atomic import atomic_path


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

    def boxes(self, x: np.ndarray, y: np.ndarray, w: float, h: float, color: tuple[int, int, int, int]) -> None:
        for x0, y0 in zip(x.tolist(), y.tolist(), strict=True):
            (a, b), (c, d) = self._to_px([(x0, y0), (x0 + w, y0 + h)])
            self.draw.rectangle([a, b, c, d], outline=color)

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path) as tmp:
            self.image.save(tmp, format="PNG")


def save_mask_png(mask: np.ndarray, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
