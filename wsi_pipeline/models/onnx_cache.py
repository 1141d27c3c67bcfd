"""Exported ONNX graphs kept on disk between processes, so that a job of one slide (a SLURM array task, one
`predict`) does not export its network again: the export costs 0.5-2 s a model (resnet18: 1.0 s, its session 0.14 s),
more than a small slide's forward passes.

A model folder's graph is named from the folder alone (`model_graph_key`): its card, the sha256 of its weights, the
source of the modules that build and export the network and the versions of torch, onnxruntime and the library the
architecture comes from. Kept once, later processes run it without building the torch network at all (models/
loading.py puts the build off): a torchvision architecture's import alone costs 1.2-1.7 s (torch._dynamo, through
torchvision.ops) and 150 MB. A network from anywhere else (a plugin's architecture, one made in memory) is named by
a digest of the network itself (`graph_key`): its weights and forward code (torch.fx's generated code for a folded
network, else each module class's `forward` source). Both names include the guard's layers and windows, the tile
shape, the opset and this cache's own wrapper code. A graph is data (no code runs when it is loaded). The folder:
$WSI_PIPELINE_CACHE, else $XDG_CACHE_HOME/wsi-pipeline, else ~/.cache/wsi-pipeline; where it cannot be written,
graphs are not kept (nothing fails). A graph unused for UNUSED_DAYS is removed when another is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_pipeline.core.atomic import atomic_path
from wsi_pipeline.models.card import ModelCard

LOG = logging.getLogger("wsi_pipeline.models")
FORMAT = "1"


def cache_folder() -> Path:
    base = os.environ.get("WSI_PIPELINE_CACHE")
    if base:
        return Path(base) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wsi-pipeline" / "onnx"


def graph_key(network: nn.Module, parts: list[Any], code: list[Callable[..., Any]]) -> str | None:
    """The digest naming `network`'s graph made with `parts` (layers, windows, shape, opset) by `code` (the
    functions that shape the graph); None where a module's forward source cannot be read (then nothing is kept)."""
    import onnxruntime

    digest = hashlib.sha256()
    try:
        forward = getattr(network, "code", None)  # a torch.fx GraphModule (a folded network) says its own forward
        sources = {forward} if isinstance(forward, str) else set()
        for module in network.modules():
            if not isinstance(module, torch.fx.GraphModule):
                sources.add(f"{type(module).__module__}.{type(module).__qualname__}")
                sources.add(inspect.getsource(type(module).forward))
        sources |= {inspect.getsource(function) for function in code}
    except (OSError, TypeError):  # a class defined in an interactive session, a C extension's module
        return None
    for text in sorted(sources):
        digest.update(text.encode())
    for name, tensor in network.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    versions = [FORMAT, torch.__version__, onnxruntime.__version__]
    digest.update(repr([*versions, *parts, str(network)]).encode())
    return digest.hexdigest()[:32]


# the modules whose code shapes a model folder's graph: the architectures, the BatchNorm folding (predictor), the
# export and its guard outputs (cpu_runtime, domain) and this file
_GRAPH_CODE = ("architectures", "predictor", "cpu_runtime", "domain", "onnx_cache")


def model_graph_key(card: ModelCard, weights_sha256: str) -> str | None:
    """The digest naming the graphs of a model folder (its card and weights) before its network is built; None for an
    architecture this project does not define (a plugin's: its code is not known here without building it)."""
    import onnxruntime

    from wsi_pipeline.models import architectures

    name, registered = card.architecture, architectures.registered()
    if name in registered and not architectures.defined_here(name):
        return None
    library = "timm" if name.startswith("timm:") else None if name in registered else "torchvision"
    try:
        versions = [FORMAT, torch.__version__, onnxruntime.__version__]
        versions.append(importlib.metadata.version(library) if library else "")
    except importlib.metadata.PackageNotFoundError:
        return None
    digest = hashlib.sha256(repr([*versions, card.model_dump_json(), weights_sha256]).encode())
    folder = Path(__file__).parent
    for module in _GRAPH_CODE:
        digest.update((folder / f"{module}.py").read_bytes())
    return digest.hexdigest()[:24]


def variant_key(model_key: str, parts: list[Any]) -> str:
    """The name of `model_key`'s graph made with `parts` (rewrite, guard layers and windows, tile shape, opset)."""
    return f"{model_key}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:16]}"


def has_kept_graph(model_key: str | None) -> bool:
    """Whether a graph of this model was kept (it was built, checked and exported before, so it can be again)."""
    if model_key is None:
        return False
    try:
        return any(cache_folder().glob(f"{model_key}-*.onnx"))
    except OSError:
        return False


def kept_graph(key: str | None) -> Path | None:
    """The kept graph's file, if there is one (a session loads it by path: ONNX Runtime holds on to the bytes of a
    graph it is given as bytes for the session's life, 44 MB for resnet18)."""
    if key is None:
        return None
    path = cache_folder() / f"{key}.onnx"
    if not path.is_file():
        return None
    with contextlib.suppress(OSError):  # its modification time says when it was last used (see `_prune`)
        os.utime(path)
    return path


def keep_graph(key: str | None, graph: bytes) -> Path | None:
    """The file `graph` is kept in, None where it cannot be (a read-only home, a full disk: the graph is made again
    next time, nothing fails)."""
    if key is None:
        return None
    path = cache_folder() / f"{key}.onnx"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(graph)
    except Exception as exc:  # OSError and what atomic_path raises for a folder it cannot use
        LOG.debug("ONNX graph not kept in %s: %s", path.parent, exc)
        return None
    _prune(path.parent)
    return path


UNUSED_DAYS = 30  # a kept graph not used for this long is removed when another is kept


def _prune(folder: Path) -> None:
    """Remove the graphs no process has used for UNUSED_DAYS: a graph's name changes with the model, this code and
    the library versions, so after an upgrade the old ones are never read again (a development machine had gathered
    191 MB in 82 graphs). Only plain files named like ours are removed, never what a link points to."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for path in folder.glob("*.onnx"):
        with contextlib.suppress(OSError):  # another process removed or replaced it meanwhile
            if _OURS.fullmatch(path.name) and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.unlink()


_OURS = re.compile(r"[0-9a-f]{32}\.onnx|[0-9a-f]{24}-[0-9a-f]{16}\.onnx")  # graph_key's, variant_key's names
