"""Building blocks the tasks share: reading a heatmap level with its placement, regions as QuPath-ready objects."""

from __future__ import annotations

import numpy as np

from wsi_pipeline.export.qupath import object_id
from wsi_pipeline.heatmap import Heatmap
from wsi_pipeline.postprocess.regions import Region, heatmap_regions
from wsi_pipeline.tasks.base import Colour, RegionObject

# Region extraction reads the finest pyramid level no larger than this (px per side): enough for mm-scale regions.
REGION_LEVEL_MAX_PX = 8192


def positive_class(classes: list[str], preferred: tuple[str, ...]) -> str:
    """The class a task reports on: the first preferred name present, else the last class."""
    return next((c for c in preferred if c in classes), classes[-1])


def level_for_regions(heat: Heatmap) -> int:
    for level, arr in enumerate(heat.levels):
        if max(arr.shape[1:]) <= REGION_LEVEL_MAX_PX:
            return level
    return len(heat.levels) - 1


def level_transform(heat: Heatmap, level: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(origin, scale) in level-0 px of a heatmap level's pixel edges."""
    t = heat.attrs["level0_px"]
    factor = 2**level
    return (t["origin"][0], t["origin"][1]), (t["scale"][0] * factor, t["scale"][1] * factor)


def region_level(heat: Heatmap, name: str) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """One channel at the level used for regions and overlays, with its (origin, scale) in level-0 px."""
    level = level_for_regions(heat)
    origin, scale = level_transform(heat, level)
    return heat.channel(name, level), origin, scale


def regions_of(
    values: np.ndarray,
    origin: tuple[float, float],
    scale: tuple[float, float],
    threshold: float,
    mpp: tuple[float, float],
) -> list[Region]:
    return heatmap_regions(values, threshold, origin, scale, mpp, simplify_px=scale[0] / 4)


def region_objects(slide_id: str, cls: str, colour: Colour, regions: list[Region]) -> list[RegionObject]:
    return [
        RegionObject(
            cls,
            colour,
            object_id(slide_id, cls, index),
            region.polygon,
            {
                "Area µm^2": region.area_um2,
                "Max diameter µm": region.longest_diameter_um,
                "Max probability": region.max_probability,
            },
        )
        for index, region in enumerate(regions)
    ]
