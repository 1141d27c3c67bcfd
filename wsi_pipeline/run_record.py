"""A slide's run record (`run.json`): what made its outputs, and the compatibility key a re-run compares."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import Config
from .models import LoadedModel
from .slide import backend_versions

RUN_FORMAT = "wsi-pipeline/run@1"


def weights_digest(model: LoadedModel) -> str:
    path = model.path / "weights.safetensors" if model.path else None
    if path is None or not path.exists():
        return "in-memory"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def compatibility_key(
    config: Config, tasks: list[str], models: dict[str, LoadedModel], mpp: float, backend: str
) -> str:
    """Equal keys mean equal outputs: tissue and task settings, model cards and weights, µm/px, reader backend."""
    parts = {
        "tissue": config.tissue.model_dump(mode="json"),
        "tasks": {t: config.task(t).model_dump(mode="json", exclude={"model", "batch_size"}) for t in tasks},
        "models": {t: [models[t].card.model_dump(mode="json"), weights_digest(models[t])] for t in tasks},
        "mpp": round(mpp, 9),
        "backend": backend,
        "precision": config.engine.precision,
        "format": RUN_FORMAT,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def completed_run(path: Path) -> dict[str, Any] | None:
    """The run record at `path` when it says complete, else None."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if record.get("complete") and record.get("format") == RUN_FORMAT else None


def model_records(tasks: list[str], models: dict[str, LoadedModel]) -> dict[str, Any]:
    return {
        t: {
            "path": str(models[t].path),
            "card": models[t].card.model_dump(mode="json"),
            "weights_sha256_16": weights_digest(models[t]),
        }
        for t in tasks
    }


def versions() -> dict[str, str]:
    import torch
    import zarr

    return {
        "wsi_pipeline": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **backend_versions(),
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }
