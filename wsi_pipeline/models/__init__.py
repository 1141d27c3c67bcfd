"""Models: architectures, model cards and safe checkpoint loading. Knows nothing of OpenSlide."""

from .card import ModelCard
from .loading import LoadedModel, default_model_dir, load_model, resolve_model, save_model

__all__ = ["LoadedModel", "ModelCard", "default_model_dir", "load_model", "resolve_model", "save_model"]
