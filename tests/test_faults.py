"""The fault catalogue (docs/reliability.md): every bad input, fault and damaged output the tool promises to handle,
each run through the real CLI in a subprocess, asserting the exit status, the one-line message and that nothing on
disk looks complete but is not."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.helpers import TCGA, run_cli
from wsi_pipeline.core.inventory import first_problem
from wsi_pipeline.heatmap import HeatmapGeometry, HeatmapWriter, open_heatmap
from wsi_pipeline.models.demo import write_figure_detector
from wsi_pipeline.run.lock import output_lock, single_slide_lock
from wsi_pipeline.slide.synth import SynthSpec, default_layout, write_synthetic_slide

pytestmark = pytest.mark.e2e

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One small synthetic slide, the hand-set figure detector, and a finished reference run of it."""
    root = tmp_path_factory.mktemp("faults")
    slide = write_synthetic_slide(root / "slides" / "case.svs", default_layout(3000, 2400, 0.25, seed=5, n_figures=6))
    model = write_figure_detector(root / "model", 0.25)
    reference = root / "reference"
    result = run_cli(*_run(slide, model, reference))
    assert result.returncode == 0, result.stderr
    return slide, model, reference


def _run(slides: Path | str, model: Path, out: Path, *extra: str, workers: str = "0") -> list[str]:
    return [
        "run",
        str(slides),
        "-o",
        str(out),
        "--tasks",
        "mitosis",
        "--set",
        f"tasks.mitosis.model={model}",
        "--device",
        "cpu",
        "--workers",
        workers,
        "--no-progress",
        *extra,
    ]


def _rows(out: Path) -> dict[str, dict[str, str]]:
    return {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open(encoding="utf-8"))}


def _outputs(folder: Path) -> dict[str, object]:
    """What a slide's run computed, without the names it was given (the same slide may sit under another id)."""
    summary = json.loads((folder / "summary.json").read_text())
    features = json.loads((folder / "qupath.geojson").read_text())["features"]
    return {
        "summary": {k: v for k, v in summary.items() if k not in ("slide", "slide_id")},
        "mitoses.csv": (folder / "mitoses.csv").read_bytes(),
        "geometries": [f["geometry"] for f in features],
        "mitosis": np.asarray(open_heatmap(folder / "heatmaps.zarr" / "mitosis").levels[0]).tobytes(),
    }


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def assert_nothing_looks_complete_but_is_not(out: Path, temporaries_allowed: bool = False) -> None:
    """Every slide folder with a complete run record verifies against its inventory; every heatmap store that says
    complete opens image by image; no temporary is left (unless a SIGKILL left it for the next run to clean)."""
    if not out.exists():
        return
    for record_path in out.glob("*/run.json"):
        record = json.loads(record_path.read_text())
        if record.get("complete"):
            assert first_problem(record_path.parent, record["outputs"]) is None, record_path
    for store in out.rglob("heatmaps.zarr"):
        attrs = dict(zarr.open_group(str(store), mode="r").attrs).get("wsi_pipeline", {})
        if attrs.get("complete"):
            for name in attrs["images"]:
                open_heatmap(store / name)
    if not temporaries_allowed:
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name], list(out.rglob("*.tmp-*"))


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_slides_fail_alone_with_their_reasons(case, data_dir: Path, tmp_path: Path) -> None:
    """Unreadable, truncated, no µm/px and no tissue in one batch beside a good slide."""
    slide, model, reference = case
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slide, folder / "good.svs")
    (folder / "garbage.svs").write_bytes(os.urandom(200_000))
    data = slide.read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) * 2 // 3])
    (folder / "no-mpp.svs").symlink_to(TCGA)
    write_synthetic_slide(folder / "blank.svs", SynthSpec(2000, 1500, 0.25))
    out = tmp_path / "out"
    result = run_cli(*_run(folder, model, out))
    assert result.returncode == 1, result.stderr
    rows = _rows(out)
    expected = {
        "garbage": "does not recognise this file format",
        "truncated": "truncated",
        "no-mpp": "--default-mpp",
        "blank": "no tissue",
    }
    for slide_id, words in expected.items():
        assert rows[slide_id]["status"] == "failed" and words in rows[slide_id]["error"], rows[slide_id]
        assert "\n" not in rows[slide_id]["error"] and not (out / slide_id).exists()
    assert "--slide-mpp" not in rows["no-mpp"]["error"]  # `run` has no such option
    assert rows["good"]["status"] == "done" and _outputs(out / "good") == _outputs(reference / "case")
    assert_nothing_looks_complete_but_is_not(out)


def test_usage_mistakes_are_refused_before_any_slide(case, tmp_path: Path) -> None:
    slide, model, _ = case
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    malformed = tmp_path / "mpp.csv"
    malformed.write_text("name;mpp\ncase;0.25\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tissue: [unclosed\n")
    twice = tmp_path / "twice.csv"
    twice.write_text("slide,mpp\ncase.svs,0.25\ncase.svs,0.5\n")
    two_ways = tmp_path / "two-ways.csv"
    two_ways.write_text("slide,mpp\ncase.svs,0.25\ncase,0.5\n")
    cases: list[tuple[list[str], int, str]] = [
        (_run(slide, model, out, "--tasks", ","), 2, "--tasks ',' names no task"),
        (_run(slide, model, out, "--tasks", "mitosis,nosuch"), 2, "unknown task(s) nosuch"),
        (_run(slide, model, out, "--shard", "3/3"), 2, "--shard '3/3'"),
        (_run(empty, model, out), 2, "no slides found"),
        (_run(slide, model, out, "--default-mpp", "-3"), 2, "'--default-mpp'"),
        (_run(slide, model, out, "--backend", "nosuch"), 2, "--backend: unknown reader backend 'nosuch'"),
        (_run(slide, model, out, "--mpp-file", str(malformed)), 7, "columns slide,mpp"),
        (_run(slide, model, out, "--mpp-file", str(twice)), 7, "lines 2 and 3 both name 'case.svs'"),
        (_run(slide, model, out, "--mpp-file", str(two_ways)), 7, "all name"),
        (_run(slide, model, out, "--set", "tasks.mitosis.tile_px=abc"), 7, "tasks.mitosis.tile_px"),
        (_run(slide, model, out, "-c", str(bad_yaml)), 7, "is not valid YAML"),
        (_run(slide, model, out, "--set", "tasks.mitosis.model=/no/such/model"), 10, "set tasks.mitosis.model"),
        (_run(slide, model, out, "--set", "tasks.mitosis.overlap_px=3"), 7, "tasks.mitosis"),
    ]
    for args, code, words in cases:
        result = run_cli(*args)
        assert result.returncode == code, (args, result.stderr)
        line = result.stderr.strip().splitlines()[-1]
        assert words in line, (args, result.stderr)
        assert "Traceback" not in result.stderr and "--model" not in line
        assert not out.exists()  # refused before the batch: not one slide folder, not even OUT
    # a tile size the model cannot take fails the batch (exit 7) before the first slide, not each slide (exit 1)
    meta = run_cli("run", str(slide), "-o", str(out), "--tasks", "metastasis", "--set", "tasks.metastasis.tile_px=128")
    assert meta.returncode == 7 and "tasks.metastasis.tile_px is 128" in _error_line(meta.stderr)
    assert not out.exists()


def test_silent_mistakes_are_warned(case, tmp_path: Path) -> None:
    slide, model, _ = case
    mpp_file = tmp_path / "mpp.csv"
    mpp_file.write_text("slide,mpp\nsomething-else.svs,0.25\n")
    out = tmp_path / "out"
    result = run_cli(*_run(slide, model, out, "--mpp-file", str(mpp_file)), str(tmp_path / "nomatch*.svs"))
    assert result.returncode == 0, result.stderr
    assert f"warning: pattern {tmp_path / 'nomatch*.svs'} matches no file" in result.stderr
    assert f"warning: --mpp-file {mpp_file} names no slide of this batch (rows: something-else.svs)" in result.stderr


def test_two_runs_on_one_folder(case, tmp_path: Path) -> None:
    slide, model, _ = case
    out = tmp_path / "out"
    with output_lock(out):
        result = run_cli(*_run(slide, model, out))
    assert result.returncode == 11 and "another run is writing" in _error_line(result.stderr)


def test_every_command_that_writes_a_run_folder_takes_its_lock(case, tmp_path: Path) -> None:
    """predict, tissue and tiles write into OUT/<slide_id>/ as run does: while a run writes OUT they are refused
    (exit 11) and write nothing (before: predict died with KeyError or mixed heatmaps with the run's); they hold
    OUT's lock shared and their slide's own, so two of them on different slides run side by side."""
    slide, model, _ = case
    out = tmp_path / "out"
    commands = [
        ["predict", str(slide), "-o", str(out), "--task", "mitosis", "--model", str(model), "--device", "cpu"],
        ["tissue", str(slide), "-o", str(out)],
        ["tiles", str(slide), "-o", str(out), "--mpp", "1", "--tile-px", "128"],
    ]
    with output_lock(out):
        for command in commands:
            result = run_cli(*command)
            assert result.returncode == 11, (command[0], result.stderr)
            assert "another run is writing" in _error_line(result.stderr), command[0]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    # single-slide commands on different slides of one folder run side by side; on the same slide they do not
    with single_slide_lock(out, "another-slide"):
        beside = run_cli(*commands[1])
    assert beside.returncode == 0, beside.stderr
    with single_slide_lock(out, slide.stem):
        same = run_cli(*commands[1])
    assert same.returncode == 11 and f"another run is writing {out / slide.stem}" in _error_line(same.stderr)
    missing = run_cli("tissue", str(tmp_path / "absent.svs"), "-o", str(tmp_path / "never"))
    assert missing.returncode == 3 and not (tmp_path / "never").exists(), missing.stderr


def test_the_runs_own_files_are_never_lost_to_a_slide_or_a_link(case, tmp_path: Path) -> None:
    """A slide named like one of the run's own files (manifest.csv.svs -> OUT/manifest.csv/) is refused before any
    slide (exit 2) instead of having its folder removed by the manifest's write; a file is never written over a
    folder it did not make; a lock file planted as a symbolic link is refused (exit 9) and its target left whole."""
    from wsi_pipeline.core.atomic import write_text
    from wsi_pipeline.core.errors import OutputError

    slide, model, _ = case
    for name in ("manifest.csv", "report.html", "Shards", "cohort_summary.csv"):
        named = tmp_path / "named" / name
        named.mkdir(parents=True)
        shutil.copy(slide, named / f"{name}.svs")
        out = tmp_path / f"out-{name}"
        result = run_cli(*_run(named, model, out))
        assert result.returncode == 2, result.stderr
        assert f"its output folder would be {name}/, a name the run's own files use" in _error_line(result.stderr)
        assert not out.exists()
    single = run_cli("tissue", str(tmp_path / "named" / "report.html" / "report.html.svs"), "-o", str(tmp_path / "t"))
    assert single.returncode == 2 and "a name the run's own files use" in _error_line(single.stderr)
    assert not (tmp_path / "t").exists()
    folder = tmp_path / "in-the-way" / "manifest.csv"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OutputError, match="a folder of that name is in the way"):
        write_text(folder, "slide,slide_id\n")
    assert (folder / "inside").is_dir() and list(folder.parent.iterdir()) == [folder]  # nor a temporary left
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inside").mkdir(parents=True)
    linked_slide = tmp_path / "linked-slide"
    linked_slide.mkdir()
    (linked_slide / slide.stem).symlink_to(elsewhere)
    result = run_cli(*_run(slide, model, linked_slide))
    assert (
        result.returncode == 1
        and "is a symbolic link; a run never follows a link" in _rows(linked_slide)[slide.stem]["error"]
    )
    assert sorted(p.name for p in elsewhere.iterdir()) == ["inside"]  # nothing computed, nothing written there
    target = tmp_path / "keep.txt"
    target.write_text("keep\n")
    out = tmp_path / "linked"
    out.mkdir()
    (out / ".lock").symlink_to(target)
    result = run_cli(*_run(slide, model, out))
    assert result.returncode == 9, result.stderr
    assert "is a symbolic link; a run never follows a link it did not create" in _error_line(result.stderr)
    assert target.read_text() == "keep\n" and sorted(p.name for p in out.iterdir()) == [".lock"]


# --- models ----------------------------------------------------------------------------------------------------
def test_changed_weights_and_pickled_checkpoints_are_refused(case, tmp_path: Path) -> None:
    slide, model, _ = case
    changed = tmp_path / "changed"
    shutil.copytree(model, changed)
    weights = bytearray((changed / "weights.safetensors").read_bytes())
    weights[-1] ^= 0x01  # one bit of one weight: the file still loads, the card's sha256 no longer matches
    (changed / "weights.safetensors").write_bytes(bytes(weights))
    result = run_cli(*_run(slide, changed, tmp_path / "out"))
    assert result.returncode == 10 and "sha256 differs from the card's" in _error_line(result.stderr)

    from PIL import Image

    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: unpickling it would run code
    data = tmp_path / "tiles"
    rng = np.random.default_rng(0)
    for cls in ("epithelium", "stroma"):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    train = run_cli(
        "train", "epithelium_stroma", str(data), "-o", str(tmp_path / "trained"), "--tile-px", "64", "--mpp", "0.5",
        "--init", str(pickled), "--set", "epochs=1",
    )  # fmt: skip
    line = _error_line(train.stderr)
    assert train.returncode == 10 and f"--init {pickled}: not a plain tensor checkpoint" in line
    assert "weights_only" not in train.stderr


# --- damaged outputs -------------------------------------------------------------------------------------------
def _chunks(folder: Path) -> list[Path]:
    return sorted((folder / "heatmaps.zarr" / "mitosis" / "0" / "c").rglob("*"), key=str)


def _delete_chunk(folder: Path) -> str:
    chunk = next(p for p in _chunks(folder) if p.is_file())
    chunk.unlink()
    return f"mitosis heatmap chunk {chunk.relative_to(chunk.parents[2]).as_posix()} missing"


def _corrupt_chunk(folder: Path) -> str:
    chunk = next(p for p in _chunks(folder) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash tells
    chunk.write_bytes(bytes(data))
    return "mitosis heatmap chunk"


def _add_chunk(folder: Path) -> str:
    array = zarr.open_array(str(folder / "heatmaps.zarr" / "mitosis" / "0"), mode="r")
    rows, cols = (-(-n // c) for n, c in zip(array.shape[1:], array.chunks[1:], strict=True))
    existing = {p.relative_to(p.parents[2]).as_posix() for p in _chunks(folder) if p.is_file()}
    absent = [f"{r}/{c}" for r in range(rows) for c in range(cols) if f"0/{r}/{c}" not in existing]
    assert absent, "the reference heatmap has a chunk at every place: the test needs an empty one"
    source = next(p for p in _chunks(folder) if p.is_file())
    row, col = absent[0].split("/")
    shutil.copy(source, folder / "heatmaps.zarr" / "mitosis" / "0" / "c" / "0" / row / col)
    return "was not written by the run"


def _edit_summary(folder: Path) -> str:
    text = (folder / "summary.json").read_text()
    (folder / "summary.json").write_text(text.replace('"count": 6', '"count": 9'))
    assert (folder / "summary.json").read_text() != text
    return "summary.json changed"


def _delete(name: str, words: str) -> Callable[[Path], str]:
    def damage(folder: Path) -> str:
        (folder / name).unlink()
        return words

    return damage


def _truncate_geojson(folder: Path) -> str:
    path = folder / "qupath.geojson"
    path.write_bytes(path.read_bytes()[:100])
    return "qupath.geojson changed"


def _damage_record(folder: Path) -> str:
    (folder / "run.json").write_text('{"complete": tr')
    return "run record unreadable"


DAMAGES = {
    "chunk deleted": _delete_chunk,
    "chunk corrupted": _corrupt_chunk,
    "chunk added": _add_chunk,
    "summary edited": _edit_summary,
    "summary deleted": _delete("summary.json", "summary.json missing"),
    "geojson truncated": _truncate_geojson,
    "run record deleted": _delete("run.json", "no run record"),
    "run record damaged": _damage_record,
}


def test_damaged_outputs_are_redone_and_say_why(case, tmp_path: Path) -> None:
    """One slide per kind of damage (copies of the case slide, named after it), all redone in one re-run."""
    slide, model, reference = case
    folder = tmp_path / "slides"
    folder.mkdir()
    names = {damage: damage.replace(" ", "-") for damage in DAMAGES}
    for name in names.values():
        shutil.copy(slide, folder / f"{name}.svs")
    out = tmp_path / "out"
    assert run_cli(*_run(folder, model, out)).returncode == 0
    words = {damage: DAMAGES[damage](out / name) for damage, name in names.items()}
    result = run_cli(*_run(folder, model, out))
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    for damage, name in names.items():
        row = rows[name]
        assert row["status"] == "done" and words[damage] in row["note"] and row["note"].endswith(": redone"), row
        assert f"{name}: done" in result.stdout
        assert _outputs(out / name) == _outputs(reference / "case"), damage
    again = run_cli(*_run(folder, model, out))
    assert f"{len(DAMAGES)} slides: 0 done, {len(DAMAGES)} skipped, 0 failed" in again.stdout


def test_predict_into_a_finished_run_invalidates_it(case, tmp_path: Path) -> None:
    slide, model, reference = case
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    from wsi_pipeline.models.loading import load_model, save_model

    loaded = load_model(model)
    with torch.no_grad():
        for parameter in loaded.module.parameters():
            parameter.mul_(0.9)  # another model: other heatmaps
    other = save_model(tmp_path / "other", loaded.module, loaded.card.model_copy(update={"name": "other"}))
    stale = out / "case" / ".heatmaps.zarr.mitosis.tmp-999999999-0a1b2c3d"  # a killed predict's half-built image
    stale.mkdir()
    predicted = run_cli(
        "predict", str(slide), "-o", str(out), "--task", "mitosis", "--model", str(other), "--device", "cpu",
        "--workers", "0", "--no-progress",
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert "run.json: removed" in predicted.stderr and not (out / "case" / "run.json").exists()
    assert not stale.exists()  # removed by the next predict (its process is gone)
    result = run_cli(*_run(slide, model, out))
    assert _rows(out)["case"]["status"] == "done" and "no run record" in _rows(out)["case"]["note"], result.stdout
    assert _outputs(out / "case") == _outputs(reference / "case")  # the run's model again, not predict's


# --- slide ids -------------------------------------------------------------------------------------------------
def test_slide_ids_do_not_depend_on_the_batch(case, tmp_path: Path) -> None:
    slide, model, reference = case
    (tmp_path / "a").mkdir()
    (tmp_path / "c").mkdir()
    shutil.copy(slide, tmp_path / "a" / "same.svs")
    shutil.copy(slide, tmp_path / "c" / "same.svs")  # the same bytes elsewhere: the same slide, moved
    other = write_synthetic_slide(tmp_path / "b" / "same.svs", default_layout(3000, 2400, 0.25, seed=9, n_figures=2))
    out = tmp_path / "out"
    both = run_cli(*_run(tmp_path / "a" / "same.svs", model, out), str(other))
    assert both.returncode == 2 and "2 slides would share the output folder same/" in _error_line(both.stderr)
    assert not out.exists()
    alone = run_cli(*_run(tmp_path / "a" / "same.svs", model, out))
    assert alone.returncode == 0 and (out / "same" / "run.json").is_file()
    moved = run_cli(*_run(tmp_path / "c" / "same.svs", model, out))
    assert _rows(out)["same"]["status"] == "skipped", moved.stdout
    foreign = run_cli(*_run(other, model, out))
    assert foreign.returncode == 1
    assert "holds the outputs of another slide with the same id" in _rows(out)["same"]["error"]
    assert _outputs(out / "same") == _outputs(reference / "case")  # a's outputs were neither trusted nor replaced
    accents = tmp_path / "accents"
    accents.mkdir()
    for name in ("a é b.svs", "a b.svs"):
        shutil.copy(slide, accents / name)
    named = run_cli(*_run(accents, model, tmp_path / "named"))
    assert named.returncode == 0, named.stderr
    assert set(_rows(tmp_path / "named")) == {"a_é_b", "a_b"}
    assert (tmp_path / "named" / "a_é_b" / "run.json").is_file()


# --- write failures --------------------------------------------------------------------------------------------
def _mount(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        pytest.skip("mounting a small or read-only tmpfs needs root; run the suite as root (CI does)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"this machine refuses tmpfs mounts ({done.stderr.decode().strip()}); CI can mount")


def test_full_disk_is_exit_9_and_leaves_nothing_complete(case, tmp_path: Path) -> None:
    slide, model, _ = case
    small = tmp_path / "small"
    _mount(small, "size=300k")
    try:
        out = small / "out"
        result = run_cli(*_run(slide, model, out))
        line = _error_line(result.stderr)
        assert result.returncode == 9 and f"cannot write {out / 'case'}: no space left on the device" in line
        assert "free disk space" in line and not (out / "case").exists()
        assert_nothing_looks_complete_but_is_not(out)
        shutil.rmtree(out)
        predicted = run_cli(
            "predict", str(slide), "-o", str(out), "--task", "mitosis", "--model", str(model), "--device", "cpu",
            "--workers", "0", "--no-progress",
        )  # fmt: skip
        # the path is named even where zarr's writing thread does not say which file it was writing
        assert predicted.returncode == 9 and f"cannot write {out}" in _error_line(predicted.stderr)
        assert "no space left" in _error_line(predicted.stderr)
        root = dict(zarr.open_group(str(out / "case" / "heatmaps.zarr"), mode="r").attrs)["wsi_pipeline"]
        assert root["complete"] is False  # the store says it is unfinished
        assert_nothing_looks_complete_but_is_not(out)
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=False)  # detached even while a handle is open


def test_a_heatmap_image_that_fills_the_disk_is_discarded_for_good(tmp_path: Path) -> None:
    """One band of 40 chunks written at once: zarr writes them concurrently, the first ENOSPC raises while the rest
    are still landing, and each landing recreates the temporary folder after a plain removal (CI's `predict` on a
    full disk once left `.heatmaps.zarr.mitosis.tmp-*`). `abort` waits for them; nothing is left, looked at later."""
    full = tmp_path / "full"
    _mount(full, "size=300k")
    try:
        geometry = HeatmapGeometry(256, 256 * 40, 16, 0.0, (0.5, 0.5), (1.0, 1.0))
        writer = HeatmapWriter(full / "heatmaps.zarr", "mitosis", ["mitosis"], geometry, "float32", chunk=256)
        band = np.random.default_rng(0).random((1, 256, 256 * 40), dtype=np.float32)  # incompressible
        writer.write(0, 0, band)
        with pytest.raises(OSError, match="No space left"):
            writer.advance(256)
        writer.abort()
        time.sleep(0.5)
        assert not [p for p in full.rglob("*") if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", "--lazy", str(full)], check=False)


def test_a_library_that_hides_the_errno_is_still_a_write_failure(tmp_path: Path) -> None:
    """torch.save on a full disk raises RuntimeError, not OSError: the failed write is still named (exit 9)."""
    from wsi_pipeline.core.atomic import atomic_path
    from wsi_pipeline.core.errors import OutputWriteError

    full = tmp_path / "full"
    _mount(full, "size=64k")
    try:
        with (
            pytest.raises(OutputWriteError, match=r"cannot write .*ckpt\.pt: no space left") as err,
            atomic_path(full / "ckpt.pt") as tmp,
        ):
            torch.save({"w": torch.zeros(100_000)}, tmp)
        assert err.value.exit_code == 9 and isinstance(err.value.__cause__, RuntimeError)
        assert list(full.iterdir()) == []  # neither the temporary nor the probe is left
    finally:
        subprocess.run(["umount", "--lazy", str(full)], check=False)  # detached even while a handle is open


def test_read_only_and_forbidden_folders_are_exit_9(case, tmp_path: Path) -> None:
    slide, model, _ = case
    forbidden = tmp_path / "forbidden"
    forbidden.mkdir()
    forbidden.chmod(0o555)
    # root writes anywhere: drop the capabilities that let it (setpriv, util-linux) so permissions apply
    if IS_ROOT and shutil.which("setpriv") is None:
        pytest.skip("root ignores folder permissions and setpriv (util-linux) is not installed to drop that")
    prefix = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"] if IS_ROOT else []
    command = [*prefix, sys.executable, "-m", "wsi_pipeline.cli", *_run(slide, model, forbidden / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    line = _error_line(result.stderr)
    assert result.returncode == 9 and f"cannot write {forbidden / 'out'}: permission denied" in line
    assert "fix the folder's permissions" in line
    read_only = tmp_path / "ro"
    _mount(read_only, "ro,size=1m")
    try:
        result = run_cli(*_run(slide, model, read_only / "out"))
        assert result.returncode == 9 and "the file system is read-only" in _error_line(result.stderr)
    finally:
        subprocess.run(["umount", "--lazy", str(read_only)], check=False)  # detached even while a handle is open


def test_submit_without_a_scheduler_is_exit_12(case, tmp_path: Path) -> None:
    slide, _, _ = case
    out = tmp_path / "out"
    result = run_cli("submit", str(slide), "-o", str(out), env={"PATH": str(Path(sys.executable).parent)})
    line = _error_line(result.stderr)
    assert result.returncode == 12 and "sbatch and squeue not found on PATH" in line and "wsi-pipeline run" in line
    assert not out.exists()  # no job scripts, no slide list: nothing that looks submitted


# --- signals ---------------------------------------------------------------------------------------------------
def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wsi_pipeline.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_slide_work(out: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until a slide is being built (its hidden temporary folder exists): the signal lands mid-slide."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and any(p.name.startswith(".case") and ".tmp-" in p.name for p in out.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    pytest.fail("the run never started a slide")


@pytest.mark.parametrize(("sig", "code", "words"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                    (signal.SIGINT, 130, "interrupted")])  # fmt: skip
def test_sigterm_and_sigint_discard_what_was_written(case, tmp_path: Path, sig: int, code: int, words: str) -> None:
    slide, model, reference = case
    out = tmp_path / "out"
    proc = _start(_run(slide, model, out, workers="1"))
    _wait_for_slide_work(out, proc)
    time.sleep(0.5)
    os.killpg(proc.pid, sig)  # the whole process group, as a scheduler or a terminal signals it
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1].startswith(words) and "Traceback" not in stderr
    assert not (out / "case").exists()
    assert_nothing_looks_complete_but_is_not(out)
    finish = run_cli(*_run(slide, model, out))
    assert finish.returncode == 0 and _outputs(out / "case") == _outputs(reference / "case")


def test_a_signal_mid_batch_keeps_the_finished_slides_and_discards_those_in_flight(case, tmp_path: Path) -> None:
    """Slides overlap in a batch (one exported while the next is in the model and the one after is opened):
    SIGTERM then discards every slide not finished, keeps each finished one (and lists it in the manifest), and a
    rerun ends as an uninterrupted run."""
    slide, model, reference = case
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(4):
        shutil.copyfile(slide, folder / f"case{i}.svs")
    out = tmp_path / "out"
    proc = _start(_run(folder, model, out, workers="1"))
    deadline = time.monotonic() + 120
    while not (out / "case0").exists():  # the first slide is finished: the next ones are in flight
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert_nothing_looks_complete_but_is_not(out)
    finished = {p.parent.name for p in out.glob("*/run.json")}
    assert "case0" in finished and len(finished) < 4
    done = {r for r, row in _rows(out).items() if row["status"] == "done"}
    assert done == finished  # the manifest lists exactly the slides whose folders are complete
    again = run_cli(*_run(folder, model, out))
    assert again.returncode == 0, again.stderr
    assert f"{len(finished)} skipped" in again.stdout
    for i in range(4):
        assert _outputs(out / f"case{i}") == _outputs(reference / "case")


def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted(case, tmp_path: Path) -> None:
    slide, model, reference = case
    moments = random.Random(15).sample([0.0, 0.3, 0.8, 1.5, 2.5], 2)
    for moment in moments:
        out = tmp_path / f"killed-{moment}"
        proc = _start(_run(slide, model, out, workers="1"))
        _wait_for_slide_work(out, proc)
        time.sleep(moment)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert_nothing_looks_complete_but_is_not(out, temporaries_allowed=True)
        finish = run_cli(*_run(slide, model, out))
        assert finish.returncode == 0, finish.stderr
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the killed run's leftovers are gone
        assert _outputs(out / "case") == _outputs(reference / "case")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_command_said_it_finished_keeps_its_status(tmp_path: Path, sig: int) -> None:
    """`gather` has written its files and said so; a signal in the interpreter's last ~0.6 s turned its status into
    143/130 without a word. Now the finished command's status stands (here 1: one slide failed)."""
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    (shards / "manifest-0-of-1.csv").write_text(
        "slide,slide_id,status,error,seconds,tiles,note\n/x/a.svs,a,failed,unreadable,0.1,0,\n"
    )
    command = [sys.executable, "-m", "wsi_pipeline.cli", "gather", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = process.stdout.readline()  # type: ignore[union-attr]
    assert said.startswith("wrote "), said
    process.send_signal(sig)  # at once: the interpreter is shutting down
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, (process.returncode, stderr)
    assert "Traceback" not in stderr


def test_an_interrupt_that_lands_in_a_finaliser_prints_no_traceback() -> None:
    """The signal handler's KeyboardInterrupt may be raised inside a __del__ or weakref callback, where Python prints
    "Exception ignored in ..." and a traceback; once a signal is being acted on, that print is dropped (the run
    raises the interrupt again at its next safe point), and other unraisable errors are still printed."""
    code = (
        "import signal\n"
        "from wsi_pipeline.core import errors\n"
        "errors.install_signal_handlers()\n"
        "class Late:\n"
        "    def __init__(self, exc): self.exc = exc\n"
        "    def __del__(self): raise self.exc\n"
        "Late(ValueError('still shown'))\n"
        "errors._RECEIVED.append(signal.SIGINT)\n"
        "Late(KeyboardInterrupt())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "still shown" in done.stderr and done.stderr.count("Exception ignored") == 1


def test_a_signal_that_lands_in_a_finaliser_is_acted_on_at_once(tmp_path: Path) -> None:
    """SIGTERM arriving while a __del__ runs raises there, where Python can only drop it; the run must not carry on
    until its next safe point (a whole stage, past a scheduler's KillWait): the interrupt is raised again at once.
    The work after the finaliser has no safe point, so only that re-delivery can stop it."""
    in_finaliser, carried_on = tmp_path / "in-finaliser", tmp_path / "carried-on"
    code = (
        "import os, sys, time\n"
        "from wsi_pipeline.core import errors\n"
        "errors.install_signal_handlers()\n"
        "class Slow:\n"
        "    def __del__(self):\n"
        f"        open({str(in_finaliser)!r}, 'w').close()\n"
        "        end = time.monotonic() + 30\n"
        "        while time.monotonic() < end: pass\n"
        "try:\n"
        "    Slow()\n"
        "    end = time.monotonic() + 30\n"
        "    while time.monotonic() < end: pass\n"
        f"    open({str(carried_on)!r}, 'w').close()\n"
        "except KeyboardInterrupt as exc:\n"
        "    print(type(exc).__name__, flush=True)\n"
        "    os._exit(143)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not in_finaliser.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout.strip()) == (143, "Terminated"), stderr
    assert not carried_on.exists() and "Exception ignored" not in stderr


def test_a_slide_deleted_while_it_is_read_fails_alone_in_one_line(case, tmp_path: Path) -> None:
    """The slide file removed once its tissue is found, before the reading processes open it (spawned workers start
    in seconds): that slide fails with one line naming it, the next slide is done, nothing half-built remains."""
    slide, model, _ = case
    slides = tmp_path / "slides"
    slides.mkdir()
    doomed = slides / "a-doomed.svs"
    shutil.copy(slide, doomed)
    shutil.copy(slide, slides / "b-kept.svs")
    out = tmp_path / "out"
    proc = _start(_run(slides, model, out, "--set", "engine.loader=processes", workers="1"))
    deadline = time.monotonic() + 120
    while not any(out.glob(".a-doomed.tmp-*/tissue.json")):  # the tissue stage of the first slide has finished
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    doomed.unlink()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr  # one slide failed
    assert "Traceback" not in stderr and "internal error" not in stderr + stdout, stderr
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows["a-doomed"]["status"] == "failed" and str(doomed) in rows["a-doomed"]["error"], rows
    assert "\n" not in rows["a-doomed"]["error"]
    assert rows["b-kept"]["status"] == "done"
    assert not (out / "a-doomed").exists()
    assert_nothing_looks_complete_but_is_not(out)
