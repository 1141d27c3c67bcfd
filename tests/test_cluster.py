"""Cluster submission against a real one-node SLURM on localhost (started by the tests)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import mitosis_options, run_cli, run_outputs
from tests.helpers.docs import example
from tests.helpers.slurm import LocalSlurm, unavailable_reason
from wsi_pipeline.models.demo import write_figure_detector
from wsi_pipeline.run.cluster import wait
from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

pytestmark = pytest.mark.e2e  # the CLI in subprocesses / whole runs

HARD_TIMEOUT = 300  # seconds; every wait on the scheduler has one


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"cluster tests must run in CI: {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def three_slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("three")
    for seed in (21, 22, 23):
        write_synthetic_slide(
            root / "slides" / f"c{seed}.svs", default_layout(4000, 3000, 0.25, seed=seed, n_figures=5)
        )
    return root / "slides", write_figure_detector(root / "model", 0.25)


def _common(model: Path) -> list[str]:
    return mitosis_options(model)


def _jobs_known() -> set[str]:
    listing = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i"], capture_output=True, text=True, timeout=60)
    return set(listing.stdout.split())


def _workflow_config(tmp_path: Path, slides: Path, model: Path, **resources: int) -> Path:
    """A workflows/Snakefile configuration writing to tmp_path/wf with 2 slides per job."""
    import yaml

    config = tmp_path / "wf.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "slides": [str(slides)],
                "out": str(tmp_path / "wf"),
                "slides_per_job": 2,
                "wsi_pipeline": f"{sys.executable} -m wsi_pipeline.cli",
                "run_options": _common(model),
                "resources": {"cpus": 1, "mem_mb": 2000, **resources},
            }
        )
    )
    return config


def _wait_until_ended(array_id: str, gather_id: str, deadline: float) -> None:
    """Until the gather job has ended (it waits for the array's tasks), as `submit` follows it, within the deadline."""
    wait(array_id, gather_id, timeout_s=deadline - time.monotonic(), poll_s=0.5, echo=lambda line: None)


def _submit(slides: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "submit",
        str(slides),
        "-o",
        str(out),
        "--cpus-per-job",
        "1",
        "--mem-per-job",
        "2G",
        "--timeout",
        str(HARD_TIMEOUT),
        *_common(model),
        *extra,
    )


def test_dry_run_scripts_are_valid_sbatch(slurm: LocalSlurm, three_slides, tmp_path: Path) -> None:
    slides, model = three_slides
    result = _submit(slides, model, tmp_path / "out", "--slides-per-job", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "3 slide(s) in 2 array task(s)" in result.stdout
    array_text = result.stdout.split("# --- array job ---\n")[1].split("# --- gather job")[0]
    gather_text = result.stdout.split("--dependency=afterany) ---\n")[1]
    assert "#SBATCH --array=0-1" in array_text and "--shard ${SLURM_ARRAY_TASK_ID}/2" in array_text
    for text in (array_text, gather_text):
        script = tmp_path / "job.sbatch"
        script.write_text(text)
        check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "to start at" in check.stderr, check.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_three_slides_as_two_jobs_equal_a_local_run(slurm: LocalSlurm, three_slides, tmp_path: Path) -> None:
    slides, model = three_slides
    local = tmp_path / "local"
    assert run_cli("run", str(slides), "-o", str(local), "--no-progress", *_common(model)).returncode == 0
    out = tmp_path / "cluster"
    result = _submit(slides, model, out, "--slides-per-job", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(2 task(s) for 3 slide(s))" in result.stdout
    assert "3 slides: 3 done, 0 skipped, 0 failed" in result.stdout
    assert (out / "cohort_summary.csv").read_text() == (local / "cohort_summary.csv").read_text()
    assert run_outputs(out) == run_outputs(local)


def test_cancelled_job_is_reported_and_resubmit_completes(slurm: LocalSlurm, three_slides, tmp_path: Path) -> None:
    slides, model = three_slides
    out = tmp_path / "out"
    # three one-CPU tasks on a two-CPU node: task 2 waits in the queue, and is cancelled there
    first = _submit(slides, model, out, "--slides-per-job", "1", "--no-follow")
    assert first.returncode == 0, first.stderr
    array_id = first.stdout.split("submitted array job ")[1].split()[0]
    gather_id = first.stdout.split("gather job ")[1].split(";")[0]
    subprocess.run(["scancel", f"{array_id}_2"], check=True, timeout=60)
    deadline = time.monotonic() + HARD_TIMEOUT
    _wait_until_ended(array_id, gather_id, deadline)
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows["c23"]["status"] == "failed" and "submit again" in rows["c23"]["error"]
    assert rows["c21"]["status"] == rows["c22"]["status"] == "done"
    again = _submit(slides, model, out, "--slides-per-job", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 slides: 1 done, 2 skipped, 0 failed" in again.stdout


def test_following_outlasts_a_controller_that_stops_answering(slurm: LocalSlurm, three_slides, tmp_path: Path) -> None:
    """A busy or stalled slurmctld times a query out (squeue fails after 2 x MessageTimeout, 20 s here); `submit`
    asks again on its next poll instead of giving up on jobs that go on (it gives up after SQUEUE_ATTEMPTS)."""
    slides, model = three_slides
    out = tmp_path / "out"
    command = [sys.executable, "-m", "wsi_pipeline.cli", "submit", str(slides), "-o", str(out), "--cpus-per-job", "1"]
    command += ["--mem-per-job", "2G", "--slides-per-job", "2", "--timeout", str(HARD_TIMEOUT), *_common(model)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    submitted = proc.stdout.readline()
    assert submitted.startswith("submitted array job"), submitted + proc.communicate()[1]
    controller = int((slurm.root / "slurmctld.pid").read_text())
    os.kill(controller, signal.SIGSTOP)
    try:
        time.sleep(23)  # the follower's squeue waits 20 s for an answer, then fails
    finally:
        os.kill(controller, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=HARD_TIMEOUT)
    assert proc.returncode == 0, submitted + stdout + stderr
    assert "3 slides: 3 done, 0 skipped, 0 failed" in stdout


def test_snakefile_with_the_local_executor_equals_a_local_run(three_slides, tmp_path: Path) -> None:
    slides, model = three_slides
    local = tmp_path / "local"
    assert run_cli("run", str(slides), "-o", str(local), "--no-progress", *_common(model)).returncode == 0
    config = _workflow_config(tmp_path, slides, model)
    snakefile = Path(__file__).resolve().parent.parent / "workflows" / "Snakefile"
    snakemake = Path(sys.executable).parent / "snakemake"
    result = subprocess.run(
        [
            str(snakemake),
            "-s",
            str(snakefile),
            "--configfile",
            str(config),
            "--cores",
            "2",
            "--directory",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=HARD_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "wf"
    assert (out / "cohort_summary.csv").read_text() == (local / "cohort_summary.csv").read_text()
    assert run_outputs(out) == run_outputs(local)
    assert sorted(p.name for p in (out / "shards").glob("manifest-*.csv")) == [
        "manifest-0-of-2.csv",
        "manifest-1-of-2.csv",
    ]


def test_snakefile_with_the_slurm_profile(slurm: LocalSlurm, three_slides, tmp_path: Path) -> None:
    slides, model = three_slides
    config = _workflow_config(tmp_path, slides, model, runtime_min=30)
    jobs_before = _jobs_known()
    workflows = Path(__file__).resolve().parent.parent / "workflows"
    snakemake = Path(sys.executable).parent / "snakemake"
    # Snakemake ignores SIGTERM while it waits on SLURM: a hard SIGKILL deadline keeps CI from hanging
    result = subprocess.run(
        [
            "timeout",
            "-s",
            "KILL",
            str(HARD_TIMEOUT),
            str(snakemake),
            "-s",
            str(workflows / "Snakefile"),
            "--configfile",
            str(config),
            "--profile",
            str(workflows / "profiles" / "slurm"),
            "--directory",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "wf" / "manifest.csv").open()))
    assert [r["status"] for r in rows] == ["done"] * 3
    # the two shard jobs really went through SLURM (finished jobs stay listed for MinJobAge = 600 s)
    assert len(_jobs_known() - jobs_before) >= 2


def test_a_running_job_the_scheduler_terminates_is_redone_by_the_next_submission(
    slurm: LocalSlurm, tmp_path: Path
) -> None:
    """`scancel` of a running task sends SIGTERM (as a time limit or preemption does): the job script execs `run`,
    which discards the slide it was writing and exits 143; gather records the slide; submitting again redoes it."""
    slides = tmp_path / "slides"
    write_synthetic_slide(slides / "big.svs", default_layout(9000, 7000, 0.25, seed=4, n_figures=5))
    model = write_figure_detector(tmp_path / "model", 0.25)
    out = tmp_path / "out"
    first = _submit(slides, model, out, "--no-follow")
    assert first.returncode == 0, first.stderr
    array_id = first.stdout.split("submitted array job ")[1].split()[0]
    gather_id = first.stdout.split("gather job ")[1].split(";")[0]
    deadline = time.monotonic() + HARD_TIMEOUT
    while not (out.exists() and any(p.name.startswith(".big.tmp-") for p in out.iterdir())):
        assert time.monotonic() < deadline, "the job never started its slide"
        time.sleep(0.05)
    subprocess.run(["scancel", f"{array_id}_0"], check=True, timeout=60)
    _wait_until_ended(array_id, gather_id, deadline)
    log = (out / "shards" / "logs" / f"slurm-{array_id}_0.out").read_text()
    # seen once in a CI rehearsal with KillWait=5: the log held only slurmstepd's CANCELLED line, the run SIGKILLed
    # 4.7 s after the cancel (tests/helpers/slurm.py); the scheduler's own record of the job goes into the message
    # (read only when it fails) so that a repeat says more
    assert "terminated (SIGTERM): outputs being written were discarded" in log and "Traceback" not in log, (
        log,
        (slurm.root / "slurmd.log").read_text().splitlines()[-6:],
    )
    row = next(csv.DictReader((out / "manifest.csv").open()))
    assert row["status"] == "failed" and "submit again" in row["error"]
    assert not (out / "big").exists() and not any(".tmp-" in p.name for p in out.iterdir())
    again = _submit(slides, model, out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 slides: 1 done, 0 skipped, 0 failed" in again.stdout


DOCS_CLUSTER_LINES = """
import sys

{example}
sys.stdout.flush()
sys.stdin.readline()  # the test's run is done
cluster.close()
"""


def test_the_cluster_docs_dask_jobqueue_lines_run(slurm: LocalSlurm, three_slides, tmp_path: Path) -> None:
    """docs/cluster.md's dask-jobqueue lines as written, but for the 2 cores this one-node SLURM has (cores=8 would
    never be scheduled): a SLURM job starts a dask worker, and `run --dask-scheduler` with the address they print
    gives the same outputs as a run without it."""
    from distributed import Client

    code = example("cluster.md", "SLURMCluster(")
    assert "cores=8" in code
    script = tmp_path / "dask_slurm.py"
    script.write_text(DOCS_CLUSTER_LINES.format(example=code.replace("cores=8", "cores=2")))
    started = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        address = started.stdout.readline().strip()  # type: ignore[union-attr]
        assert address.startswith("tcp://"), address
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=HARD_TIMEOUT)  # the worker runs as a SLURM job
        slides, model = three_slides
        one = [str(next(iter(sorted(slides.glob("*.svs")))))]
        args = [*_common(model), "--workers", "1", "--no-progress"]
        via_slurm = run_cli("run", *one, "-o", str(tmp_path / "dask"), *args, "--dask-scheduler", address)
        assert via_slurm.returncode == 0, via_slurm.stderr
        local = run_cli("run", *one, "-o", str(tmp_path / "local"), *args)
        assert local.returncode == 0, local.stderr
        assert run_outputs(tmp_path / "dask") == run_outputs(tmp_path / "local")
    finally:
        started.communicate("done\n", timeout=120)
