"""Cluster submission through SLURM job arrays: one array task per group of slides, then a gather job.

An sbatch array is the simplest robust engine here: every task is an ordinary `wsi-pipeline run --shard I/N` over a
slide list fixed at submission (so shards cannot shift if files appear later), resumable like any run; the gather
job depends on the array with `afterany`, so it also runs when tasks fail or are cancelled, and records their slides
as failed. Progress is followed with `squeue`, which needs no accounting database.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.core.atomic import write_text
from wsi_pipeline.core.errors import UsageError, WsiError
from wsi_pipeline.core.layout import RunLayout
from wsi_pipeline.run.inputs import assign_ids, discover

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


SQUEUE_ATTEMPTS = 3  # squeue calls in a row that may fail before `wait` gives up


class ClusterError(WsiError):
    exit_code = 12
    kind = "cluster"


@dataclass
class JobResources:
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 4
    mem_per_job: str = "8G"
    time_limit: str | None = None
    account: str | None = None


@dataclass(frozen=True)
class RunOptions:
    """The `run` options every array task passes on, as the user gave them to `submit`."""

    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    tasks: str | None = None
    device: str | None = None
    default_mpp: float | str | None = None
    mpp_file: str | None = None
    overwrite: bool = False

    def arguments(self) -> list[str]:
        """The same options on `run`'s command line (paths made absolute: jobs start elsewhere)."""
        options: list[str] = []
        if self.config_path:
            options += ["-c", str(Path(self.config_path).resolve())]
        for item in self.overrides:
            options += ["--set", item]
        for flag, value in (("--tasks", self.tasks), ("--device", self.device), ("--default-mpp", self.default_mpp)):
            if value is not None:
                options += [flag, str(value)]
        if self.mpp_file:
            options += ["--mpp-file", str(Path(self.mpp_file).resolve())]
        if self.overwrite:
            options.append("--overwrite")
        return options


@dataclass
class SubmitPlan:
    slides: list[Path]
    shards: int
    out: Path
    array_script: str
    gather_script: str

    @property
    def list_file(self) -> Path:
        return RunLayout(self.out).submitted_list


def _directives(resources: JobResources, name: str, log: str) -> list[str]:
    lines = [f"#SBATCH --job-name={name}", f"#SBATCH --output={log}", "#SBATCH --ntasks=1"]
    if resources.partition:
        lines.append(f"#SBATCH --partition={resources.partition}")
    if resources.account:
        lines.append(f"#SBATCH --account={resources.account}")
    if resources.time_limit:
        lines.append(f"#SBATCH --time={resources.time_limit}")
    return lines


def plan_submission(
    inputs: Sequence[str],
    out: Path,
    resources: JobResources,
    slides_per_job: int,
    run_options: RunOptions,
    python: str = sys.executable,
) -> SubmitPlan:
    """The slide list and the two job scripts (nothing is written or submitted)."""
    if slides_per_job < 1:
        raise UsageError("--slides-per-job must be at least 1")
    slides = [p.resolve() for p in discover(inputs)]
    if not slides:
        raise UsageError(f"no slides found in {', '.join(inputs)}")
    assign_ids(slides)  # two slides that would share an output folder are refused before anything is queued
    out = out.resolve()
    shards = math.ceil(len(slides) / slides_per_job)
    layout = RunLayout(out)
    logs = layout.logs
    cli = f"{shlex.quote(python)} -m wsi_pipeline.cli"
    array = [
        "#!/bin/bash",
        *_directives(resources, "wsi-pipeline", str(logs / "slurm-%A_%a.out")),
        f"#SBATCH --array=0-{shards - 1}",
        f"#SBATCH --cpus-per-task={resources.cpus_per_job}",
        f"#SBATCH --mem={resources.mem_per_job}",
    ]
    if resources.gpus_per_job:
        array.append(f"#SBATCH --gres=gpu:{resources.gpus_per_job}")
    workers = max(1, resources.cpus_per_job - 1)
    run = [
        f"{cli} run -o {shlex.quote(str(out))} --slide-list {shlex.quote(str(layout.submitted_list))}",
        f"--shard ${{SLURM_ARRAY_TASK_ID}}/{shards} --workers {workers} --no-progress",
        *(shlex.quote(o) for o in run_options.arguments()),
    ]
    # exec: the scheduler's SIGTERM (time limit, preemption, scancel) reaches `run` itself, which discards what it
    # was writing and exits 143; the next submission redoes that shard's unfinished slides
    array += ["set -uo pipefail", "exec " + " ".join(run)]
    gather = [
        "#!/bin/bash",
        *_directives(resources, "wsi-pipeline-gather", str(logs / "slurm-gather-%j.out")),
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=1G",
        f"{cli} gather {shlex.quote(str(out))}",
    ]
    return SubmitPlan(slides, shards, out, "\n".join(array) + "\n", "\n".join(gather) + "\n")


def require_scheduler() -> None:
    """SLURM's commands on PATH, checked before anything is written."""
    missing = [command for command in ("sbatch", "squeue") if shutil.which(command) is None]
    if missing:
        raise ClusterError(
            f"{' and '.join(missing)} not found on PATH: submit from a SLURM login node (or load its module, e.g. "
            "`module load slurm`); without a cluster, run the slides here with `wsi-pipeline run`"
        )


def _sbatch(script: Path, *extra: str) -> str:
    try:
        done = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"sbatch could not be run for {script}: {exc}") from exc
    if done.returncode != 0:
        raise ClusterError(f"sbatch refused {script}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """State of every job and array task that squeue still knows, keyed by its id (e.g. `12_0`)."""
    done = subprocess.run(
        ["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%T"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return {}
        raise ClusterError(f"squeue failed: {done.stderr.strip()}")
    states = {}
    for line in done.stdout.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.strip()
    return states


def _job_states_patiently(job_ids: Sequence[str], poll_s: float) -> dict[str, str]:
    """`job_states`, asked again `poll_s` later when squeue fails: a busy or stalled controller times a query out now
    and then (after 2 x MessageTimeout) while the jobs go on."""
    for _ in range(SQUEUE_ATTEMPTS - 1):
        try:
            return job_states(job_ids)
        except ClusterError:
            time.sleep(poll_s)
    return job_states(job_ids)  # the last attempt's failure is the caller's


def submit(
    plan: SubmitPlan,
    *,
    follow: bool = True,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
    echo: Callable[[str], None] = print,
) -> tuple[str, str]:
    """Write the list and scripts under OUT/shards/, submit the array and the gather job, and (with `follow`) wait
    until the gather job has ended. Returns (array job id, gather job id)."""
    require_scheduler()
    layout = RunLayout(plan.out)
    folder = layout.submit_folder(time.strftime("%Y%m%d-%H%M%S"))
    layout.logs.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    array_path, gather_path = folder / "array.sbatch", folder / "gather.sbatch"
    try:
        write_text(plan.list_file, "".join(f"{p}\n" for p in plan.slides))
        layout.shard_plan.unlink(missing_ok=True)  # a new submission cuts the (new) list anew
        write_text(array_path, plan.array_script)
        write_text(gather_path, plan.gather_script)
        array_id = _sbatch(array_path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing was queued: leave no scripts that look submitted
        raise
    gather_id = _sbatch(gather_path, f"--dependency=afterany:{array_id}")
    echo(
        f"submitted array job {array_id} ({plan.shards} task(s) for {len(plan.slides)} slide(s)) and gather job "
        f"{gather_id}; scripts in {folder}"
    )
    if follow:
        wait(array_id, gather_id, timeout_s=timeout_s, poll_s=poll_s, echo=echo)
    return array_id, gather_id


def wait(array_id: str, gather_id: str, *, timeout_s: float | None, poll_s: float, echo: Callable[[str], None]) -> None:
    """Poll squeue until the gather job is finished; every wait has a deadline when `timeout_s` is given."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = ""
    while True:
        states = _job_states_patiently([array_id, gather_id], poll_s)
        tasks = {k: v for k, v in states.items() if k.startswith(f"{array_id}_")}
        counts: dict[str, int] = {}
        for state in tasks.values():
            counts[state] = counts.get(state, 0) + 1
        line = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "waiting"
        gather_state = states.get(gather_id, "gone")
        line = f"array {array_id}: {line}; gather {gather_id}: {gather_state.lower()}"
        if line != last:
            echo(line)
            last = line
        if gather_state in TERMINAL_STATES or gather_state == "gone":
            if gather_state not in ("COMPLETED", "gone"):
                echo(f"gather job {gather_id} ended {gather_state}")
            return
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(
                f"gave up waiting after {timeout_s:.0f} s; the jobs go on (squeue -j {array_id},"
                f"{gather_id}); run `wsi-pipeline gather OUT` when they have ended"
            )
        time.sleep(poll_s)
