"""`wsi-pipeline run` end to end in a subprocess: outputs, QuPath validity, resume, failures (faults and signals:
test_faults.py)."""

from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from tests.helpers import CMU, DICOM, NDPI, TCGA, mitosis_options, run_cli, run_outputs
from wsi_pipeline.export.qupath import TISSUE_COLOR
from wsi_pipeline.heatmap import open_heatmap
from wsi_pipeline.models.demo import write_figure_detector
from wsi_pipeline.run.lock import output_lock
from wsi_pipeline.slide.synth import default_layout, read_truth, write_synthetic_slide
from wsi_pipeline.training.metrics import match_detections

pytestmark = pytest.mark.e2e  # the CLI in subprocesses / whole runs

OBJECT_TYPES = {"annotation", "detection", "tile", "cell", "tmaCore"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two synthetic slides at 0.25 µm/px with planted figures, and the hand-set figure detector."""
    root = tmp_path_factory.mktemp("cohort")
    for seed, size in ((3, (6000, 4500)), (8, (5000, 4000))):
        write_synthetic_slide(
            root / "slides" / f"case-{seed}.svs", default_layout(*size, 0.25, seed=seed, n_figures=10, pen=True)
        )
    write_figure_detector(root / "model", 0.25)
    return root / "slides", root / "model"


@pytest.fixture(scope="module")
def cohort_run(cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One plain run of the cohort (its output folder and stdout), which the tests below compare with and never
    change."""
    slides, model = cohort
    out = tmp_path_factory.mktemp("cohort_run") / "out"
    result = run_cli(*_args(slides, model, out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def _args(slides: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(slides), "-o", str(out), *mitosis_options(model), "--workers", "1", "--no-progress", *extra]


def validate_qupath(path: Path, width: int, height: int) -> dict[str, int]:
    """Check every feature against ../shared/QUPATH_GEOJSON.md; returns counts per objectType."""
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    counts: dict[str, int] = {}
    ids = set()
    for feat in data["features"]:
        assert feat["type"] == "Feature"
        uuid.UUID(feat["id"])
        assert feat["id"] not in ids
        ids.add(feat["id"])
        props = feat["properties"]
        assert props["objectType"] in OBJECT_TYPES
        counts[props["objectType"]] = counts.get(props["objectType"], 0) + 1
        if "classification" in props:
            assert isinstance(props["classification"]["name"], str) and len(props["classification"]["color"]) == 3
        for value in props.get("measurements", {}).values():
            assert isinstance(value, float | int) or value in ("NaN", "Infinity", "-Infinity")
        geom = shape(feat["geometry"])
        assert geom.is_valid and not geom.is_empty
        minx, miny, maxx, maxy = geom.bounds
        # tiles may run past the slide's edge by less than one tile (the grid covers the slide)
        slack = 600 if props["objectType"] == "tile" else 0
        assert minx >= -0.01 and miny >= -0.01 and maxx <= width + slack and maxy <= height + slack
    return counts


def test_run_finds_the_planted_figures(cohort: tuple[Path, Path], cohort_run: tuple[Path, str]) -> None:
    slides, _ = cohort
    out, stdout = cohort_run
    assert "2 slides: 2 done, 0 skipped, 0 failed" in stdout
    manifest = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["status"] for r in manifest] == ["done", "done"]
    cohort_rows = list(csv.DictReader((out / "cohort_summary.csv").open()))
    assert [r["slide_id"] for r in cohort_rows] == ["case-3", "case-8"]
    for row in cohort_rows:
        slide_dir = out / row["slide_id"]
        spec = read_truth(slides / f"{row['slide_id']}.svs")
        truth = np.array([[f.x, f.y] for f in spec.figures]) * spec.mpp
        found = np.array([[float(r["x"]), float(r["y"])] for r in csv.DictReader((slide_dir / "mitoses.csv").open())])
        score = match_detections(found * spec.mpp, truth, radius=7.5)
        assert (score.true_positives, score.false_positives, score.false_negatives) == (10, 0, 0)
        summary = json.loads((slide_dir / "summary.json").read_text())
        assert summary["mitosis"]["count"] == 10 == int(row["mitosis_count"])
        # a 1.25 x 1 mm slide: its 8 µm mask pixels along ~9 mm of outline weigh ~3 % of the area
        assert summary["tissue_area_mm2"] == pytest.approx(spec.tissue_area_um2() / 1e6, rel=0.03)
        assert summary["mitosis"]["per_mm2"] == pytest.approx(10 / summary["tissue_area_mm2"], rel=1e-4)
        counts = validate_qupath(slide_dir / "qupath.geojson", spec.width, spec.height)
        assert counts["detection"] == 10 and counts["annotation"] == 3 and counts["tile"] > 0
        run_record = json.loads((slide_dir / "run.json").read_text())
        assert run_record["complete"] and run_record["models"]["mitosis"]["card"]["name"].startswith("demo-")
        stages = {
            "tissue_s",
            "mpp_estimate_s",
            "tiling_s",
            "read_setup_s",
            "inference_s",
            "heatmaps_s",
            "postprocess_s",
            "export_s",
        }
        assert set(run_record["timings"]) == stages  # mpp_estimate_s: the µm/px check (slide.check_mpp)
        assert open_heatmap(slide_dir / "heatmaps.zarr" / "mitosis").levels[0].shape[0] == 1
        overview = Image.open(slide_dir / "overview.png")  # read from the slide, 1000 px long, with a legend
        assert max(overview.size) == 1000 and overview.size[0] * spec.height == pytest.approx(
            overview.size[1] * spec.width, rel=0.01
        )
        legend = np.asarray(overview.convert("RGB"))[10:17, 9:17]  # the first swatch: the tissue outline's colour
        assert (np.abs(legend.astype(int) - TISSUE_COLOR).max(axis=-1) < 8).all()


def test_slides_overlapped_write_what_one_slide_at_a_time_writes(
    cohort: tuple[Path, Path], cohort_run: tuple[Path, str], tmp_path: Path
) -> None:
    """The default batch overlaps slides (engine.slides_in_flight 4: the next slide prepared and the ones before
    exported while one is in the model); one at a time, every output file is the same, byte for byte (each run
    record's inventory holds every file's sha256; run.json itself holds timings)."""
    slides, model = cohort
    overlapped, _ = cohort_run
    serial = tmp_path / "serial"
    result = run_cli(*_args(slides, model, serial, "--set", "engine.slides_in_flight=1"))
    assert result.returncode == 0, result.stderr
    for slide_id in ("case-3", "case-8"):
        inventories = [json.loads((o / slide_id / "run.json").read_text())["outputs"] for o in (overlapped, serial)]
        assert len(inventories[0]) > 20 and inventories[0] == inventories[1], slide_id
    assert (overlapped / "cohort_summary.csv").read_bytes() == (serial / "cohort_summary.csv").read_bytes()
    columns = ("slide_id", "status", "tiles", "note")
    rows = [
        [{c: r[c] for c in columns} for r in csv.DictReader((o / "manifest.csv").open())] for o in (overlapped, serial)
    ]
    assert rows[0] == rows[1]


def test_rerun_skips_and_overwrite_or_new_config_redoes(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    slides, model = cohort
    out = tmp_path / "out"
    assert run_cli(*_args(slides, model, out)).returncode == 0
    before = (out / "case-3" / "qupath.geojson").read_bytes()
    again = run_cli(*_args(slides, model, out))
    assert "2 slides: 0 done, 2 skipped, 0 failed" in again.stdout
    assert (out / "case-3" / "qupath.geojson").read_bytes() == before
    forced = run_cli(*_args(slides, model, out, "--overwrite"))
    assert "2 done" in forced.stdout and (out / "case-3" / "qupath.geojson").read_bytes() == before
    changed = run_cli(*_args(slides, model, out, "--set", "tasks.mitosis.threshold=0.6"))
    assert "2 slides: 2 done" in changed.stdout


def test_run_on_the_real_slide_folder(data_dir: Path, tmp_path: Path) -> None:
    model = write_figure_detector(tmp_path / "model", 0.5)
    mpp_file = tmp_path / "mpp.csv"
    mpp_file.write_text(f"slide,mpp\n{TCGA.name},1.0\n")
    out = tmp_path / "out"
    result = run_cli(
        "run",
        str(data_dir / "slides"),
        "-o",
        str(out),
        "--tasks",
        "mitosis",
        "--set",
        f"tasks.mitosis.model={model}",
        "--set",
        "tasks.mitosis.tile_px=256",
        "--set",
        "tasks.mitosis.overlap_px=16",
        "--mpp-file",
        str(mpp_file),
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.returncode == 1  # the DICOM file cannot be read
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows[DICOM.stem]["status"] == "failed" and "OpenSlide cannot read" in rows[DICOM.stem]["error"]
    for slide in (CMU, TCGA):
        assert rows[slide.stem]["status"] == "done", rows[slide.stem]
        summary = json.loads((out / slide.stem / "summary.json").read_text())
        assert summary["mitosis"]["count"] >= 0 and "input_guard" not in summary
    # the fluorescence slide is done, its mitosis task skipped by the input guard (test_input_guard)
    assert rows[NDPI.stem]["status"] == "done" and "input guard: mitosis skipped" in rows[NDPI.stem]["note"]
    tcga = json.loads((out / TCGA.stem / "summary.json").read_text())
    assert tcga["mpp_source"] == "--mpp-file"  # TCGA-CR-7395 records no µm/px: the report marks the given one
    assert (
        'class="num given" data-sort="1.0" title="µm/px from --mpp-file: the file records none'
        in (out / "report.html").read_text()
    )
    # the detector reads at 0.5 µm/px, twice finer than TCGA's 1.0: said once, beside the kept answer; CMU (0.499)
    # is read at its own scale and gets no such line
    enlarged = "mitosis: the model reads at 0.5 µm/px, 2.0x finer than the slide's finest level (1 µm/px, from --mpp"
    assert next(w for w in tcga["mitosis"]["warnings"] if "finer than" in w).startswith(enlarged), tcga["mitosis"]
    assert enlarged in result.stderr and "count" in tcga["mitosis"]
    cmu = json.loads((out / CMU.stem / "summary.json").read_text())
    assert not any("finer than" in w for w in cmu["mitosis"].get("warnings", []))
    assert len(list(csv.DictReader((out / "cohort_summary.csv").open()))) == 3
    assert "4 slides: 3 done, 0 skipped, 1 failed" in result.stdout


def test_metastasis_and_epithelium_regions_reproduce_known_tissue(tmp_path: Path) -> None:
    from wsi_pipeline.models.demo import write_tissue_classifier

    spec = default_layout(12000, 9000, 0.5, seed=2)
    slide = write_synthetic_slide(tmp_path / "slides" / "s.svs", spec)
    tumour = write_tissue_classifier(tmp_path / "tumour", "metastasis", ["tumor", "normal"], 1.0, 96)
    epi = write_tissue_classifier(tmp_path / "epi", "epithelium_stroma", ["epithelium", "stroma", "other"], 0.5, 224)
    out = tmp_path / "out"
    result = run_cli(
        "run",
        str(slide),
        "-o",
        str(out),
        "--tasks",
        "metastasis,epithelium_stroma",
        "--set",
        f"tasks.metastasis.model={tumour}",
        "--set",
        f"tasks.epithelium_stroma.model={epi}",
        "--set",
        "tasks.metastasis.smooth_sigma_um=0",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "s" / "summary.json").read_text())
    tissue_mm2 = spec.tissue_area_um2() / 1e6
    meta = summary["metastasis"]
    assert meta["regions"] == 3  # the three tissue pieces
    assert meta["tumor_area_mm2"] == pytest.approx(tissue_mm2, rel=0.08)  # 48 µm heatmap px along the outlines
    longest_axis_um = 2 * max(spec.regions[0].rx, spec.regions[0].ry) * spec.mpp
    assert meta["largest_lesion_diameter_um"] == pytest.approx(longest_axis_um, rel=0.05)
    assert meta["category"] == "macro-metastasis" and meta["score"] > 0.8
    es = summary["epithelium_stroma"]
    assert es["epithelium_area_mm2"] == pytest.approx(tissue_mm2, rel=0.15)  # 112 µm tiles kept at 25 % tissue
    assert es["stroma_area_mm2"] == 0 and es["epithelium_fraction"] == pytest.approx(1.0, rel=0.15)
    counts = validate_qupath(out / "s" / "qupath.geojson", spec.width, spec.height)
    assert counts["annotation"] == 3 + 3 + 3  # tissue, tumour and epithelium regions
    features = json.loads((out / "s" / "qupath.geojson").read_text())["features"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert {f["properties"]["name"] for f in tiles} == {"metastasis", "epithelium_stroma"}
    assert any("tumor probability" in f["properties"]["measurements"] for f in tiles)
    cohort = next(iter(csv.DictReader((out / "cohort_summary.csv").open())))
    assert float(cohort["metastasis_largest_lesion_diameter_um"]) == meta["largest_lesion_diameter_um"]


def test_sharded_runs_then_gather_equal_one_run(
    cohort: tuple[Path, Path], cohort_run: tuple[Path, str], tmp_path: Path
) -> None:
    slides, model = cohort
    whole, sharded = cohort_run[0], tmp_path / "sharded"
    first = run_cli(*_args(slides, model, sharded, "--shard", "0/2"))
    assert first.returncode == 0 and "1 slides: 1 done" in first.stdout, first.stderr
    # the other shard never ran: gather knows the folder's slides (OUT/shards/plan.json) and lists it as failed
    partial = run_cli("gather", str(sharded))
    assert partial.returncode == 1, partial.stderr
    rows = list(csv.DictReader((sharded / "manifest.csv").open()))
    assert [r["status"] for r in rows] == ["done", "failed"] and "no result" in rows[1]["error"], rows
    # a shard cut another way (0/3) while a shard of the recorded cut (1/2) runs would skip or double slides:
    # refused before any slide; with no shard running it would start a new cut (a workflow re-run)
    with output_lock(sharded, (1, 2)):
        other = run_cli(*_args(slides, model, sharded, "--shard", "0/3"))
    assert other.returncode == 2 and "it is being run as 2 shards" in other.stderr, other.stderr
    assert "running: shard 1-of-2: pid" in other.stderr, other.stderr
    second = run_cli(*_args(slides, model, sharded, "--shard", "1/2"))
    assert second.returncode == 0 and "1 slides: 1 done" in second.stdout, second.stderr
    (sharded / "manifest.csv").unlink()
    with output_lock(sharded, (1, 2)):  # shard 1 still running: its slide would be written down as failed
        early = run_cli("gather", str(sharded))
    assert early.returncode == 11 and f"(shard 1-of-2: pid {os.getpid()} on " in early.stderr, early.stderr
    assert not (sharded / "manifest.csv").exists()
    gathered = run_cli("gather", str(sharded))
    assert gathered.returncode == 0, gathered.stderr
    assert (sharded / "cohort_summary.csv").read_text() == (whole / "cohort_summary.csv").read_text()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((whole / "manifest.csv").open())]
    merged = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((sharded / "manifest.csv").open())]
    assert merged == strip
    assert run_outputs(sharded) == run_outputs(whole)


def test_a_subset_run_keeps_the_folders_other_slides_in_its_cohort_files(
    cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    """Running one slide into a folder that holds others (a new slide added to a cohort, a failed one redone)
    rewrote manifest.csv, cohort_summary.csv and report.html with that one slide: the others vanished from the
    cohort. Now the files list every slide the folder holds; the earlier ones' note says where they come from, and
    only this run's slides decide its exit status."""
    slides, model = cohort
    first, second = sorted(slides.glob("*.svs"))
    out = tmp_path / "out"
    for slide in (first, second, first):
        done = run_cli(*_args(slide, model, out))
        assert done.returncode == 0, done.stderr
    assert "also list 1 slide(s) of earlier runs" in done.stdout
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert sorted(rows) == [first.stem, second.stem]
    assert rows[second.stem]["note"] == "from an earlier run of this folder" and rows[first.stem]["status"] == "skipped"
    cohort_rows = list(csv.DictReader((out / "cohort_summary.csv").open()))
    assert sorted(r["slide_id"] for r in cohort_rows) == [first.stem, second.stem]
    assert second.stem in (out / "report.html").read_text()


def test_postprocessing_on_an_existing_dask_scheduler(
    cohort: tuple[Path, Path], cohort_run: tuple[Path, str], tmp_path: Path
) -> None:
    from distributed import LocalCluster

    slides, model = cohort
    plain = cohort_run[0]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        out = tmp_path / "dask"
        result = run_cli(*_args(slides, model, out, "--dask-scheduler", cluster.scheduler_address))
        assert result.returncode == 0, result.stderr
        assert run_outputs(out) == run_outputs(plain)
    patience = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}  # dask's connect timeout, 30 s by default
    bad = run_cli(*_args(slides, model, tmp_path / "bad", "--dask-scheduler", "tcp://127.0.0.1:9"), env=patience)
    assert bad.returncode == 7 and "cannot connect" in bad.stderr, bad.stderr
