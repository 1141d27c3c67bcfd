"""Regions at a target µm/px from a reader's pyramid: pick the level, read it in row blocks, resample.

Knows nothing of any slide library: it only calls `SlideReader.read_level`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import sparse

from wsi_pipeline.slide.reader import SlideReader

# A level may be this much coarser than asked and still be used (TCGA level downsamples are 2.0005, not 2).
LEVEL_TOLERANCE = 1.01
# Output rows read and resampled at a time, so memory stays bounded for any region size.
ROWS_PER_BLOCK = 512
MAX_BLOCK_LEVEL_PX = 2**25  # level px one block reads at most (32 M px: 96 MB as RGB, 128 MB as OpenSlide's RGBA)


def best_level(downsamples: tuple[float, ...], downsample: float) -> int:
    """The coarsest level whose resolution is at least as fine as `downsample` (with 1 % slack)."""
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= downsample * LEVEL_TOLERANCE:
            best = level
    return best


# A plan's tiles in one row share their vertical weights and in one column their horizontal ones: cached, a plan of
# R x C tiles builds R + C weight matrices instead of 2 R C (each costs about as much as applying it).
@functools.lru_cache(maxsize=1024)
def _area_weights(first_edge: float, step: float, count: int, size: int) -> sparse.csr_matrix:
    """(count, size) weights of `count` output pixels whose edges are `first_edge + i * step` over `size` input
    pixels: input pixel k weighs the length of [k, k + 1) inside the output pixel over `step` (an exact area mean)."""
    edges = first_edge + np.arange(count + 1) * step
    index = np.floor(edges[:-1]).astype(np.int64)[:, None] + np.arange(math.ceil(step) + 1)[None, :]
    weight = np.clip(edges[1:, None], index, index + 1) - np.clip(edges[:-1, None], index, index + 1)
    keep = (weight > 0) & (index < size)
    rows = np.broadcast_to(np.arange(count)[:, None], index.shape)
    return sparse.csr_matrix(((weight / step)[keep], (rows[keep], index[keep])), shape=(count, size), dtype=np.float32)


# Added before rounding: a value that is exactly k + 0.5 (common at simple fractions) comes out of two reads as
# k + 0.5 +- 1e-7 and would round both ways; the bias sends every such tie up, far above the arithmetic's noise.
_TIE_BIAS = 1e-4


def area_mean(block: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """The exact area mean of `block` (H, W, 3) over the output grid `size` (w, h) that spans `box` (left, top,
    right, bottom in block px), rounded to uint8: two sparse weight matrices, rows then columns.

    Written here rather than PIL's resize(BOX) because PIL counts an input pixel by where its centre falls: at the
    rational factors slides have (1.996, 3.888) centres land exactly on output pixel edges, and two reads of the
    same pixel resolve that tie differently; overlap weights have no such ties, so every read agrees.
    """
    w, h = size
    rows, cols = block.shape[:2]
    vertical = _rows_mean(_area_weights(box[1], (box[3] - box[1]) / h, h, rows), block.reshape(rows, cols * 3))
    by_column = vertical.reshape(h, cols, 3).transpose(0, 2, 1).reshape(h * 3, cols)
    both = (_area_weights(box[0], (box[2] - box[0]) / w, w, cols) @ by_column.T).T
    values = both.reshape(h, 3, w).transpose(0, 2, 1)
    return np.clip(np.floor(values + (0.5 + _TIE_BIAS)), 0, 255).astype(np.uint8)


VALUES_AT_ONCE = 1 << 21  # input values `_rows_mean` converts to float32 at a time


def _rows_mean(weights: sparse.csr_matrix, block: np.ndarray) -> np.ndarray:
    """`weights @ block` in float32, `block` (uint8) converted a band of output rows at a time rather than whole: a
    thumbnail's level-0 block as float32 was most of its read (CMU-1-Small-Region: 0.14 of 0.19 s, its 79 MB paged
    in afresh). Each output row sums the same input rows in the same order as one product would: equal bit for bit."""
    count, size = weights.shape
    inputs_per_row = math.ceil(size / count)  # at most, give or take the rows two outputs share
    band = max(1, VALUES_AT_ONCE // (block.shape[1] * inputs_per_row))
    if band >= count:
        return weights @ block.astype(np.float32)
    out = np.zeros((count, block.shape[1]), np.float32)
    for first in range(0, count, band):
        part = weights[first : first + band]
        if part.nnz:  # rows that weigh no input stay 0, as in the one product
            low, high = int(part.indices.min()), int(part.indices.max()) + 1
            out[first : first + band] = part[:, low:high] @ block[low:high].astype(np.float32)
    return out


def _whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


@dataclass(frozen=True)
class Block:
    """One block of output rows of a region read: the level px to read (`left`, `top`, `n_cols` x `n_rows` of
    `level`) and how they become the output: `mode` copy, reduce (a whole-pixel `factor` mean), area (an exact area
    mean over `box`, in block px) or bicubic (enlarging over `box`)."""

    level: int
    left: int
    top: int
    n_cols: int
    n_rows: int
    mode: str
    factor: tuple[int, int]
    box: tuple[float, float, float, float]
    rows: tuple[int, int]  # output rows row0 .. row1 - 1
    width: int  # output columns of this block
    cols: tuple[int, int] = (0, 0)  # output columns col0 .. col1 - 1 (col1 - col0 == width)


def region_blocks(
    downsamples: tuple[float, ...], x: float, y: float, width: int, height: int, scale: tuple[float, float]
) -> list[Block]:
    """The blocks `read_resampled` reads and resamples for this region (the CPU path and the device path of
    `engine.device_reads` both follow them, so both read the same pixels)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"region size must be positive, got {width}x{height}")
    scale_x, scale_y = scale
    level = best_level(downsamples, min(scale_x, scale_y))
    level_ds = downsamples[level]
    fx, fy = scale_x / level_ds, scale_y / level_ds  # level px per output px
    u0, v0 = x / level_ds, y / level_ds  # the region's corner in level px
    aligned = _whole(u0) and _whole(v0) and _whole(fx) and _whole(fy) and min(round(fx), round(fy)) >= 1
    factor = (round(fx), round(fy))
    mode = ("copy" if factor == (1, 1) else "reduce") if aligned else ("area" if min(fx, fy) >= 1 else "bicubic")
    # PIL normalises a filter over the pixels it has: a margin past the filter's reach (bicubic: 2 px at the larger
    # of 1 and the scale) keeps every output pixel's weights the same as in any other read that covers it
    pad = 0 if aligned else math.ceil(2 * max(fx, fy, 1.0)) + 1
    # blocks of output rows and columns, each reading at most MAX_BLOCK_LEVEL_PX level px: a thumbnail of a slide
    # with only its full-resolution level (one 1e6 px wide level at 32 level px per output px) is read in pieces,
    # never as one 46 GiB array
    rows_per_block = max(1, min(ROWS_PER_BLOCK, int(math.sqrt(MAX_BLOCK_LEVEL_PX) / max(fy, 1.0))))
    cols_per_block = max(1, int(MAX_BLOCK_LEVEL_PX / ((rows_per_block * fy + 2 * pad) * max(fx, 1.0))))
    blocks = []
    for row0 in range(0, height, rows_per_block):
        row1 = min(height, row0 + rows_per_block)
        top = v0 + row0 * fy
        first_row = math.floor(top + 1e-9) - pad
        n_rows = math.ceil(v0 + row1 * fy - 1e-9) + pad - first_row
        for col0 in range(0, width, cols_per_block):
            col1 = min(width, col0 + cols_per_block)
            start = u0 + col0 * fx
            left = math.floor(start + 1e-9) - pad
            n_cols = math.ceil(u0 + col1 * fx - 1e-9) + pad - left
            box = (
                start - left,
                top - first_row,
                start - left + (col1 - col0) * fx,
                top - first_row + (row1 - row0) * fy,
            )
            blocks.append(
                Block(
                    level, left, first_row, n_cols, n_rows, mode, factor, box, (row0, row1), col1 - col0, (col0, col1)
                )
            )
    return blocks


def read_resampled(
    reader: SlideReader, x: float, y: float, width: int, height: int, scale: tuple[float, float]
) -> np.ndarray:
    """RGB uint8 (height, width, 3) whose top-left corner is level-0 point (x, y) (fractional allowed), `scale`
    level-0 px per output px.

    One global affine transform: output pixel (row, col) is the area [x + col sx, x + (col + 1) sx) x [y + row sy,
    ...) of the slide, whichever region it is read in, so overlapping reads agree pixel for pixel and stitched maps
    have no seams at any µm/px. Reads the best level (in whole level px, with a margin wider than the filter) and
    resamples: an exact area mean when shrinking (`area_mean`), PIL's bicubic when enlarging, a plain copy or PIL's
    correctly rounded k x k mean when the region falls on whole level pixels.
    """
    out = np.empty((height, width, 3), dtype=np.uint8)
    for b in region_blocks(reader.level_downsamples, x, y, width, height, scale):
        (row0, row1), (col0, col1) = b.rows, b.cols
        block = reader.read_level(b.left, b.top, b.level, b.n_cols, b.n_rows)
        if b.mode == "copy":
            out[row0:row1, col0:col1] = block[: row1 - row0, : b.width]
        elif b.mode == "reduce":
            # a whole-pixel k x k mean (e.g. 0.5 µm/px from a 0.25 µm/px level): PIL's reduce is correctly rounded
            # and about twice as fast as resize(BOX), whose fixed-point weights can be 1 off
            out[row0:row1, col0:col1] = np.asarray(Image.fromarray(block).reduce(b.factor))[: row1 - row0, : b.width]
        elif b.mode == "area":
            out[row0:row1, col0:col1] = area_mean(block, b.box, (b.width, row1 - row0))
        else:
            picture = Image.fromarray(block).resize((b.width, row1 - row0), Image.Resampling.BICUBIC, box=b.box)
            out[row0:row1, col0:col1] = np.asarray(picture)
    return out
