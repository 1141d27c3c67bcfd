"""Model folders without torch: where they are, what they hold, and their cards (read by the CLI and the
task registry before anything heavy is imported)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from wsi_pipeline.core.errors import WsiError
from wsi_pipeline.models.card import ModelCard

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "weights.safetensors"  # the network file of the safetensors format (models/formats.py has each)
# The shipped defaults, one folder per task, written by `make models` (installed with the package).
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"


class ModelError(WsiError):
    exit_code = 10
    kind = "bad-model"


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
