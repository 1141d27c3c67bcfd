"""Model directories: `model_card.json` + `weights.safetensors`. Loading never unpickles code."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, write_json
from ..errors import WsiError
from .architectures import build
from .card import ModelCard

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "weights.safetensors"
# The shipped defaults, one folder per task, written by `make models` (installed with the package).
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"


class ModelError(WsiError):
    exit_code = 10
    kind = "bad-model"


@dataclass
class LoadedModel:
    """A model ready for the engine: its card, the network, and the format whose predictor runs it."""

    card: ModelCard
    module: nn.Module
    path: Path | None = None
    format: str = "torch"


def save_model(directory: str | os.PathLike[str], module: nn.Module, card: ModelCard) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(directory / CARD_FILE, card.model_dump(mode="json"))
    return directory


def load_card(directory: Path) -> ModelCard:
    path = directory / CARD_FILE
    if not path.is_file():
        raise ModelError(
            f"{directory}: no {CARD_FILE}; a model is a folder with {CARD_FILE} and {WEIGHTS_FILE} (see docs/models.md)"
        )
    try:
        return ModelCard.model_validate(json.loads(path.read_text()))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not a valid model card: {exc}") from exc


def default_model_dir(task: str) -> Path:
    """The shipped model of `task`; an installation without it is told how to make it."""
    directory = DEFAULTS_DIR / task
    if not (directory / CARD_FILE).is_file():
        raise ModelError(
            f"the default {task} model is missing from {DEFAULTS_DIR}; rebuild it with `make models` "
            f"(needs ../shared/data) or set tasks.{task}.model to a model folder"
        )
    return directory


def shipped_tasks() -> list[str]:
    """Tasks with a shipped default model folder."""
    return sorted(p.name for p in DEFAULTS_DIR.iterdir() if (p / CARD_FILE).is_file()) if DEFAULTS_DIR.is_dir() else []


def resolve_model(
    task: str, configured: str | os.PathLike[str] | None, default: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """The configured model folder, else `default`, else the task's shipped default."""
    chosen = configured if configured is not None else default
    return load_model(chosen if chosen is not None else default_model_dir(task), task=task)


def load_model(directory: str | os.PathLike[str], task: str | None = None) -> LoadedModel:
    """Load and check a model before any tile is read: card valid, task right, weights match the architecture."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"model folder {directory} not found; give --model PATH to a folder with {CARD_FILE}")
    card = load_card(directory)
    if task is not None and card.task != task:
        raise ModelError(
            f"{directory} is a {card.task} model (its card says so), not a {task} model; "
            f"give a {task} model with --model"
        )
    try:
        module = build(card.architecture, len(card.classes), **card.architecture_args)
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{directory}: cannot build architecture {card.architecture!r}: {exc}") from exc
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{directory}: no {WEIGHTS_FILE}; re-export the model (make models)")
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
