"""Tissue masks on real slides, real tiles (pen, almost-white) and synthetic slides with known regions."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import Point, shape

from tests.helpers import CMU, NDPI, TCGA
from wsi_pipeline.config import TissueConfig
from wsi_pipeline.core.errors import NoTissueError
from wsi_pipeline.run.stages import tissue_stage
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.polygons import mask_to_polygons
from wsi_pipeline.slide.synth import SynthSpec, write_synthetic_slide
from wsi_pipeline.slide.tissue import detect_tissue, tissue_mask_from_rgb

PARAMS = TissueConfig()


def _iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return a.intersection(b).area / a.union(b).area


def test_real_tiles_pen_and_almost_white_are_not_tissue(data_dir: Path) -> None:
    fractions = {}
    for path in sorted((data_dir / "tissue_tiles").glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        mask, _ = tissue_mask_from_rgb(rgb, 0.5, PARAMS)
        fractions[path.name] = float(mask.mean())
    assert len(fractions) == 10
    for name, fraction in fractions.items():
        if name.startswith("tissue-"):
            assert fraction > 0.9, (name, fraction)
        else:  # no-tissue*, pen marks, almost-white
            assert fraction < 0.05, (name, fraction)


def test_synthetic_slide_mask_matches_truth_and_rejects_pen(synthetic_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = synthetic_slide
    tissue = detect_tissue(Slide(path), PARAMS)
    truth = spec.tissue_geometry()
    found = shapely.union_all(tissue.polygons)
    assert _iou(found, truth) > 0.98
    assert tissue.area_mm2 == pytest.approx(spec.tissue_area_um2() / 1e6, rel=0.01)
    assert len(tissue.polygons) == 3
    assert sum(len(p.interiors) for p in tissue.polygons) == 1  # the hole
    pen = spec.pen[0].geometry()
    assert found.intersection(pen).area < 0.01 * pen.area


@pytest.mark.e2e
def test_huge_slide_mask(huge_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = huge_slide
    tissue = detect_tissue(Slide(path), PARAMS)
    assert tissue.mask.shape == (2500, 3125)
    assert _iou(shapely.union_all(tissue.polygons), spec.tissue_geometry()) > 0.99


def test_real_slides_known_points_and_areas(data_dir: Path) -> None:
    cmu = detect_tissue(Slide(CMU), PARAMS)
    union = shapely.union_all(cmu.polygons)
    assert union.contains(Point(1236, 2225))  # dermis
    assert not union.contains(Point(247, 494)) and not union.contains(Point(2000, 300))  # glass
    # the section covers roughly 40 % of the 2220 x 2967 px (1.64 mm²) image
    assert 0.55 < cmu.area_mm2 < 0.75
    tcga = detect_tissue(Slide(TCGA, mpp=1.0), PARAMS)
    union = shapely.union_all(tcga.polygons)
    assert union.contains(Point(2220, 1110))
    assert not union.contains(Point(2850, 1925))  # the lumen is a hole
    assert not union.contains(Point(200, 200))
    assert any(len(p.interiors) >= 1 for p in tcga.polygons)
    assert 8.0 < tcga.area_mm2 < 11.0  # of 15.8 mm² imaged at the assumed 1 µm/px


def test_fluorescence_slide_uses_dark_background(data_dir: Path) -> None:
    tissue = detect_tissue(Slide(NDPI), PARAMS)
    assert tissue.background == "dark"
    assert 0 < tissue.mask.mean() < 0.9


def test_mask_to_polygons_nests_holes() -> None:
    mask = np.zeros((40, 50), bool)
    mask[5:35, 5:45] = True
    mask[15:25, 20:30] = False
    mask[1:3, 47:49] = True
    polys = sorted(mask_to_polygons(mask, (2.0, 2.0), (100.0, 10.0)), key=lambda p: p.area, reverse=True)
    assert len(polys) == 2
    big = polys[0]
    assert len(big.interiors) == 1
    # contours cut pixel corners by half a pixel diagonally: area within 1 % of the pixel count
    assert big.area == pytest.approx((30 * 40 - 100) * 4, rel=0.01)
    assert big.bounds == pytest.approx((110.0, 20.0, 190.0, 80.0), abs=1.01)


def test_tissue_stage_outputs_follow_the_qupath_spec(synthetic_slide: tuple[Path, SynthSpec], tmp_path: Path) -> None:
    path, spec = synthetic_slide
    result = tissue_stage(Slide(path), PARAMS, tmp_path / "out")
    collection = json.loads(result.files["geojson"].read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 3
    for feat in collection["features"]:
        uuid.UUID(feat["id"])
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == "Tissue" and len(props["classification"]["color"]) == 3
        geom = shape(feat["geometry"])
        assert geom.is_valid and geom.geom_type == "Polygon"
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0 and maxx <= spec.width and maxy <= spec.height
    mask = np.asarray(Image.open(result.files["mask"]))
    assert mask.shape == result.tissue.mask.shape and set(np.unique(mask)) == {0, 255}
    assert Image.open(result.files["overview"]).size == (mask.shape[1], mask.shape[0])
    summary = json.loads(result.files["summary"].read_text())
    assert summary["area_mm2"] == pytest.approx(spec.tissue_area_um2() / 1e6, rel=0.01)
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary files left behind


def test_empty_slide_is_no_tissue(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "empty.svs", SynthSpec(3000, 2000, 0.5))
    with pytest.raises(NoTissueError, match="no tissue") as err:
        tissue_stage(Slide(path), PARAMS, tmp_path / "out")
    assert err.value.exit_code == 8
