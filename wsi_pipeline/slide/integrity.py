"""Integrity checks that tell a damaged file at open time instead of hours into a run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wsi_pipeline.core.errors import SlideTruncatedError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(path: Path) -> bool:
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
