"""Model directories: `model_card.json` + `weights.safetensors`. Loading never unpickles code."""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from wsi_pipeline.core.atomic import atomic_path, write_json
from wsi_pipeline.core.inventory import file_sha256
from wsi_pipeline.models.architectures import build
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.folders import (
    CARD_FILE,
    DEFAULTS_DIR,
    WEIGHTS_FILE,
    ModelError,
    default_model_dir,
    load_card,
    shipped_tasks,
)
from wsi_pipeline.models.formats import model_format

__all__ = [
    "CARD_FILE",
    "DEFAULTS_DIR",
    "WEIGHTS_FILE",
    "LoadedModel",
    "ModelError",
    "default_model_dir",
    "load_card",
    "load_model",
    "resolve_model",
    "save_model",
    "shipped_tasks",
]


@dataclass
class LoadedModel:
    """A model ready for the engine: its card, the network, and the registered format that loaded it and runs it
    (the card's `format`: safetensors, torchscript, onnx or a plugin's)."""

    card: ModelCard
    module: nn.Module | None
    path: Path | None = None
    format: str = "safetensors"
    runtime: Any = None  # a format's own handle (an onnxruntime session) when it is not a torch module
    guard: Any = None  # its fitted domain guard (models/domain.DomainGuard), when the card names one
    # its network exported to ONNX Runtime (models/cpu_runtime.py), per rewrite and tile shape: one export a process
    sessions: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    folder_key: str | None = None  # what names its kept ONNX graphs without building the network (models/onnx_cache.py)
    # the network's build, put off (`module` None until `network()`) where a graph of it is kept
    build: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)
    _building: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def network(self) -> nn.Module | None:
        """The torch module, built now if its build was put off; None for a format without one (ONNX)."""
        with self._building:  # predictors of one model are made in more than one thread of an overlapped batch
            if self.module is None and self.build is not None:
                self.module, self.build = self.build(), None
        return self.module


def save_model(directory: str | os.PathLike[str], module: nn.Module, card: ModelCard) -> Path:
    """Weights, then the card with the weights' sha256 (checked on every load)."""
    directory = Path(directory)
    save_weights_and_card(directory, module.state_dict(), WEIGHTS_FILE, CARD_FILE, card)
    return directory


CardT = TypeVar("CardT", bound=BaseModel)


def save_weights_and_card(
    directory: Path, state: Mapping[str, Any], weights_file: str, card_file: str, card: CardT
) -> CardT:
    """Any model folder (a model, an encoder, an encoder's head, a slide model): the tensors as safetensors, readable
    as the umask allows, then the card with their sha256 (`weights_sha256`); returns that card."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / weights_file) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        readable(tmp)
    card = card.model_copy(update={"weights_sha256": file_sha256(directory / weights_file)})
    write_json(directory / card_file, card.model_dump(mode="json"))
    return card


def readable(path: Path) -> None:
    """safetensors writes its file 0600; a model folder is for everyone the umask allows (a shared install, a lab's
    model share), like any file the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def resolve_model(
    task: str, configured: str | os.PathLike[str] | None, default: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """The configured model folder, else `default`, else the task's shipped default."""
    chosen = configured if configured is not None else default
    return load_model(chosen if chosen is not None else default_model_dir(task), task=task)


def load_model(
    directory: str | os.PathLike[str], task: str | None = None, option: str = "--model", defer_network: bool = False
) -> LoadedModel:
    """Load and check a model before any tile is read: card valid, task right, the network file the card's (sha256)
    and, for safetensors, matching the architecture. `option` is how the user named the folder (`--model`,
    `tasks.<task>.model`). `defer_network`, for a caller that runs the network as loaded and never changes its
    weights (the engine): its ONNX graphs are named by the folder (`folder_key`), and where one is kept (so the network
    was built and checked before) the torch module is built only when something asks for it (`LoadedModel.network`).
    Other callers may change the module in memory, so their graphs are named by the network's own digest."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"model folder {directory} not found; set {option} to a folder with {CARD_FILE}")
    card = load_card(directory)
    if task is not None and card.task != task:
        raise ModelError(
            f"{directory} is a {card.task} model (its card says so), not a {task} model; set {option} to a {task} model"
        )
    try:
        fmt = model_format(card.format)
    except KeyError as exc:
        raise ModelError(f"{directory / CARD_FILE}: {exc.args[0]} (a plugin registers its own formats)") from None
    network = directory / fmt.file
    if not network.is_file():
        raise ModelError(f"{directory}: no {network.name} (its card's format is {card.format}); re-export the model")
    sha256 = file_sha256(network) if card.weights_sha256 is not None or defer_network else None
    if card.weights_sha256 is not None and sha256 != card.weights_sha256:
        raise ModelError(
            f"{network} is not the file its card was written for (sha256 differs from the card's weights_sha256): "
            "the file was changed or damaged; restore it, or re-export the model (make models)"
        )
    from wsi_pipeline.models.domain import load_guard  # imports torch, as the formats do
    from wsi_pipeline.models.onnx_cache import has_kept_graph, model_graph_key

    guard = load_guard(directory, card)
    key = model_graph_key(card, sha256) if sha256 is not None and defer_network and fmt.name == "safetensors" else None
    if has_kept_graph(key):
        build = functools.partial(_built, fmt.load, network, card)
        return LoadedModel(card, None, directory, format=fmt.name, guard=guard, folder_key=key, build=build)
    loaded = fmt.load(network, card)
    if fmt.predictor is None:  # a torch module, run by the engine's module predictor
        return LoadedModel(card, loaded.eval(), directory, format=fmt.name, guard=guard, folder_key=key)
    return LoadedModel(card, None, directory, format=fmt.name, runtime=loaded, guard=guard)


def _built(load: Callable[[Path, ModelCard], Any], network: Path, card: ModelCard) -> nn.Module:
    return load(network, card).eval()


def network_file(model: LoadedModel) -> Path | None:
    """The file that holds a loaded model's network (None for a model made in memory)."""
    return model.path / model_format(model.card.format).file if model.path else None


def safetensors_module(network: Path, card: ModelCard) -> nn.Module:
    """The card's architecture with the weights of a safetensors file (tensors only: nothing is unpickled)."""
    directory = network.parent
    try:
        module = build(card.architecture, len(card.classes), **card.architecture_args)
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{directory}: cannot build architecture {card.architecture!r}: {exc}") from exc
    try:
        state = load_file(str(network))
    except Exception as exc:  # safetensors raises several error types for damaged files
        raise ModelError(f"{network} cannot be read ({exc}); re-export or re-train the model") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing / unexpected keys or shape mismatches
        first = str(exc).splitlines()[:3]
        raise ModelError(
            f"{network} does not match architecture {card.architecture!r} "
            f"({' '.join(line.strip() for line in first)}); check the card or re-train"
        ) from exc
    return module.eval()


def torchscript_module(path: Path, card: ModelCard) -> nn.Module:
    """A TorchScript archive holds its graph and tensors, no pickled Python objects; loaded on the CPU."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in torch, still what other tools write
            return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{path} is not a TorchScript archive ({str(exc).splitlines()[0]}); re-export it") from exc


def onnx_session(path: Path, card: ModelCard) -> Any:
    """An onnxruntime session (CPU; the predictor adds CUDA where onnxruntime has it), opened now so that a bad
    graph fails before the first tile."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(f"{path}: ONNX models need onnxruntime (pip install onnxruntime)") from None
    try:
        return onnxruntime.InferenceSession(str(path), providers=_onnx_providers(onnxruntime))
    except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
        raise ModelError(f"{path} cannot be loaded by onnxruntime ({str(exc).splitlines()[0]}); re-export it") from exc


def _onnx_providers(onnxruntime: Any) -> list[str]:
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
