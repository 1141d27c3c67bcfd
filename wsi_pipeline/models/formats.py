"""The model-format registry: how a model folder stores its network and how the engine runs it, in one place.

A format is a card `format` name, the file in the model folder that holds the network, a loader, and (for a format
that is not a torch module, such as an ONNX graph) a predictor factory. A loader that returns an `nn.Module` needs no
predictor: the engine's module predictor runs it, with the card's normalisation and activation and the engine's
precision, BatchNorm folding and `torch.compile` (the last two where `optimisable`: a TorchScript graph is already
compiled). The built-in formats (safetensors, torchscript, onnx) are registered by `models.predictor`; a plugin
registers its own with `register_format(ModelFormat(...))` and its folders load and run like the built-in ones.
No torch here: the registry is read before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_pipeline.models.folders import ModelError

if TYPE_CHECKING:
    from wsi_pipeline.models.card import ModelCard

_FORMATS: dict[str, ModelFormat] = {}
_BUILTIN = "wsi_pipeline.models.predictor"  # registers safetensors, torchscript and onnx when imported


@dataclass(frozen=True)
class PredictorOptions:
    """How the engine runs every model, whatever its format: precision (auto, fp32, bf16), torch.compile,
    BatchNorm folding and the CPU runtime (`engine.*` of the configuration)."""

    precision: str = "auto"
    compile: bool = False
    fuse_batchnorm: bool = True
    runtime: str = "auto"  # auto, torch, onnxruntime: what runs a torch module's fp32 forward on the CPU


@dataclass(frozen=True)
class ModelFormat:
    name: str  # the card's `format`
    file: str  # the file in the model folder that holds the network
    # (network file, card) -> an nn.Module, or a runtime handle for `predictor`; raises ModelError naming the file
    load: Callable[[Path, ModelCard], Any]
    # (LoadedModel, torch.device, PredictorOptions) -> Predictor; None: the loader returns an nn.Module
    predictor: Callable[..., Any] | None = None
    optimisable: bool = True  # a module that BatchNorm folding and torch.compile may rewrite


def register_format(model_format: ModelFormat | str, factory: Callable[..., Any] | None = None) -> ModelFormat:
    """Make model folders whose card says `format: <name>` loadable and runnable (or replace a format).

    The earlier form, `register_format("name", Factory)` with a `(LoadedModel, device) -> Predictor` factory, still
    registers an in-memory format (a `LoadedModel(format="name")` runs through the engine; no folder loads)."""
    if isinstance(model_format, str):
        if factory is None:
            raise TypeError("register_format(name, factory): the factory is missing")
        name, make = model_format, factory
        model_format = ModelFormat(name, "", _no_folder(name), lambda model, device, _options: make(model, device))
    _FORMATS[model_format.name] = model_format
    return model_format


def _no_folder(name: str) -> Callable[[Path, ModelCard], Any]:
    def load(network: Path, card: ModelCard) -> Any:
        raise ModelError(f"{network.parent}: format {name!r} was registered for models in memory only; no folder loads")

    return load


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


def format_names() -> list[str]:
    importlib.import_module(_BUILTIN)
    return sorted(_FORMATS)


def model_format(name: str) -> ModelFormat:
    """The registered format `name`; a KeyError names the known ones (callers turn it into their own error)."""
    importlib.import_module(_BUILTIN)
    try:
        return _FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown model format {name!r}; known: {', '.join(sorted(_FORMATS))}") from None
