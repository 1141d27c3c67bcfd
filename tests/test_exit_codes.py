"""The README's exit-status table, row by row: one real case per exit status, through the CLI in a subprocess, so the
table and the code cannot drift apart. A row added to the table without a case here fails the test."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import CMU, ROOT, TCGA, run_cli
from wsi_pipeline.run.lock import output_lock

pytestmark = pytest.mark.e2e


def table_statuses() -> list[int]:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| exit | meaning |") :].split("\n\n")[0]
    return [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]


def _signalled(sig: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """A `run` that is signalled once its batch has begun (the run folder's lock file exists)."""
    out = tmp_path / f"signalled-{sig}"
    command = [sys.executable, "-m", "wsi_pipeline.cli", "run", str(CMU), "-o", str(out), "--tasks", "metastasis",
               "--device", "cpu", "--workers", "1", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".lock").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def cases(tmp_path: Path) -> dict[int, tuple[Callable[[], subprocess.CompletedProcess[str]], str]]:
    """Each exit status: how to get it, and words of its one-line message."""
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(CMU.read_bytes()[:1_000_000])
    from wsi_pipeline.slide.synth import SynthSpec, write_synthetic_slide

    blank = write_synthetic_slide(tmp_path / "blank.svs", SynthSpec(2000, 1500, 0.5))
    shards = tmp_path / "sharded" / "shards"
    shards.mkdir(parents=True)
    (shards / "manifest-0-of-1.csv").write_text(
        "slide,slide_id,status,error,seconds,tiles,note\n/x/a.svs,a,failed,unreadable,0.1,0,\n"
    )
    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()
    (tmp_path / "no-classes").mkdir()
    locked = tmp_path / "locked"
    no_scheduler = {"PATH": str(Path(sys.executable).parent)}  # the venv's programs: no sbatch, no squeue

    def held() -> subprocess.CompletedProcess[str]:
        with output_lock(locked):
            return run_cli("tissue", str(CMU), "-o", str(locked))

    out = str(tmp_path / "out")
    return {
        0: (lambda: run_cli("config"), ""),
        1: (lambda: run_cli("gather", str(tmp_path / "sharded")), ""),
        2: (lambda: run_cli("predict", str(CMU), "--task", "nosuch", "-o", out), "unknown task 'nosuch'"),
        3: (lambda: run_cli("info", str(tmp_path / "absent.svs")), "absent.svs"),
        4: (lambda: run_cli("info", str(text)), "notes.svs"),
        5: (lambda: run_cli("info", str(cut)), "truncated"),
        6: (lambda: run_cli("tissue", str(TCGA), "-o", out), "--slide-mpp"),
        7: (lambda: run_cli("config", "--set", "tasks.mitosis.tile_pz=3"), "tasks.mitosis.tile_pz"),
        8: (lambda: run_cli("tissue", str(blank), "-o", out), "no tissue"),
        9: (lambda: run_cli("tissue", str(CMU), "-o", str(ROOT / "README.md" / "sub")), "is a file, not a folder"),
        10: (
            lambda: run_cli("predict", str(CMU), "--task", "mitosis", "--model", str(empty_model), "-o", out),
            "model_card.json",
        ),
        11: (held, "another run is writing"),
        12: (lambda: run_cli("submit", str(CMU), "-o", out, env=no_scheduler), "sbatch"),
        13: (
            lambda: run_cli(
                "train", "epithelium_stroma", str(tmp_path / "no-classes"), "-o", out, "--tile-px", "96", "--mpp", "0.5"
            ),
            "no-classes",
        ),
        130: (lambda: _signalled(signal.SIGINT, tmp_path), "interrupted"),
        143: (lambda: _signalled(signal.SIGTERM, tmp_path), "terminated"),
    }


def test_every_row_of_the_readme_exit_table_is_what_the_cli_returns(data_dir: Path, tmp_path: Path) -> None:
    statuses = table_statuses()
    table = cases(tmp_path)
    assert statuses == sorted(table), f"README rows {statuses} against the cases {sorted(table)}"
    for status in statuses:
        make, words = table[status]
        done = make()
        assert done.returncode == status, (status, done.stderr[-2000:])
        if status >= 2:
            errors = [
                line for line in done.stderr.splitlines() if line.startswith(("error: ", "interrupted", "terminated"))
            ]
            assert len(errors) == 1 and words in errors[0], (status, done.stderr[-2000:])
            assert "Traceback" not in done.stderr, (status, done.stderr[-2000:])
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert not os.path.exists(ROOT / "README.md" / "sub")
