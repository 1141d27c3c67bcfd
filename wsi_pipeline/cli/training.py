"""Commands that make and measure models: train and evaluate. Settings are validated by `TrainSettings`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from wsi_pipeline.training.settings import TrainSettings, parse_class_map

GROUP_PATTERN = TrainSettings.model_fields["group_pattern"].default
group_pattern_option = click.option(
    "--group-pattern",
    default=None,
    help="Regex whose first group names a tile's source image (the split and --held-out use it); '' = each tile "
    f"alone [{GROUP_PATTERN}]. Annotated slides, AMi-Br and MITOS-2012 data are grouped by slide / field whatever "
    "it says.",
)
groups_option = click.option(
    "--groups",
    default=None,
    metavar="REGEX",
    help="Use only items whose source (image, slide or field; e.g. slide:24.tif) matches this regex: one centre or "
    "scanner of a dataset, for cross-source validation.",
)
class_option = click.option(
    "--class",
    "classes",
    multiple=True,
    metavar="NAME=FOLDER[,FOLDER]",
    help="An output class and the folders it is made of (default: one class per folder).",
)

# Options of `train` that are training settings (TrainSettings fields): recipe / --set values, the command line wins.
SETTING_OPTIONS = (
    "classes",
    "kind",
    "arch",
    "arch_args",
    "tile_px",
    "mpp",
    "default_mpp",
    "epochs",
    "lr",
    "batch_size",
    "schedule",
    "select",
    "patience",
    "val_fraction",
    "val_data",
    "group_pattern",
    "groups",
    "seed",
    "device",
    "workers",
    "describe",
    "freeze_backbone",
    "from_embeddings",
    "encoder",
    "head",
    "init",
    "stain_normalisation",
    "recompute_batchnorm",
    "average_epochs",
    "precision",
)


def given_options(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The setting options the user typed (not click's defaults)."""
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: values[k] for k in SETTING_OPTIONS if ctx.get_parameter_source(k) in typed}


@click.command()
@click.argument("task")
@click.argument("data", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Model folder.")
@click.option(
    "-c",
    "--config",
    "recipe",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A training recipe (YAML of settings by option name, e.g. configs/models/metastasis.yaml).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting.")
@class_option
@click.option(
    "--kind",
    type=click.Choice(["classifier", "class_map", "dense"]),
    default=None,
    help="A classifier task's model: one vector per tile, or a map of per-pixel classes (class_map, a U-Net "
    "trained on the same tiles; see docs/models.md; 'dense' is its former name) [classifier]. A point-detector "
    "task (mitosis) always trains a point detector.",
)
@click.option(
    "--arch",
    default=None,
    help="Architecture (registry or torchvision name) [small_cnn; dense classifier task: small_unet; mitosis: "
    "dense_fcn].",
)
@click.option(
    "--arch-arg",
    "arch_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="An argument of the architecture, e.g. --arch-arg width=16 --arch-arg blocks=4.",
)
@click.option("--tile-px", type=int, default=None, help="Tile size of the data (px) [dense tasks: 96].")
@click.option("--mpp", type=float, default=None, help="µm/px of the data [dense tasks: 0.25].")
@click.option(
    "--default-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="µm/px of annotated slides whose file has none (as run --default-mpp).",
)
@click.option("--epochs", type=int, default=None, help="[20]")
@click.option("--lr", type=float, default=None, help="[0.001]")
@click.option("--batch-size", type=int, default=None, help="[32]")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default=None, help="Learning rate [cosine].")
@click.option(
    "--select",
    type=click.Choice(["best", "last"]),
    default=None,
    help="Keep the epoch with the best validation metric (ROC AUC for two classes, balanced accuracy for more, "
    "detection F1 for mitosis), or the last epoch (then validation data only measures, it never chooses) [best].",
)
@click.option("--patience", type=int, default=None, help="Stop after this many epochs without improvement [5].")
@click.option("--val-fraction", type=float, default=None, help="Share of source images for validation [0.25].")
@click.option(
    "--val-data",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="A separate validation folder (e.g. PCam's valid/, split by slide) instead of a split of DATA.",
)
@group_pattern_option
@groups_option
@click.option("--seed", type=int, default=None, help="[0]")
@click.option("--device", default=None, help="[auto]")
@click.option("--workers", type=int, default=None, help="Data-loading processes [1].")
@click.option(
    "--describe",
    default=None,
    help="The training data for the model card: dataset, licence, citation, what the classes mean.",
)
@click.option("--freeze-backbone", is_flag=True, default=None, help="Train only the new head.")
@click.option(
    "--from-embeddings",
    type=click.Path(file_okay=False),
    default=None,
    help="Train only a head on --encoder's features of the tiles, encoded once and cached in this folder (the next "
    "training on the same tiles reads them); the model folder holds encoder and head (docs/embeddings.md).",
)
@click.option(
    "--encoder",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="The encoder folder (import-encoder) or model folder of --from-embeddings.",
)
@click.option("--head", type=click.Choice(["linear", "mlp"]), default=None, help="The head on embeddings [linear].")
@click.option(
    "--recompute-batchnorm",
    is_flag=True,
    default=None,
    help="After training, recompute BatchNorm statistics over the un-augmented training tiles.",
)
@click.option(
    "--average-epochs",
    type=int,
    default=None,
    help="Keep the mean of the last N epochs' weights (stochastic weight averaging; with --select last "
    "--recompute-batchnorm) [0: off].",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default=None,
    help="bf16: mixed-precision training (bf16 autocast, channels-last), faster on AMX CPUs and GPUs [fp32].",
)
@click.option(
    "--stain-normalisation",
    type=click.Choice(["macenko"]),
    default=None,
    help="Normalise every tile's stain (Macenko, per tile) in training; the card makes run and evaluate do the same.",
)
@click.option(
    "--init",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Start from a local checkpoint (.safetensors or weights-only .pt).",
)
@click.pass_context
def train(
    ctx: click.Context,
    task: str,
    data: tuple[str, ...],
    out_dir: str,
    recipe: str | None,
    overrides: tuple[str, ...],
    **options: Any,
) -> None:
    """Train a TASK model from DATA folders, split by source image or slide (never by tile).

    Classifier tasks (epithelium_stroma, metastasis) read folder-per-class tiles; point-detector tasks (mitosis) read
    point-annotated images (AMi-Br crops, a points.csv, MITOS-2012 fields as negatives) and learn a probability map.
    A plugin's task (WSI_PIPELINE_PLUGINS or an entry point) trains like a built-in one.
    """
    from wsi_pipeline.training.commands import train_model
    from wsi_pipeline.training.settings import load_train_settings

    given = given_options(ctx, options)
    for key in ("classes", "arch_args"):  # multiple options: typed means at least one
        if key in given and not given[key]:
            del given[key]
        elif key in given:
            given[key] = list(given[key])
    settings = load_train_settings(task, recipe, overrides, given)
    card, n_train, n_val = train_model(settings, data, Path(out_dir))
    click.echo(
        f"model in {out_dir}: validation {card['metrics']['validation']} "
        f"(epoch {card['training']['best_epoch']}, {card['metrics']['selected_by']}; {n_train} train / "
        f"{n_val} validation images, {'validation folder' if settings.val_data else 'split by source'})"
    )


@click.command()
@click.argument("task")
@click.argument("model_dir", metavar="MODEL", type=click.Path(file_okay=False, exists=True))
@click.argument("data", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Report folder.")
@class_option
@click.option("--positive", default=None, help="Class scored by ROC AUC [the model's first class].")
@click.option(
    "--held-out",
    is_flag=True,
    help="Only the source images / slides the model card lists as validation (never seen in training).",
)
@group_pattern_option
@groups_option
@click.option("--mpp", type=float, default=None, help="µm/px of a points.csv folder's images (mitosis).")
@click.option(
    "--default-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="µm/px of annotated slides whose file has none (as run --default-mpp).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Threshold to report figures at [the model card's operating point].",
)
@click.option("--radius-um", type=click.FloatRange(min=0, min_open=True), default=7.5, show_default=True)
@click.option("--device", default="auto", show_default=True)
def evaluate(
    task: str,
    model_dir: str,
    data: tuple[str, ...],
    out_dir: str,
    classes: tuple[str, ...],
    positive: str | None,
    held_out: bool,
    group_pattern: str | None,
    groups: str | None,
    mpp: float | None,
    default_mpp: float | None,
    threshold: float | None,
    radius_um: float,
    device: str,
) -> None:
    """Evaluate a model on labelled DATA; writes OUT/evaluation.json and a curve (roc.png, or froc.png for mitosis).

    Classifiers: balanced accuracy, ROC AUC with a bootstrap 95 % interval, confusion matrix. Mitosis: figure-centre
    recall, recall, precision and F1 within --radius-um, false detections per crop and per mm² of figure-free field.
    """
    from wsi_pipeline.training.commands import evaluate_model

    class_map = parse_class_map(classes)
    report = evaluate_model(
        task,
        model_dir,
        data,
        Path(out_dir),
        class_map=class_map,
        positive=positive,
        held_out=held_out,
        group_pattern=GROUP_PATTERN if group_pattern is None else group_pattern,
        groups=groups,
        mpp=mpp,
        default_mpp=default_mpp,
        threshold=threshold,
        radius_um=radius_um,
        device=device,
    )
    click.echo(_report_line(report, threshold, out_dir))
    click.echo(_bf16_line(report["bf16"]["max_abs_difference"]))


def _bf16_line(difference: float) -> str:
    from wsi_pipeline.models.predictor import BF16_CARD_LIMIT, bf16_within_limit

    within = bf16_within_limit(difference)
    verdict, runs = ("within", "bf16 where the device has it") if within else ("over", "fp32")
    return (
        f"bf16 autocast: outputs up to {difference:.4f} from fp32, {verdict} the engine's limit {BF16_CARD_LIMIT} "
        f"(in evaluation.json; `publish` copies it into the card, where `engine.precision: auto` reads it and runs "
        f"the model in {runs})"
    )


def _report_line(report: dict[str, Any], threshold: float | None, out_dir: str) -> str:
    if "at_threshold" in report:
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
        return (
            f"{report['crops']} images with figures, {report['fields']} figure-free fields at threshold "
            f"{report['params']['threshold']}: {figures}; {_guard_line(report)}; report in {out_dir}"
        )
    auc, point = report["roc_auc"], report["at_operating_point"]
    domain = _guard_line(report)
    return (
        f"{report['tiles']} tiles: balanced accuracy {report['balanced_accuracy']:.3f}; ROC AUC "
        f"({auc['positive']}) {auc['value']:.3f} [95 % CI {auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]; at threshold "
        f"{point['threshold']}: balanced accuracy {point['balanced_accuracy']:.3f}; {domain}; report in {out_dir}"
    )


def _guard_line(report: dict[str, Any]) -> str:
    flagged = report.get("domain_flagged_fraction")
    return "no domain guard" if flagged is None else f"domain guard flags {100 * flagged:.1f} % of the tiles"


@click.command("export-model")
@click.argument("model_dir", metavar="MODEL", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="New model folder.")
@click.option("--format", "target_format", type=click.Choice(["onnx", "torchscript"]), required=True)
def export_model_cmd(model_dir: str, out_dir: str, target_format: str) -> None:
    """Export MODEL (a safetensors model folder) as ONNX or TorchScript with the same card; `run` and `predict`
    take the new folder like any other (tasks.<task>.model, --model)."""
    from wsi_pipeline.models.portable import export_model

    out = export_model(model_dir, target_format, out_dir)
    click.echo(f"{target_format} model in {out}")
