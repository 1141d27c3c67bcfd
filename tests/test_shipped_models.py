"""The shipped default models: complete cards, small safe weights, figures that re-measure exactly, seamless
stitching of the trained dense network, and `run` using them when the configuration names none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CMU, run_cli, stitched_and_whole_region
from wsi_pipeline.config import TissueConfig
from wsi_pipeline.models import default_model_dir, load_model, resolve_model, shipped_tasks
from wsi_pipeline.models.loading import CARD_FILE, ModelError
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import TilePlan, plan_tiles
from wsi_pipeline.slide.tissue import detect_tissue

CPU = torch.device("cpu")
EPI_CLASSES = ["--class", "epithelium=01_TUMOR,06_MUCOSA,epithelial", "--class", "stroma=02_STROMA,fibroblast"]
ANNOTATIONS = Path(__file__).parent / "annotations"
# the shipped cards were made by `python -m wsi_pipeline.training.study`, which `wsi-pipeline study` replaced
TRAINED_BY = (
    "wsi-pipeline train {task} ",
    "wsi-pipeline study configs/models/{task}",
    "python -m wsi_pipeline.training.study configs/models/{task}",
)


@pytest.mark.parametrize("task", shipped_tasks())
def test_each_task_ships_a_small_model_with_a_complete_card(task: str) -> None:
    model = resolve_model(task, None)
    card = model.card
    assert model.path == default_model_dir(task) and card.task == task
    assert (model.path / "weights.safetensors").stat().st_size < 5_000_000
    study_name = "epithelium" if task == "epithelium_stroma" else task
    commands = tuple(c.format(task=study_name if "study" in c else task) for c in TRAINED_BY)
    assert card.training["description"] and card.training["command"].startswith(commands)
    assert card.training["train_groups"] and set(card.training["train_groups"]).isdisjoint(card.training["val_groups"])
    assert card.metrics["validation"] and card.metrics["evaluation"]
    assert (model.path / "evaluation" / "evaluation.json").is_file()


@pytest.mark.e2e
def test_epithelium_model_remeasures_its_card_on_held_out_tiles_of_both_sources(data_dir: Path, tmp_path: Path) -> None:
    """Held out of the shipped epithelium/stroma model: whole Kather source images and CRCHistoPhenotypes fields."""
    path = default_model_dir("epithelium_stroma")
    epi = data_dir / "epithelium_stroma"
    folders = [str(epi / "kather2016"), *(str(epi / "crchistophenotypes" / s) for s in ("train", "validation"))]
    result = run_cli(
        "evaluate", "epithelium_stroma", str(path), *folders, "--held-out", *EPI_CLASSES, "-o", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "evaluation.json").read_text())
    card = json.loads((path / CARD_FILE).read_text())
    assert report["balanced_accuracy"] == pytest.approx(card["metrics"]["evaluation"]["balanced_accuracy"], abs=1e-9)
    assert report["roc_auc"]["value"] == pytest.approx(card["metrics"]["evaluation"]["roc_auc"]["value"], abs=1e-9)
    assert report["tiles"] == card["training"]["val_tiles"]
    # the card's cross-source figures come from models that never saw the source they were measured on
    cross = card["metrics"]["cross_source"]
    assert set(cross["figures"]) == {"kather2016 -> crchistophenotypes", "crchistophenotypes -> kather2016"}


@pytest.mark.e2e
def test_epithelium_model_tells_epidermis_from_dermis_on_skin(data_dir: Path, tmp_path: Path) -> None:
    """Another organ, centre and scanner than its training: CMU-1-Small-Region's skin, with regions of clear
    epidermis (squamous epithelium) and dermis (collagen) drawn from the image by a developer, not a pathologist
    (tests/annotations/; docs/models.md). A gate on the shipped weights: a model trained on Kather alone scores
    0.18-1.0 here depending on its seed."""
    folder = tmp_path / "skin"
    folder.mkdir()
    (folder / CMU.name).symlink_to(CMU)
    (folder / f"{CMU.stem}.geojson").symlink_to(ANNOTATIONS / f"{CMU.stem}.geojson")
    classes = ["--class", "epithelium=Epithelium", "--class", "stroma=Stroma", "--positive", "epithelium"]
    path = default_model_dir("epithelium_stroma")
    result = run_cli("evaluate", "epithelium_stroma", str(path), str(folder), *classes, "-o", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    truth = {name: sum(row.values()) for name, row in report["confusion"].items()}
    assert truth == {"epithelium": 11, "stroma": 17}  # one grid of 96 px tiles per drawn rectangle
    assert report["roc_auc"]["value"] >= 0.95


@pytest.mark.e2e
def test_metastasis_model_remeasures_its_card_on_pcam_valid(data_dir: Path, tmp_path: Path) -> None:
    path = default_model_dir("metastasis")
    valid = data_dir / "metastasis" / "pcam" / "valid"
    classes = ["--class", "tumour=1", "--class", "normal=0", "--positive", "tumour"]
    result = run_cli("evaluate", "metastasis", str(path), str(valid), *classes, "-o", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "evaluation.json").read_text())
    card = json.loads((path / CARD_FILE).read_text())
    assert report["tiles"] == 3000
    assert report["roc_auc"]["value"] == pytest.approx(card["metrics"]["evaluation"]["roc_auc"]["value"], abs=1e-6)
    # training measured the same tiles (AUC of the other class: equal up to float ties)
    assert report["roc_auc"]["value"] == pytest.approx(card["metrics"]["validation"]["roc_auc"], abs=1e-4)


@pytest.mark.parametrize("tile_px", [128, 256])
def test_trained_mitosis_network_stitches_seamlessly(data_dir: Path, tmp_path: Path, tile_px: int) -> None:
    """The shipped weights, read at 0.998 µm/px to keep the whole-region pass small: stitching equals one pass."""
    copy = tmp_path / "mitosis"
    shutil.copytree(default_model_dir("mitosis"), copy)
    card = json.loads((copy / CARD_FILE).read_text())
    card["mpp"] = 0.998
    (copy / CARD_FILE).write_text(json.dumps(card))
    model = load_model(copy, task="mitosis")
    slide = Slide(CMU)
    tissue = detect_tissue(slide, TissueConfig())
    plan = plan_tiles(slide, tissue, 0.998, tile_px, overlap_px=2 * model.card.halo_px, min_tissue=0.0)
    stitched, reference = stitched_and_whole_region(slide, plan, model, tmp_path / "heatmaps.zarr", workers=1)
    n_cols, n_rows = plan.grid
    step = tile_px - 2 * model.card.halo_px
    width, height = (n_cols - 1) * step + tile_px, (n_rows - 1) * step + tile_px
    assert stitched.shape == reference.shape == (height // 4, width // 4)
    assert np.abs(stitched - reference).max() <= 1e-4


@pytest.mark.parametrize("tile_px", [128, 256])
def test_mitosis_map_at_a_non_integer_factor_stitches_seamlessly(data_dir: Path, tmp_path: Path, tile_px: int) -> None:
    """The shipped network at its own 0.25 µm/px on a 0.499 µm/px slide (x 1.996, fractional tile origins): the
    stitched map equals one pass over the same region (a 3 x 3 block of tiles, to keep that pass small)."""
    model = resolve_model("mitosis", None)
    slide = Slide(CMU)
    tissue = detect_tissue(slide, TissueConfig())
    overlap = 2 * model.card.halo_px
    full = plan_tiles(slide, tissue, model.card.mpp, tile_px, overlap_px=overlap, min_tissue=0.0)
    x0 = full.spec.stride_px * full.spec.downsample[0]
    assert abs(x0 - round(x0)) > 1e-3  # tile origins really are fractional level-0 px
    keep = (full.cols < 3) & (full.rows < 3)
    plan = TilePlan(
        full.spec, (3, 3), full.cols[keep], full.rows[keep], full.x[keep], full.y[keep], full.tissue_fraction[keep]
    )
    stitched, reference = stitched_and_whole_region(slide, plan, model, tmp_path / "heatmaps.zarr", workers=1)
    side = (2 * (tile_px - overlap) + tile_px) // model.card.output_stride
    assert stitched.shape == reference.shape == (side, side)
    assert np.abs(stitched - reference).max() <= 1e-4


@pytest.mark.e2e
def test_run_uses_the_shipped_models_unless_configured(synthetic_slide, tmp_path: Path) -> None:
    path, _ = synthetic_slide
    out = tmp_path / "o"
    result = run_cli("run", str(path), "-o", str(out), "--tasks", "metastasis", "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "synthetic" / "run.json").read_text())
    assert Path(record["models"]["metastasis"]["path"]) == default_model_dir("metastasis")
    missing = tmp_path / "no-such-model"
    result = run_cli(
        "run",
        str(path),
        "-o",
        str(tmp_path / "o2"),
        "--tasks",
        "metastasis",
        "--set",
        f"tasks.metastasis.model={missing}",
    )
    assert result.returncode == ModelError.exit_code and f"model folder {missing} not found" in result.stderr


@pytest.mark.e2e  # the CLI in a subprocess, training or whole-slide inference
def test_mitosis_on_skin_is_withheld_and_a_forced_implausible_count_is_flagged_wherever_read(
    data_dir: Path, tmp_path: Path
) -> None:
    """The shipped mitosis model (breast cancer at 40x) on skin at 20x takes nearly every nucleus for a mitosis (891,
    1 384 per mm², before it had a domain guard). Its guard now withholds the count. Forced, the count is kept and
    flagged in the log, summary.json, the manifest, cohort_summary.csv, report.html and qupath.geojson."""
    import csv

    withheld = run_cli("run", str(CMU), "-o", str(tmp_path / "na"), "--tasks", "mitosis", "--no-progress")
    answer = json.loads((tmp_path / "na" / CMU.stem / "summary.json").read_text())["mitosis"]
    assert withheld.returncode == 0 and "count" not in answer, answer
    assert answer["not_applicable"].startswith("not applicable: tissue unlike this model's training data (breast")
    assert answer["domain"]["in_domain_fraction"] < 0.5, answer  # 0.35 when measured
    out = tmp_path / "out"
    force = ("--set", "tasks.mitosis.force=true")
    result = run_cli("run", str(CMU), "-o", str(out), "--tasks", "mitosis", *force, "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    mitosis = json.loads((out / CMU.stem / "summary.json").read_text())["mitosis"]
    assert mitosis["per_mm2"] > 50, mitosis  # counted in the in-domain tissue only
    flag = f"mitosis: {mitosis['per_mm2']:.0f} per mm² of tissue is implausible"
    assert mitosis["warnings"][0].startswith(flag), mitosis["warnings"]
    assert "kept because tasks.mitosis.force is set" in mitosis["warnings"][1]
    # a 20x slide read by a 40x model (0.499 / 0.25 µm/px): said once, the answer kept
    assert mitosis["warnings"][2].startswith("mitosis: the model reads at 0.25 µm/px, 2.0x finer than the slide's")
    assert f"warning: {CMU.stem}: {flag}" in result.stderr
    assert next(csv.DictReader((out / "manifest.csv").open()))["note"].startswith(flag)
    assert next(csv.DictReader((out / "cohort_summary.csv").open()))["warnings"].startswith(flag)
    report = (out / "report.html").read_text()
    assert flag in report and '<td class="num flagged"' in report  # the cell itself is marked
    assert "breast (invasive carcinoma)" in report  # what the answer rests on
    # in qupath.geojson every detection of the flagged count is classed so QuPath can filter them; detections
    # outside the counted tissue (outline and in-domain tiles) are kept, classed apart, and not counted per mm²
    features = json.loads((out / CMU.stem / "qupath.geojson").read_text())["features"]
    classes = [f["properties"].get("classification", {}).get("name") for f in features]
    assert classes.count("Mitosis (implausible count)") == mitosis["count"] and "Mitosis" not in classes
    assert mitosis["not_counted"] > 0 and classes.count("Mitosis (not counted)") == mitosis["not_counted"]
    assert mitosis["per_mm2"] == pytest.approx(mitosis["count"] / mitosis["counted_area_mm2"], rel=1e-4)
    rerun = run_cli("run", str(CMU), "-o", str(out), "--tasks", "mitosis", *force, "--device", "cpu", "--no-progress")
    row = next(csv.DictReader((out / "manifest.csv").open()))
    assert row["status"] == "skipped" and row["note"].startswith(flag), rerun.stdout  # said again when kept
    raised = tmp_path / "raised"
    limit = f"tasks.mitosis.plausible_max_per_mm2={mitosis['per_mm2'] + 1}"
    again = run_cli("run", str(CMU), "-o", str(raised), "--tasks", "mitosis", *force, "--set", limit, "--no-progress")
    assert again.returncode == 0 and "implausible" not in again.stderr, again.stderr
    summary = json.loads((raised / CMU.stem / "summary.json").read_text())["mitosis"]
    assert summary["count"] == mitosis["count"] and not any("implausible" in w for w in summary["warnings"])
