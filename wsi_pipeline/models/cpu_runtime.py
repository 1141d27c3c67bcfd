"""A torch model's forward pass run by ONNX Runtime on the CPU, where it is faster than torch in fp32.

Why: the same folded fp32 network runs 1.2-2.3x faster in ONNX Runtime's CPU kernels than in torch's on both
CPUs this project was measured on (an AVX2 EPYC and an AVX-512 one; benchmarks/results/cpu-model.json, rows
`fused_fp32` and `onnxruntime_fp32`), with logits within a few 1e-6 of torch's. The network is exported once per
process, model and tile shape (from the module the predictor would run, BatchNorm folded; the graph kept on disk
for the next process, models/onnx_cache.py) and the session kept;
the domain guard's window features of its layers become extra outputs of the graph, so the guard reads the same
activations without hooks. bf16 and torch.compile stay with torch; so does a network the exporter cannot take (it
says why, once).
"""

from __future__ import annotations

import functools
import io
import logging
import threading
import warnings
from collections.abc import Callable
from copy import deepcopy
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from wsi_pipeline.models.onnx_cache import graph_key, keep_graph, kept_graph, variant_key

LOG = logging.getLogger("wsi_pipeline.models")
ONNX_OPSET = 17  # also what `export-model --format onnx` writes (models/portable.py)

# Input px per ONNX Runtime call (16 tiles of 224 px): a batch runs in slices of this size. Each call's activations
# live in the arena, so a whole batch of 64 resnet18 tiles held 253 MB there; in slices of 16 the process peaked
# ~200 MB lower at the same rate (16.2 / 16.4 ms a tile; slices of 8: 16.6 ms), with the same outputs. The mitosis
# model's 512 px tiles run 3 at a time: 32-33 ms a tile alone against 34 whole (1 at a time: 38-40), while `run` on
# CMU with the default tasks peaked at 1.20-1.24 GB instead of 1.74-1.79 GB in the same wall time (8.1-8.5 s).
PIXELS_PER_RUN = 16 * 224 * 224
_LOCK = threading.Lock()  # predictors of one model are made, and run, in more than one thread of an overlapped batch


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def use_onnxruntime(runtime: str, device: torch.device, bf16: bool, compiled: bool, optimisable: bool) -> bool:
    """`auto`: ONNX Runtime for an fp32 forward pass on the CPU of a network torch may rewrite, when it is
    installed; `torch` never; `onnxruntime` wherever it can run (not bf16, not compiled, CPU only)."""
    if runtime == "torch" or device.type != "cpu" or bf16 or compiled or not optimisable:
        return False
    return onnxruntime_available()


class _WithLayers(nn.Module):
    """The network's output followed by the domain guard's window features of `layers` (their outputs read through
    `domain.FeatureTap`'s hooks): computed in the graph, the activations themselves never leave it (copied out,
    the first layers' outputs cost more than the forward pass). `windows`: each layer's window in its own px, or
    None for a layer with no spatial output (its output is its feature)."""

    def __init__(self, network: nn.Module, layers: list[str], windows: list[int | None]) -> None:
        super().__init__()
        self.network, self.layers, self.windows = network, layers, windows
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from wsi_pipeline.models.domain import stats_over

        out = self.network(x)
        features = []
        for name, window in zip(self.layers, self.windows, strict=True):
            activation = self.seen.pop(name).float()
            features.append(activation[:, None, :] if window is None else stats_over(activation, window))
        return (out, *features)


def _export(
    network: Callable[[], nn.Module], layers: list[str], window_px: int, shape: tuple[int, int], named: str | None
) -> Any:
    """An ONNX Runtime session of `network()` for tiles of `shape` (any batch size); the graph is taken from the
    cache folder where an earlier process kept it (models/onnx_cache.py), named `named` where the model folder names
    it (then the network is not built), else by a digest of the network."""
    session = _kept_session(named)
    if session is not None:
        return session
    from wsi_pipeline.models.domain import FeatureTap, stats_over, window_size

    module = network()
    example = torch.zeros(2, 3, *shape)
    tap = FeatureTap(module, layers, window_px)
    if layers:
        with torch.inference_mode():
            module(example)  # each layer's output size, so that the graph's windows are constants
    tap.remove()
    sizes = tap.seen
    windows = [None if sizes[n].ndim == 2 else window_size(sizes[n].shape[-1], shape[1], window_px) for n in layers]
    key = named or graph_key(module, [layers, windows, shape, ONNX_OPSET], [_WithLayers.forward, stats_over, _graph])
    session = None if named else _kept_session(key)
    if session is not None:
        return session
    graph = _graph(_WithLayers(_traceable(module), layers, windows), example)
    path = keep_graph(key, graph)
    return _session(str(path) if path is not None else graph)


def _kept_session(key: str | None) -> Any:
    """A session of the graph kept under `key`; None where none is kept or it cannot be loaded (a damaged file,
    made again by the caller)."""
    path = kept_graph(key)
    if path is None:
        return None
    try:
        return _session(str(path))
    except Exception as exc:  # onnxruntime raises its own exception types for a damaged graph
        LOG.info("a kept ONNX graph could not be loaded (%s); exporting again", _first_line(exc))
        return None


def _graph(traced: _WithLayers, example: torch.Tensor) -> bytes:
    """The ONNX graph of `traced` (its network's output and the guard's window features), batch size free."""
    from wsi_pipeline.models.domain import FeatureTap

    tap = FeatureTap(traced.network, traced.layers, 1)  # its hooks keep what `traced` reads
    traced.seen = tap.seen
    buffer = io.BytesIO()
    names = ["logits", *[f"layer{i}" for i in range(len(traced.layers))]]
    # on an operator it cannot export, torch's exporter prints the whole traced graph to stderr from C++ before
    # raising (`_jit_onnx_log`, with logging off too); the failure is said in one line by the caller instead
    log = getattr(torch._C, "_jit_onnx_log", None)
    try:
        if log is not None:
            torch._C._jit_onnx_log = lambda *_: None
        with torch.no_grad(), torch.inference_mode(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
            torch.onnx.export(
                traced,
                (example,),
                cast(Any, buffer),  # the exporter writes to a file object too (typed as a path only)
                input_names=["input"],
                output_names=names,
                dynamic_axes={name: {0: "batch"} for name in ["input", *names]},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    finally:
        if log is not None:
            torch._C._jit_onnx_log = log
        tap.remove()
    return buffer.getvalue()


def _session(graph: str | bytes) -> Any:
    """A session of the graph in file `graph` (a path), or of its bytes where it could not be kept."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads torch would use, no more
    options.inter_op_num_threads = 1
    # sleeping, not spinning, between kernels: the tile readers and an overlapped slide's exports share the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no memory pattern (buffers planned from the first runs and kept): the mitosis model on CMU peaked at 2149 MB
    # with it, 1571 MB without (torch: 1436 MB), at the same speed (35.0 / 35.6 ms a tile); the arena stays (without
    # it, 44.7 ms a tile)
    options.enable_mem_pattern = False
    if _shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


@functools.cache
def _shared_arena() -> bool:
    """One CPU buffer arena for every session of the process, grown by what is asked rather than doubled: each
    session kept an arena of its own for the process's life, so the default tasks' peak was the sum of the models'
    (one CMU slide, default tasks: 1740 -> 1623-1633 MB peak RSS, as fast; torch: 1225 MB). False when ONNX Runtime
    refuses it (the sessions then keep their own)."""
    import onnxruntime

    cpu = onnxruntime.OrtMemoryInfo(
        "Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT
    )
    try:  # arena_extend_strategy 1: kSameAsRequested; 0 and -1: no limit, the default chunk sizes
        onnxruntime.create_and_register_allocator(cpu, onnxruntime.OrtArenaCfg(0, 1, -1, -1))
    except Exception as exc:  # onnxruntime raises its own exception types; one registered before serves as well
        return "already" in str(exc).lower()
    return True


def _traceable(network: nn.Module) -> nn.Module:
    """A copy of `network` with ordinary, contiguous weights: the tracer refuses inference tensors (a module made
    under `torch.inference_mode`), and a graph exported from channels-last weights ran 1.7x slower in ONNX Runtime
    (epithelium model, this project's CPU: 1.18 against 0.65 ms a tile)."""
    with torch.inference_mode(False):
        copy = deepcopy(network)
        for module in copy.modules():
            for key, value in module._parameters.items():  # no public way to swap a parameter's storage
                if value is not None:
                    module._parameters[key] = nn.Parameter(value.clone().contiguous(), requires_grad=False)
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.clone().contiguous()
    return copy.eval()


class OnnxForward:
    """A network's forward pass through ONNX Runtime, float32 NCHW in, torch tensors out: its output and the
    domain guard's window features (`domain.window_stats`) of each of its layers.
    `sessions` is the loaded model's (`LoadedModel.sessions`): every slide of a process reuses one session per
    rewrite (`key`) and tile shape. `network` gives the network to export, called only where no graph is kept
    (`model_key`: the model folder's graph name, models/onnx_cache.py). The read's set-up
    (`TorchModulePredictor.prepare`), or else the first batch of a shape, makes the session; where that fails (the
    exporter cannot trace it, an operator ONNX lacks) `__call__` returns None, once said, and torch runs it."""

    def __init__(
        self,
        sessions: dict[Any, Any],
        key: tuple[Any, ...],
        network: Callable[[], nn.Module],
        layers: tuple[list[str], int],  # the guard's layers and window (px), none for an unguarded model
        name: str,
        model_key: str | None = None,
    ) -> None:
        self.sessions, self.key, self.network, self.name = sessions, key, network, name
        self.layers, self.window_px = layers
        self.model_key = model_key

    def session(self, shape: tuple[int, int]) -> Any:
        key = (*self.key, shape)
        if key in self.sessions:  # every batch: no lock, which an export in another thread would hold for a second
            return self.sessions[key]
        with _LOCK:
            if key not in self.sessions:
                named = None
                if self.model_key is not None:
                    named = variant_key(self.model_key, [*self.key, shape, ONNX_OPSET])  # key: rewrite, layers, window
                try:
                    self.sessions[key] = _export(self.network, self.layers, self.window_px, shape, named)
                except Exception as exc:  # the exporter and onnxruntime fail in many ways, each its own type
                    self.sessions[key] = None
                    LOG.info("%s runs in torch: ONNX Runtime cannot take it (%s)", self.name, _first_line(exc))
            return self.sessions[key]

    def __call__(
        self, batch: torch.Tensor, normalised: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The outputs for `batch` (tiles as read), each slice of PIXELS_PER_RUN made the network's input by
        `normalised` just before it runs (one slice's float copy at a time, not the batch's); None where ONNX Runtime
        cannot run the network."""
        session = self.session((int(batch.shape[-2]), int(batch.shape[-1])))
        if session is None:
            return None
        step = max(1, PIXELS_PER_RUN // (int(batch.shape[-2]) * int(batch.shape[-1])))
        inputs = (normalised(batch[i : i + step]).detach().cpu().numpy() for i in range(0, len(batch), step))
        runs = [session.run(None, {"input": np.ascontiguousarray(x)}) for x in inputs]
        out, *layers = (parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in zip(*runs, strict=True))
        return torch.from_numpy(out), [torch.from_numpy(a) for a in layers]


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
