"""An encoder and a small head trained on its cached features (`train --from-embeddings`), as one model folder that
`run`, `predict` and `evaluate` take like any classifier: the card (format `encoder_head`), the head's weights in
head.safetensors and the encoder's folder inside it (`encoder/`, hard-linked where the file system allows, so a
gigabyte encoder is not stored twice)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.encoders import LoadedEncoder, load_encoder, resized
from wsi_pipeline.models.folders import ModelError

HEAD_FILE = "head.safetensors"
ENCODER_FOLDER = "encoder"


def build_head(dim: int, classes: int, kind: str = "linear", hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """linear: one layer (a linear probe); mlp: one hidden layer with ReLU and dropout."""
    if kind == "linear":
        return nn.Linear(dim, classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))
    raise ModelError(f"head {kind!r}: choose linear or mlp")


class EncoderHead(nn.Module):
    """Normalised tiles at the card's tile size -> the encoder's vector (resized to its input) -> the head's logits."""

    def __init__(self, encoder: LoadedEncoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder_card = encoder.card
        self.encoder = encoder.module
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(resized(x, self.encoder_card)))


def encoder_head_module(network: Path, card: ModelCard) -> nn.Module:
    """The loader of format `encoder_head` (models/predictor.py registers it)."""
    directory = network.parent
    encoder = load_encoder(directory / ENCODER_FOLDER)
    args = card.architecture_args
    head = build_head(encoder.card.dim, len(card.classes), args.get("head", "linear"), int(args.get("hidden", 256)))
    try:
        head.load_state_dict(load_file(str(network)), strict=True)
    except Exception as exc:  # safetensors' and torch's error types for a damaged or foreign file
        raise ModelError(f"{network} does not fit a {args.get('head')} head on {encoder.card.name} ({exc})") from exc
    return EncoderHead(encoder, head).eval()


def place_encoder(source: Path, out: Path) -> Path:
    """The encoder folder copied into the model folder, its weights hard-linked when the file system allows."""
    target = out / ENCODER_FOLDER
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file():
            try:
                os.link(item, target / item.name)
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copy2(item, target / item.name)
    return target
