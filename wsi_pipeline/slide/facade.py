"""`Slide`: the one object the pipeline holds for a slide file, a thin facade over a `SlideReader`.

It adds what every backend shares: the µm/px with its source, bounds, regions at a target µm/px, the integrity
check and the `info` report. Knows nothing of torch; pickles into tile-reading workers with its reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.core.errors import MissingMppError, SlideNotFoundError, SlideTooLargeError
from wsi_pipeline.core.layout import is_dicom_series, slide_files, slide_id_for
from wsi_pipeline.slide.integrity import check_tiff_complete, is_tiff
from wsi_pipeline.slide.mpp import Mpp, mpp_from_properties, plausible
from wsi_pipeline.slide.reader import SlideReader, open_reader
from wsi_pipeline.slide.resample import Block, best_level, read_resampled, region_blocks

# The largest picture of a whole slide read at once (the tissue detector's at 8 µm/px, the overview's): 2^27 px, a
# 92 x 92 mm area at 8 µm/px, 400 MB as RGB; a 75 x 50 mm glass slide is 59 M px there.
MAX_PICTURE_PX = 2**27
GLASS_MM = 80  # the longer side of the largest common glass slide (75 x 50 mm), rounded up


@dataclass(frozen=True)
class Bounds:
    """The non-empty region of a slide in level-0 px (`openslide.bounds-*`); QuPath's origin is its corner."""

    x: int
    y: int
    width: int
    height: int


class Slide:
    """A whole-slide image: geometry, µm/px with its source, and region reads at a target µm/px."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        mpp: float | None = None,
        *,
        check: bool = True,
        backend: str = "auto",
        mpp_source: str = "--mpp",
    ) -> None:
        self.path = Path(path)
        self._mpp_override = mpp
        self._mpp_source = mpp_source  # where an overriding µm/px came from, said beside every figure that uses it
        if not self.path.exists():
            raise SlideNotFoundError(f"{self.path}: no such file; check the path (and that the share is mounted)")
        if not self.path.is_file() and not is_dicom_series(self.path):
            raise SlideNotFoundError(
                f"{self.path} is not a file nor a DICOM series folder; give a slide file (or a folder to `run`)"
            )
        if mpp is not None and not (mpp > 0 and plausible(mpp)):
            raise MissingMppError(f"µm/px {mpp} is not plausible; give the scan's µm/px, e.g. 0.25 for 40x")
        self.reader: SlideReader = open_reader(self.path, backend)
        self.level_dimensions = self.reader.level_dimensions
        self.level_downsamples = self.reader.level_downsamples
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.level_count: int = len(self.level_dimensions)
        self.properties: dict[str, str] = dict(self.reader.properties)
        self.associated_images: tuple[str, ...] = self.reader.associated_images
        if check and self.path.is_file() and is_tiff(self.path):
            check_tiff_complete(self.path)

    def with_mpp(self, mpp: float, source: str = "override") -> Slide:
        """The same slide (same reader, nothing reopened) with its µm/px overridden, `source` saying by what."""
        clone = object.__new__(Slide)
        clone.__dict__.update(self.__dict__)
        if not (mpp > 0 and plausible(mpp)):
            raise MissingMppError(f"µm/px {mpp} is not plausible; give the scan's µm/px, e.g. 0.25 for 40x")
        clone._mpp_override, clone._mpp_source = mpp, source
        return clone

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- geometry --------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.reader.backend

    @property
    def slide_id(self) -> str:
        return slide_id_for(self.path)

    @property
    def vendor(self) -> str | None:
        return self.properties.get("openslide.vendor")

    @property
    def objective_power(self) -> float | None:
        value = self.properties.get("openslide.objective-power")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    @property
    def bounds(self) -> Bounds:
        p = self.properties
        if "openslide.bounds-x" in p:
            return Bounds(
                int(p["openslide.bounds-x"]),
                int(p["openslide.bounds-y"]),
                int(p["openslide.bounds-width"]),
                int(p["openslide.bounds-height"]),
            )
        return Bounds(0, 0, *self.dimensions)

    @property
    def mpp_or_none(self) -> Mpp | None:
        if self._mpp_override is not None:
            return Mpp(self._mpp_override, self._mpp_override, self._mpp_source)
        return mpp_from_properties(self.properties)

    @property
    def mpp(self) -> Mpp:
        found = self.mpp_or_none
        if found is None:
            raise MissingMppError(
                f"{self.path}: the slide records no µm/px (no openslide.mpp-x, no TIFF resolution tags); "
                "give it with --slide-mpp (e.g. --slide-mpp 0.25 for 40x, 0.5 for 20x)"
            )
        return found

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose resolution is at least as fine as `downsample` (with 1 % slack)."""
        return best_level(self.level_downsamples, downsample)

    # --- pixels ----------------------------------------------------------------------------------------------
    def read_region(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `mpp` µm/px whose top-left corner is level-0 point (x, y).

        Position-consistent at any µm/px (see `resample.read_resampled`): a pixel's value does not depend on the
        region it is read in. Transparent and out-of-bounds pixels become white.
        """
        slide_mpp = self.mpp
        return read_resampled(self.reader, x, y, width, height, (mpp / slide_mpp.x, mpp / slide_mpp.y))

    def region_blocks(self, x: float, y: float, width: int, height: int, mpp: float) -> list[Block]:
        """What `read_region` reads from the pyramid and how it resamples it (for readers on another device)."""
        slide_mpp = self.mpp
        return region_blocks(self.level_downsamples, x, y, width, height, (mpp / slide_mpp.x, mpp / slide_mpp.y))

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The bounded region of the slide at `mpp` µm/px (RGB uint8); a slide whose picture at that µm/px would be
        larger than MAX_PICTURE_PX is refused (exit 5), naming its size: no glass slide is that large."""
        b = self.bounds
        slide_mpp = self.mpp
        width = max(1, round(b.width * slide_mpp.x / mpp))
        height = max(1, round(b.height * slide_mpp.y / mpp))
        if width * height > MAX_PICTURE_PX:
            mm = (b.width * slide_mpp.x / 1000, b.height * slide_mpp.y / 1000)
            picture = f"{width} x {height} px at {mpp:g} µm/px, over the {MAX_PICTURE_PX // 10**6} M px limit"
            if max(mm) <= GLASS_MM:  # a real slide asked for at too fine a scale: the caller must read regions
                raise SlideTooLargeError(
                    f"{self.path}: a picture of the whole slide ({mm[0]:.0f} x {mm[1]:.0f} mm) would be {picture}; "
                    "read it in regions"
                )
            raise SlideTooLargeError(
                f"{self.path}: {b.width} x {b.height} px at {slide_mpp.x:g} µm/px is {mm[0]:.0f} x {mm[1]:.0f} mm, "
                f"larger than any glass slide ({picture}); the file's header or its µm/px is wrong: check the slide "
                "(or give its µm/px with --mpp-file / --default-mpp)"
            )
        return self.read_region(b.x, b.y, width, height, mpp)

    def info(self) -> dict[str, Any]:
        """Everything `wsi-pipeline info` reports, JSON-serialisable."""
        mpp = self.mpp_or_none
        b = self.bounds
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": ds}
                for i, ((w, h), ds) in enumerate(zip(self.level_dimensions, self.level_downsamples, strict=True))
            ],
            "mpp": None if mpp is None else {"x": mpp.x, "y": mpp.y, "source": mpp.source},
            "objective_power": self.objective_power,
            "bounds": {"x": b.x, "y": b.y, "width": b.width, "height": b.height},
            "associated_images": list(self.associated_images),
            "file_bytes": sum(p.stat().st_size for p in slide_files(self.path)),
        }
