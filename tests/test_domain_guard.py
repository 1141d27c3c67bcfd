"""The domain guard (models/domain.py, training/domain.py, run/domain.py): each model's own features judge whether a
tile is like its training tiles; on tissue it does not know, `run` says "not applicable" instead of a figure."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CMU, DATA, TCGA, run_cli
from wsi_pipeline.models import PredictorOptions, default_model_dir, load_model, make_predictor
from wsi_pipeline.models.domain import DOMAIN_KEY, default_layers
from wsi_pipeline.models.folders import CARD_FILE, ModelError
from wsi_pipeline.training.data.items import DataError
from wsi_pipeline.training.domain import TileSource, calibrate, source_tiles

PCAM_VALID = DATA / "metastasis" / "pcam" / "valid"
AMIBR = DATA / "mitosis" / "amibr_tupac16"
ANNOTATIONS = Path(__file__).parent / "annotations"  # regions drawn from the images (docs/models.md)


def _values(model_dir: Path, tiles: np.ndarray) -> np.ndarray:
    """The domain values `run` writes for these tiles (score / threshold; above 1 out of domain)."""
    predictor = make_predictor(load_model(model_dir), torch.device("cpu"), PredictorOptions(precision="fp32"))
    with torch.inference_mode():
        out = predictor(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous())
    return out[DOMAIN_KEY].numpy()


def test_the_shipped_metastasis_guard_keeps_lymph_node_and_flags_skin_at_run_time(data_dir: Path) -> None:
    """Through the predictor `run` uses (BatchNorm folded): PCam validation tiles (lymph node, the model's domain;
    its threshold sat at their 97.5th percentile) are kept, tiles of normal skin are not."""
    model = default_model_dir("metastasis")
    lymph = source_tiles(TileSource(PCAM_VALID), 0.972, 96, per_image=1, limit=600, seed=3)
    skin = source_tiles(TileSource(CMU), 0.972, 96, per_image=1, limit=600, seed=3)
    lymph_in = float(np.mean(_values(model, lymph) <= 1))
    skin_in = float(np.mean(_values(model, skin) <= 1))
    assert lymph_in >= 0.95, lymph_in  # 0.975 when measured
    assert skin_in <= 0.25, skin_in  # 0.11 when measured (89.0 % of 73 skin tiles flagged)


def test_the_shipped_mitosis_guard_keeps_held_out_breast_crops_and_flags_skin_in_run_tiles(data_dir: Path) -> None:
    """The mitosis model runs on 512 px tiles but was trained on 128 px crops: its guard was fitted on the crops
    mirrored out to 512 px (a zero-padded crop looks to the network like no run tile). Crops of the TUPAC16 slides
    its card holds out for validation, read the same way, pass; tiles of skin at 0.25 µm/px mostly do not."""
    model = default_model_dir("mitosis")
    held = set(load_model(model).card.training["val_groups"])
    crops = source_tiles(TileSource(AMIBR), 0.25, 512, per_image=1, limit=80, seed=3, points=held.__contains__)
    skin = source_tiles(TileSource(CMU), 0.25, 512, per_image=1, limit=30, seed=3)
    assert crops.shape == (80, 512, 512, 3) and len(skin) == 30
    assert float(np.mean(_values(model, crops) <= 1)) >= 0.9  # 0.973 of all 409 validation tiles when fitted
    assert float(np.mean(_values(model, skin) <= 1)) <= 0.5  # 0.333 when fitted (all 30 tiles)


def test_a_point_detectors_guard_is_fitted_on_its_own_crops_split_as_its_card_says(
    tmp_path: Path, data_dir: Path
) -> None:
    """`--card-split`: the crops of the sources the card held out for validation set the threshold, the others are
    fitted (each 128 px crop mirrored out to the 512 px run tile: 25 windows of 96 px); `#GROUPS` narrows a source;
    a classifier has no such split."""
    model_dir = tmp_path / "mitosis"
    shutil.copytree(default_model_dir("mitosis"), model_dir)
    card = json.loads((model_dir / CARD_FILE).read_text())
    card["domain_guard"], card["training"]["val_groups"] = None, ["slide:04_stitched1.tif"]
    (model_dir / CARD_FILE).write_text(json.dumps(card))
    fitted = "#^slide:(04|06)_stitched1"  # 319 + 117 figures listed; the crops of them that AMi-Br holds
    entry = calibrate(load_model(model_dir), [TileSource.parse(f"{AMIBR}{fitted}")], [], card_split=True, max_tiles=60)
    assert entry.validation_tiles == 60 and entry.fit_tiles == 60 * 25  # both sides capped at 60 crops
    assert entry.window_px == 96 and entry.figures["validation"]["flagged"] <= 0.1
    assert load_model(model_dir).guard is not None
    with pytest.raises(DataError, match="--card-split needs a point detector"):
        calibrate(load_model(default_model_dir("metastasis")), [TileSource(PCAM_VALID)], [], card_split=True)


def test_evaluating_the_mitosis_model_reports_the_share_its_guard_flags(tmp_path: Path, data_dir: Path) -> None:
    """`evaluate mitosis` says how much of the evaluated data its guard flags, tiles cut as at calibration: of 60
    crops of the held-out TUPAC16 slides few (2.7 % of all held-out tiles at calibration); a model without a guard
    says None."""
    from wsi_pipeline.training.data.points import amibr_images
    from wsi_pipeline.training.detector.evaluate import DetectionParams, evaluate_detector

    model = load_model(default_model_dir("mitosis"))
    held = set(model.card.training["val_groups"])
    images = [i for i in amibr_images(AMIBR) if i.group in held][:60]
    params = DetectionParams(threshold=model.card.threshold("mitosis"))
    report = evaluate_detector(model, images, tmp_path / "e", torch.device("cpu"), params)
    assert report["domain_flagged_fraction"] is not None and report["domain_flagged_fraction"] <= 0.1, report
    model.guard = None
    assert (
        evaluate_detector(model, images[:5], tmp_path / "n", torch.device("cpu"), params)["domain_flagged_fraction"]
        is None
    )


def test_a_crop_smaller_than_the_tile_is_mirrored_out_to_it() -> None:
    from wsi_pipeline.training.domain import mirrored

    crop = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    tile = mirrored(crop, 10)
    assert tile.shape == (10, 10, 3)
    assert np.array_equal(tile[3:7, 2:8], crop)  # centred
    assert np.array_equal(tile[3 - 1, 2:8], crop[0]) and np.array_equal(tile[7, 2:8], crop[3])


def test_a_source_names_its_groups_after_a_hash() -> None:
    source = TileSource.parse("other=../data/amibr#^slide:\\d+\\.tif")
    assert (source.name, source.path, source.mpp, source.groups) == (
        "other",
        Path("../data/amibr"),
        None,
        "^slide:\\d+\\.tif",
    )
    assert source.accepts("slide:24.tif") and not source.accepts("slide:01_stitched1.tif")
    assert TileSource.parse("skin=a.svs@0.5") == TileSource(Path("a.svs"), 0.5, "skin", None)


def test_default_layers_are_each_blocks_output() -> None:
    model = load_model(default_model_dir("metastasis"))
    assert model.module is not None
    assert default_layers(model.module, 96) == ["2", "6", "10", "14", "18"]  # the ReLU of each of the 5 blocks


@pytest.fixture()
def guarded_copy(tmp_path: Path) -> Path:
    target = tmp_path / "metastasis"
    shutil.copytree(default_model_dir("metastasis"), target)
    return target


def test_a_missing_damaged_or_foreign_guard_file_is_refused_naming_it(guarded_copy: Path, data_dir: Path) -> None:
    guard = guarded_copy / "domain_guard.safetensors"
    data = guard.read_bytes()
    guard.write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match=r"domain_guard.safetensors is not the file its card was written for"):
        load_model(guarded_copy)
    guard.unlink()
    with pytest.raises(ModelError, match=r"domain_guard.safetensors is missing"):
        load_model(guarded_copy)
    guard.write_bytes(data)
    card = json.loads((guarded_copy / CARD_FILE).read_text())
    card["domain_guard"]["architecture"] = "resnet18"
    (guarded_copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"fitted for architecture resnet18, not this model's small_cnn"):
        load_model(guarded_copy)
    result = run_cli("run", str(CMU), "-o", str(guarded_copy.parent / "out"), "--tasks", "metastasis",
                     "--set", f"tasks.metastasis.model={guarded_copy}", "--no-progress")  # fmt: skip
    assert result.returncode == ModelError.exit_code and "domain_guard.safetensors" in result.stderr, result.stderr


def test_a_guard_from_too_few_tiles_is_refused_naming_the_minimum(guarded_copy: Path, data_dir: Path) -> None:
    few = TileSource(PCAM_VALID / "0")
    with pytest.raises(DataError, match=r"at least 200 fitting windows of 96 px and 50 validation tiles"):
        calibrate(load_model(guarded_copy), [few], [few], max_tiles=40)


@pytest.mark.e2e  # the CLI in a subprocess, whole-slide inference
def test_metastasis_on_skin_is_not_applicable_everywhere_the_answer_is_read(tmp_path: Path, data_dir: Path) -> None:
    """CMU-1-Small-Region is normal skin: the lymph-node metastasis model once called it "micro-metastasis" (score
    0.988). Now its answer is withheld in summary.json, the manifest, cohort_summary.csv and report.html; the maps
    and the domain image are written; `force` keeps the figures, flagged."""
    out = tmp_path / "out"
    result = run_cli("run", str(CMU), "-o", str(out), "--tasks", "metastasis", "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    folder = out / CMU.stem
    summary = json.loads((folder / "summary.json").read_text())["metastasis"]
    assert "category" not in summary and "score" not in summary, summary
    assert summary["not_applicable"].startswith("not applicable: tissue unlike this model's training data (lymph node")
    assert summary["domain"]["in_domain_fraction"] < 0.5, summary  # 0.15 when measured
    assert (folder / "heatmaps.zarr" / "domain-metastasis").is_dir() and (folder / "heatmaps.zarr" / "tumour").is_dir()
    line = "metastasis: not applicable"
    assert next(csv.DictReader((out / "manifest.csv").open()))["note"].startswith(line)
    row = next(csv.DictReader((out / "cohort_summary.csv").open()))
    assert row["metastasis_category"] == "" and row["warnings"].startswith(line)
    assert "not applicable" in (out / "report.html").read_text()
    geojson = json.loads((folder / "qupath.geojson").read_text())
    assert not [f for f in geojson["features"] if f["properties"].get("classification", {}).get("name") == "Tumor"]
    forced = tmp_path / "forced"
    again = run_cli("run", str(CMU), "-o", str(forced), "--tasks", "metastasis", "--set",
                    "tasks.metastasis.force=true", "--no-progress")  # fmt: skip
    kept = json.loads((forced / CMU.stem / "summary.json").read_text())["metastasis"]
    assert again.returncode == 0 and "category" in kept and "not_applicable" not in kept, again.stderr
    assert any("kept because tasks.metastasis.force is set" in w for w in kept["warnings"]), kept
    # overview.png, the report's first picture: the withheld map is not painted (only the tissue outline is drawn
    # over the slide, beside the legend)
    painted = [_painted(out / CMU.stem / "overview.png"), _painted(forced / CMU.stem / "overview.png")]
    # forced, painted on the tiles its guard kept only (15 % of the tissue): 53 379 px when measured, 322 954 when
    # the map was painted over all tissue
    assert painted[0] == 0 and 1000 < painted[1] < 150_000, painted


def _painted(overview: Path) -> int:
    """How many px of `overview` differ from the slide's own picture other than by the tissue outline or legend."""
    from PIL import Image

    from wsi_pipeline.run.outputs import TISSUE_COLOR, slide_pictures
    from wsi_pipeline.slide import Slide

    base = slide_pictures(Slide(CMU), overlays=True)[1][0]
    shown = np.asarray(Image.open(overview).convert("RGB"))
    changed = np.any(shown != base, axis=-1) & np.any(shown != np.asarray(TISSUE_COLOR), axis=-1)
    changed[:60, :320] = False  # the legend's box
    return int(changed.sum())


@pytest.mark.e2e  # the CLI in a subprocess
def test_evaluate_reads_a_slide_without_mpp_and_reports_the_guards_share(data_dir: Path, tmp_path: Path) -> None:
    """TCGA-CR-7395 (squamous carcinoma, frozen; no µm/px in the file) with regions drawn from the image
    (tests/annotations/): `--default-mpp` reads it at 1.0 µm/px; the colon model's guard flags nearly all its tiles,
    and `evaluate` says how many (JSON and terminal line)."""
    folder = tmp_path / "tcga"
    folder.mkdir()
    (folder / TCGA.name).symlink_to(TCGA)
    (folder / f"{TCGA.stem}.geojson").symlink_to(ANNOTATIONS / f"{TCGA.stem}.geojson")
    classes = ["--class", "epithelium=Epithelium", "--class", "stroma=Stroma", "--positive", "epithelium"]
    model = str(default_model_dir("epithelium_stroma"))
    without = run_cli("evaluate", "epithelium_stroma", model, str(folder), *classes, "-o", str(tmp_path / "a"))
    assert without.returncode == DataError.exit_code and "µm/px" in without.stderr, without.stderr
    result = run_cli("evaluate", "epithelium_stroma", model, str(folder), *classes, "--default-mpp", "1.0",
                     "-o", str(tmp_path / "e"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert {name: sum(row.values()) for name, row in report["confusion"].items()} == {"epithelium": 284, "stroma": 81}
    assert report["domain_flagged_fraction"] > 0.9  # 0.995 when measured
    assert f"domain guard flags {100 * report['domain_flagged_fraction']:.1f} % of the tiles" in result.stdout


def test_an_exported_model_keeps_its_domain_and_runs_unguarded(tmp_path: Path) -> None:
    """ONNX and TorchScript graphs offer no layers to hook: `export-model` drops the guard (the file is not carried)
    and keeps the card's domain; the exported folder loads and predicts."""
    from wsi_pipeline.models.portable import export_model

    out = export_model(default_model_dir("metastasis"), "onnx", tmp_path / "onnx")
    model = load_model(out)
    assert model.guard is None and model.card.domain_guard is None
    assert model.card.domain is not None and model.card.domain.organs == ["lymph node (breast cancer sentinel)"]
    predictor = make_predictor(model, torch.device("cpu"))
    outputs = predictor(torch.full((2, 3, 96, 96), 200, dtype=torch.uint8))
    assert DOMAIN_KEY not in outputs and outputs["tumour"].shape == (2,)
