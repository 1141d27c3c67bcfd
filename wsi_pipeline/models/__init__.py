"""Models: architectures, model cards and safe checkpoint loading. Knows nothing of OpenSlide."""

from .card import ModelCard
from .loading import LoadedModel, default_model_dir, load_model, resolve_model, save_model, shipped_tasks
from .predictor import Predictor, make_predictor, register_format

__all__ = [
    "LoadedModel",
    "ModelCard",
    "Predictor",
    "default_model_dir",
    "load_model",
    "make_predictor",
    "register_format",
    "resolve_model",
    "save_model",
    "shipped_tasks",
]
