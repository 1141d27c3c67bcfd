"""Exported ONNX graphs kept on disk between processes, so that a job of one slide (a SLURM array task, one
`predict`) does not export its network again: the export costs 0.5-2 s a model (resnet18: 1.0 s, its session 0.14 s),
more than a small slide's forward passes.

The key is a digest of everything the graph is made from: the network's weights and forward code (torch.fx's
generated code for a folded network, else each module class's `forward` source), the guard's layers and windows,
the tile shape, and the versions of torch, onnxruntime, the opset and this cache's own wrapper code. A graph is
data (no code runs when it is loaded). The folder: $WSI_PIPELINE_CACHE, else $XDG_CACHE_HOME/wsi-pipeline, else
~/.cache/wsi-pipeline; where it cannot be written, graphs are not kept (nothing fails).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_pipeline.core.atomic import atomic_path

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


def read_graph(key: str | None) -> bytes | None:
    if key is None:
        return None
    path = cache_folder() / f"{key}.onnx"
    try:
        return path.read_bytes()
    except OSError:
        return None


def keep_graph(key: str | None, graph: bytes) -> None:
    if key is None:
        return
    path = cache_folder() / f"{key}.onnx"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(graph)
    except Exception as exc:  # a read-only home, a full disk: the graph is made again next time, nothing fails
        LOG.debug("ONNX graph not kept in %s: %s", path.parent, exc)
