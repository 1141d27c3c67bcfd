"""Every code example in docs/ and the README runs or is checked here, as a reader would use it: the task of
docs/architecture.md as a plugin of `wsi-pipeline run`, the conformance-suite lines of docs/readers.md in a third
party's own pytest run, the dask-jobqueue lines of docs/cluster.md in tests/test_cluster.py (they need a SLURM), and
every `wsi-pipeline` and `make` command in a shell block against the real command line. A new Python example that
nothing here runs fails `test_every_python_example_is_run`."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CMU, ROOT, run_cli, write_density_model
from tests.helpers.docs import blocks, example

# each Python example and the test that runs it (by a line the block contains)
RUN_BY = {
    ("architecture.md", "class DensityTask:"): "test_the_architecture_docs_task_runs_as_a_plugin",
    ("readers.md", "class TestMyReader(ReaderConformance):"): "test_the_readers_docs_conformance_lines_run",
    ("cluster.md", "SLURMCluster("): "tests/test_cluster.py::test_the_cluster_docs_dask_jobqueue_lines_run",
}


def test_every_python_example_is_run() -> None:
    unrun = [
        f"{path.relative_to(ROOT)}: {code.splitlines()[0]!r}"
        for path, code in blocks("python")
        if not any(path.name == doc and marker in code for doc, marker in RUN_BY)
    ]
    assert not unrun, f"Python examples no test runs (add one to RUN_BY): {unrun}"
    for doc, marker in RUN_BY:
        example(doc, marker)  # each is still there, once


def _command_options() -> dict[str, set[str]]:
    """Every `wsi-pipeline` command and the options it takes, from the real click command line."""
    from wsi_pipeline.cli import main

    commands: dict[str, set[str]] = {}
    for name, command in main.commands.items():
        commands[name] = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
        commands[name] |= {"-h", "--help"}
    return commands


def test_every_shell_command_in_the_docs_exists_with_its_options() -> None:
    """`wsi-pipeline CMD --opt ...` and `make TARGET` lines of every bash block: the command, each option and each
    make target exist, so a renamed option cannot leave a doc behind."""
    commands = _command_options()
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    problems, checked = [], 0
    for path, code in blocks("bash"):
        text = code.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            for words in (part.split() for part in re.split(r"&&|;|\|", line)):
                if len(words) >= 2 and words[0] == "wsi-pipeline" and not words[1].startswith("-"):
                    checked += 1
                    if words[1] not in commands:
                        problems.append(f"{path.name}: unknown command {words[1]!r}")
                        continue
                    options = {w.split("=")[0].strip("[]") for w in words[2:] if w.lstrip("[").startswith("-")}
                    problems += [f"{path.name}: {words[1]} has no {o}" for o in options - commands[words[1]]]
                elif len(words) >= 2 and words[0] == "make":
                    checked += 1
                    problems += [
                        f"{path.name}: no make target {t}" for t in words[1:] if "=" not in t and t not in targets
                    ]
    assert checked >= 10, f"only {checked} commands found in the docs' bash blocks"
    assert not problems, problems


def test_no_test_module_imports_another() -> None:
    """Shared code lives in tests/helpers/, as docs/architecture.md says."""
    imports = [
        f"{path.name}: {line.strip()}"
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        for line in path.read_text().splitlines()
        if re.match(r"\s*(from tests\.test_|import tests\.test_)", line)
    ]
    assert not imports, imports


@pytest.mark.e2e
def test_the_architecture_docs_task_runs_as_a_plugin(data_dir: Path, tmp_path: Path) -> None:
    """The example task, as written, registered from a file named in the configuration: `run` writes its heatmap,
    summary entry, cohort column, report column, QuPath regions and overlay."""
    plugin = tmp_path / "density_task.py"
    plugin.write_text(example("architecture.md", "class DensityTask:"))
    model = write_density_model(tmp_path / "model")
    config = tmp_path / "config.yaml"
    config.write_text(f"plugins: ['{plugin}:register']\ntasks:\n  haematoxylin_density:\n    model: {model}\n")
    out = tmp_path / "out"
    done = run_cli("run", str(CMU), "-o", str(out), "-c", str(config), "--tasks", "haematoxylin_density",
                   "--device", "cpu", "--workers", "1", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    slide = out / CMU.stem
    summary = json.loads((slide / "summary.json").read_text())["haematoxylin_density"]
    assert 0.0 < summary["mean_density"] < 1.0
    row = next(csv.DictReader((out / "cohort_summary.csv").open()))
    assert float(row["haematoxylin_density_mean_density"]) == summary["mean_density"]
    assert "haematoxylin density" in (out / "report.html").read_text()
    features = json.loads((slide / "qupath.geojson").read_text())["features"]
    dense = [f for f in features if f["properties"].get("classification", {}).get("name") == "Dense"]
    assert dense and all(f["properties"]["objectType"] == "annotation" for f in dense)
    assert (slide / "heatmaps.zarr" / "haematoxylin").is_dir() and (
        slide / "overlay-haematoxylin_density.png"
    ).is_file()


THIRD_PARTY_BACKEND = """
from wsi_pipeline.slide.backends.tifffile_direct import TiffDirectReader
from wsi_pipeline.slide.reader import register_backend


class MyReader(TiffDirectReader):
    backend = "mine"


register_backend("mine", MyReader, accepts=lambda path: False)
"""


@pytest.mark.e2e
def test_the_readers_docs_conformance_lines_run(tmp_path: Path) -> None:
    """The three lines of docs/readers.md in a third party's test file (beside its own backend, registered as a
    plugin would), run by its own pytest outside this repository: every check of the suite runs and passes."""
    test_file = tmp_path / "test_my_reader.py"
    test_file.write_text(THIRD_PARTY_BACKEND + "\n\n" + example("readers.md", "class TestMyReader(ReaderConformance):"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(test_file)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    from wsi_pipeline.testing import ReaderConformance

    checks = sum(5 if name == "test_a_region_equals_the_same_pixels_of_a_larger_read" else 1
                 for name in dir(ReaderConformance) if name.startswith("test_"))  # fmt: skip
    assert f"{checks} passed" in done.stdout, done.stdout[-1000:]
