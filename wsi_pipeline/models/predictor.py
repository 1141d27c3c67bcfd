"""The seam between the engine and model formats: a `Predictor` maps a uint8 tile batch to named outputs.

The engine only ever calls `make_predictor`, one calling convention for every format (models/formats.py): a format
whose loader gives a torch module runs in `TorchModulePredictor`, where precision, BatchNorm folding and compile are
applied for all of them; a format with its own runtime (ONNX) brings its predictor. Predictors know nothing of
slides or heatmaps. The built-in formats are registered at the end of this module.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from wsi_pipeline.models.architectures import has_batchnorm
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.cpu_runtime import OnnxForward, onnxruntime_available, use_onnxruntime
from wsi_pipeline.models.encoder_head import HEAD_FILE, encoder_head_module
from wsi_pipeline.models.folders import WEIGHTS_FILE, ModelError
from wsi_pipeline.models.formats import ModelFormat, PredictorOptions, model_format, register_format
from wsi_pipeline.models.loading import LoadedModel, onnx_session, safetensors_module, torchscript_module

LOG = logging.getLogger("wsi_pipeline.models")
DEFAULT_OPTIONS = PredictorOptions()
_SAID_FP32: set[str] = set()


class Predictor(Protocol):
    """Probabilities for a batch: uint8 RGB (B, 3, H, W) on the predictor's device -> {written class: float32
    (B,) for a classifier, (B, h, w) for a dense model}, on the CPU as numpy-ready tensors."""

    card: ModelCard

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Every class of the card, (B, C) or (B, C, h, w) float32 on the CPU (`evaluate` scores these)."""
        ...


BF16_TOLERANCE = 0.02  # largest |bf16 - fp32| of a probability the engine accepts (as on CUDA)
# A card's figure is the maximum over its evaluation data; on other slides it can be larger (the 5-block PCam model:
# 0.013 on PCam valid, 0.021 on CMU-1 skin), so `auto` asks the measured figure for half the tolerance.
BF16_CARD_LIMIT = BF16_TOLERANCE / 2


def bf16_within_limit(measured: float | None) -> bool:
    """Whether a card's measured bf16 difference lets `auto` use bf16 (None: not measured, so nothing forbids it)."""
    return measured is None or measured <= BF16_CARD_LIMIT


def use_bf16(device: torch.device, precision: str, card: ModelCard | None = None, runtime: str = "torch") -> bool:
    """`auto`: bf16 autocast on CUDA; on the CPU, fp32 where ONNX Runtime runs it (`runtime` not `torch`: as fast
    as torch's bf16 on the shipped models with their guards, exact, and the same outputs whether or not the CPU has
    bf16; benchmarks/results/cpu-model.json), else bf16 on CPUs with native bf16 (AVX512-BF16 / AMX: 1.1-2.7x
    torch's folded fp32 rate); unless the card measured its bf16 outputs further than BF16_CARD_LIMIT from fp32
    (`bf16_max_difference`, written by `evaluate` and `publish`): a model is only as fast as its outputs stay
    right. fp32 elsewhere; `bf16` forces it."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if card is not None and not bf16_within_limit(card.bf16_max_difference):
        return False
    if device.type == "cuda":
        return True
    if runtime != "torch" and onnxruntime_available():
        return False
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class TorchModulePredictor:
    """A torch `nn.Module` with the card's normalisation and activation: BatchNorm folded; an fp32 forward pass on
    the CPU in ONNX Runtime (`engine.runtime`, models/cpu_runtime.py); in torch, channels_last, bf16 autocast where
    it pays (`use_bf16`), optionally `torch.compile`d (worth it for long slides: it costs 8-28 s per model first)."""

    def __init__(self, model: LoadedModel, device: torch.device, options: PredictorOptions = DEFAULT_OPTIONS) -> None:
        if model.module is None and model.build is None:
            raise ValueError(f"{model.card.name} has no torch module to run")
        self.card = model.card
        self.device = device
        precision = options.precision
        self.bf16 = use_bf16(device, precision, self.card, options.runtime)
        would = use_bf16(device, precision, None, options.runtime)  # without the card's measured difference
        if precision == "auto" and not self.bf16 and would and self.card.name not in _SAID_FP32:
            _SAID_FP32.add(self.card.name)  # once per model and process, not once per slide
            LOG.info(
                "%s runs in fp32: its card measured bf16 outputs up to %.3f from fp32 (limit %.2f)",
                self.card.name,
                self.card.bf16_max_difference,
                BF16_CARD_LIMIT,
            )
        self.model, self.options = model, options
        # a TorchScript module is already a compiled graph: neither fusion nor torch.compile takes it
        self.optimisable = model_format(model.format).optimisable
        # the domain guard reads the card's layers (a format whose layers cannot be hooked, TorchScript, runs
        # unguarded: `run` says which, once per task, run/batch.py)
        meta = self.card.domain_guard
        self.guarded = model.guard is not None and self.optimisable and meta is not None
        self.guard = model.guard.to(device) if self.guarded else None
        self.tap: Any = None  # the guard's hooks on the torch network, once it is built
        self.run: Any = None  # the torch network that runs, once built (`network`)
        self._folded: torch.nn.Module | None = None
        self.onnx = None  # the forward pass in ONNX Runtime where it is faster (models/cpu_runtime.py)
        if use_onnxruntime(options.runtime, device, self.bf16, options.compile, self.optimisable):
            layers = (list(meta.layers), meta.window_px) if self.guarded and meta is not None else ([], 1)
            rewrite = "folded" if options.fuse_batchnorm else "as-is"
            key = (rewrite, tuple(layers[0]), layers[1])
            self.onnx = OnnxForward(model.sessions, key, self.folded, layers, self.card.name, model.folder_key)
        if self.onnx is None or model.module is not None:
            self.network()  # built now, as it will run (or is built already): a bad network fails here
        self.windows: list[torch.Tensor] | None = None  # the guard's features, where the ONNX graph gave them
        norm = self.card.normalisation
        self.mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
        self.indices = [self.card.classes.index(c) for c in self.card.written_classes]

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.onnx is not None else "torch"

    def network(self) -> Any:
        """The torch network that runs (BatchNorm folded, channels-last, compiled where asked), with the guard's
        hooks; built on first use: where ONNX Runtime runs a kept graph of the model, never."""
        if self.run is None:
            fused = self.folded()
            if self.guarded:
                from wsi_pipeline.models.domain import attach

                self.tap, self.guard = attach(fused, self.card, self.model.guard, self.device)
            self.run = torch.compile(fused) if self.options.compile and self.optimisable else fused
        return self.run

    def folded(self) -> torch.nn.Module:
        """The network with BatchNorm folded where asked: what torch runs and what ONNX Runtime's graph is made from."""
        if self._folded is None:
            module = self.model.network()
            assert module is not None
            module = module.to(self.device).eval().to(memory_format=torch.channels_last)
            self.model.module = module
            fold = self.options.fuse_batchnorm and self.optimisable
            self._folded = conv_bn_fused(module) if fold else module
        return self._folded

    def prepare(self, tile_px: int) -> None:
        """Make the ONNX Runtime session for `tile_px` tiles now (once a process: from the kept graph, else by
        exporting the network), in the thread that sets the read up rather than at its first batch; a network ONNX
        Runtime cannot take runs in torch from here on."""
        if self.onnx is not None and self.onnx.session((tile_px, tile_px)) is None:
            self.onnx = None
            self.network()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Every class: (B, C) or (B, C, h, w) float32 on the CPU."""
        batch = stain_normalised(batch, self.card)
        ran = self.onnx(batch, self.normalised) if self.onnx is not None else None
        if ran is not None:
            out, self.windows = ran
            return activate(out, self.card)
        x = self.normalised(batch)
        network = self.network()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = network(x.contiguous(memory_format=torch.channels_last))
        return activate(out.float(), self.card).cpu()

    def normalised(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's input: float32, scaled to [0, 1] and normalised as the card says, in place on one copy (a
        float batch is not changed; three copies, 38 MB each for 64 tiles of 224 px, before: the same values)."""
        return batch.to(torch.float32, copy=True).div_(255.0).sub_(self.mean).div_(self.std)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = pick_written(self.probabilities(batch), self.card, self.indices)
        if self.guard is not None:  # guarded: its window features from the ONNX graph, else from torch's hooks
            from wsi_pipeline.models.domain import DOMAIN_KEY

            windows, self.windows = self.windows or self.tap.windows(batch.shape[-1]), None
            outputs[DOMAIN_KEY] = self.guard.tile_scores(windows)
        return outputs


def conv_bn_fused(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode module with each BatchNorm folded into the convolution before it (torch.fx's
    `fuse`), the classic inference rewrite: every shipped model is 1.3-2x faster on this CPU (bf16; fp32 1.4-1.5x)
    with probabilities equal to the unfused module's within 1e-5 (benchmarks/cpu_model.py). A module fx cannot
    trace (data-dependent control flow) runs as it is."""
    from torch.fx.experimental.optimization import fuse

    if not has_batchnorm(module):
        return module
    try:
        return fuse(module).to(memory_format=torch.channels_last)
    except Exception as exc:  # tracing fails in many ways (TraceError, TypeError, NotImplementedError, ...)
        LOG.info("%s: BatchNorm not folded (torch.fx cannot trace it: %s)", type(module).__name__, exc)
        return module


def stain_normalised(batch: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """The batch as the model was trained to see it: stain-normalised per tile when its card says so (on the CPU:
    a Macenko estimate per tile is a few small linear-algebra steps, not worth a device kernel)."""
    if card.stain_normalisation is None:
        return batch
    from wsi_pipeline.models.stain import normalise_batch

    return normalise_batch(batch, card.stain_normalisation)


def activate(logits: torch.Tensor, card: ModelCard) -> torch.Tensor:
    return torch.softmax(logits, dim=1) if card.activation == "softmax" else torch.sigmoid(logits)


def pick_written(probs: torch.Tensor, card: ModelCard, indices: list[int]) -> dict[str, torch.Tensor]:
    return {name: probs[:, index] for name, index in zip(card.written_classes, indices, strict=True)}


class OnnxPredictor:
    """An ONNX graph run by onnxruntime (CUDA where onnxruntime has it, else the CPU): input float32 NCHW,
    normalised as the card says; output the network's logits, activated as the card says."""

    def __init__(self, model: LoadedModel, device: torch.device, options: PredictorOptions = DEFAULT_OPTIONS) -> None:
        self.card = model.card
        self.session = model.runtime
        self.input = self.session.get_inputs()[0].name
        norm = self.card.normalisation
        self.mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std).view(1, 3, 1, 1)
        self.indices = [self.card.classes.index(c) for c in self.card.written_classes]

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        batch = stain_normalised(batch, self.card)
        x = ((batch.cpu().float() / 255.0 - self.mean) / self.std).contiguous().numpy()
        (logits,) = self.session.run(None, {self.input: x})[:1]
        return activate(torch.from_numpy(logits).float(), self.card)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return pick_written(self.probabilities(batch), self.card, self.indices)


def make_predictor(model: LoadedModel, device: torch.device, options: PredictorOptions = DEFAULT_OPTIONS) -> Predictor:
    """The predictor of a loaded model, whatever its format: one place for precision, folding and compile."""
    try:
        fmt = model_format(model.format)
    except KeyError as exc:
        raise ModelError(f"{model.card.name}: {exc.args[0]}") from None
    if fmt.predictor is not None:  # a runtime of its own (ONNX), or an in-memory format's factory
        return fmt.predictor(model, device, options)
    if model.module is None and model.build is None:
        raise ModelError(f"{model.card.name}: format {fmt.name} loaded no torch module and has no predictor")
    return TorchModulePredictor(model, device, options)


register_format(ModelFormat("safetensors", WEIGHTS_FILE, safetensors_module))
register_format(ModelFormat("torchscript", "model.torchscript.pt", torchscript_module, optimisable=False))
register_format(ModelFormat("onnx", "model.onnx", onnx_session, predictor=OnnxPredictor, optimisable=False))
register_format(ModelFormat("encoder_head", HEAD_FILE, encoder_head_module))
