"""A slide-level model in `run`: read the slide's embeddings of the model's encoder, give the slide's score and
class, write the attention as an image of heatmaps.zarr (one px per tile, the most attended tile = 1) and the most
attended tiles as QuPath tile objects; the overlay and summary.json follow as for a task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.config import Config
from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.engine.embeddings import read_embeddings
from wsi_pipeline.engine.predict import EmbedRequest
from wsi_pipeline.engine.stitch import tile_grid_geometry
from wsi_pipeline.heatmap import CHUNK, HeatmapWriter
from wsi_pipeline.models.card import RESERVED_ATTENTION
from wsi_pipeline.models.encoders import LoadedEncoder
from wsi_pipeline.models.slide_mil import GatedAttentionMIL, SlideModelCard, load_slide_model, slide_prediction
from wsi_pipeline.tasks.base import Overlay, TaskResult, TileObjects

SLIDE_CLASSIFIER = "slide_classifier"  # its key in summary.json and the cohort table
ATTENTION_IMAGE = RESERVED_ATTENTION  # its image in heatmaps.zarr
ATTENTION_COLOUR = (220, 40, 40)


def load_slide_classifier(
    config: Config, encoders: dict[str, LoadedEncoder]
) -> tuple[SlideModelCard, GatedAttentionMIL] | None:
    """The configured slide model, checked against the run's encoders before the first slide (exit 7): its encoder
    must be among them, with the same weights and vector length."""
    folder = config.slide_classifier.model
    if folder is None:
        return None
    card, module = load_slide_model(folder)
    needed = card.encoder
    encoder = encoders.get(needed.name)
    if encoder is None:
        raise ConfigError(
            f"slide_classifier.model {folder} reads {needed.name} embeddings: add that encoder (--encoder DIR, "
            f"embed.encoders); this run has {', '.join(encoders) or 'none'}"
        )
    if encoder.card.dim != needed.dim or (needed.weights_sha256 and needed.weights_sha256 != encoder.sha256):
        raise ConfigError(
            f"slide_classifier.model {folder} was trained on other {needed.name} embeddings (weights or length "
            "differ from this run's encoder of that name); give the encoder it was trained with"
        )
    return card, module


def classify_slide(
    slide_id: str,
    model: tuple[SlideModelCard, GatedAttentionMIL],
    embeds: list[EmbedRequest],
    store: Path,
    config: Config,
) -> TaskResult:
    """The slide's answer from its embeddings just written; the attention image into `store` (heatmaps.zarr)."""
    card, module = model
    request = next(r for r in embeds if r.name == card.encoder.name)
    features, _, _ = read_embeddings(request.target.path)
    threshold = config.slide_classifier.threshold if config.slide_classifier.threshold is not None else card.threshold
    summary: dict[str, Any] = {"model": card.name, "encoder": card.encoder.name, "tiles": len(features)}
    if not len(features):
        return TaskResult({**summary, "class": None, "score": None}, warnings=[f"{SLIDE_CLASSIFIER}: no tiles"])
    score, attention = slide_prediction(module, features)
    relative = attention / attention.max()
    plan = request.plan
    write_attention(store, plan, relative)
    order = np.argsort(-attention)[: config.slide_classifier.top_tiles]
    tiles = [
        (int(plan.cols[i]), int(plan.rows[i]), float(plan.x[i]), float(plan.y[i]),
         {"attention": float(attention[i]), "relative attention": float(relative[i]), "rank": float(rank + 1)})
        for rank, i in enumerate(order)
    ]  # fmt: skip
    summary |= {
        "class": card.classes[1] if score >= threshold else card.classes[0],
        "score": round(score, 6),
        "threshold": threshold,
        "threshold_source": "configuration" if config.slide_classifier.threshold is not None else "model card",
        # how concentrated the attention is: the share of it on the top 5 % of tiles (0.05 when spread evenly)
        "attention_top5pct_share": round(float(np.sort(attention)[::-1][: max(1, len(attention) // 20)].sum()), 4),
    }
    return TaskResult(
        summary,
        overlay=Overlay(
            ATTENTION_IMAGE,
            ATTENTION_COLOUR,
            "attention (1 = the most attended tile)",
            f"class {summary['class']}, score {score:.3f} (threshold {threshold:.3f})",
            on_overview=False,
        ),
        tiles=TileObjects("attention", plan.tile_size_level0, tiles),
    )


def write_attention(store: Path, plan: Any, relative: np.ndarray) -> Path:
    """The attention on the plan's tile grid (one px per tile; tiles not analysed stay 0)."""
    geometry = tile_grid_geometry(plan)
    grid = np.zeros((geometry.height, geometry.width), np.float32)
    grid[plan.rows, plan.cols] = relative
    writer = HeatmapWriter(store, ATTENTION_IMAGE, [ATTENTION_IMAGE], geometry, attrs={"task": SLIDE_CLASSIFIER})
    try:
        for y0 in range(0, geometry.height, CHUNK):
            writer.write(y0, 0, grid[None, y0 : y0 + CHUNK])
            writer.advance(y0 + CHUNK)
        return writer.close()
    except BaseException:
        writer.abort()
        raise
