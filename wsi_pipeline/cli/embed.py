"""Commands for tile encoders: list the shipped cards, import downloaded weights into an encoder folder, embed
slides (`run` with encoders and no task: the same resume, verification, shards and report), and train a slide-level
model on the embeddings (`train-slide`)."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_pipeline.cli.common import (
    backend_option,
    config_option,
    device_option,
    mpp_or_auto,
    run_config,
    set_option,
    slide_model_option,
)
from wsi_pipeline.cli.inference import _shard, encoder_overrides, execute_run, slide_inputs


@click.command()
@click.argument("slides", nargs=-1)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option(
    "--encoder",
    "encoders",
    multiple=True,
    required=True,
    type=click.Path(file_okay=False),
    help="An encoder folder (import-encoder makes one) or one of our model folders (its penultimate features); "
    "repeatable: one read feeds every encoder of the same µm/px and tile size.",
)
@slide_model_option
@click.option("--format", "file_format", type=click.Choice(["zarr", "h5"]), default=None, help="[embed.format: zarr]")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None, help="[embed.dtype: float16]")
@click.option("--slide-list", type=click.Path(dir_okay=False), default=None, help="One slide path per line.")
@device_option
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Tile-reading threads [cores - 1].")
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs are complete and compatible.")
@click.option("--default-mpp", type=mpp_or_auto, default=None, help="µm/px for slides that record none (or auto).")
@click.option("--mpp-file", type=click.Path(dir_okay=False), default=None, help="CSV slide,mpp overriding the files.")
@click.option("--shard", default=None, metavar="I/N", help="Process only shard I of N.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@backend_option
@config_option
@set_option
def embed(
    slides: tuple[str, ...],
    out_dir: str,
    encoders: tuple[str, ...],
    slide_model_dir: str | None,
    file_format: str | None,
    dtype: str | None,
    slide_list: str | None,
    device: str,
    workers: int | None,
    overwrite: bool,
    default_mpp: float | str | None,
    mpp_file: str | None,
    shard: str | None,
    progress: bool,
    backend: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Write each encoder's tile vectors of every slide: OUT/<slide_id>/embeddings/<encoder>.zarr (`features` N x D,
    `coords` N x 2 level-0 px), or .h5 in the layout TRIDENT and CLAM read (docs/embeddings.md)."""
    inputs = slide_inputs(slides, slide_list)
    extra = [f"embed.format={file_format}"] if file_format else []
    extra += [f"embed.dtype={dtype}"] if dtype else []
    extra += [f"slide_classifier.model={slide_model_dir}"] if slide_model_dir else []
    cfg = run_config(config_path, (*overrides, *extra, *encoder_overrides(encoders)), backend)
    execute_run(
        inputs, Path(out_dir), cfg, [], device=device, workers=workers, progress=progress, overwrite=overwrite,
        default_mpp=default_mpp, mpp_file=mpp_file, shard=_shard(shard), dask_scheduler=None,
    )  # fmt: skip


@click.command("import-encoder")
@click.argument("card")
@click.argument("weights", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Encoder folder.")
@click.option("--strip-prefix", default="", help="Remove this prefix from every weight name first (e.g. 'module.').")
def import_encoder_cmd(card: str, weights: str, out_dir: str, strip_prefix: str) -> None:
    """Make an encoder folder from downloaded WEIGHTS (safetensors, or a weights-only .bin / .pth, converted once)
    and CARD: a shipped card's name (`wsi-pipeline encoders` lists them) or an encoder.json. Weights that do not fit
    the architecture are refused naming the first missing and unexpected keys (exit 10)."""
    from wsi_pipeline.models.encoders import import_encoder

    encoder = import_encoder(card, Path(weights), Path(out_dir), strip_prefix)
    c = encoder.card
    click.echo(
        f"encoder {c.name} in {out_dir}: {c.dim} values per tile, {c.tile_px} px at {c.mpp:g} µm/px, pooling "
        f"{c.pooling}; use it with `wsi-pipeline embed SLIDES -o OUT --encoder {out_dir}`"
    )


@click.command("encoders")
def encoders_cmd() -> None:
    """The encoders whose cards ship with wsi-pipeline (no weights: download them under each one's licence, then
    `import-encoder NAME FILE -o DIR`)."""
    from wsi_pipeline.models.encoder_card import shipped_encoder_cards

    for name, card in shipped_encoder_cards().items():
        source = card.source
        click.echo(
            f"{name:14s} {card.architecture.removeprefix('timm:'):32s} {card.dim:5d}-d {card.tile_px} px at "
            f"{card.mpp:g} µm/px, {card.pooling:8s} {source.repository} ({source.weights_file})"
        )


@click.command("train-slide")
@click.argument("labels", type=click.Path(dir_okay=False, exists=True))
@click.argument("embeddings", type=click.Path(file_okay=False, exists=True))
@click.option("--encoder", required=True, help="The encoder name whose embeddings to read (embeddings/<encoder>.zarr).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Slide-model folder.")
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option(
    "--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25, show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--positive", default=None, help="The positive label value [the larger of the two].")
@click.option(
    "--held-out",
    "held_out",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A second labels CSV whose slides are the held-out fold (instead of a random split by patient).",
)
def train_slide(
    labels: str,
    embeddings: str,
    encoder: str,
    out_dir: str,
    epochs: int,
    lr: float,
    val_fraction: float,
    seed: int,
    positive: str | None,
    held_out: str | None,
) -> None:
    """Train an attention-MIL slide classifier (gated ABMIL) from LABELS (CSV: slide_id,label[,patient]) and the
    EMBEDDINGS folder `embed` wrote (or a TRIDENT / CLAM folder of <slide_id>.h5), split by patient; `run
    --slide-model OUT --encoder ENC` then gives each slide's score, class and attention map."""
    from wsi_pipeline.training.slide_mil import SlideMilSettings, train_slide_classifier

    settings = SlideMilSettings(
        encoder, epochs, lr, val_fraction=val_fraction, seed=seed, positive=positive,
        held_out=Path(held_out) if held_out else None,
    )  # fmt: skip
    card = train_slide_classifier(Path(labels), Path(embeddings), Path(out_dir), settings)
    v = card.metrics["validation"]
    low, high = v["roc_auc_ci95"]
    click.echo(
        f"slide model in {out_dir}: held-out ROC AUC {v['roc_auc']:.3f} [95 % CI {low:.3f}, {high:.3f}] on "
        f"{card.metrics['slides']['validation']} slides ({card.metrics['slides']['train']} trained on, "
        f"{card.metrics['slides']['tune']} to choose the epoch and threshold {card.threshold:.3f}: sensitivity "
        f"{v['sensitivity']:.2f}, specificity {v['specificity']:.2f} on the held-out slides)"
    )
