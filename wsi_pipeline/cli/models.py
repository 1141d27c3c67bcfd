"""Commands that make the shipped models (`make models`) and the demo: study, publish, colour-stats, demo.

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


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"), show_default=True,
              help="Output folder.")  # fmt: skip
def demo(out: Path) -> None:
    """Write a synthetic slide with planted figures, run the pipeline on it, and say where to look (`make demo`)."""
    from wsi_pipeline.cli.demo import run_demo

    run_demo(out.resolve())
