"""The input guard: the shipped models' colour statistics accept real H&E and refuse fluorescence, IHC-like and
unstained tissue; `run` skips (or, forced, runs and marks) the task for such a slide and says so everywhere."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CMU, NDPI, TCGA, run_cli
from wsi_pipeline.config import TissueConfig
from wsi_pipeline.models.input_guard import outside_reason, slide_colour, training_stats
from wsi_pipeline.models.loading import default_model_dir, load_card
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tissue import detect_tissue

TASKS = ("epithelium_stroma", "metastasis", "mitosis")


def _tissue(path: Path, mpp: float | None = None):  # type: ignore[no-untyped-def]
    with Slide(path, mpp=mpp) as slide:
        return detect_tissue(slide, TissueConfig())


def test_shipped_cards_carry_colour_statistics() -> None:
    for task in TASKS:
        stats = load_card(default_model_dir(task)).input_stats
        assert stats is not None and stats.tiles >= 50, task
        assert 0.99 < float(np.linalg.norm(stats.od_direction_mean)) < 1.01  # a unit vector on average
        assert stats.od_direction_mean[1] > stats.od_direction_mean[2] > 0  # H&E: green absorbed most


def test_real_h_and_e_passes_and_fluorescence_does_not(data_dir: Path) -> None:
    he = [_tissue(CMU), _tissue(TCGA, mpp=0.5)]
    fluorescence = _tissue(NDPI)
    for task in TASKS:
        stats = load_card(default_model_dir(task)).input_stats
        for tissue in he:
            assert outside_reason(tissue, stats) is None, (task, slide_colour(tissue))
        assert "background is dark (fluorescence" in (outside_reason(fluorescence, stats) or "")


def test_ihc_like_and_unstained_tissue_lie_outside(data_dir: Path) -> None:
    """CMU's own mask and layout, its tissue recoloured DAB-brown or unstained grey. PCam's stain spread is wide, so
    the metastasis model's guard lets pale grey through (docs/models.md says so); the other two refuse both."""
    tissue = _tissue(CMU)
    for colour, tasks in (((150, 95, 50), TASKS), ((215, 210, 212), ("epithelium_stroma", "mitosis"))):
        recoloured = tissue.thumbnail.copy()
        recoloured[tissue.mask] = colour
        other = dataclasses.replace(tissue, thumbnail=recoloured)
        for task in tasks:
            reason = outside_reason(other, load_card(default_model_dir(task)).input_stats)
            assert reason is not None and "standard deviations from the model's training tissue" in reason, task


def test_training_stats_measure_the_tissue_colour() -> None:
    rng = np.random.default_rng(0)
    pink = np.full((64, 64, 3), (220, 140, 190), np.uint8)
    tiles = [np.clip(pink + rng.integers(-8, 8, pink.shape), 0, 255).astype(np.uint8) for _ in range(20)]
    tiles.append(np.full((64, 64, 3), 250, np.uint8))  # glass only: not measured
    stats = training_stats(tiles)
    assert stats is not None and stats.tiles == 20
    expected = -np.log10(np.array([220, 140, 190]) / 255)
    assert np.allclose(stats.od_direction_mean, expected / np.linalg.norm(expected), atol=0.01)
    assert stats.od_length_mean == pytest.approx(float(np.linalg.norm(expected)), abs=0.01)


@pytest.mark.e2e
def test_run_skips_the_task_on_a_fluorescence_slide_unless_forced(data_dir: Path, tmp_path: Path) -> None:
    base = ["run", str(NDPI), str(CMU), "--tasks", "epithelium_stroma", "--device", "cpu", "--no-progress"]
    out = tmp_path / "out"
    result = run_cli(*base, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "epithelium_stroma model not trusted here: the slide's background is dark" in result.stderr
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    fluo, cmu = rows[NDPI.stem], rows[CMU.stem]
    assert fluo["status"] == "done" and fluo["note"].startswith("input guard: epithelium_stroma skipped")
    # CMU (bright-field skin) passes the input guard; the colon model's domain guard then withholds its answer
    assert cmu["status"] == "done" and cmu["note"].startswith("epithelium_stroma: not applicable"), cmu
    summary = json.loads((out / NDPI.stem / "summary.json").read_text())
    assert summary["input_guard"]["epithelium_stroma"]["skipped"] is True and "epithelium_stroma" not in summary
    assert not (out / NDPI.stem / "heatmaps.zarr" / "epithelium").exists()
    cohort = {r["slide_id"]: r for r in csv.DictReader((out / "cohort_summary.csv").open())}
    assert cohort[NDPI.stem]["epithelium_stroma_epithelium_fraction"] == ""  # no figure rather than a wrong one
    # withheld on CMU by the domain guard: no figure either, and the cohort's warnings say why
    assert cohort[CMU.stem]["epithelium_stroma_epithelium_fraction"] == ""
    assert cohort[CMU.stem]["warnings"].startswith("epithelium_stroma: not applicable")
    forced = run_cli(*base, "-o", str(out), "--set", "tasks.epithelium_stroma.force=true")
    assert forced.returncode == 0, forced.stderr
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows[NDPI.stem]["status"] == "done" and "epithelium_stroma forced" in rows[NDPI.stem]["note"]
    summary = json.loads((out / NDPI.stem / "summary.json").read_text())
    assert summary["input_guard"]["epithelium_stroma"]["skipped"] is False and "epithelium_stroma" in summary
