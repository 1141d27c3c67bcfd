"""The `wsi-pipeline` command line: parses options and delegates; every user-facing error is one line + exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import Config, dump_config, load_config
from .errors import ConfigError, MissingMppError, WsiError
from .slide import Slide

TASK_NAMES = ("epithelium_stroma", "mitosis", "metastasis")


class _Group(click.Group):
    """Turns WsiError into `error: ...` on stderr with the error's exit status; Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WsiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: outputs being written were discarded; re-run to finish", err=True)
            sys.exit(130)


slide_mpp_option = click.option(
    "--slide-mpp",
    type=float,
    default=None,
    help="µm/px of the slide's level 0, overriding its metadata (needed when the file records none).",
)
config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML configuration (see configs/default.yaml).",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any configuration key, e.g. --set tasks.mitosis.tile_px=512.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="wsi-pipeline")
def main() -> None:
    """Whole-slide image analysis: tissue, tiles, CNN heatmaps and QuPath outputs."""


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option(
    "--mpp",
    "--slide-mpp",
    "mpp",
    type=float,
    default=None,
    help="µm/px of level 0, overriding the slide's metadata.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(slide_path: str, mpp: float | None, as_json: bool) -> None:
    """Geometry, levels, µm/px (and where it came from), bounds and associated images of SLIDE."""
    with Slide(slide_path, mpp=mpp) as slide:
        data = slide.info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(_format_info(data))
    if data["mpp"] is None:
        raise MissingMppError(
            f"{slide_path}: the slide records no µm/px; give it with --mpp (or --slide-mpp), "
            "e.g. --mpp 0.25 for 40x, 0.5 for 20x"
        )


def _format_info(d: dict[str, Any]) -> str:
    mpp = d["mpp"]
    mpp_text = "unknown (give --mpp)" if mpp is None else f"{mpp['x']:.4f} x {mpp['y']:.4f} µm/px ({mpp['source']})"
    b = d["bounds"]
    lines = [
        f"slide        {d['path']}",
        f"slide_id     {d['slide_id']}",
        f"vendor       {d['vendor']}",
        f"dimensions   {d['dimensions'][0]} x {d['dimensions'][1]} px",
        f"mpp          {mpp_text}",
        f"objective    {d['objective_power'] if d['objective_power'] is not None else 'unknown'}",
        f"bounds       x={b['x']} y={b['y']} {b['width']} x {b['height']}",
        f"associated   {', '.join(d['associated_images']) or 'none'}",
        f"levels       {d['level_count']}",
    ]
    lines += [
        f"  level {lv['level']}: {lv['width']} x {lv['height']}  downsample {lv['downsample']:.4f}"
        for lv in d["levels"]
    ]
    return "\n".join(lines)


@main.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--width", type=click.IntRange(min=64), default=8000, show_default=True)
@click.option("--height", type=click.IntRange(min=64), default=6000, show_default=True)
@click.option(
    "--mpp", type=click.FloatRange(min=0.05, max=20), default=0.5, show_default=True, help="µm/px of level 0."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--figures",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Number of round dark figures planted in the tissue.",
)
@click.option("--pen/--no-pen", default=False, show_default=True, help="Draw a green pen stroke on the glass.")
def synth(out: str, width: int, height: int, mpp: float, seed: int, figures: int, pen: bool) -> None:
    """Write a synthetic pyramidal Aperio TIFF with known tissue (and OUT's .truth.json)."""
    from .synth import default_layout, truth_path, write_synthetic_slide

    spec = default_layout(width, height, mpp, seed=seed, n_figures=figures, pen=pen)
    path = write_synthetic_slide(out, spec)
    click.echo(f"wrote {path} ({width} x {height} px at {mpp} µm/px); truth in {truth_path(path)}")


def _class_map(specs: tuple[str, ...]) -> dict[str, list[str]] | None:
    """`--class NAME=FOLDER[,FOLDER]` options as {class: folders}; None when none were given."""
    mapping = {}
    for spec in specs:
        name, _, folders = spec.partition("=")
        if not name or not folders:
            raise ConfigError(f"--class {spec!r}: expected NAME=FOLDER[,FOLDER]")
        mapping[name] = [f for f in folders.split(",") if f]
    return mapping or None


def _key_values(specs: tuple[str, ...], option: str) -> dict[str, Any]:
    """`KEY=VALUE` options as a dict, each value read as YAML (numbers, booleans, lists)."""
    import yaml

    values: dict[str, Any] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        if not key or not sep:
            raise ConfigError(f"{option} {spec!r}: expected KEY=VALUE")
        values[key] = yaml.safe_load(raw)
    return values


def _config(config_path: str | None, overrides: tuple[str, ...]) -> Config:
    return load_config(config_path, overrides)


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@slide_mpp_option
@config_option
@set_option
def tissue(
    slide_path: str,
    out_dir: str,
    slide_mpp: float | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Detect tissue: OUT/<slide_id>/tissue.geojson, tissue_mask.png, overview.png, tissue.json."""
    from .stages import tissue_stage

    cfg = _config(config_path, overrides)
    with Slide(slide_path, mpp=slide_mpp) as slide:
        result = tissue_stage(slide, cfg.tissue, Path(out_dir) / slide.slide_id)
    s = result.summary
    click.echo(
        f"{s['slide_id']}: {s['regions']} tissue region(s), {s['area_mm2']:.3f} mm² (mask at {s['mask_mpp']:.2f} µm/px)"
    )
    for kind, path in result.files.items():
        click.echo(f"  {kind:9s} {path}")


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option(
    "--task",
    type=click.Choice(TASK_NAMES),
    default=None,
    help="Plan the tiles `run` reads for this task (configured values, else the model card's).",
)
@click.option("--mpp", type=float, default=None, help="Target µm/px of the tiles.")
@click.option("--tile-px", type=int, default=None, help="Tile edge in px at the target µm/px.")
@click.option("--overlap-px", type=int, default=None, help="Overlap between neighbouring tiles in px [0].")
@click.option("--min-tissue", type=float, default=None, help="Keep tiles with at least this tissue fraction [0.1].")
@slide_mpp_option
@config_option
@set_option
def tiles(
    slide_path: str,
    out_dir: str,
    task: str | None,
    mpp: float | None,
    tile_px: int | None,
    overlap_px: int | None,
    min_tissue: float | None,
    slide_mpp: float | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Plan tiles at a target µm/px: OUT/<slide_id>/tiles-<name>.json (+ .geojson for QuPath, .png)."""
    from .models.loading import default_model_dir, load_card
    from .stages import task_tiling, tiles_stage
    from .tissue import detect_tissue

    cfg = _config(config_path, overrides)
    if task is not None:  # the tiles `run` would read: the task's configured values, else its model card's
        t = getattr(cfg.tasks, task)
        card = load_card(Path(t.model) if t.model is not None else default_model_dir(task))
        task_mpp, task_tile_px = task_tiling(task, t, card)
        mpp = task_mpp if mpp is None else mpp
        tile_px = task_tile_px if tile_px is None else tile_px
        overlap_px = t.overlap_px if overlap_px is None else overlap_px
        min_tissue = t.min_tissue if min_tissue is None else min_tissue
    if mpp is None or tile_px is None:
        raise ConfigError("give --mpp and --tile-px (e.g. --mpp 0.5 --tile-px 224), or --task NAME")
    if mpp <= 0:
        raise ConfigError(f"--mpp must be positive, got {mpp}")
    overlap_px = 0 if overlap_px is None else overlap_px
    min_tissue = 0.1 if min_tissue is None else min_tissue
    name = task or f"{mpp:g}um-{tile_px}px"
    with Slide(slide_path, mpp=slide_mpp) as slide:
        tissue_mask = detect_tissue(slide, cfg.tissue)
        plan, files = tiles_stage(
            slide,
            tissue_mask,
            Path(out_dir) / slide.slide_id,
            name,
            mpp=mpp,
            tile_px=tile_px,
            overlap_px=overlap_px,
            min_tissue=min_tissue,
            tissue_params=cfg.tissue,
        )
    n_cols, n_rows = plan.grid
    click.echo(
        f"{slide.slide_id}: {len(plan)} of {n_cols * n_rows} tiles kept ({n_cols} x {n_rows} grid, "
        f"{tile_px} px at {mpp:g} µm/px, overlap {overlap_px} px, min tissue {min_tissue:g})"
    )
    for kind, path in files.items():
        click.echo(f"  {kind:8s} {path}")


@main.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--task", type=click.Choice(TASK_NAMES), required=True)
@click.option(
    "--model",
    "model_path",
    type=click.Path(),
    default=None,
    help="Model folder (model_card.json + weights.safetensors); default: tasks.<task>.model.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Tiles per batch [task's batch_size].")
@click.option(
    "--workers", type=click.IntRange(min=0), default=None, help="Tile-reading worker processes [cores - 1, at least 1]."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@slide_mpp_option
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
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Run one task over SLIDE's tiles: OUT/<slide_id>/heatmaps.zarr/<class> (OME-Zarr) and tissue."""
    from .engine import default_workers
    from .stages import predict_stage

    cfg = _config(config_path, overrides)
    workers = default_workers() if workers is None else workers
    with Slide(slide_path, mpp=slide_mpp) as slide:
        result = predict_stage(
            slide,
            cfg,
            task,
            Path(out_dir) / slide.slide_id,
            model_path=model_path,
            device=device,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )
    read = result["timings"]["reads"][0]
    click.echo(
        f"{slide.slide_id}: {result['tiles']} tiles with {result['model']} on {read['device']} in "
        f"{read['seconds']:.1f} s ({read['tiles_per_s'] or 0:.1f} tiles/s)"
    )
    for name in result["heatmaps"]:
        click.echo(f"  heatmap  {result['store'] / name}")


@main.command()
@click.argument("slides", nargs=-1)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option(
    "--slide-list",
    type=click.Path(dir_okay=False),
    default=None,
    help="A file with one slide path per line (added to SLIDES).",
)
@click.option("--tasks", default=None, help="Comma-separated tasks to run [every enabled task].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Tile-reading processes [cores - 1].")
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs are complete and compatible.")
@click.option("--default-mpp", type=float, default=None, help="µm/px for slides that record none.")
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
@click.option("--progress/--no-progress", default=True, show_default=True)
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
    default_mpp: float | None,
    mpp_file: str | None,
    dask_scheduler: str | None,
    shard: str | None,
    progress: bool,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Run the pipeline on SLIDES (files, folders, glob patterns): see docs/outputs.md for what OUT holds."""
    from .batch import parse_shard, read_slide_list, run_batch, summary_table
    from .engine import default_workers

    inputs = [*slides, *(read_slide_list(slide_list) if slide_list else [])]
    if not inputs:
        raise ConfigError("give slides (files, folders or glob patterns) or --slide-list FILE")
    cfg = _config(config_path, overrides)
    chosen = (
        [t.strip() for t in tasks.split(",") if t.strip()]
        if tasks
        else [t for t in TASK_NAMES if getattr(cfg.tasks, t).enabled]
    )
    unknown = [t for t in chosen if t not in TASK_NAMES]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASK_NAMES)}")
    workers = default_workers() if workers is None else workers

    def report(outcome: Any) -> None:
        text = f"{outcome.slide_id}: {outcome.status} ({outcome.seconds:.1f} s)"
        click.echo(text + (f" — {outcome.error}" if outcome.error else ""), err=outcome.status == "failed")

    result = run_batch(
        inputs,
        Path(out_dir),
        cfg,
        chosen,
        device=device,
        workers=workers,
        overwrite=overwrite,
        default_mpp=default_mpp,
        mpp_file=mpp_file,
        progress=progress,
        shard=parse_shard(shard) if shard else None,
        dask_scheduler=dask_scheduler,
        on_slide=report,
    )
    click.echo(summary_table(result))
    listing = "shards/manifest-*.csv; merge with `wsi-pipeline gather`" if shard else "manifest.csv, cohort_summary.csv"
    click.echo(f"outputs in {Path(out_dir).resolve()} ({listing}, <slide_id>/)")
    sys.exit(result.exit_code)


@main.command()
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
@click.option("--default-mpp", type=float, default=None, help="Passed to run.")
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
    default_mpp: float | None,
    overwrite: bool,
    dry_run: bool,
    no_follow: bool,
    timeout_s: float | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Run SLIDES on a SLURM cluster: one array task per --slides-per-job slides, then a gather job."""
    from .batch import read_manifest_outcomes, summary_table
    from .cluster import JobResources, plan_submission
    from .cluster import submit as submit_jobs

    _config(config_path, overrides)  # validate here, before anything is submitted
    options: list[str] = []
    if config_path:
        options += ["-c", str(Path(config_path).resolve())]
    for item in overrides:
        options += ["--set", item]
    for flag, value in (("--tasks", tasks), ("--device", device), ("--default-mpp", default_mpp)):
        if value is not None:
            options += [flag, str(value)]
    if mpp_file:
        options += ["--mpp-file", str(Path(mpp_file).resolve())]
    if overwrite:
        options.append("--overwrite")
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


@main.command()
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False, exists=True))
def gather(out_dir: str) -> None:
    """Merge the manifests of `run --shard` jobs into OUT/manifest.csv and OUT/cohort_summary.csv."""
    from .batch import gather as gather_outputs

    manifest, cohort, failed = gather_outputs(Path(out_dir))
    click.echo(f"wrote {manifest} and {cohort}" + (f"; {failed} slide(s) failed" if failed else ""))
    sys.exit(1 if failed else 0)


def _training_defaults(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`-c RECIPE.yaml`: option values by name (e.g. `epochs: 12`, `arch_arg: [width=16]`); the command line wins."""
    if value is None:
        return None
    import yaml

    try:
        loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"training recipe {value} cannot be read: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"training recipe {value} must be a mapping of option names to values")
    # a recipe may use an option's long name (arch-arg, arch_arg) or its parameter name (arch_args)
    alias = {p.name: p.name for p in ctx.command.params if p.name}
    for param in ctx.command.params:
        for opt in param.opts:
            if opt.startswith("--") and param.name:
                alias[opt[2:].replace("-", "_")] = param.name
    unknown = sorted(k for k in loaded if k.replace("-", "_") not in alias)
    if unknown:
        raise ConfigError(f"training recipe {value}: unknown option(s) {unknown}; see wsi-pipeline train --help")
    recipe = {alias[k.replace("-", "_")]: v for k, v in loaded.items()}
    ctx.default_map = {**(ctx.default_map or {}), **recipe}
    return value


TASK_CHOICE = click.Choice(["epithelium_stroma", "mitosis", "metastasis"])
group_pattern_option = click.option(
    "--group-pattern",
    default=r"(CRC-Prim-HE-\d+)",
    show_default=True,
    help="Regex whose first group names a tile's source image (the split and --held-out use it); '' = each tile "
    "alone. Annotated slides, AMi-Br and MITOS-2012 data are grouped by slide / field whatever it says.",
)


@main.command()
@click.argument("task", type=TASK_CHOICE)
@click.argument("data", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Model folder.")
@click.option(
    "-c",
    "--config",
    "recipe",
    type=click.Path(dir_okay=False, exists=True),
    is_eager=True,
    expose_value=False,
    callback=_training_defaults,
    help="A training recipe (YAML of option values, e.g. configs/models/metastasis.yaml); options given win.",
)
@click.option(
    "--class",
    "class_specs",
    multiple=True,
    metavar="NAME=FOLDER[,FOLDER]",
    help="An output class and the folders it is made of (default: one class per folder).",
)
@click.option("--arch", default=None, help="Architecture (registry or torchvision name) [small_cnn; dense_fcn].")
@click.option(
    "--arch-arg",
    "arch_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="An argument of the architecture, e.g. --arch-arg width=16 --arch-arg blocks=4.",
)
@click.option("--tile-px", type=click.IntRange(min=8), default=None, help="Tile size of the data (px) [mitosis: 96].")
@click.option("--mpp", type=float, default=None, help="µm/px of the data [mitosis: 0.25].")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "constant"]),
    default="cosine",
    show_default=True,
    help="Learning rate over the epochs.",
)
@click.option(
    "--select",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Keep the epoch with the best validation metric (ROC AUC for two classes, balanced accuracy for more, "
    "detection F1 for mitosis), or the last epoch (then validation data only measures, it never chooses).",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Stop after this many epochs without a better validation metric.",
)
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.9), default=0.25, show_default=True)
@click.option(
    "--val-data",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="A separate validation folder (e.g. PCam's valid/, split by slide) instead of a split of DATA.",
)
@group_pattern_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="Data-loading processes.")
@click.option(
    "--describe",
    "description",
    default="",
    help="The training data for the model card: dataset, licence, citation, what the classes mean.",
)
@click.option("--freeze-backbone", is_flag=True, help="Train only the new head.")
@click.option(
    "--init",
    "init_checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Start from a local checkpoint (.safetensors or weights-only .pt).",
)
def train(
    task: str,
    data: tuple[str, ...],
    out_dir: str,
    class_specs: tuple[str, ...],
    arch: str | None,
    arch_args: tuple[str, ...],
    tile_px: int | None,
    mpp: float | None,
    epochs: int,
    lr: float,
    batch_size: int,
    schedule: str,
    select: str,
    patience: int,
    val_fraction: float,
    val_data: str | None,
    group_pattern: str,
    seed: int,
    device: str,
    workers: int,
    description: str,
    freeze_backbone: bool,
    init_checkpoint: str | None,
) -> None:
    """Train a TASK model from DATA folders, split by source image or slide (never by tile).

    Classifiers (epithelium_stroma, metastasis) read folder-per-class tiles; mitosis reads point-annotated images
    (AMi-Br crops, a points.csv, MITOS-2012 fields as negatives) and learns a dense probability map.
    """
    from .engine import resolve_device
    from .training.data import split_by_group
    from .training.loop import TrainConfig

    dense = task == "mitosis"
    if not dense and (tile_px is None or mpp is None):
        raise ConfigError(f"training a {task} classifier needs --tile-px and --mpp (the data's tile size and µm/px)")
    items, classes = _training_items(task, data, class_specs, group_pattern, mpp, tile_px)
    cfg = TrainConfig(
        task=task,
        classes=classes,
        architecture=arch or ("dense_fcn" if dense else "small_cnn"),
        architecture_args=_key_values(arch_args, "--arch-arg"),
        mpp=mpp or 0.25,
        tile_px=tile_px or 96,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        schedule=schedule,
        select=select,
        patience=patience,
        seed=seed,
        workers=workers,
        freeze_backbone=freeze_backbone,
        init_checkpoint=init_checkpoint,
        extra={"data": [*data, *([val_data] if val_data else [])], "description": description},
    )
    if val_data:
        train_items = items
        val_items, val_classes = _training_items(task, (val_data,), class_specs, group_pattern, mpp, tile_px)
        if val_classes != cfg.classes:
            raise ConfigError(f"--val-data classes {val_classes} differ from the training classes {cfg.classes}")
    else:
        train_items, val_items = split_by_group(items, val_fraction, seed)
    if dense:
        from .training.dense import train_mitosis

        card = train_mitosis(train_items, val_items, cfg, Path(out_dir), device=resolve_device(device))
    else:
        from .training.train import train_classifier

        card = train_classifier(train_items, val_items, cfg, Path(out_dir), device=resolve_device(device))
    click.echo(
        f"model in {out_dir}: validation {card['metrics']['validation']} "
        f"(epoch {card['training']['best_epoch']}, {card['metrics']['selected_by']}; {len(train_items)} train / "
        f"{len(val_items)} validation images, {'validation folder' if val_data else 'split by source'})"
    )


def _training_items(
    task: str,
    folders: tuple[str, ...],
    class_specs: tuple[str, ...],
    group_pattern: str,
    mpp: float | None,
    tile_px: int | None = None,
) -> tuple[list[Any], list[str]]:
    """Every folder's items and the class names (all folders must give the same classes)."""
    if task == "mitosis":
        from .training.points import point_images

        return [image for folder in folders for image in point_images(folder, mpp)], ["mitosis"]
    from .training.annotations import annotated_items, is_annotated_folder
    from .training.data import folder_items

    items: list[Any] = []
    classes: list[str] | None = None
    for folder in folders:
        if is_annotated_folder(folder):  # slides + QuPath GeoJSON exports
            if mpp is None or tile_px is None:
                raise ConfigError(f"{folder}: tiles from annotated slides need --mpp and --tile-px")
            found, names = annotated_items(folder, _class_map(class_specs), mpp=mpp, tile_px=tile_px)
        else:
            found, names = folder_items(folder, _class_map(class_specs), group_pattern or None)
        if classes is not None and names != classes:
            raise ConfigError(f"{folder} has classes {names}, the other data folders {classes}")
        items += found
        classes = names
    assert classes is not None
    return items, classes


@main.command()
@click.argument("task", type=TASK_CHOICE)
@click.argument("model_dir", metavar="MODEL", type=click.Path(file_okay=False, exists=True))
@click.argument("data", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Report folder.")
@click.option(
    "--class",
    "class_specs",
    multiple=True,
    metavar="NAME=FOLDER[,FOLDER]",
    help="Which folders make each of the model's classes (default: folders named after them).",
)
@click.option("--positive", default=None, help="Class scored by ROC AUC [the model's first class].")
@click.option(
    "--held-out",
    is_flag=True,
    help="Only the source images / slides the model card lists as validation (never seen in training).",
)
@group_pattern_option
@click.option("--mpp", type=float, default=None, help="µm/px of a points.csv folder's images (mitosis).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Mitosis threshold.")
@click.option("--radius-um", type=click.FloatRange(min=0, min_open=True), default=7.5, show_default=True)
@click.option("--device", default="auto", show_default=True)
def evaluate(
    task: str,
    model_dir: str,
    data: tuple[str, ...],
    out_dir: str,
    class_specs: tuple[str, ...],
    positive: str | None,
    held_out: bool,
    group_pattern: str,
    mpp: float | None,
    threshold: float,
    radius_um: float,
    device: str,
) -> None:
    """Evaluate a model on labelled DATA; writes OUT/evaluation.json and a curve (roc.png, or froc.png for mitosis).

    Classifiers: balanced accuracy, ROC AUC with a bootstrap 95 % interval, confusion matrix. Mitosis: figure-centre
    recall, recall, precision and F1 within --radius-um, false detections per crop and per mm² of figure-free field.
    """
    from .engine import resolve_device
    from .models import load_model

    model = load_model(model_dir, task=task)
    items, classes = _training_items(task, data, class_specs, group_pattern, mpp or model.card.mpp, model.card.tile_px)
    if held_out:
        groups = set(model.card.training.get("val_groups", []))
        items = [i for i in items if i.group in groups]
        if not items:
            raise ConfigError(f"--held-out: none of DATA is among {model_dir}'s validation sources")
    if task == "mitosis":
        from .training.mitosis_eval import DetectionParams, evaluate_mitosis

        params = DetectionParams(threshold=threshold, radius_um=radius_um)
        report = evaluate_mitosis(model, items, Path(out_dir), resolve_device(device), params)
        at = report["at_threshold"]
        figures = ", ".join(
            f"{label} {'n/a' if at[key] is None else format(at[key], '.3f')}"
            for key, label in (
                ("centre_recall", "figure-centre recall"),
                ("recall", "recall"),
                ("precision", "precision"),
                ("f1", "F1"),
                ("false_per_crop", "false per crop"),
                ("false_per_mm2_figure_free", "false per mm² figure-free"),
            )
        )
        click.echo(
            f"{report['crops']} images with figures, {report['fields']} figure-free fields at threshold "
            f"{threshold}: {figures}; report in {out_dir}"
        )
        return
    from .training.evaluation import evaluate_classifier

    report = evaluate_classifier(model, items, classes, Path(out_dir), resolve_device(device), positive)
    auc = report["roc_auc"]
    click.echo(
        f"{report['tiles']} tiles: balanced accuracy {report['balanced_accuracy']:.3f}; ROC AUC "
        f"({auc['positive']}) {auc['value']:.3f} [95 % CI {auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]; "
        f"report in {out_dir}"
    )


@main.command("config")
@config_option
@set_option
def config_cmd(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Validate a configuration and print it resolved (defaults + file + --set)."""
    click.echo(dump_config(_config(config_path, overrides)), nl=False)


if __name__ == "__main__":
    main()
