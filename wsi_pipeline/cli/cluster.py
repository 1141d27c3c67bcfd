"""Cluster commands: submit (SLURM job arrays + a gather job) and gather (merge shard manifests)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_pipeline.cli.common import config_option, mpp_or_auto, run_config, set_option, work_done


@click.command()
@click.argument("slides", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--scheduler", type=click.Choice(["slurm"]), default="slurm", show_default=True)
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--account", default=None, help="SLURM account.")
@click.option("--gpus-per-job", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--cpus-per-job", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--mem-per-job", default="8G", show_default=True, help="Memory per job (see docs/cluster.md).")
@click.option("--time", "time_limit", default=None, help="Time limit per job, e.g. 04:00:00.")
@click.option("--slides-per-job", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--tasks", default=None, help="Comma-separated tasks (passed to run).")
@click.option("--device", default=None, help="Passed to run (default: auto).")
@click.option("--mpp-file", type=click.Path(dir_okay=False), default=None, help="Passed to run.")
@click.option("--default-mpp", type=mpp_or_auto, default=None, help="Passed to run (a µm/px or auto).")
@click.option("--overwrite", is_flag=True, help="Passed to run.")
@click.option("--dry-run", is_flag=True, help="Print the job scripts; submit nothing.")
@click.option("--no-follow", is_flag=True, help="Submit and return at once (then `gather` when done).")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Stop following after this many seconds.")
@config_option
@set_option
def submit(
    slides: tuple[str, ...],
    out_dir: str,
    scheduler: str,
    partition: str | None,
    account: str | None,
    gpus_per_job: int,
    cpus_per_job: int,
    mem_per_job: str,
    time_limit: str | None,
    slides_per_job: int,
    tasks: str | None,
    device: str | None,
    mpp_file: str | None,
    default_mpp: float | str | None,
    overwrite: bool,
    dry_run: bool,
    no_follow: bool,
    timeout_s: float | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Run SLIDES on a SLURM cluster: one array task per --slides-per-job slides, then a gather job."""
    from wsi_pipeline.run.batch import summary_table
    from wsi_pipeline.run.cluster import JobResources, RunOptions, plan_submission
    from wsi_pipeline.run.cluster import submit as submit_jobs
    from wsi_pipeline.run.cohort import read_manifest_outcomes

    run_config(config_path, overrides)  # validate here, before anything is submitted
    options = RunOptions(config_path, overrides, tasks, device, default_mpp, mpp_file, overwrite)
    resources = JobResources(partition, gpus_per_job, cpus_per_job, mem_per_job, time_limit, account)
    plan = plan_submission(slides, Path(out_dir), resources, slides_per_job, options)
    if dry_run:
        click.echo(f"# {len(plan.slides)} slide(s) in {plan.shards} array task(s); slide list -> {plan.list_file}")
        click.echo("# --- array job ---")
        click.echo(plan.array_script)
        click.echo("# --- gather job (after the array, --dependency=afterany) ---")
        click.echo(plan.gather_script)
        return
    submit_jobs(plan, follow=not no_follow, timeout_s=timeout_s, echo=click.echo)
    if no_follow:
        return
    result = read_manifest_outcomes(plan.out)
    click.echo(summary_table(result))
    sys.exit(result.exit_code)


@click.command()
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False, exists=True))
def gather(out_dir: str) -> None:
    """Merge the manifests of `run --shard` jobs into OUT/manifest.csv and OUT/cohort_summary.csv."""
    from wsi_pipeline.run.cohort import gather as gather_outputs

    manifest, cohort, failed = gather_outputs(Path(out_dir))
    work_done()
    report = Path(out_dir) / "report.html"
    click.echo(f"wrote {manifest}, {cohort} and {report}" + (f"; {failed} slide(s) failed" if failed else ""))
    sys.exit(1 if failed else 0)
