"""Chunked local maxima equal a single-pass skimage.feature.peak_local_max, including peaks on chunk borders."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage
from skimage.feature import peak_local_max

from wsi_pipeline.postprocess.maxima import find_peaks


def _blobs(shape: tuple[int, int], centres: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    heights = rng.uniform(0.3, 1.0, len(centres))
    image[centres[:, 0], centres[:, 1]] = heights
    image = ndimage.gaussian_filter(image, sigma) * (2 * np.pi * sigma**2)
    return image + rng.uniform(0, 1e-3, shape).astype(np.float32)  # no exact ties


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_chunked_peaks_equal_single_pass(sigma: float) -> None:
    rng = np.random.default_rng(1)
    shape, chunk, min_distance = (1500, 1300), 256, 6
    borders = [(r, c) for r in (255, 256, 511, 512, 1023, 1024) for c in range(3, 1297, 97)]  # on chunk edges
    centres = np.array(borders + [tuple(p) for p in rng.integers(0, 1300, (400, 2))])
    centres = np.clip(centres, 0, (shape[0] - 1, shape[1] - 1))
    image = _blobs(shape, centres, 2.0, seed=2)
    peaks = find_peaks(da.from_array(image, chunks=chunk), min_distance=min_distance, threshold=0.1, sigma=sigma)
    reference_map = ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=4.0) if sigma else image
    ref = peak_local_max(reference_map, min_distance=min_distance, threshold_abs=0.1, exclude_border=False)
    ref = ref[np.lexsort((ref[:, 1], ref[:, 0]))]
    assert len(peaks) == len(ref) > 300
    assert np.array_equal(np.c_[peaks.rows, peaks.cols], ref)
    on_borders = np.isin(peaks.rows % chunk, (0, chunk - 1)) | np.isin(peaks.cols % chunk, (0, chunk - 1))
    assert on_borders.sum() >= 20  # the case the halo exists for
    assert np.allclose(peaks.values, reference_map[ref[:, 0], ref[:, 1]])


def test_known_points_and_threshold() -> None:
    image = np.zeros((300, 300), np.float32)
    image[[50, 50, 200], [60, 66, 250]] = [0.9, 0.8, 0.4]
    peaks = find_peaks(image, min_distance=10, threshold=0.5, chunk=64)
    assert list(zip(peaks.rows.tolist(), peaks.cols.tolist(), strict=True)) == [(50, 60)]  # 0.8 too close, 0.4 low
    assert find_peaks(np.zeros((10, 10)), min_distance=2, threshold=0.1).rows.size == 0
