"""Local maxima of large heatmaps, chunk by chunk, equal to a single pass over the whole map.

Each chunk is processed with a halo of 2 x min_distance (dask `overlap`, no padding at the map's true edges) and
keeps only the peaks in its own core, so a peak's whole neighbourhood is always seen and no peak is found twice.
Smoothing, when asked for, uses a halo of 4 sigma (scipy's truncation) and so equals smoothing the whole map.

Equality with `skimage.feature.peak_local_max(smoothed, min_distance, threshold_abs, exclude_border=False)` holds
when no two candidate peaks within min_distance have exactly the same value; between exact ties, which of the two is
kept may differ (both are correct maxima).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max


@dataclass
class Peaks:
    rows: np.ndarray  # int64, heatmap px
    cols: np.ndarray
    values: np.ndarray  # float32, the (smoothed) map at the peak

    def __len__(self) -> int:
        return int(self.rows.size)


def smooth(image: da.Array, sigma: float) -> da.Array:
    """Gaussian smoothing with a halo wide enough to equal scipy's on the whole map (mode 'reflect')."""
    if sigma <= 0:
        return image.astype(np.float32)
    depth = math.ceil(4.0 * sigma) + 1
    return da.map_overlap(
        lambda block: ndimage.gaussian_filter(block, sigma, mode="reflect", truncate=4.0),
        image.astype(np.float32),
        depth=depth,
        boundary="reflect",
        dtype=np.float32,
    )


def _block_peaks(
    block: np.ndarray, offset: tuple[int, int], core: tuple[int, int, int, int], min_distance: int, threshold: float
) -> np.ndarray:
    found = peak_local_max(block, min_distance=min_distance, threshold_abs=threshold, exclude_border=False)
    if not found.size:
        return np.zeros((0, 3), np.float64)
    rows, cols = found[:, 0] + offset[0], found[:, 1] + offset[1]
    r0, r1, c0, c1 = core
    keep = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    values = block[found[keep, 0], found[keep, 1]]
    return np.c_[rows[keep], cols[keep], values]


def find_peaks(
    image: np.ndarray | da.Array, *, min_distance: int, threshold: float, sigma: float = 0.0, chunk: int = 1024
) -> Peaks:
    """Peaks of a 2-D map (numpy or dask, e.g. `da.from_zarr`) above `threshold`, at least `min_distance` px apart,
    ordered by row then column."""
    if min_distance < 1:
        raise ValueError(f"min_distance must be at least 1 px, got {min_distance}")
    arr = image if isinstance(image, da.Array) else da.from_array(np.asarray(image), chunks=chunk)
    arr = smooth(arr, sigma)
    depth = 2 * min_distance
    extended = da.overlap.overlap(arr, depth={0: depth, 1: depth}, boundary="none")
    row_edges = np.cumsum((0, *arr.chunks[0]))
    col_edges = np.cumsum((0, *arr.chunks[1]))
    tasks = []
    blocks = extended.to_delayed()
    for i in range(len(arr.chunks[0])):
        for j in range(len(arr.chunks[1])):
            r0, r1, c0, c1 = row_edges[i], row_edges[i + 1], col_edges[j], col_edges[j + 1]
            offset = (r0 - (depth if i > 0 else 0), c0 - (depth if j > 0 else 0))
            tasks.append(dask.delayed(_block_peaks)(blocks[i, j], offset, (r0, r1, c0, c1), min_distance, threshold))
    found = [t for t in dask.compute(*tasks) if len(t)]
    table = np.concatenate(found) if found else np.zeros((0, 3))
    order = np.lexsort((table[:, 1], table[:, 0]))
    table = table[order]
    return Peaks(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2].astype(np.float32))
