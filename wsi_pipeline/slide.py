"""Open whole-slide images, resolve their µm/px, and read regions at a target µm/px.

Knows nothing of torch. A `Slide` can be pickled into DataLoader workers: the OpenSlide handle is opened lazily
in each process (an OpenSlide handle must never cross a fork).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image

from .errors import MissingMppError, SlideNotFoundError, SlideTruncatedError, SlideUnreadableError

# Extensions OpenSlide reads (used to discover slides in folders).
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)

# A level may be this much coarser than asked and still be used (TCGA level downsamples are 2.0005, not 2).
_LEVEL_TOLERANCE = 1.01
# Plausible µm/px; a TIFF's default 72 dpi (352 µm/px) is a placeholder, not a measurement.
_PLAUSIBLE_MPP = (0.02, 50.0)
# Output rows read and resampled at a time, so memory stays bounded for any region size.
_ROWS_PER_BLOCK = 512

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_UNITS_PER_CM = {"centimeter": 1.0, "inch": 2.54, "millimeter": 0.1, "micrometer": 1e-4}


@dataclass(frozen=True)
class Mpp:
    """Microns per level-0 pixel and where the value came from."""

    x: float
    y: float
    source: str  # "override" | "slide metadata" | "TIFF resolution tags"

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


@dataclass(frozen=True)
class Bounds:
    """The non-empty region of a slide in level-0 px (`openslide.bounds-*`); QuPath's origin is its corner."""

    x: int
    y: int
    width: int
    height: int


def slide_id_for(path: str | os.PathLike[str]) -> str:
    """A filesystem-safe name for a slide's output folder (the file name without its extension)."""
    stem = Path(path).name
    for ext in SLIDE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")
    return safe or "slide"


def _mpp_from_tiff_tags(props: dict[str, str]) -> tuple[float, float] | None:
    unit = props.get("tiff.ResolutionUnit", "").lower()
    try:
        xres, yres = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
    except (KeyError, ValueError):
        return None
    if unit not in _UNITS_PER_CM or xres <= 0 or yres <= 0:
        return None
    microns_per_unit = _UNITS_PER_CM[unit] * 1e4
    x, y = microns_per_unit / xres, microns_per_unit / yres
    return (x, y) if _plausible(x) and _plausible(y) else None


def _mpp_from_properties(props: dict[str, str]) -> Mpp | None:
    """Slide metadata first, then the TIFF resolution tags; the source says which one the value really is.

    OpenSlide itself turns resolution tags into `openslide.mpp-x` for generic TIFF and NDPI, so a value equal to
    the tags' is reported as coming from the tags.
    """
    tags = _mpp_from_tiff_tags(props)
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        x = y = math.nan
    if _plausible(x) and _plausible(y):
        from_tags = (
            tags is not None and math.isclose(tags[0], x, rel_tol=1e-6) and math.isclose(tags[1], y, rel_tol=1e-6)
        )
        return Mpp(x, y, "TIFF resolution tags" if from_tags else "slide metadata")
    if tags is not None:
        return Mpp(tags[0], tags[1], "TIFF resolution tags")
    return None


def _plausible(value: float) -> bool:
    return _PLAUSIBLE_MPP[0] <= value <= _PLAUSIBLE_MPP[1]


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def check_tiff_complete(path: Path) -> None:
    """Raise SlideTruncatedError when a TIFF-based slide's directories or tile data run past the end of the file.

    OpenSlide either refuses such a file as "unsupported" or, worse, opens it and fails only when a missing tile
    is read hours into a run; the TIFF directories tell at once. tifffile logs (not raises) bad directory offsets,
    so its log records are read too.
    """
    import tifffile

    size = path.stat().st_size
    problems: list[str] = []
    handler = _ListHandler(problems)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            if not pages:
                problems.append("no readable TIFF directory")
            for index, page in enumerate(pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                end = int((offsets + counts).max()) if offsets.size else 0
                if end > size:
                    problems.append(f"image data of TIFF page {index} ends at byte {end} but the file has {size}")
    except Exception as exc:  # tifffile's own errors on a damaged directory
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    if problems:
        raise SlideTruncatedError(
            f"{path} is truncated or damaged ({problems[0]}); copy the slide again from its source "
            "(an interrupted download or transfer leaves such files)"
        )


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "offset" in message or "truncat" in message.lower() or "corrupt" in message.lower():
            self.sink.append(message)


class Slide:
    """A whole-slide image: geometry, µm/px with its source, and region reads at a target µm/px."""

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None, *, check: bool = True) -> None:
        self.path = Path(path)
        self._mpp_override = mpp
        self._handle: openslide.OpenSlide | None = None
        self._pid: int | None = None
        if not self.path.exists():
            raise SlideNotFoundError(f"{self.path}: no such file; check the path (and that the share is mounted)")
        if not self.path.is_file():
            raise SlideNotFoundError(f"{self.path} is not a file; give a slide file (or a folder to `run`)")
        if mpp is not None and not (mpp > 0 and _plausible(mpp)):
            raise MissingMppError(f"--mpp {mpp} is not a plausible µm/px; give the scan's µm/px, e.g. --mpp 0.25")
        osr = self._osr  # opens, mapping OpenSlide's errors to ours
        self.dimensions: tuple[int, int] = osr.dimensions
        self.level_count: int = osr.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in osr.level_downsamples)
        self.properties: dict[str, str] = dict(osr.properties)
        self.associated_images: tuple[str, ...] = tuple(sorted(osr.associated_images.keys()))
        if check and _is_tiff(self.path):
            check_tiff_complete(self.path)

    # --- process-safe handle -------------------------------------------------------------------------------
    @property
    def _osr(self) -> openslide.OpenSlide:
        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = openslide.OpenSlide(str(self.path))
            except openslide.OpenSlideUnsupportedFormatError as exc:
                if _is_tiff(self.path):
                    check_tiff_complete(self.path)
                raise SlideUnreadableError(
                    f"{self.path}: OpenSlide does not recognise this file format; convert it to a pyramidal TIFF "
                    "(e.g. with `vips tiffsave --tile --pyramid`) or check that it is a slide"
                ) from exc
            except openslide.OpenSlideError as exc:
                if _is_tiff(self.path):
                    check_tiff_complete(self.path)
                raise SlideUnreadableError(
                    f"{self.path}: OpenSlide cannot read this file ({exc}); re-export or convert the slide "
                    "to a format OpenSlide supports (e.g. pyramidal TIFF)"
                ) from exc
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- geometry --------------------------------------------------------------------------------------------
    @property
    def slide_id(self) -> str:
        return slide_id_for(self.path)

    @property
    def vendor(self) -> str | None:
        return self.properties.get(openslide.PROPERTY_NAME_VENDOR)

    @property
    def objective_power(self) -> float | None:
        value = self.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
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
            return Mpp(self._mpp_override, self._mpp_override, "override")
        return _mpp_from_properties(self.properties)

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
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * _LEVEL_TOLERANCE:
                best = level
        return best

    # --- pixels ----------------------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `mpp` µm/px whose top-left corner is level-0 pixel (x, y).

        Reads from the best level and resamples (area average when shrinking, bicubic when enlarging);
        transparent and out-of-bounds pixels become white.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        slide_mpp = self.mpp
        scale_x, scale_y = mpp / slide_mpp.x, mpp / slide_mpp.y
        level = self.best_level(min(scale_x, scale_y))
        level_ds = self.level_downsamples[level]
        fx, fy = scale_x / level_ds, scale_y / level_ds  # level px per output px
        out = np.empty((height, width, 3), dtype=np.uint8)
        exact = abs(fx - 1) < 1e-9 and abs(fy - 1) < 1e-9
        factor = (round(fx), round(fy))
        integral = min(factor) >= 1 and abs(fx - factor[0]) < 1e-9 and abs(fy - factor[1]) < 1e-9
        for row0 in range(0, height, _ROWS_PER_BLOCK):
            row1 = min(height, row0 + _ROWS_PER_BLOCK)
            top = row0 * fy
            first_row = math.floor(top + 1e-9)
            n_rows = max(1, math.ceil(row1 * fy - 1e-9) - first_row)
            n_cols = max(1, math.ceil(width * fx - 1e-9))
            origin_y = y + round(first_row * level_ds)
            block = self._read_level(x, origin_y, level, n_cols, n_rows)
            if exact:
                out[row0:row1] = np.asarray(block)[: row1 - row0, :width]
            elif integral:
                # a whole-pixel k x k mean (e.g. 0.5 µm/px from a 0.25 µm/px level): PIL's reduce is correctly rounded
                # and about twice as fast as resize(BOX), whose fixed-point weights can be 1 off
                out[row0:row1] = np.asarray(block.reduce(factor))
            else:
                box = (0.0, top - first_row, width * fx, top - first_row + (row1 - row0) * fy)
                resample = Image.Resampling.BOX if min(fx, fy) >= 1 else Image.Resampling.BICUBIC
                out[row0:row1] = np.asarray(block.resize((width, row1 - row0), resample=resample, box=box))
        return out

    def _read_level(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        try:
            rgba = self._osr.read_region((x, y), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideUnreadableError(
                f"{self.path}: reading level {level} at ({x}, {y}) failed ({exc}); the file is damaged — "
                "copy it again from its source"
            ) from exc
        return _on_white(rgba)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The bounded region of the slide at `mpp` µm/px (RGB uint8)."""
        b = self.bounds
        slide_mpp = self.mpp
        width = max(1, round(b.width * slide_mpp.x / mpp))
        height = max(1, round(b.height * slide_mpp.y / mpp))
        return self.read_region(b.x, b.y, width, height, mpp)

    def info(self) -> dict[str, Any]:
        """Everything `wsi-pipeline info` reports, JSON-serialisable."""
        mpp = self.mpp_or_none
        b = self.bounds
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
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
            "file_bytes": self.path.stat().st_size,
        }


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite OpenSlide's (non-premultiplied) RGBA onto white; returns RGB."""
    if rgba.mode != "RGBA":
        return rgba.convert("RGB")
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba.convert("RGB"), mask=alpha)
    return white
