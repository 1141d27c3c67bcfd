"""Region post-processing: areas, holes, longest diameters and lesion classes on known shapes."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.postprocess.regions import heatmap_regions, lesion_category, longest_diameter_um


def test_rectangle_with_hole_and_a_small_speck() -> None:
    values = np.zeros((100, 120), np.float32)
    values[10:60, 20:100] = 0.9  # 50 x 80 heatmap px
    values[30:40, 50:60] = 0.1  # a 10 x 10 hole
    values[80, 5] = 0.95  # one-pixel speck
    # each heatmap px is 16 level-0 px; level-0 px are 0.5 µm -> 8 µm per heatmap px
    regions = heatmap_regions(values, 0.5, (100.0, 200.0), (16.0, 16.0), (0.5, 0.5), min_area_um2=1000)
    assert len(regions) == 1
    region = regions[0]
    assert len(region.polygon.interiors) == 1
    # contours cut each corner by half a pixel: (4000 - 100) px minus ~ corner cuts, x 64 µm² per px
    assert region.area_um2 == pytest.approx((50 * 80 - 100) * 64, rel=0.01)
    # the diagonal of 80 x 50 px (each 8 µm), less the cut corners
    assert region.longest_diameter_um == pytest.approx(np.hypot(79 * 8, 49 * 8) + 8 * np.sqrt(2) / 2, rel=0.01)
    assert region.max_probability == pytest.approx(0.9)
    assert region.polygon.bounds[0] == pytest.approx(100 + 20 * 16, abs=0.01)  # the left pixel edge of column 20


def test_lesion_categories_and_diameter_units() -> None:
    assert lesion_category(2500) == "macro-metastasis"
    assert lesion_category(2000) == "macro-metastasis"
    assert lesion_category(500) == "micro-metastasis"
    assert lesion_category(150) == "isolated tumour cells"
    from shapely.geometry import box

    assert longest_diameter_um(box(0, 0, 300, 400), (0.5, 0.5)) == pytest.approx(250.0)
