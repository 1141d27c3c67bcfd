"""The OpenSlide backend: every format OpenSlide reads (SVS, NDPI, MRXS, SCN, generic tiled TIFF, DICOM, ...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openslide
from PIL import Image

from wsi_pipeline.core.errors import SlideTruncatedError, SlideUnreadableError
from wsi_pipeline.core.layout import dicom_series_file
from wsi_pipeline.slide.integrity import check_tiff_complete, is_tiff
from wsi_pipeline.slide.reader import register_backend

if TYPE_CHECKING:
    from collections.abc import Mapping


class OpenSlideReader:
    """`SlideReader` over openslide-python; the handle is opened lazily in each process."""

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle: openslide.OpenSlide | None = None
        self._pid: int | None = None
        osr = self._osr  # opens, mapping OpenSlide's errors to ours
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in osr.level_downsamples)
        self.properties: Mapping[str, str] = dict(osr.properties)
        self.associated_images: tuple[str, ...] = tuple(sorted(osr.associated_images.keys()))

    @property
    def _osr(self) -> openslide.OpenSlide:
        if self._handle is None or self._pid != os.getpid():
            try:
                # a DICOM series folder: OpenSlide opens one instance and finds the others beside it
                opened = dicom_series_file(self.path) if self.path.is_dir() else self.path
                self._handle = openslide.OpenSlide(str(opened))
            except openslide.OpenSlideError as exc:  # unsupported format included (a subclass)
                if self.path.is_file() and is_tiff(self.path):
                    check_tiff_complete(self.path)  # a truncated TIFF is reported as such, not as unreadable
                if isinstance(exc, openslide.OpenSlideUnsupportedFormatError):
                    why = "OpenSlide does not recognise this file format; convert it to a pyramidal TIFF (e.g. with "
                    why += "`vips tiffsave --tile --pyramid`) or check that it is a slide"
                else:
                    why = f"OpenSlide cannot read this file ({exc}); re-export or convert the slide to a format "
                    why += "OpenSlide supports (e.g. pyramidal TIFF)"
                raise SlideUnreadableError(f"{self.path}: {why}") from exc
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def read_level(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        # OpenSlide places reads by level-0 px: exact for level 0 and whole downsamples; where a level's downsample
        # is not whole (4.0004 is common), OpenSlide interpolates the sub-pixel remainder itself
        ds = self.level_downsamples[level]
        x0, y0 = (x, y) if ds == 1 else (round(x * ds), round(y * ds))
        try:
            rgba = self._osr.read_region((x0, y0), level, (width, height))
        except openslide.OpenSlideError as exc:  # damaged tile data: exit 5 like the other backends
            raise SlideTruncatedError(
                f"{self.path}: reading level {level} at ({x}, {y}) (level px) failed ({exc}); the file is damaged — "
                "copy it again from its source"
            ) from exc
        return np.asarray(_on_white(rgba))

    def read_associated(self, name: str) -> np.ndarray:
        return np.asarray(_on_white(self._osr.associated_images[name]))

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None


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


def _versions() -> dict[str, str]:
    return {"openslide": openslide.__library_version__, "openslide_python": openslide.__version__}


register_backend("openslide", OpenSlideReader, priority=0, versions=_versions)
