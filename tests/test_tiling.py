"""Tile plans: grid geometry, exact tissue fractions, filtering, order, persistence and compatibility."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CMU
from wsi_pipeline.config import TissueConfig
from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.run.stages import tiles_stage
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.synth import SynthSpec, write_synthetic_slide
from wsi_pipeline.slide.tiling import TilePlan, plan_tiles
from wsi_pipeline.slide.tissue import TissueMask, detect_tissue


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> Slide:
    """4096 x 4096 px at 0.5 µm/px; tests give it hand-made tissue masks."""
    return Slide(write_synthetic_slide(tmp_path_factory.mktemp("t") / "blank.svs", SynthSpec(4096, 4096, 0.5)))


def square_mask() -> TissueMask:
    """Tissue exactly on level-0 [1024, 3072) x [1024, 3072): mask px (64..192) at 16 level-0 px each."""
    mask = np.zeros((256, 256), bool)
    mask[64:192, 64:192] = True
    return TissueMask(mask, 8.0, (0, 0), (16.0, 16.0), np.zeros((256, 256, 3), np.uint8), slide_mpp=(0.5, 0.5))


def test_grid_aligned_tiles_have_exact_fractions(blank_slide: Slide) -> None:
    plan = plan_tiles(blank_slide, square_mask(), mpp=0.5, tile_px=256, overlap_px=0, min_tissue=0.0)
    assert plan.grid == (16, 16) and len(plan) == 256
    inside = (plan.x >= 1024) & (plan.x < 3072) & (plan.y >= 1024) & (plan.y < 3072)
    assert inside.sum() == 64
    assert np.all(plan.tissue_fraction[inside] == 1.0) and np.all(plan.tissue_fraction[~inside] == 0.0)
    kept = plan_tiles(blank_slide, square_mask(), mpp=0.5, tile_px=256, min_tissue=0.5)
    assert len(kept) == 64


def test_fractional_overlap_with_tissue(blank_slide: Slide) -> None:
    # 384 px tiles at 0.5 µm/px: tile col 2 spans x [768, 1152): 128 of 384 px are tissue
    plan = plan_tiles(blank_slide, square_mask(), mpp=0.5, tile_px=384, min_tissue=0.0)
    fraction = {(int(c), int(r)): float(f) for c, r, f in zip(plan.cols, plan.rows, plan.tissue_fraction, strict=True)}
    assert fraction[(2, 4)] == pytest.approx(1 / 3, abs=1e-6)  # y [1536, 1920) inside
    assert fraction[(2, 2)] == pytest.approx(1 / 9, abs=1e-6)
    assert fraction[(7, 7)] == pytest.approx((3072 - 2688) / 384 * (3072 - 2688) / 384, abs=1e-6)


def test_overlap_and_downsample_geometry(blank_slide: Slide) -> None:
    plan = plan_tiles(blank_slide, square_mask(), mpp=1.0, tile_px=128, overlap_px=32, min_tissue=0.0)
    # 2048 target px wide, stride 96: ceil((2048 - 32) / 96) = 21 columns
    assert plan.grid == (21, 21)
    assert plan.tile_size_level0 == (256.0, 256.0)
    assert list(plan.x[:4]) == [0, 192, 384, 576]
    last = plan.x.max() + 256
    assert last >= 4096  # the grid covers the slide
    # deterministic row-major order
    order = plan.rows.astype(np.int64) * plan.grid[0] + plan.cols
    assert np.all(np.diff(order) > 0)


def test_bad_tile_parameters(blank_slide: Slide) -> None:
    with pytest.raises(ConfigError, match="overlap_px"):
        plan_tiles(blank_slide, square_mask(), mpp=0.5, tile_px=64, overlap_px=64)
    with pytest.raises(ConfigError, match="min_tissue"):
        plan_tiles(blank_slide, square_mask(), mpp=0.5, tile_px=64, min_tissue=1.5)


def test_real_slide_plan_save_load_and_compatibility(data_dir: Path, tmp_path: Path) -> None:
    slide = Slide(CMU)
    tissue = detect_tissue(slide, TissueConfig())
    plan, files = tiles_stage(
        slide,
        tissue,
        tmp_path,
        "t",
        mpp=0.5,
        tile_px=224,
        overlap_px=0,
        min_tissue=0.5,
        tissue_params=TissueConfig(),
    )
    n_cols = math.ceil(2220 * 0.499 / 0.5 / 224)
    n_rows = math.ceil(2967 * 0.499 / 0.5 / 224)
    assert plan.grid == (n_cols, n_rows) == (10, 14)
    everything = plan_tiles(slide, tissue, 0.5, 224, 0, 0.0)
    assert len(everything) == 140
    assert len(plan) == int((everything.tissue_fraction >= 0.5).sum())
    # tissue area seen by all tiles equals the mask area: tiles do not overlap, except that origins are rounded to
    # whole level-0 px (224 px x 1.002 downsample), which shifts each tile edge by < 0.5 px of 224 (0.2 %)
    tile_area_mm2 = (224 * 0.5) ** 2 / 1e6
    assert everything.tissue_fraction.sum() * tile_area_mm2 == pytest.approx(tissue.mask_area_mm2, rel=2e-3)
    loaded = TilePlan.load(files["json"])
    assert np.array_equal(loaded.x, plan.x) and np.array_equal(loaded.y, plan.y)
    assert np.allclose(loaded.tissue_fraction, plan.tissue_fraction, atol=1e-4)
    loaded.check_compatible({"mpp": 0.5, "tile_px": 224})
    with pytest.raises(ConfigError, match="tile_px=224"):
        loaded.check_compatible({"tile_px": 256})
    tiles_geojson = json.loads(files["geojson"].read_text())
    assert len(tiles_geojson["features"]) == len(plan)
    first = tiles_geojson["features"][0]
    assert first["properties"]["objectType"] == "tile"
    assert first["properties"]["measurements"]["Tissue fraction"] == pytest.approx(
        float(plan.tissue_fraction[0]), abs=1e-6
    )


@pytest.mark.e2e
def test_huge_slide_plan(huge_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = huge_slide
    slide = Slide(path)
    tissue = detect_tissue(slide, TissueConfig())
    started = time.perf_counter()
    plan = plan_tiles(slide, tissue, mpp=0.25, tile_px=256, overlap_px=0, min_tissue=0.5)
    seconds = time.perf_counter() - started
    assert plan.grid == (391, 313)
    tissue_tiles = spec.tissue_area_um2() / (256 * 0.25) ** 2
    assert abs(len(plan) - tissue_tiles) < 0.02 * tissue_tiles
    print(f"plan of {len(plan)} tiles on 100000 x 80000 px in {seconds:.2f} s")
