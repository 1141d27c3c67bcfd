"""Raster masks to polygons with holes, in level-0 pixel coordinates."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import Polygon
from skimage import measure


def mask_to_polygons(
    mask: np.ndarray, scale: tuple[float, float], origin: tuple[float, float], simplify_px: float = 0.0
) -> list[Polygon]:
    """Polygons (with holes) of a boolean mask, in the coordinates `origin + (col, row) * scale` of pixel corners.

    Written here because scikit-image traces contours but does not nest holes in their outlines; each connected
    piece is traced on its own so that its outer ring and its holes are known to belong together.
    """
    polygons: list[Polygon] = []
    labels = measure.label(mask, connectivity=2)
    for region in measure.regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        piece = np.pad(labels[r0:r1, c0:c1] == region.label, 1)
        rings = []
        for contour in measure.find_contours(piece.astype(np.float32), 0.5):
            if len(contour) < 4:
                continue
            # contour (row, col) in padded-piece pixel centres -> pixel-corner coordinates of the full mask
            cols = contour[:, 1] - 1 + c0 + 0.5
            rows = contour[:, 0] - 1 + r0 + 0.5
            ring = Polygon(np.c_[origin[0] + cols * scale[0], origin[1] + rows * scale[1]])
            if ring.area > 0:
                rings.append(ring)
        if not rings:
            continue
        rings.sort(key=lambda p: p.area, reverse=True)
        outer, holes = rings[0], rings[1:]
        poly = Polygon(outer.exterior.coords, [h.exterior.coords for h in holes if outer.contains(h.centroid)])
        poly = shapely.make_valid(poly)
        if simplify_px > 0:
            poly = poly.simplify(simplify_px, preserve_topology=True)
        polygons.extend(g for g in getattr(poly, "geoms", [poly]) if isinstance(g, Polygon) and g.area > 0)
    return polygons
