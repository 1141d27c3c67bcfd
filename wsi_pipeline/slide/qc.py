"""Quality control of the tissue a task reads: per-tile artefact classes from the tiles already read.

Classical measures in the spirit of HistoQC, computed on every tile of one read (the run's read closest to
`QC_MPP`), each tile first averaged down to about `QC_MPP` µm/px so one threshold holds at every read scale:

- out_of_focus: texture-normalised focus. The fine detail band (grey OD minus its 1 px Gaussian) over the band below
  it (1 px minus 3 px Gaussians): a blur of σ µm removes the first long before the second, while a pale or a dense
  tile scales both bands alike. Blank-looking tiles (no texture at all) are not judged.
- fold: tissue lying twice over is darker and more saturated than the slide's own tissue: a tile whose mean optical
  density is over `fold_od_ratio` times the slide's median tile *and* whose saturation is over the slide's median.
- bubble_or_edge: the dark grey rims of air bubbles, coverslip and mounting edges: a share of dark *unsaturated*
  pixels, which stained tissue (dark nuclei are blue-purple, saturated) does not have.
- pen: ink by the tissue detector's colour rules (green/blue pen, red ink) over a share of the tile.
- too_dark / too_faint: the tissue's mean optical density above / below absolute limits (overstained, or washed out
  and pale), whatever the rest of the slide looks like.

Why hand-written: HistoQC works on a whole-slide thumbnail in its own process and pipeline, and has no per-tile API;
these few filters on tiles already in memory cost ~1 ms a tile.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from wsi_pipeline.slide.qc_config import QC_CLASSES, QcConfig
from wsi_pipeline.slide.tissue import ColourFeatures, ink_colour

QC_MPP = 1.0  # µm/px the measures are taken at (a tile read finer is averaged down to about this)
__all__ = ["QC_CLASSES", "QcConfig", "classify", "pool_factor", "tile_features"]
FEATURES = ("tissue", "focus", "od", "saturation", "grey_dark", "ink", "texture")


def pool_factor(mpp: float) -> int:
    """Whole px averaged into one so that `mpp` comes to about QC_MPP µm/px (1 when already that coarse)."""
    return max(1, round(QC_MPP / mpp))


def tile_features(tiles: np.ndarray, mpp: float) -> np.ndarray:
    """(N, len(FEATURES)) float32 from (N, H, W, 3) uint8 tiles read at `mpp` µm/px."""
    n, h, w, _ = tiles.shape
    f = pool_factor(mpp)
    hh, ww = h // f * f, w // f * f
    rgb = tiles[:, :hh, :ww].astype(np.float32)
    if f > 1:
        rgb = rgb.reshape(n, hh // f, f, ww // f, f, 3).mean(axis=(2, 4))
    od = -np.log((rgb + 1.0) / 256.0)
    grey = od.mean(axis=-1)
    value = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    sat = np.divide(value - low, value, out=np.zeros_like(value), where=value > 0)
    tissue = (grey > 0.1) | (sat > 0.1)
    colour = ColourFeatures.of(rgb)
    ink = ink_colour(colour)
    grey_dark = (value < 110) & (sat < 0.25)
    # focus along each axis on its own: a motion blur smears one direction and leaves the other sharp
    ratios = []
    for axis in (1, 2):
        smooth1 = ndimage.gaussian_filter1d(grey, 1.0, axis=axis, mode="reflect")
        fine = grey - smooth1
        coarse = smooth1 - ndimage.gaussian_filter1d(grey, 3.0, axis=axis, mode="reflect")
        ratios.append((fine, coarse))
    out = np.zeros((n, len(FEATURES)), np.float32)
    for i in range(n):
        t = tissue[i]
        share = float(t.mean())
        out[i, 0] = share
        if share == 0.0:
            continue
        out[i, 1] = min(float(fine[i][t].std() / (coarse[i][t].std() + 1e-6)) for fine, coarse in ratios)
        out[i, 2] = float(grey[i][t].mean())
        out[i, 3] = float(sat[i][t].mean())
        out[i, 4] = float(grey_dark[i].mean())
        out[i, 5] = float(ink[i].mean())
        out[i, 6] = float(grey[i][t].std())
    return out


def classify(features: np.ndarray, thresholds: QcConfig, reference: np.ndarray | None = None) -> np.ndarray:
    """(N, len(QC_CLASSES)) bool: which classes each tile falls in. Folds are judged against the slide's own tissue:
    the median over `reference` tiles' features (by default `features` themselves, all of one slide's tiles)."""
    t = thresholds
    tissue, focus, od, sat, grey_dark, ink, texture = (features[:, i] for i in range(len(FEATURES)))
    has = tissue > 0
    flags = np.zeros((len(features), len(QC_CLASSES)), bool)
    ref = features if reference is None else reference
    ref_has = ref[:, 0] > 0
    if not has.any() or not ref_has.any():
        return flags
    median_od, median_sat = float(np.median(ref[ref_has, 2])), float(np.median(ref[ref_has, 3]))
    flags[:, 0] = has & (texture >= t.min_texture) & (focus < t.focus_min)
    flags[:, 1] = has & (od > t.fold_od_ratio * median_od) & (sat > median_sat)
    flags[:, 2] = grey_dark > t.grey_dark_fraction
    flags[:, 3] = ink > t.pen_fraction
    flags[:, 4] = has & (od > t.dark_od)
    flags[:, 5] = has & (od < t.faint_od)
    return flags
