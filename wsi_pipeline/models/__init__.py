"""Models: architectures, model cards and safe checkpoint loading. Knows nothing of OpenSlide."""

from .card import ModelCard
from .loading import LoadedModel, load_model, save_model

__all__ = ["LoadedModel", "ModelCard", "load_model", "save_model"]
