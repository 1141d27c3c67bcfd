"""`wsi-pipeline publish WORK DEFAULTS` (the last step of `make models`): a task's folder is
published with its evaluation's figures in the card; a folder beside it that is not named after a task (a backup,
an experiment) is reported and left alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli
from wsi_pipeline.models.demo import write_tissue_classifier


@pytest.mark.e2e  # the CLI in a subprocess, training or whole-slide inference
def test_only_task_folders_are_published_with_their_evaluation(data_dir: Path, tmp_path: Path) -> None:
    work, defaults = tmp_path / "work", tmp_path / "defaults"
    defaults.mkdir()
    model = work / "metastasis"
    write_tissue_classifier(model, "metastasis", ["tumour", "normal"], 0.972, 96)
    valid = data_dir / "metastasis" / "pcam" / "valid"
    result = run_cli(
        "evaluate", "metastasis", str(model), str(valid), "--class", "tumour=1", "--class", "normal=0",
        "--positive", "tumour", "-o", str(model / "evaluation"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shutil.copytree(model, work / "metastasis.backup")
    done = run_cli("publish", str(work), str(defaults))
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout and "metastasis.backup" in done.stdout
    assert sorted(p.name for p in defaults.iterdir()) == ["metastasis"]
    report = json.loads((model / "evaluation" / "evaluation.json").read_text())
    card = json.loads((defaults / "metastasis" / "model_card.json").read_text())
    assert card["metrics"]["evaluation"]["roc_auc"] == report["roc_auc"]
    assert card["metrics"]["evaluation"]["tiles"] == 3000
    assert 0 <= report["bf16"]["max_abs_difference"] < 1  # the engine's precision reads it from the card
    assert card["bf16_max_difference"] == report["bf16"]["max_abs_difference"]
    assert abs(report["bf16"]["roc_auc"] - report["roc_auc"]["value"]) < 0.01
    assert (defaults / "metastasis" / "evaluation" / "roc.png").is_file()
