"""Which torch device a run uses."""

from __future__ import annotations

import torch

from wsi_pipeline.core.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto` -> the first CUDA GPU when there is one, else the CPU; a device that is not here is a usage mistake
    (exit 2), refused before the first slide."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device
