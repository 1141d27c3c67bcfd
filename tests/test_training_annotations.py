"""Training tiles from QuPath GeoJSON annotations on a real slide (CMU-1-Small-Region)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli
from wsi_pipeline.slide import Slide
from wsi_pipeline.training.data.annotations import annotated_items
from wsi_pipeline.training.data.items import DataError, load_tile

Box = tuple[int, int, int, int]


def _qupath_export(path: Path, regions: dict[str, Box | list[Box]]) -> None:
    """What QuPath's Export objects as GeoJSON writes for rectangle annotations (plus an unclassified one)."""
    boxes = [(name, box) for name, given in regions.items() for box in (given if isinstance(given, list) else [given])]
    features = [
        {
            "type": "Feature",
            "id": f"id-{i}",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]],
            },
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}},
        }
        for i, (name, (x, y, w, h)) in enumerate(boxes)
    ]
    features.append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 0]]]},
            "properties": {"objectType": "annotation"},
        }
    )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


@pytest.fixture
def annotated(data_dir: Path, tmp_path: Path) -> Path:
    """Two names for the real slide (links, not copies), each with its own QuPath export."""
    folder = tmp_path / "annotated"
    folder.mkdir()
    cmu = data_dir / "slides" / "CMU-1-Small-Region.svs"
    regions = {
        "a": {"Epithelium": (100, 200, 1000, 600), "Stroma": (300, 1500, 640, 640)},
        "b": {"Epithelium": (1200, 300, 640, 640), "Stroma": (200, 2000, 512, 700)},
    }
    for name, boxes in regions.items():
        (folder / f"{name}.svs").symlink_to(cmu)
        _qupath_export(folder / f"{name}.geojson", boxes)
    return folder


def test_tiles_fill_each_annotation_on_a_grid_and_read_the_slide(annotated: Path) -> None:
    items, classes = annotated_items(annotated, None, mpp=0.499, tile_px=64, min_coverage=1.0)
    assert classes == ["Epithelium", "Stroma"]
    a_epi = sorted((i.region.x, i.region.y) for i in items if i.path.name == "a.svs" and i.label == 0)
    # 1000 x 600 px from (100, 200) holds 15 x 9 whole 64 px tiles (the slide's own µm/px: 1 px = 1 px)
    assert len(a_epi) == 15 * 9
    assert a_epi[0] == (100, 200) and a_epi[-1] == (100 + 14 * 64, 200 + 8 * 64)
    b_stroma = [i for i in items if i.path.name == "b.svs" and i.label == 1]
    assert len(b_stroma) == 8 * 10
    assert {i.group for i in items} == {"slide:a.svs", "slide:b.svs"}
    tile = load_tile(items[0], 64)
    with Slide(items[0].path) as slide:
        expected = slide.read_region(items[0].region.x, items[0].region.y, 64, 64, 0.499)
    assert np.array_equal(tile, expected)
    # at 1 µm/px a tile covers 128 level-0 px: a 640 px square holds 5 x 5
    coarse, _ = annotated_items(annotated, {"stroma": ["Stroma"], "epi": ["Epithelium"]}, mpp=0.998, tile_px=64)
    assert sum(1 for i in coarse if i.path.name == "a.svs" and i.label == 0) == 25


def test_each_separate_annotation_gets_a_grid_of_its_own(data_dir: Path, tmp_path: Path) -> None:
    """Two small epithelium boxes 37 px off each other's grid: each holds 2 x 2 whole tiles of 64 px, which a grid
    anchored at the class's overall bounds would cut (the second box would keep one of its four)."""
    (tmp_path / "s.svs").symlink_to(data_dir / "slides" / "CMU-1-Small-Region.svs")
    boxes: dict[str, Box | list[Box]] = {
        "Epithelium": [(100, 200, 128, 128), (437, 637, 128, 128)],
        "Stroma": (300, 1500, 256, 128),
    }
    _qupath_export(tmp_path / "s.geojson", boxes)
    items, _ = annotated_items(tmp_path, None, mpp=0.499, tile_px=64, min_coverage=1.0)
    epithelium = sorted((i.region.x, i.region.y) for i in items if i.label == 0)
    corners = [(x0 + dx, y0 + dy) for x0, y0 in ((100, 200), (437, 637)) for dx in (0, 64) for dy in (0, 64)]
    assert epithelium == sorted(corners)
    assert sum(1 for i in items if i.label == 1) == 4 * 2


def test_annotation_errors_name_the_problem(annotated: Path) -> None:
    with pytest.raises(DataError, match=r"no annotation is classified \['Tumor'\]"):
        annotated_items(annotated, {"tumour": ["Tumor"], "stroma": ["Stroma"]}, mpp=0.5, tile_px=64)
    with pytest.raises(DataError, match="no tile of"):
        annotated_items(annotated, None, mpp=0.5, tile_px=1024)
    (annotated / "a.geojson").write_text("{not json")
    with pytest.raises(DataError, match="cannot be read as GeoJSON"):
        annotated_items(annotated, None, mpp=0.5, tile_px=64)


@pytest.mark.e2e
def test_train_command_on_annotated_slides(annotated: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_cli(
        "train",
        "epithelium_stroma",
        str(annotated),
        "-o",
        str(out),
        "--class",
        "epithelium=Epithelium",
        "--class",
        "stroma=Stroma",
        "--tile-px",
        "64",
        "--mpp",
        "0.998",
        "--epochs",
        "1",
        "--arch-arg",
        "width=4",
        "--val-fraction",
        "0.5",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert card["classes"] == ["epithelium", "stroma"] and card["tile_px"] == 64 and card["mpp"] == 0.998
    assert sorted(card["training"]["train_groups"] + card["training"]["val_groups"]) == ["slide:a.svs", "slide:b.svs"]
    assert card["architecture_args"] == {"width": 4}
