"""Thresholded heatmap regions as polygons with area and longest diameter in µm."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import Polygon

from wsi_pipeline.slide.polygons import mask_to_polygons


@dataclass
class Region:
    polygon: Polygon  # level-0 px (OpenSlide coordinates)
    area_um2: float
    longest_diameter_um: float
    max_probability: float


def longest_diameter_um(polygon: Polygon, mpp: tuple[float, float]) -> float:
    """Largest distance between two points of the region (always two vertices of its convex hull), in µm."""
    hull = np.asarray(
        polygon.convex_hull.exterior.coords
        if polygon.convex_hull.geom_type == "Polygon"
        else polygon.convex_hull.coords
    ) * np.asarray(mpp)
    if len(hull) < 2:
        return 0.0
    return float(max(np.hypot(*(a - b)) for a, b in combinations(hull, 2)))


def lesion_category(diameter_um: float) -> str:
    """CAMELYON / AJCC size classes of a metastasis by its longest diameter."""
    if diameter_um >= 2000:
        return "macro-metastasis"
    if diameter_um >= 200:
        return "micro-metastasis"
    return "isolated tumour cells"


def heatmap_regions(
    values: np.ndarray,
    threshold: float,
    origin: tuple[float, float],
    scale: tuple[float, float],
    slide_mpp: tuple[float, float],
    *,
    smooth_px: float = 0.0,
    min_area_um2: float = 0.0,
    simplify_px: float = 0.0,
) -> list[Region]:
    """Connected regions of `values >= threshold` (after optional Gaussian smoothing), with holes.

    `origin` and `scale` map heatmap pixel edges to level-0 px: x = origin + col * scale.
    """
    smoothed = ndimage.gaussian_filter(values.astype(np.float32), smooth_px) if smooth_px > 0 else values
    mask = smoothed >= threshold
    regions = []
    for poly in mask_to_polygons(mask, scale, origin, simplify_px):
        area = poly.area * slide_mpp[0] * slide_mpp[1]
        if area < min_area_um2:
            continue
        r0 = max(0, int((poly.bounds[1] - origin[1]) / scale[1]))
        r1 = int(np.ceil((poly.bounds[3] - origin[1]) / scale[1]))
        c0 = max(0, int((poly.bounds[0] - origin[0]) / scale[0]))
        c1 = int(np.ceil((poly.bounds[2] - origin[0]) / scale[0]))
        window = np.where(mask[r0:r1, c0:c1], values[r0:r1, c0:c1], 0)
        regions.append(Region(poly, area, longest_diameter_um(poly, slide_mpp), float(window.max(initial=0))))
    return regions


def clipped_to(regions: list[Region], tissue: shapely.Geometry, slide_mpp: tuple[float, float]) -> list[Region]:
    """The parts of `regions` inside `tissue` (level-0 px): a map that covers whole tiles (a dense map, or tiles at
    the tissue's edge) classifies the glass around the tissue too, and an area of a class must be tissue. Parts are
    kept as one region each; a region wholly outside is dropped."""
    kept = []
    for region in regions:
        inside = region.polygon.intersection(tissue)
        for part in getattr(inside, "geoms", [inside]):
            if isinstance(part, Polygon) and not part.is_empty and part.area > 0:
                area = part.area * slide_mpp[0] * slide_mpp[1]
                kept.append(Region(part, area, longest_diameter_um(part, slide_mpp), region.max_probability))
    return kept
