"""How the engine runs, bound once per run: device, readers, batch size, precision, compile, folding, progress.

The run layer builds one `EngineOptions` (from the configuration's `engine` section and the command line, device
resolved, so a wrong --device is refused before the first slide) and passes it down whole; nothing below unpacks
options by hand."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from wsi_pipeline.engine.device import resolve_device
from wsi_pipeline.engine.loader import DecodeKind, LoaderKind
from wsi_pipeline.models.formats import PredictorOptions

CPU = torch.device("cpu")


@dataclass(frozen=True)
class EngineOptions:
    device: torch.device = CPU
    batch_size: int = 32
    workers: int = 2  # tile-reading workers (threads, or processes with loader="processes")
    progress: bool = True
    precision: str = "auto"  # auto, fp32, bf16 (models.predictor.use_bf16)
    compile: bool = False
    fuse_batchnorm: bool = True
    runtime: str = "auto"  # auto, torch, onnxruntime (models.cpu_runtime.use_onnxruntime)
    loader: LoaderKind = "threads"
    decode: DecodeKind = "cpu"  # "device": stored JPEG tiles decoded on the model's device

    @classmethod
    def resolved(cls, device: str, **options: Any) -> EngineOptions:
        """Options with `device` (auto, cpu, cuda, cuda:N) resolved now: a device that is not here is refused."""
        return cls(device=resolve_device(device), **options)

    @property
    def predictor(self) -> PredictorOptions:
        """What every model's predictor applies, whatever the model's format."""
        return PredictorOptions(self.precision, self.compile, self.fuse_batchnorm, self.runtime)

    def with_batch_size(self, batch_size: int) -> EngineOptions:
        return replace(self, batch_size=batch_size)
