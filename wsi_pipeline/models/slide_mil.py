"""Slide-level models on tile embeddings: gated attention-MIL (ABMIL, Ilse et al. 2018). A slide is a bag of its
tiles' vectors; attention weighs each tile, the weighted mean is classified. The attention is the map a
pathologist checks: where the model looked for its answer.

A slide-model folder holds `slide_model.json` (the card below) and `weights.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file
from torch import nn

from wsi_pipeline.core.inventory import file_sha256
from wsi_pipeline.models.folders import ModelError
from wsi_pipeline.models.loading import save_weights_and_card

SLIDE_CARD = "slide_model.json"
SLIDE_WEIGHTS = "weights.safetensors"


class SlideEncoderRef(BaseModel):
    """The encoder whose embeddings the model reads: a run must write them (checked before the first slide)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    dim: int = Field(gt=0)
    mpp: float = Field(gt=0)
    tile_px: int = Field(gt=0)
    weights_sha256: str | None = None


class SlideModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: str = Field("slide_classifier", pattern="^slide_classifier$")
    architecture: str = Field("abmil_gated", pattern="^abmil_gated$")
    hidden: int = Field(256, gt=0)
    attention_hidden: int = Field(128, gt=0)
    dropout: float = Field(0.25, ge=0, lt=1)
    encoder: SlideEncoderRef
    classes: list[str] = Field(min_length=2, max_length=2, description="negative, positive")
    threshold: float = Field(0.5, ge=0, le=1, description="on the positive class's probability")
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str | None = None


class GatedAttentionMIL(nn.Module):
    """Tile vectors (N, D) -> class logits (C,) and attention (N,) summing to 1."""

    def __init__(self, dim: int, classes: int, hidden: int = 256, attention_hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        # each feature standardised by the training tiles' mean and spread (set by train-slide, saved with the
        # weights): encoders' vectors come in any scale, and the first layer then learns alike for all of them
        self.feature_mean: torch.Tensor
        self.feature_scale: torch.Tensor
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(dim))
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden, attention_hidden), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden, attention_hidden), nn.Sigmoid())
        self.attention_w = nn.Linear(attention_hidden, 1)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed((features - self.feature_mean) / self.feature_scale)
        scores = self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(-1)
        attention = torch.softmax(scores, dim=0)
        return self.classifier(attention @ h), attention


def build_slide_model(card: SlideModelCard) -> GatedAttentionMIL:
    return GatedAttentionMIL(card.encoder.dim, len(card.classes), card.hidden, card.attention_hidden, card.dropout)


def save_slide_model(out: Path, module: nn.Module, card: SlideModelCard) -> Path:
    save_weights_and_card(out, module.state_dict(), SLIDE_WEIGHTS, SLIDE_CARD, card)
    return out


def read_slide_card(directory: Path) -> SlideModelCard:
    path = directory / SLIDE_CARD
    if not path.is_file():
        raise ModelError(f"{directory}: no {SLIDE_CARD}; a slide model is made by `wsi-pipeline train-slide`")
    try:
        return SlideModelCard.model_validate(json.loads(path.read_text()))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not a valid slide-model card: {exc}") from exc


def load_slide_model(directory: str | Path) -> tuple[SlideModelCard, GatedAttentionMIL]:
    directory = Path(directory)
    card = read_slide_card(directory)
    weights = directory / SLIDE_WEIGHTS
    if not weights.is_file() or (card.weights_sha256 and file_sha256(weights) != card.weights_sha256):
        raise ModelError(f"{weights} is missing or not the file its card was written for; train the model again")
    module = build_slide_model(card)
    try:
        module.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights} does not fit its card ({str(exc).splitlines()[0]})") from exc
    return card, module.eval()


def slide_prediction(module: GatedAttentionMIL, features: Any) -> tuple[float, Any]:
    """The positive class's probability and the attention (numpy, N) of one slide's tile vectors."""
    with torch.inference_mode():
        logits, attention = module(torch.as_tensor(features, dtype=torch.float32))
    return float(torch.softmax(logits, 0)[1]), attention.numpy()
