"""Commands that make the shipped models (`make models`) and the demo: study, publish, colour-stats,
calibrate-domain, demo.

They only parse and delegate; the work is in `training/study.py`, `training/publish.py`, `training/colour_stats.py`
and `cli/demo.py`. Errors become one line and their exit status through the group, as for every command."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("study_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=Path("../shared/data"),
              show_default=True, help="The folder the study's sources are named in.")  # fmt: skip
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="OUT/study.json and each model under OUT/<variant>/<source>/.")  # fmt: skip
@click.option("--final", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Then train the chosen variant on every source into this model folder.")  # fmt: skip
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="A setting for every training.")
def study(study_file: Path, data: Path, out: Path, final: Path | None, overrides: tuple[str, ...]) -> None:
    """Cross-source validation of a training recipe (configs/models/*_study.yaml): train on one source, measure on
    the others, for every variant; choose a variant, and with --final train it on all sources."""
    from wsi_pipeline.training.study import run_study, train_final

    report = run_study(study_file, data, out, overrides)
    click.echo(f"chosen: {report['chosen']} ({out / 'study.json'})")
    if final is not None:
        train_final(study_file, report, data, final, overrides)


@click.command()
@click.argument("work", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("defaults", type=click.Path(file_okay=False, path_type=Path))
def publish(work: Path, defaults: Path) -> None:
    """Replace DEFAULTS/<task> with each task's model trained in WORK/<task> and its held-out evaluation (the last
    step of `make models`); other folders in WORK are named and left alone."""
    from wsi_pipeline.training.publish import publish_all

    for line in publish_all(work, defaults):
        click.echo(line)


@click.command("colour-stats")
@click.argument("task")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("data", nargs=-1, required=True)
@click.option("-c", "--recipe", required=True, help="The training recipe the model was trained with.")
@click.option("--val-data", default=None, help="As given to train (then every DATA tile is training).")
def colour_stats(task: str, model_dir: Path, data: tuple[str, ...], recipe: str, val_data: str | None) -> None:
    """Write into MODEL_DIR's card the colour statistics the input guard reads, measured on the training tiles
    `train` would use (for models trained before cards had them; the weights are untouched)."""
    from wsi_pipeline.models.folders import CARD_FILE, load_card
    from wsi_pipeline.training.colour_stats import measure

    load_card(model_dir)  # a valid card first
    path = model_dir / CARD_FILE
    card = json.loads(path.read_text())
    card["input_stats"] = measure(task, recipe, list(data), val_data)
    path.write_text(json.dumps(card, indent=2) + "\n")
    click.echo(f"{path}: input_stats {card['input_stats']}")


SOURCE_HELP = (
    "[NAME=]PATH[@MPP][#GROUPS]: a folder of image tiles or a slide, at MPP µm/px (images: the model's by default); "
    "for a point detector's training folder, GROUPS (a regex) keeps the source images it matches"
)


@click.command("calibrate-domain")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("data", nargs=-1)
@click.option("--val-data", "validation", multiple=True, help=f"In-domain validation tiles. {SOURCE_HELP}")
@click.option(
    "--domain",
    "domain_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="A YAML file of the model's domain (organs, specimen, stain, magnification, sources, excludes) to write "
    "into its card; alone (no DATA), only that is written.",
)
@click.option("--held-out", multiple=True, help="Further in-domain tiles to measure the flagged share on.")
@click.option("--outside", multiple=True, help="Tissue the model must not answer on, to measure (AUROC, flagged).")
@click.option(
    "--quantile",
    type=click.FloatRange(0.5, 0.9999),
    default=0.975,
    show_default=True,
    help="Of validation scores, where the threshold sits.",
)
@click.option("--per-image", type=click.IntRange(min=1), default=4, show_default=True, help="Tiles cut per image.")
@click.option("--max-tiles", type=click.IntRange(min=1), default=4000, show_default=True, help="Per source.")
@click.option("--layer", "layers", multiple=True, help="A named module to read (default: each block's output).")
@click.option(
    "--card-split",
    is_flag=True,
    help="A point detector's DATA (its training folders): the sources its card names as validation set the threshold, "
    "the rest are fitted.",
)
def calibrate_domain(
    model_dir: Path,
    data: tuple[str, ...],
    validation: tuple[str, ...],
    held_out: tuple[str, ...],
    outside: tuple[str, ...],
    quantile: float,
    per_image: int,
    max_tiles: int,
    layers: tuple[str, ...],
    domain_file: Path | None,
    card_split: bool,
) -> None:
    """Fit MODEL_DIR's domain guard on DATA: tiles like its training data, each [NAME=]PATH[@MPP], a folder of
    image tiles or a slide, at MPP µm/px (images: the model's by default).

    Writes domain_guard.safetensors and names it in the model card; `run` then flags tiles unlike them and withholds
    a task's answer on a slide with too little tissue in domain (docs/models.md, "Domain guard")."""
    from wsi_pipeline.models import load_model
    from wsi_pipeline.training.domain import TileSource, calibrate, write_domain

    if domain_file is not None:
        click.echo(f"{model_dir}: domain {write_domain(model_dir, domain_file)}")
    if not data:
        if not validation and domain_file is not None:
            return
        raise click.UsageError("give DATA (tiles like the model's training data) and --val-data")
    if not validation and not card_split:
        raise click.UsageError("give --val-data (in-domain tiles the threshold is calibrated on) or --card-split")
    entry = calibrate(
        load_model(model_dir),
        [TileSource.parse(d) for d in data],
        [TileSource.parse(v) for v in validation],
        [TileSource.parse(h) for h in held_out],
        [TileSource.parse(o) for o in outside],
        quantile=quantile,
        per_image=per_image,
        max_tiles=max_tiles,
        layers=list(layers) or None,
        card_split=card_split,
    )
    click.echo(f"{model_dir / entry.file}: {entry.fit_tiles} tiles fitted, layers {', '.join(entry.layers)}")
    for name, figure in entry.figures.items():
        auroc = (
            f", AUROC {figure['auroc_vs_validation']:.3f} against validation" if "auroc_vs_validation" in figure else ""
        )
        click.echo(f"  {name}: {figure['tiles']} tiles, {100 * figure['flagged']:.1f} % flagged{auroc}")


@click.command("train-mpp-estimator")
@click.argument("sources_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The folder the sources' globs are under (../shared/data).")  # fmt: skip
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the network and its card go (wsi_pipeline/models/defaults/mpp_estimator).")  # fmt: skip
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True, help="Training steps per fit.")
def train_mpp_estimator(sources_file: Path, data: Path, out: Path, steps: int) -> None:
    """Fit the µm/px estimator on sources of known µm/px, measuring each left out in turn (docs/mpp.md)."""
    from wsi_pipeline.training.mpp_estimator import fit_estimator, read_sources

    card = fit_estimator(read_sources(sources_file, data), out, steps=steps, log=click.echo)
    click.echo(f"{out}: interval x/÷ {2 ** card['interval_log2']:.2f} (the largest held-out error)")


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"), show_default=True,
              help="Output folder.")  # fmt: skip
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration key, e.g. --set qc.enabled=false.")  # fmt: skip
def demo(out: Path, overrides: tuple[str, ...]) -> None:
    """Write a synthetic slide with planted figures, run the pipeline on it, and say where to look (`make demo`)."""
    from wsi_pipeline.cli.demo import run_demo

    run_demo(out.resolve(), overrides)
