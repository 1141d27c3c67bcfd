"""Regions at a target µm/px from a reader's pyramid: pick the level, read it in row blocks, resample.

Knows nothing of any slide library: it only calls `SlideReader.read_level`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .reader import SlideReader

# A level may be this much coarser than asked and still be used (TCGA level downsamples are 2.0005, not 2).
LEVEL_TOLERANCE = 1.01
# Output rows read and resampled at a time, so memory stays bounded for any region size.
ROWS_PER_BLOCK = 512


def best_level(downsamples: tuple[float, ...], downsample: float) -> int:
    """The coarsest level whose resolution is at least as fine as `downsample` (with 1 % slack)."""
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= downsample * LEVEL_TOLERANCE:
            best = level
    return best


def read_resampled(
    reader: SlideReader, x: int, y: int, width: int, height: int, scale: tuple[float, float]
) -> np.ndarray:
    """RGB uint8 (height, width, 3) whose top-left is level-0 pixel (x, y), `scale` level-0 px per output px.

    Reads from the best level and resamples (area average when shrinking, bicubic when enlarging).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"region size must be positive, got {width}x{height}")
    scale_x, scale_y = scale
    level = best_level(reader.level_downsamples, min(scale_x, scale_y))
    level_ds = reader.level_downsamples[level]
    fx, fy = scale_x / level_ds, scale_y / level_ds  # level px per output px
    out = np.empty((height, width, 3), dtype=np.uint8)
    exact = abs(fx - 1) < 1e-9 and abs(fy - 1) < 1e-9
    factor = (round(fx), round(fy))
    integral = min(factor) >= 1 and abs(fx - factor[0]) < 1e-9 and abs(fy - factor[1]) < 1e-9
    for row0 in range(0, height, ROWS_PER_BLOCK):
        row1 = min(height, row0 + ROWS_PER_BLOCK)
        top = row0 * fy
        first_row = math.floor(top + 1e-9)
        n_rows = max(1, math.ceil(row1 * fy - 1e-9) - first_row)
        n_cols = max(1, math.ceil(width * fx - 1e-9))
        origin_y = y + round(first_row * level_ds)
        block = reader.read_level(x, origin_y, level, n_cols, n_rows)
        if exact:
            out[row0:row1] = block[: row1 - row0, :width]
        elif integral:
            # a whole-pixel k x k mean (e.g. 0.5 µm/px from a 0.25 µm/px level): PIL's reduce is correctly rounded
            # and about twice as fast as resize(BOX), whose fixed-point weights can be 1 off
            out[row0:row1] = np.asarray(Image.fromarray(block).reduce(factor))
        else:
            box = (0.0, top - first_row, width * fx, top - first_row + (row1 - row0) * fy)
            resample = Image.Resampling.BOX if min(fx, fy) >= 1 else Image.Resampling.BICUBIC
            out[row0:row1] = np.asarray(Image.fromarray(block).resize((width, row1 - row0), resample=resample, box=box))
    return out
