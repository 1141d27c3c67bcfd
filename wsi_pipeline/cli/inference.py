"""Commands that run models: predict (one task on one slide) and run (every task on a folder of slides)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from wsi_pipeline.core.errors import UsageError
from wsi_pipeline.core.layout import RunLayout
from wsi_pipeline.slide import Slide

if TYPE_CHECKING:
    from wsi_pipeline.config import Config
    from wsi_pipeline.run.pipeline import SlideOutcome

from wsi_pipeline.cli.common import (
    backend_option,
    config_option,
    default_mpp_option,
    device_option,
    encoder_option,
    mpp_or_auto,
    run_config,
    set_option,
    slide_model_option,
    slide_mpp_option,
    slide_with_mpp,
    work_done,
)


@click.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--task", required=True, help="A registered task (epithelium_stroma, mitosis, metastasis, ...).")
@click.option(
    "--model",
    "model_path",
    type=click.Path(),
    default=None,
    help="Model folder (model_card.json + weights.safetensors); default: tasks.<task>.model.",
)
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Tiles per batch [task's batch_size].")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Tile-reading workers (threads; engine.loader) [cores - 1, at least 1].",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@slide_mpp_option
@default_mpp_option
@backend_option
@config_option
@set_option
def predict(
    slide_path: str,
    out_dir: str,
    task: str,
    model_path: str | None,
    device: str,
    batch_size: int | None,
    workers: int | None,
    progress: bool,
    slide_mpp: float | None,
    default_mpp: float | str | None,
    backend: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Run one task over SLIDE's tiles: OUT/<slide_id>/heatmaps.zarr/<class> (OME-Zarr) and tissue."""
    from wsi_pipeline.engine import default_workers
    from wsi_pipeline.run.lock import single_slide_lock
    from wsi_pipeline.run.settings import engine_options
    from wsi_pipeline.run.stages import predict_stage
    from wsi_pipeline.tasks import get_task

    cfg = run_config(config_path, overrides, backend)
    get_task(task, "--task")
    engine = engine_options(
        cfg,
        device=device,
        workers=default_workers() if workers is None else workers,
        batch_size=batch_size or cfg.task(task).batch_size,
        progress=progress,
    )
    # the slide opens first (a missing or unreadable file leaves no OUT), then its lock beside OUT's (shared)
    with (
        Slide(slide_path, mpp=slide_mpp, backend=cfg.slide.backend) as opened,
        single_slide_lock(Path(out_dir), opened.slide_id),
    ):
        slide = slide_with_mpp(opened, default_mpp)
        layout = RunLayout(Path(out_dir)).slide(slide.slide_id)
        result = predict_stage(slide, cfg, task, layout, engine, model_path=model_path)
    read = result["timings"]["reads"][0]
    click.echo(
        f"{slide.slide_id}: {result['tiles']} tiles with {result['model']} on {read['device']} in "
        f"{read['seconds']:.1f} s ({read['tiles_per_s'] or 0:.1f} tiles/s)"
    )
    for name in result["heatmaps"]:
        click.echo(f"  heatmap  {result['store'] / name}")


@click.command()
@click.argument("slides", nargs=-1)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option(
    "--slide-list",
    type=click.Path(dir_okay=False),
    default=None,
    help="A file with one slide path per line (added to SLIDES).",
)
@click.option("--tasks", default=None, help="Comma-separated tasks to run [every enabled task].")
@device_option
@click.option(
    "--workers", type=click.IntRange(min=0), default=None, help="Tile-reading threads (engine.loader) [cores - 1]."
)
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs are complete and compatible.")
@click.option(
    "--default-mpp",
    type=mpp_or_auto,
    default=None,
    help="µm/px for slides that record none; `auto` estimates each from its tissue (docs/mpp.md).",
)
@click.option(
    "--mpp-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="CSV with columns slide,mpp: per-slide µm/px that override the files.",
)
@click.option(
    "--dask-scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run post-processing on an existing dask scheduler (tcp://host:port) [a local one].",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Process only shard I of N (0-based, round-robin over the sorted slide list).",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Per-tile progress bars (the one line per finished slide always comes).",
)
@encoder_option
@slide_model_option
@backend_option
@config_option
@set_option
def run(
    slides: tuple[str, ...],
    out_dir: str,
    slide_list: str | None,
    tasks: str | None,
    device: str,
    workers: int | None,
    overwrite: bool,
    default_mpp: float | str | None,
    mpp_file: str | None,
    dask_scheduler: str | None,
    shard: str | None,
    progress: bool,
    backend: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    encoders: tuple[str, ...],
    slide_model_dir: str | None,
) -> None:
    """Run the pipeline on SLIDES (files, folders, glob patterns): see docs/outputs.md for what OUT holds."""
    from wsi_pipeline.run.inputs import select_tasks

    # the command line checked before torch is imported: a mistake costs half a second, not three
    inputs = slide_inputs(slides, slide_list)
    shard_spec = _shard(shard)
    slide_model = (f"slide_classifier.model={slide_model_dir}",) if slide_model_dir else ()
    cfg = run_config(config_path, (*overrides, *encoder_overrides(encoders), *slide_model), backend)
    task_list = select_tasks(cfg, tasks)
    execute_run(
        inputs, Path(out_dir), cfg, task_list, device=device, workers=workers, progress=progress, overwrite=overwrite,
        default_mpp=default_mpp, mpp_file=mpp_file, shard=shard_spec, dask_scheduler=dask_scheduler,
    )  # fmt: skip


def slide_inputs(slides: tuple[str, ...], slide_list: str | None) -> list[str]:
    from wsi_pipeline.run.inputs import read_slide_list

    inputs = [*slides, *(read_slide_list(slide_list) if slide_list else [])]
    if not inputs:
        raise UsageError("give slides (files, folders or glob patterns) or --slide-list FILE")
    return inputs


def _shard(shard: str | None) -> tuple[int, int] | None:
    from wsi_pipeline.run.inputs import parse_shard

    return parse_shard(shard) if shard else None


def encoder_overrides(encoders: tuple[str, ...]) -> tuple[str, ...]:
    """`--encoder DIR` (repeatable) as the configuration's `embed.encoders` (a YAML list: paths with commas work)."""
    if not encoders:
        return ()
    import json

    return (f"embed.encoders={json.dumps([str(Path(e)) for e in encoders])}",)


def execute_run(
    inputs: list[str],
    out_dir: Path,
    cfg: Config,
    task_list: list[str],
    *,
    device: str,
    workers: int | None,
    progress: bool,
    overwrite: bool,
    default_mpp: float | str | None,
    mpp_file: str | None,
    shard: tuple[int, int] | None,
    dask_scheduler: str | None,
) -> None:
    """`run` and `embed`: the batch over the slides, one line per slide, the summary table, the exit status."""
    from wsi_pipeline.run.inputs import read_mpp_file

    if mpp_file:
        read_mpp_file(mpp_file)

    from wsi_pipeline.engine import default_workers
    from wsi_pipeline.run.batch import run_batch, summary_table
    from wsi_pipeline.run.settings import RunSettings

    def report(outcome: SlideOutcome) -> None:
        text = f"{outcome.slide_id}: {outcome.status} ({outcome.seconds:.1f} s)"
        detail = outcome.error or outcome.note
        click.echo(text + (f" — {detail}" if detail else ""), err=outcome.status == "failed")

    settings = RunSettings.of(
        cfg,
        task_list,
        device=device,
        workers=default_workers() if workers is None else workers,
        progress=progress,
        overwrite=overwrite,
        default_mpp=default_mpp,
    )
    result = run_batch(
        inputs, out_dir, settings, mpp_file=mpp_file, shard=shard, dask_scheduler=dask_scheduler, on_slide=report
    )
    work_done()
    click.echo(summary_table(result))
    listing = "shards/manifest-*.csv; merge with `wsi-pipeline gather`" if shard else "manifest.csv, cohort_summary.csv"
    click.echo(f"outputs in {out_dir.resolve()} ({listing}, <slide_id>/)")
    sys.exit(result.exit_code)
