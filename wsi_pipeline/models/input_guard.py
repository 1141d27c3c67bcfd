"""The input guard: does a slide's tissue look like the tissue a model was trained on? A bright-field H&E model
says nothing useful about a fluorescence, IHC or unstained slide, yet it would report figures for it; the guard
tells the user and skips the task for that slide unless `tasks.<task>.force` is set.

Two checks, both cheap (the tissue stage's thumbnail and mask, nothing more is read):
- a dark background (the tissue detector's own finding) is fluorescence or dark-field, never bright-field H&E;
- the optical density of the slide's mean tissue colour, per RGB channel, compared with the model card's
  `input_stats` (the same measure over its training tiles): more than `max_z` standard deviations off in any
  channel is outside. The optical density of a mean colour does not depend on resolution, so the 8 µm/px thumbnail
  is compared with tiles at the model's µm/px.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from wsi_pipeline.models.card import ColourStats
from wsi_pipeline.slide.tissue import TissueMask

# Pixels with less optical density than this in sum are glass, not tissue (both in training tiles and slides).
MIN_TISSUE_OD = 0.15
MIN_TISSUE_SHARE = 0.1  # a training tile with less tissue than this is not measured


def optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log10(np.clip(np.asarray(rgb, np.float64), 1.0, 255.0) / 255.0)


def tissue_colour_od(pixels: np.ndarray) -> np.ndarray | None:
    """Optical density (3,) of the mean colour of the tissue pixels among `pixels` (N, 3) uint8; None without
    enough tissue."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    tissue = pixels[optical_density(pixels).sum(axis=1) > MIN_TISSUE_OD]
    if tissue.shape[0] < max(1, MIN_TISSUE_SHARE * pixels.shape[0]):
        return None
    return optical_density(tissue.mean(axis=0))


def colour_features(od: np.ndarray) -> np.ndarray:
    """(direction r, g, b, length) of an OD vector: which stain, and how much of it."""
    length = float(np.linalg.norm(od))
    return np.array([*(od / max(length, 1e-6)), length])


def training_stats(tiles: Iterable[np.ndarray]) -> ColourStats | None:
    """`ColourStats` of training tiles (H, W, 3 uint8 each); None when no tile has enough tissue."""
    values = [colour_features(od) for tile in tiles if (od := tissue_colour_od(tile)) is not None]
    if not values:
        return None
    table = np.stack(values)
    mean = table.mean(axis=0)
    # floors: a very uniform training set must not refuse every other scanner's shade of H&E
    std = np.maximum(table.std(axis=0), [0.03, 0.03, 0.03, 0.05])
    return ColourStats(
        od_direction_mean=tuple(round(float(v), 5) for v in mean[:3]),
        od_direction_std=tuple(round(float(v), 5) for v in std[:3]),
        od_length_mean=round(float(mean[3]), 5),
        od_length_std=round(float(std[3]), 5),
        tiles=len(values),
    )


def slide_colour(tissue: TissueMask) -> list[float] | None:
    od = tissue_colour_od(tissue.thumbnail[tissue.mask]) if tissue.mask.any() else None
    return None if od is None else [round(float(v), 4) for v in od]


def distance(od: list[float] | np.ndarray, stats: ColourStats) -> float:
    """How many standard deviations the colour lies from the training tissue (the largest over the features)."""
    mean = np.array([*stats.od_direction_mean, stats.od_length_mean])
    std = np.array([*stats.od_direction_std, stats.od_length_std])
    return float((np.abs(colour_features(np.asarray(od, np.float64)) - mean) / std).max())


def outside_reason(tissue: TissueMask, stats: ColourStats | None) -> str | None:
    """Why a model trained on bright-field H&E with `stats` should not be trusted on this slide, or None."""
    if tissue.background == "dark":
        return "the slide's background is dark (fluorescence or dark-field), not bright-field H&E"
    if stats is None:
        return None
    od = slide_colour(tissue)
    if od is None:
        return None
    z = distance(od, stats)
    if z <= stats.max_z:
        return None
    return (
        f"its tissue colour (optical density R/G/B {od[0]:.2f}/{od[1]:.2f}/{od[2]:.2f}) lies {z:.1f} standard "
        "deviations from the model's training tissue: IHC, unstained or very differently stained"
    )
