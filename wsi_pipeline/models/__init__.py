"""Models: architectures, model cards, safe loading and the `Predictor` seam. Knows nothing of OpenSlide.

Names are imported on first use (PEP 562), so that reading a card or a model folder does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ModelCard": "card",
    "default_model_dir": "folders",
    "load_card": "folders",
    "shipped_tasks": "folders",
    "ModelError": "folders",
    "LoadedModel": "loading",
    "load_model": "loading",
    "resolve_model": "loading",
    "save_model": "loading",
    "Predictor": "predictor",
    "make_predictor": "predictor",
    "register_format": "formats",
    "ModelFormat": "formats",
    "PredictorOptions": "formats",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
