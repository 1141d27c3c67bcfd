"""Damaged and synthetic files the conformance suites read."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

import tifffile


def damage_tile(source: Path, target: Path, level: int, index: int) -> tuple[int, int]:
    """Copy a tiled TIFF slide and overwrite the first bytes of one stored tile (its JPEG header): the directories
    stay intact, that tile no longer decodes. Returns the tile's (column, row)."""
    shutil.copy(source, target)
    with tifffile.TiffFile(target) as tif:
        # a series' first page is its keyframe: a TiffPage (tifffile types it TiffPage | TiffFrame | None)
        page = cast(tifffile.TiffPage, tif.series[0].levels[level].pages[0])
        offset = int(page.dataoffsets[index])
        across = -(-page.imagewidth // page.tilewidth)
    with target.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 64)
    return index % across, index // across
