"""The dense epithelium/stroma option: a small U-Net trained on the classifier's tiles (labelled areas: the whole
tile, or a disc around a labelled nucleus), stitched seamlessly by the engine, scored on tiles like a classifier,
run by the epithelium task with its own tile geometry, its areas clipped to the tissue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from tests.helpers import CMU, held_out_report, run_cli, stitched_and_whole_region
from wsi_pipeline.config import load_config
from wsi_pipeline.heatmap import open_heatmap
from wsi_pipeline.models import ModelCard, load_model, save_model
from wsi_pipeline.models.architectures import build, seeded
from wsi_pipeline.postprocess.regions import Region, clipped_to
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import plan_tiles
from wsi_pipeline.slide.tissue import detect_tissue
from wsi_pipeline.slide.tissue_config import TissueConfig
from wsi_pipeline.tasks.reading import ReadSpec, read_spec
from wsi_pipeline.training.classifier.class_maps import ClassMapTargets, item_scores, label_areas
from wsi_pipeline.training.data.items import TileItem

EPI = ("epithelium_stroma", "kather2016")
CRC = ("epithelium_stroma", "crchistophenotypes")


def unet_card(**changes: object) -> ModelCard:
    fields = {
        "name": "unet",
        "task": "epithelium_stroma",
        "kind": "dense",
        "architecture": "small_unet",
        "architecture_args": {"width": 4},
        "mpp": 0.998,
        "tile_px": 96,
        "output_stride": 4,
        "halo_px": 64,
        "run_tile_px": 256,
        "classes": ["epithelium", "stroma"],
        "activation": "softmax",
    }
    return ModelCard(**{**fields, **changes})


def test_small_unet_depends_on_no_pixel_beyond_its_declared_halo() -> None:
    """Pixels beyond the halo are redrawn: output px 32 (input px 128..131) stays the same; redrawn beyond 32 px it
    changes (this network's dependence ends at about 42 px). A perturbation test: max pooling passes gradients
    through its maxima only, so gradients would understate what an output depends on."""
    model = seeded(build("small_unet", 2, width=4), seed=5).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 256, 256, generator=generator)

    def output_after_redrawing_beyond(margin: int) -> torch.Tensor:
        redrawn = torch.rand(x.shape, generator=generator)
        keep = slice(128 - margin, 132 + margin)
        redrawn[..., keep, keep] = x[..., keep, keep]
        with torch.inference_mode():
            return model(redrawn)[0, :, 32, 32]

    with torch.inference_mode():
        out = model(x)
        assert out.shape[-2:] == (64, 64)
    assert torch.equal(output_after_redrawing_beyond(64), out[0, :, 32, 32])
    assert not torch.equal(output_after_redrawing_beyond(32), out[0, :, 32, 32])


def test_labelled_areas_are_the_whole_tile_or_a_disc_around_the_nucleus() -> None:
    whole = TileItem(Path("a.png"), 0, "g")
    nucleus = TileItem(Path("b.png"), 1, "g", point=(0.25, 0.75))  # input px (24, 72) of a 96 px tile
    areas = label_areas([whole, nucleus], 96, 4, radius_px=8.0)
    assert areas.shape == (2, 24, 24) and areas[0].all()
    # output px (row, col) has its centre at input px (4 row + 2, 4 col + 2): within 8 px of (x 24, y 72)
    rows, cols = np.nonzero(areas[1])
    assert all((4 * c + 2 - 24) ** 2 + (4 * r + 2 - 72) ** 2 <= 64 for r, c in zip(rows, cols, strict=True))
    assert areas[1, 17, 5] and areas[1, 16, 5] and not areas[1, 16, 4] and areas[1].sum() == 12  # 4 x 4 less corners
    maps = np.zeros((2, 2, 24, 24))
    maps[:, 0] = 0.2
    maps[1, 0, 17, 5] = 0.8  # one of the disc's 12 px
    assert item_scores(maps, areas)[:, 0] == pytest.approx([0.2, (11 * 0.2 + 0.8) / 12])


def test_dense_class_maps_stitch_like_one_pass_over_the_whole_region(data_dir: Path, tmp_path: Path) -> None:
    card = unet_card()
    model = load_model(save_model(tmp_path / "unet", seeded(build("small_unet", 2, width=4), seed=3).eval(), card))
    slide = Slide(CMU)
    tissue = detect_tissue(slide, TissueConfig())
    plan = plan_tiles(slide, tissue, 0.998, 256, overlap_px=128, min_tissue=0.0)
    assert plan.grid[0] >= 3 and plan.grid[1] >= 2  # seams inside, in both directions
    stitched, reference = stitched_and_whole_region(
        slide, plan, model, tmp_path / "heatmaps.zarr", workers=1, task="epithelium_stroma", cls="epithelium"
    )
    assert stitched.shape == reference.shape
    assert np.abs(stitched - reference).max() <= 1e-4
    assert reference.std() > 1e-3  # a map that varies, not a constant that would match anyway


def _geometry(spec: ReadSpec) -> tuple[float, int, int]:
    return spec.mpp, spec.tile_px, spec.overlap_px


def test_a_dense_card_sets_its_own_tile_and_an_overlap_of_twice_its_halo() -> None:
    config = load_config(None).task("epithelium_stroma")  # the shipped defaults: overlap 48 for the classifier
    assert _geometry(read_spec("epithelium_stroma", config, unet_card())) == (0.998, 256, 128)
    classifier = unet_card(kind="classifier", architecture="small_cnn", run_tile_px=None, halo_px=0)
    assert _geometry(read_spec("epithelium_stroma", config, classifier)) == (0.998, 96, 48)
    bigger = config.model_copy(update={"tile_px": 512, "overlap_px": 192})
    assert _geometry(read_spec("epithelium_stroma", bigger, unet_card())) == (0.998, 512, 192)
    with pytest.raises(ValueError, match="run_tile_px"):
        unet_card(kind="classifier", architecture="small_cnn")


def test_regions_are_clipped_to_the_tissue() -> None:
    square = shapely.box(0, 0, 100, 100)
    regions = [Region(square, 1e4, 141.4, 0.9), Region(shapely.box(300, 0, 310, 10), 100.0, 14.1, 0.7)]
    tissue = shapely.box(50, 0, 200, 100)  # the right half of the square, none of the second region
    clipped = clipped_to(regions, tissue, (0.5, 0.5))
    assert len(clipped) == 1
    assert clipped[0].area_um2 == pytest.approx(50 * 100 * 0.25)
    assert clipped[0].polygon.equals(shapely.box(50, 0, 100, 100)) and clipped[0].max_probability == 0.9
    assert clipped[0].longest_diameter_um == pytest.approx(np.hypot(50, 100) * 0.5)


@pytest.mark.e2e
def test_train_evaluate_and_run_a_dense_epithelium_model(data_dir: Path, tmp_path: Path) -> None:
    """Kather tiles (whole-tile labels) and CRCHistoPhenotypes nuclei (discs) through `train --kind class_map`; the
    card's validation AUC is what `evaluate --held-out` measures on the same tiles; `run` uses the card's tile
    geometry and reports areas inside the tissue."""
    kather, crc = data_dir.joinpath(*EPI), data_dir.joinpath(*CRC)
    model = tmp_path / "unet"
    classes = ["--class", "epithelium=01_TUMOR,06_MUCOSA,epithelial", "--class", "stroma=02_STROMA,fibroblast"]
    result = run_cli(
        "train", "epithelium_stroma", str(kather), str(crc / "validation"), *classes, "--kind", "class_map",
        "--arch-arg", "width=4", "--tile-px", "96", "--mpp", "0.495", "--epochs", "2", "--select", "last",
        "--val-fraction", "0.3", "--seed", "1", "-o", str(model),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = json.loads((model / "model_card.json").read_text())
    geometry = (card["kind"], card["architecture"], card["output_stride"], card["halo_px"])
    assert geometry == ("dense", "small_unet", 4, 64)
    assert card["run_tile_px"] == ClassMapTargets().run_tile_px and card["training"]["config"]["extra"]["targets"]
    assert card["thresholds"]["epithelium"] == pytest.approx(1 - card["thresholds"]["stroma"], abs=1e-4)
    nucleus_groups = [g for g in card["training"]["val_groups"] if "crchistophenotypes" in g]
    assert nucleus_groups and any(g.startswith("CRC-Prim") for g in card["training"]["val_groups"])
    report = held_out_report(model, [kather, crc / "validation"], classes, "epithelium", tmp_path / "eval")
    assert report["tiles"] == card["training"]["val_tiles"]
    assert report["roc_auc"]["value"] == pytest.approx(card["metrics"]["validation"]["roc_auc"], abs=1e-4)
    assert report["roc_auc"]["value"] > 0.6  # two epochs of a tiny network already learn something

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / CMU.name).symlink_to(CMU)
    out = tmp_path / "out"
    result = run_cli(
        "run", str(slides), "-o", str(out), "--tasks", "epithelium_stroma",
        "--set", f"tasks.epithelium_stroma.model={model}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / CMU.stem / "summary.json").read_text())["epithelium_stroma"]
    areas = summary["epithelium_area_mm2"] + summary["stroma_area_mm2"]
    tissue = json.loads((out / CMU.stem / "summary.json").read_text())["tissue_area_mm2"]
    assert summary["epithelium_area_mm2"] > 0 and areas <= tissue * 1.0001
    assert summary["threshold"]["epithelium"] == card["thresholds"]["epithelium"]
    heat = open_heatmap(out / CMU.stem / "heatmaps.zarr" / "epithelium")
    assert (heat.attrs["plan"]["tile_px"], heat.attrs["plan"]["overlap_px"]) == (512, 128)  # the card's geometry
    assert heat.attrs["mpp"][0] == pytest.approx(0.495 * 4)  # one value per 4 px at the model's µm/px
