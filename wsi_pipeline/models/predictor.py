"""The seam between the engine and model formats: a `Predictor` maps a uint8 tile batch to named outputs.

The engine only ever calls predictors; a new model format (TorchScript, ONNX, timm, ...) is an adapter that builds
one, registered with `register_format`. Predictors know nothing of slides or heatmaps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .card import ModelCard
from .loading import LoadedModel


class Predictor(Protocol):
    """Probabilities for a batch: uint8 RGB (B, 3, H, W) on the predictor's device -> {written class: float32
    (B,) for a classifier, (B, h, w) for a dense model}, on the CPU as numpy-ready tensors."""

    card: ModelCard

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TorchModulePredictor:
    """A torch `nn.Module` with the card's normalisation and activation: channels_last, bf16 autocast on CUDA,
    fp32 on the CPU."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        if model.module is None:
            raise ValueError(f"{model.card.name} has no torch module to run")
        self.card = model.card
        self.device = device
        self.module = model.module.to(device).eval().to(memory_format=torch.channels_last)
        model.module = self.module
        norm = self.card.normalisation
        self.mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
        self.indices = [self.card.classes.index(c) for c in self.card.written_classes]

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        unit = batch.float().div_(255.0)
        x = ((unit - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.module(x)
        out = out.float()
        out = torch.softmax(out, dim=1) if self.card.activation == "softmax" else torch.sigmoid(out)
        out = out.cpu()
        return {name: out[:, index] for name, index in zip(self.card.written_classes, self.indices, strict=True)}


PredictorFactory = Callable[[LoadedModel, torch.device], Predictor]
_FORMATS: dict[str, PredictorFactory] = {"torch": TorchModulePredictor}


def register_format(name: str, factory: PredictorFactory) -> None:
    """Make `LoadedModel(format=name)` runnable by the engine."""
    _FORMATS[name] = factory


def make_predictor(model: LoadedModel, device: torch.device) -> Predictor:
    try:
        factory = _FORMATS[model.format]
    except KeyError:
        raise ValueError(f"no predictor for model format {model.format!r}; known: {sorted(_FORMATS)}") from None
    return factory(model, device)
