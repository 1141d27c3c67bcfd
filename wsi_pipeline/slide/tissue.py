"""Tissue masks and polygons from a low-resolution thumbnail (~8 µm/px).

Brightfield (H&E): tissue is saturated, glass is not, so the mask is an Otsu threshold on HSV saturation, clamped so
that an all-tissue or all-glass thumbnail still splits sensibly. Ink is rejected by colour: H&E never has green
above red (green/blue/cyan pens), its pinks sit at hue 280-335° while red ink sits at 340-20°, and nothing in tissue
is near black. Dark-field (fluorescence): tissue is brighter than the background, Otsu on grey value.
Morphology parameters are in µm / µm² and converted with the mask's µm/px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import Polygon
from skimage import filters, measure, morphology

from wsi_pipeline.core.errors import NoTissueError
from wsi_pipeline.core.memory import release_free_memory
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.polygons import mask_to_polygons
from wsi_pipeline.slide.tissue_config import TissueConfig

_STRIP_ROWS = 256


@dataclass
class TissueMask:
    """A tissue mask at `mpp` µm/px covering the slide's bounds, and the geometry to map it to level 0."""

    mask: np.ndarray  # bool (rows, cols)
    mpp: float
    origin: tuple[int, int]  # level-0 px of the mask's top-left corner (the slide's bounds corner)
    scale: tuple[float, float]  # level-0 px per mask px (x, y)
    thumbnail: np.ndarray  # RGB uint8, same shape as mask
    background: str = "light"
    polygons: list[Polygon] = field(default_factory=list)  # level-0 px (OpenSlide coordinates)
    slide_mpp: tuple[float, float] = (1.0, 1.0)

    @property
    def geometry(self) -> shapely.Geometry:
        """All tissue polygons as one (possibly empty) geometry."""
        return shapely.union_all(self.polygons) if self.polygons else shapely.Polygon()

    @property
    def area_mm2(self) -> float:
        """Area of the tissue polygons (what QuPath measures), in mm²."""
        px_area = self.slide_mpp[0] * self.slide_mpp[1]
        return float(sum(p.area for p in self.polygons)) * px_area / 1e6

    @property
    def mask_area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.scale[0] * self.slide_mpp[0]) * (self.scale[1] * self.slide_mpp[1]) / 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "mask_mpp": self.mpp,
            "mask_shape": list(self.mask.shape),
            "background": self.background,
            "regions": len(self.polygons),
            "area_mm2": round(self.area_mm2, 6),
            "mask_area_mm2": round(self.mask_area_mm2, 6),
        }


@dataclass
class ColourFeatures:
    """HSV hue (degrees), saturation and value (max channel) in float32, plus red and green.

    Computed here rather than with skimage.color.rgb2hsv, which works in float64 and, on a 100k-px-wide slide's
    thumbnail, costs six times the memory and time for the same numbers.
    """

    hue: np.ndarray
    sat: np.ndarray
    value: np.ndarray
    red: np.ndarray
    green: np.ndarray

    @classmethod
    def of(cls, rgb: np.ndarray) -> ColourFeatures:
        r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
        value = np.maximum(np.maximum(r, g), b)
        delta = value - np.minimum(np.minimum(r, g), b)
        sat = np.divide(delta, value, out=np.zeros_like(value), where=value > 0)
        safe = np.where(delta > 0, delta, 1.0)
        hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
        hue = np.where(delta > 0, (hue * 60.0) % 360.0, 0.0).astype(np.float32)
        return cls(hue, sat, value, r, g)


def ink_colour(features: ColourFeatures) -> np.ndarray:
    """Pen ink by colour (bool): green/blue pen, red ink (the rules in the module docstring)."""
    f = features
    green_blue = (f.green > f.red + 10) & (f.sat > 0.15)
    red = ((f.hue >= 340) | (f.hue < 20)) & (f.sat > 0.2)
    return green_blue | red


def ink_pixels(features: ColourFeatures, params: TissueConfig) -> np.ndarray:
    """Pen ink and black artefacts (bool), by the colour rules in the module docstring."""
    return ink_colour(features) | (features.value < params.dark_value)


def detect_background(rgb: np.ndarray) -> str:
    """'dark' when the slide's border (mostly glass) is dark, as in fluorescence; else 'light'."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).max(axis=-1)
    return "dark" if float(np.median(border)) < 100 else "light"


def candidate_pixels(feature: np.ndarray, mpp: float, params: TissueConfig, background: str) -> np.ndarray:
    """Pixels that look like tissue before morphology and ink rejection (`feature` from `colour_maps`).

    The feature is smoothed over `smooth_um` first, so JPEG noise on glass at full resolution reads as glass,
    as it does at thumbnail scale: the rule gives the same answer at any µm/px.
    """
    # scipy in float32 rather than skimage.filters.gaussian, which works on a float64 copy (twice the memory)
    smooth = ndimage.gaussian_filter(feature, params.smooth_um / mpp, mode="nearest", truncate=4.0, output=np.float32)
    if background == "dark":
        threshold = filters.threshold_otsu(smooth) if np.ptp(smooth) > 0 else np.inf
        return smooth > max(threshold, 20.0)
    threshold = filters.threshold_otsu(smooth) if np.ptp(smooth) > 0 else params.saturation_max
    threshold = float(np.clip(threshold, params.saturation_min, params.saturation_max))
    return smooth >= threshold


# Binary morphology with disks through Euclidean distance transforms (scipy.ndimage): exact for a disk of any
# radius and independent of it, where skimage's flat footprints cost O(r²) per pixel (minutes for 40 µm at
# 0.5 µm/px). The transform runs strip by strip (each strip sees `radius` rows beyond its edges, all that a
# distance <= radius depends on): scipy's transform needs ~32 bytes a pixel of temporaries.
def _near(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within `radius` px (Euclidean) of a True pixel of `mask`; pixels beyond the array count as False."""
    reach = math.ceil(radius) + 1
    out = np.zeros_like(mask)
    height = mask.shape[0]
    for y0 in range(0, height, _STRIP_ROWS):
        y1 = min(height, y0 + _STRIP_ROWS)
        top, bottom = max(0, y0 - reach), min(height, y1 + reach)
        window = mask[top:bottom]
        if window.any():
            out[y0:y1] = (ndimage.distance_transform_edt(~window) <= radius)[y0 - top : y1 - top]
    return out


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    if radius < 1 or not mask.any():
        return mask.copy()
    return _near(mask, radius)


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilate then erode by a disk; padded so that tissue touching the border is not eroded by the edge."""
    if radius < 1 or not mask.any():
        return mask.copy()
    pad = math.ceil(radius) + 1
    grown = _dilate(np.pad(mask, pad), radius)
    return ~_near(~grown, radius)[pad:-pad, pad:-pad]


def clean_mask(candidate: np.ndarray, ink: np.ndarray | None, mpp: float, params: TissueConfig) -> np.ndarray:
    """Morphology in µm: close gaps, drop ink-dominated pieces, fill small holes, drop small pieces."""
    px_area = mpp * mpp
    mask = _close(candidate, params.closing_um / mpp)
    if ink is not None and ink.any():
        ink = morphology.remove_small_objects(ink, max_size=int(params.pen_min_area_um2 / px_area))
        ink_zone = _dilate(ink, params.pen_margin_um / mpp)
        labels = measure.label(mask, connectivity=2)
        if labels.max():
            ink_share = np.bincount(labels.ravel(), weights=ink.ravel(), minlength=labels.max() + 1)
            sizes = np.bincount(labels.ravel(), minlength=labels.max() + 1)
            inky = ink_share / np.maximum(sizes, 1) > params.pen_max_fraction
            inky[0] = False
            mask &= ~inky[labels]
        mask &= ~ink_zone
    mask = morphology.remove_small_holes(mask, max_size=int(params.max_hole_um2 / px_area))
    mask = morphology.remove_small_objects(mask, max_size=int(params.min_region_um2 / px_area), connectivity=2)
    return mask


def colour_maps(rgb: np.ndarray, background: str, params: TissueConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """The per-pixel tissue feature (saturation on a light background, value on a dark one; float32) and, on a light
    background with the pen filter on, the ink mask. Computed in strips of rows so that the colour features'
    temporaries (~50 bytes a pixel) stay one strip's worth: a 100k-px-wide slide's thumbnail is 8 Mpx."""
    feature = np.empty(rgb.shape[:2], dtype=np.float32)
    ink = np.zeros(rgb.shape[:2], dtype=bool) if params.pen_filter and background == "light" else None
    for y0 in range(0, rgb.shape[0], _STRIP_ROWS):
        strip = slice(y0, y0 + _STRIP_ROWS)
        features = ColourFeatures.of(rgb[strip])
        feature[strip] = features.value if background == "dark" else features.sat
        if ink is not None:
            ink[strip] = ink_pixels(features, params)
    return feature, ink


def tissue_mask_from_rgb(rgb: np.ndarray, mpp: float, params: TissueConfig) -> tuple[np.ndarray, str]:
    """The cleaned tissue mask of an RGB image at `mpp` µm/px, and the background kind used."""
    background = detect_background(rgb) if params.background == "auto" else params.background
    feature, ink = colour_maps(rgb, background, params)
    candidate = candidate_pixels(feature, mpp, params, background)
    del feature
    return clean_mask(candidate, ink, mpp, params), background


def detect_tissue(slide: Slide, params: TissueConfig) -> TissueMask:
    """Read a thumbnail at `params.mask_mpp`, build the mask and its level-0 polygons."""
    thumbnail = slide.thumbnail(params.mask_mpp)
    b = slide.bounds
    scale = (b.width / thumbnail.shape[1], b.height / thumbnail.shape[0])
    slide_mpp = slide.mpp
    mask_mpp = math.sqrt(scale[0] * slide_mpp.x * scale[1] * slide_mpp.y)
    mask, background = tissue_mask_from_rgb(thumbnail, mask_mpp, params)
    simplify_px = params.simplify_um / slide_mpp.mean
    polygons = mask_to_polygons(mask, scale, (b.x, b.y), simplify_px)
    release_free_memory()  # the feature maps and distance transforms of a large thumbnail are gone: hand them back
    return TissueMask(mask, mask_mpp, (b.x, b.y), scale, thumbnail, background, polygons, (slide_mpp.x, slide_mpp.y))


def require_tissue(tissue: TissueMask, slide: Slide) -> None:
    if not tissue.mask.any():
        raise NoTissueError(
            f"{slide.path}: no tissue found at {tissue.mpp:.1f} µm/px; check the slide, or lower "
            "tissue.saturation_min / tissue.min_region_um2 (e.g. --set tissue.min_region_um2=2000)"
        )
