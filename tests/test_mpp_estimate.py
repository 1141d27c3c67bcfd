"""µm/px from the tissue (docs/mpp.md): the shipped estimator on real tissue, `--default-mpp auto` on the real slide
that records none (TCGA-CR-7395) through every output, `--mpp-file` rows `auto`, the check of a recorded µm/px, the
estimate offered by the missing-µm/px error, and `info`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CMU, TCGA, run_cli
from wsi_pipeline.core.errors import MissingMppError
from wsi_pipeline.models.mpp_estimator import default_estimator, halve
from wsi_pipeline.slide import Slide


@pytest.fixture(scope="module")
def cmu_fields(data_dir: Path) -> list[np.ndarray]:
    slide = Slide(CMU)
    b = slide.bounds
    image = slide.read_region(b.x, b.y, b.width, b.height, slide.mpp.mean)
    return [
        image[y : y + 512, x : x + 512] for y in range(0, b.height - 511, 512) for x in range(0, b.width - 511, 512)
    ]


def test_the_estimate_follows_the_scale(cmu_fields: list[np.ndarray]) -> None:
    """The same tissue averaged 2 x 2 (a 20x slide seen at 10x) is estimated about twice as coarse, and each answer
    comes with an interval around it."""
    estimator = default_estimator()
    native = estimator.estimate_fields(cmu_fields, "CMU-1")
    slide = Slide(CMU)
    b = slide.bounds
    whole = slide.read_region(b.x, b.y, b.width, b.height, slide.mpp.mean)
    coarser = estimator.estimate_fields([halve(whole)], "CMU-1 halved")
    assert native.low < native.mpp < native.high and native.crops >= 100
    assert 1.4 <= coarser.mpp / native.mpp <= 2.5  # measured 1.6 (0.546 and 0.875 µm/px for 0.499 and 0.998)
    assert 0.75 <= native.mpp / 0.499 <= 1.33 and 0.75 <= coarser.mpp / 0.998 <= 1.33


def test_blank_fields_are_refused_naming_default_mpp() -> None:
    with pytest.raises(MissingMppError, match="--default-mpp") as caught:
        default_estimator().estimate_fields([np.full((512, 512, 3), 245, np.uint8)], "glass")
    assert caught.value.exit_code == 6


def test_info_shows_the_estimate(data_dir: Path) -> None:
    shown = run_cli("info", str(TCGA), "--json")
    data = json.loads(shown.stdout)
    assert shown.returncode == 6  # the file records none: still the missing-µm/px exit, with the estimate offered
    low, high = data["mpp_estimate_interval"]
    assert low < data["mpp_estimate"] < high
    assert "the tissue suggests about" in shown.stderr
    text = run_cli("info", str(TCGA)).stdout
    assert "mpp estimate" in text and "from the tissue" in text


def test_run_with_default_mpp_auto_marks_the_estimate_everywhere(tmp_path: Path, data_dir: Path) -> None:
    """TCGA-CR-7395 records no µm/px: `--default-mpp auto` gives it the tissue's estimate, said as such in
    summary.json, the manifest, cohort_summary.csv, report.html and the log; without it the error offers it; an
    --mpp-file row `auto` does the same for one slide."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / TCGA.name).symlink_to(TCGA)
    common = ["--tasks", "epithelium_stroma", "--no-progress"]
    refused = run_cli("run", str(slides), "-o", str(tmp_path / "refused"), *common)
    assert refused.returncode == 1
    assert "--default-mpp" in refused.stderr and "--default-mpp auto uses that estimate" in refused.stderr

    out = tmp_path / "auto"
    done = run_cli("run", str(slides), "-o", str(out), "--default-mpp", "auto", *common)
    assert done.returncode == 0, done.stderr
    assert "µm/px estimated from the tissue" in done.stderr
    summary = json.loads((out / TCGA.stem / "summary.json").read_text())
    assert summary["mpp_source"] == "estimated from the tissue"
    assert summary["mpp"] == pytest.approx(summary["mpp_estimate"], rel=1e-3)
    low, high = summary["mpp_estimate_interval"]
    assert low < summary["mpp"] < high
    assert any("estimated from the tissue" in w for w in summary["mpp_warnings"])
    with (out / "manifest.csv").open() as fh:
        assert next(csv.DictReader(fh))["mpp_source"] == "estimated from the tissue"
    with (out / "cohort_summary.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert row["mpp_source"] == "estimated from the tissue" and "µm/px estimated" in row["warnings"]
    assert 'class="num estimated"' in (out / "report.html").read_text()

    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{TCGA.name},auto\n")
    by_row = tmp_path / "row"
    done = run_cli("run", str(slides), "-o", str(by_row), "--mpp-file", str(table), *common)
    assert done.returncode == 0, done.stderr
    again = json.loads((by_row / TCGA.stem / "summary.json").read_text())
    assert again["mpp_source"] == "estimated from the tissue" and again["mpp"] == summary["mpp"]


def test_a_recorded_mpp_far_from_the_tissue_is_said(tmp_path: Path, data_dir: Path) -> None:
    """CMU-1 given 4x too fine a µm/px (a 20x scan labelled 80x): the check says so; its own µm/px passes."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / CMU.name).symlink_to(CMU)
    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{CMU.name},0.125\n")
    out = tmp_path / "out"
    done = run_cli("run", str(slides), "-o", str(out), "--mpp-file", str(table), "--tasks", "epithelium_stroma",
                   "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / CMU.stem / "summary.json").read_text())
    assert any(w.startswith("µm/px check:") and "below the tissue's estimate" in w for w in summary["mpp_warnings"])
    assert "µm/px check" in (out / "manifest.csv").read_text()


def test_tissue_takes_default_mpp_auto(tmp_path: Path, data_dir: Path) -> None:
    """The single-slide commands take `--default-mpp auto` too: tissue.json says the µm/px was estimated."""
    done = run_cli("tissue", str(TCGA), "-o", str(tmp_path), "--default-mpp", "auto")
    assert done.returncode == 0, done.stderr
    assert "µm/px estimated from the tissue" in done.stderr
    summary = json.loads((tmp_path / TCGA.stem / "tissue.json").read_text())
    assert summary["mpp_source"] == "estimated from the tissue"
    refused = run_cli("tissue", str(TCGA), "-o", str(tmp_path / "refused"))
    assert refused.returncode == 6 and "--default-mpp" in refused.stderr
