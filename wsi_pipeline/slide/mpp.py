"""µm/px of a slide: a user override, else the slide's metadata, else the TIFF resolution tags, with the source."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# Plausible µm/px; a TIFF's default 72 dpi (352 µm/px) is a placeholder, not a measurement.
PLAUSIBLE_MPP = (0.02, 50.0)
_UNITS_PER_CM = {"centimeter": 1.0, "inch": 2.54, "millimeter": 0.1, "micrometer": 1e-4}


@dataclass(frozen=True)
class Mpp:
    """Microns per level-0 pixel and where the value came from."""

    x: float
    y: float
    source: str  # "slide metadata" | "TIFF resolution tags" | the option that gave it ("--mpp", "--mpp-file", ...)

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


def plausible(value: float) -> bool:
    return PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def _mpp_from_tiff_tags(props: Mapping[str, str]) -> tuple[float, float] | None:
    unit = props.get("tiff.ResolutionUnit", "").lower()
    try:
        xres, yres = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
    except (KeyError, ValueError):
        return None
    if unit not in _UNITS_PER_CM or xres <= 0 or yres <= 0:
        return None
    microns_per_unit = _UNITS_PER_CM[unit] * 1e4
    x, y = microns_per_unit / xres, microns_per_unit / yres
    return (x, y) if plausible(x) and plausible(y) else None


def mpp_from_properties(props: Mapping[str, str]) -> Mpp | None:
    """Slide metadata first, then the TIFF resolution tags; the source says which one the value really is.

    Readers report OpenSlide's property names (`openslide.mpp-x`, `tiff.XResolution`, ...). OpenSlide itself turns
    resolution tags into `openslide.mpp-x` for generic TIFF and NDPI, so a value equal to the tags' is reported as
    coming from the tags.
    """
    tags = _mpp_from_tiff_tags(props)
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        x = y = math.nan
    if plausible(x) and plausible(y):
        from_tags = (
            tags is not None and math.isclose(tags[0], x, rel_tol=1e-6) and math.isclose(tags[1], y, rel_tol=1e-6)
        )
        return Mpp(x, y, "TIFF resolution tags" if from_tags else "slide metadata")
    if tags is not None:
        return Mpp(tags[0], tags[1], "TIFF resolution tags")
    return None
