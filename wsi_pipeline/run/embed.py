"""A slide's embeddings in `run`: which tiles each configured encoder reads and where its vectors go."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.config import EmbedConfig
from wsi_pipeline.core.layout import SlideLayout
from wsi_pipeline.engine.embeddings import EmbeddingTarget, embedding_file
from wsi_pipeline.engine.predict import EmbedRequest
from wsi_pipeline.models.encoders import LoadedEncoder
from wsi_pipeline.models.slide_mil import GatedAttentionMIL, SlideModelCard
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import plan_tiles
from wsi_pipeline.slide.tissue import TissueMask


@dataclass
class EmbedModels:
    """What a run embeds with, loaded once before the first slide: the encoders by name, and the slide-level model
    that reads one of their outputs (None: none)."""

    encoders: dict[str, LoadedEncoder] = field(default_factory=dict)
    slide_model: tuple[SlideModelCard, GatedAttentionMIL] | None = None

    def record(self) -> dict[str, Any]:
        """For the compatibility key: the encoders' cards and the slide model's (with their weights' sha256)."""
        cards: dict[str, Any] = {n: e.card.model_dump(mode="json") for n, e in self.encoders.items()}
        if self.slide_model is not None:
            cards["slide_model"] = self.slide_model[0].model_dump(mode="json")
        return cards


def embed_requests(
    slide: Slide, tissue: TissueMask, out: SlideLayout, embed: EmbedConfig, encoders: dict[str, LoadedEncoder]
) -> list[EmbedRequest]:
    """Each encoder's tiles of the slide (its card's µm/px and size; shared reads where a task's plan is the same)
    and the file they go to."""
    requests = []
    for name, encoder in encoders.items():
        card = encoder.card
        plan = plan_tiles(slide, tissue, card.mpp, card.tile_px, embed.overlap_px, embed.min_tissue)
        target = EmbeddingTarget(name, embedding_file(out.embeddings, name, embed.format), embed.format, embed.dtype)
        requests.append(EmbedRequest(name, encoder, plan, target, slide.mpp.mean, embed.batch_size))
    return requests


def embeddings_summary(requests: list[EmbedRequest], root: Path) -> dict[str, Any]:
    """summary.json's `embeddings`: per encoder, its file, tiles and vector length."""
    return {
        r.name: {
            "file": str(r.target.path.relative_to(root)),
            "tiles": len(r.plan),
            "dim": r.encoder.card.dim,
            "mpp": r.encoder.card.mpp,
            "tile_px": r.encoder.card.tile_px,
            "dtype": r.target.dtype,
        }
        for r in requests
    }
