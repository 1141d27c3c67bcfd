"""Model directories: `model_card.json` + `weights.safetensors`. Loading never unpickles code."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, write_json
from ..inventory import file_sha256
from .architectures import build
from .card import ModelCard
from .folders import CARD_FILE, DEFAULTS_DIR, WEIGHTS_FILE, ModelError, default_model_dir, load_card, shipped_tasks

__all__ = [
    "CARD_FILE",
    "DEFAULTS_DIR",
    "WEIGHTS_FILE",
    "LoadedModel",
    "ModelError",
    "default_model_dir",
    "load_card",
    "load_model",
    "resolve_model",
    "save_model",
    "shipped_tasks",
]


@dataclass
class LoadedModel:
    """A model ready for the engine: its card, the network, and the format whose predictor runs it."""

    card: ModelCard
    module: nn.Module
    path: Path | None = None
    format: str = "torch"


def save_model(directory: str | os.PathLike[str], module: nn.Module, card: ModelCard) -> Path:
    """Weights, then the card with the weights' sha256 (checked on every load)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    card = card.model_copy(update={"weights_sha256": file_sha256(directory / WEIGHTS_FILE)})
    write_json(directory / CARD_FILE, card.model_dump(mode="json"))
    return directory


def resolve_model(
    task: str, configured: str | os.PathLike[str] | None, default: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """The configured model folder, else `default`, else the task's shipped default."""
    chosen = configured if configured is not None else default
    return load_model(chosen if chosen is not None else default_model_dir(task), task=task)


def load_model(directory: str | os.PathLike[str], task: str | None = None, option: str = "--model") -> LoadedModel:
    """Load and check a model before any tile is read: card valid, task right, weights the card's (sha256) and
    matching the architecture. `option` is how the user named the folder (`--model`, `tasks.<task>.model`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"model folder {directory} not found; set {option} to a folder with {CARD_FILE}")
    card = load_card(directory)
    if task is not None and card.task != task:
        raise ModelError(
            f"{directory} is a {card.task} model (its card says so), not a {task} model; set {option} to a {task} model"
        )
    try:
        module = build(card.architecture, len(card.classes), **card.architecture_args)
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{directory}: cannot build architecture {card.architecture!r}: {exc}") from exc
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{directory}: no {WEIGHTS_FILE}; re-export the model (make models)")
    if card.weights_sha256 is not None and file_sha256(weights) != card.weights_sha256:
        raise ModelError(
            f"{weights} is not the file its card was written for (sha256 differs from the card's weights_sha256): "
            "the weights were changed or damaged; restore them, or re-export the model (make models)"
        )
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several error types for damaged files
        raise ModelError(f"{weights} cannot be read ({exc}); re-export or re-train the model") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing / unexpected keys or shape mismatches
        first = str(exc).splitlines()[:3]
        raise ModelError(
            f"{weights} does not match architecture {card.architecture!r} "
            f"({' '.join(line.strip() for line in first)}); check the card or re-train"
        ) from exc
    module.eval()
    return LoadedModel(card, module, directory)
