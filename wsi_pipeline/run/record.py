"""A slide's run record (`run.json`): what made its outputs, the compatibility key, the slide's fingerprint and the
inventory of its outputs, which a re-run compares before it skips the slide (`resume_decision`)."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.config import Config
from wsi_pipeline.core.inventory import file_sha256, first_problem
from wsi_pipeline.core.layout import SlideLayout, slide_files
from wsi_pipeline.models import LoadedModel
from wsi_pipeline.models.loading import network_file
from wsi_pipeline.slide import backend_versions

RUN_FORMAT = "wsi-pipeline/run@2"  # @2: with the outputs' inventory and the slide's fingerprint
_FINGERPRINT_BYTES = 1 << 20


def weights_digest(model: LoadedModel) -> str:
    """The network file's digest, whichever format holds it (safetensors, TorchScript, ONNX)."""
    path = network_file(model)
    if path is None or not path.exists():
        return "in-memory"
    return file_sha256(path)[:16]


def compatibility_key(
    config: Config,
    tasks: list[str],
    models: dict[str, LoadedModel],
    mpp: float,
    backend: str,
    embedding: dict[str, Any] | None = None,
) -> str:
    """Equal keys mean equal outputs: tissue and task settings, model cards and weights, the encoders' and slide
    model's cards (`EmbedModels.record`) and their settings, µm/px, reader backend."""
    parts: dict[str, Any] = {
        "tissue": config.tissue.model_dump(mode="json"),
        "tasks": {t: config.task(t).model_dump(mode="json", exclude={"model", "batch_size"}) for t in tasks},
        "models": {t: [models[t].card.model_dump(mode="json"), weights_digest(models[t])] for t in tasks},
        "mpp": round(mpp, 9),
        "backend": backend,
        "precision": config.engine.precision,
        "fuse_batchnorm": config.engine.fuse_batchnorm,  # folded BatchNorm changes probabilities in the last bits
        "runtime": config.engine.runtime,  # so do ONNX Runtime's kernels
        "decode": config.engine.decode,  # nvJPEG may round a pixel otherwise than libjpeg-turbo
        "format": RUN_FORMAT,
    }
    if embedding:  # a run without encoders keeps the key it had before embeddings existed
        parts["embed"] = config.embed.model_dump(mode="json", exclude={"encoders", "batch_size"})
        parts["slide_classifier"] = config.slide_classifier.model_dump(mode="json", exclude={"model"})
        parts["encoders"] = embedding
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def slide_fingerprint(path: Path) -> dict[str, Any]:
    """The slide file's size and the sha256 of its first and last MiB: tells a moved slide (same fingerprint) from
    another slide with the same file name, or a file replaced in place, without reading gigabytes."""
    size = 0
    digest = hashlib.sha256()
    for part in slide_files(path):  # a DICOM series folder: each instance, in name order
        part_size = part.stat().st_size
        size += part_size
        with part.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_BYTES))
            fh.seek(max(0, part_size - _FINGERPRINT_BYTES))
            digest.update(fh.read(_FINGERPRINT_BYTES))
    return {"size": size, "sha256_first_last_mib": digest.hexdigest()}


@dataclass(frozen=True)
class ResumeDecision:
    """Skip the slide, or redo it and say why (`note`); `foreign` names another slide whose outputs hold the folder."""

    skip: bool
    note: str = ""
    foreign: str | None = None
    record: dict[str, Any] | None = None  # the skipped slide's run record

    @property
    def tiles(self) -> int:
        """The skipped slide's tile count, from its record."""
        return int((self.record or {}).get("tiles", 0))


def resume_decision(
    folder: SlideLayout, key: str, fingerprint: dict[str, Any], slide: Path, *, check_outputs: bool = True
) -> ResumeDecision:
    """Whether the finished outputs in `folder` can be kept for this slide and these settings. Without
    `check_outputs` (they are to be redone anyway: --overwrite) only whose slide they are is checked."""
    if not folder.root.exists():
        return ResumeDecision(False)
    try:
        record = json.loads(folder.run_record.read_text())
    except FileNotFoundError:
        return ResumeDecision(False, "no run record (another command wrote here, or a run was cut short): redone")
    except (OSError, ValueError):
        return ResumeDecision(False, "run record unreadable: redone")
    if not isinstance(record, dict) or not record.get("complete"):
        return ResumeDecision(False, "run record incomplete: redone")
    if record.get("format") != RUN_FORMAT:
        return ResumeDecision(False, f"run record of another format ({record.get('format')}): redone")
    if record.get("slide_fingerprint") != fingerprint:
        recorded = str(record.get("slide", "?"))
        if Path(recorded).resolve() != slide.resolve():
            return ResumeDecision(False, foreign=recorded)
        return ResumeDecision(False, "the slide file changed since its outputs were made: redone")
    if not check_outputs:
        return ResumeDecision(False)
    if record.get("compatibility") != key:
        return ResumeDecision(False, "settings, models, µm/px or reader changed since: redone")
    problem = first_problem(folder.root, record.get("outputs") or {})
    if problem is not None:
        return ResumeDecision(False, f"{problem}: redone")
    return ResumeDecision(True, record=record)


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
