"""Batched inference over tile plans (MONAI's inferer): one read feeds every task whose plan reads the same tiles.

Tiles travel from the loader as uint8; each task's `Predictor` normalises and runs its model on the device and its
`Stitcher` writes the outputs. On CUDA: pinned memory, non-blocking copies, channels_last and bf16 autocast; on the
CPU, bf16 where the CPU has it natively (`models.predictor.use_bf16`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.core.memory import HeapTrimmer
from wsi_pipeline.core.progress import Progress
from wsi_pipeline.engine.embeddings import EmbeddingTarget, EmbeddingWriter, EncoderPredictor, embedding_attributes
from wsi_pipeline.engine.loader import make_loader, one_line_worker_errors
from wsi_pipeline.engine.options import EngineOptions
from wsi_pipeline.engine.qc import QcRecorder, qc_read
from wsi_pipeline.engine.stitch import DomainStitcher, Stitcher, stitcher_class
from wsi_pipeline.models import LoadedModel, Predictor, make_predictor
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.encoders import LoadedEncoder
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.qc_config import QcConfig
from wsi_pipeline.slide.tiling import TilePlan, TileSpec

DEFAULT_OPTIONS = EngineOptions()


@dataclass
class TaskRequest:
    """One task to run: its name, its loaded model and its tile plan."""

    name: str
    model: LoadedModel
    plan: TilePlan
    dtype: str = "float16"


@dataclass
class EmbedRequest:
    """One encoder to run: its tile plan (the card's µm/px and tile size) and where its embeddings go."""

    name: str  # the encoder's name (embeddings/<name>.zarr)
    encoder: LoadedEncoder
    plan: TilePlan
    target: EmbeddingTarget
    slide_mpp: float

    def writer(self) -> EmbeddingWriter:
        card = self.encoder.card
        record = {"name": card.name, "architecture": card.architecture, "pooling": card.pooling, "dim": card.dim}
        record["weights_sha256"] = card.weights_sha256 or ""
        attrs = embedding_attributes(self.plan, record, self.slide_mpp)
        return EmbeddingWriter(self.target, self.plan, card.dim, attrs)


Request = TaskRequest | EmbedRequest


def check_request(request: TaskRequest) -> None:
    """Refuse a plan the model cannot be run on, before any tile is read (the engine's own guard for every caller;
    `run` and `predict` have checked the same geometry once already, as a task's `ReadSpec`)."""
    spec = request.plan.spec
    check_geometry(request.name, request.model.card, spec.mpp, spec.tile_px, spec.overlap_px)


def check_geometry(task: str, card: ModelCard, mpp: float, tile_px: int, overlap_px: int) -> None:
    """Whether `card`'s model can be run on tiles of this µm/px, size and overlap (no slide needed)."""
    key = f"tasks.{task}"
    if abs(mpp - card.mpp) > 1e-6 * card.mpp:
        raise ConfigError(f"{key}.mpp is {mpp} but model {card.name} expects {card.mpp} µm/px")
    stitcher_class(card).check(card, tile_px, overlap_px, key)


def read_groups(requests: Sequence[Request]) -> list[list[Request]]:
    """Tasks and encoders whose plans read identical tiles (same spec and kept tiles) share one read."""
    groups: dict[tuple[TileSpec, int], list[Request]] = {}
    for request in requests:
        groups.setdefault((request.plan.spec, len(request.plan)), []).append(request)
    return list(groups.values())


def predict_slide(
    slide: Slide,
    requests: Sequence[Request],
    store: Path,
    options: EngineOptions = DEFAULT_OPTIONS,
    qc: QcConfig | None = None,
) -> dict[str, Any]:
    """Run every request over its plan and write its heatmaps into `store`; returns timings (`infer_slide`, then
    its `finish`)."""
    return infer_slide(slide, requests, store, options, qc).finish()


@dataclass
class Inference:
    """A slide's reads once their last batch is out, and what is left to do: each stitcher's last rows and
    pyramid, the QC image. Split from the reads so that a batch can give the models the next slide meanwhile
    (run/flow.py); `abort` discards it all."""

    timings: dict[str, Any]
    stitchers: list[Stitcher]
    recorder: tuple[QcRecorder, list[str]] | None = None  # and the names of the read it measured

    def finish(self) -> dict[str, Any]:
        try:
            for stitcher in self.stitchers:
                stitcher.finalize()
            if self.recorder is not None:
                recorder, names = self.recorder
                started = time.perf_counter()
                recorder.finalize()
                seconds = recorder.seconds + time.perf_counter() - started
                self.timings["qc"] = {"read": "+".join(names), "mpp": recorder.plan.spec.mpp, "seconds": seconds}
        except BaseException:
            self.abort()
            raise
        return self.timings

    def abort(self) -> None:
        for stitcher in self.stitchers:
            stitcher.abort()


def infer_slide(
    slide: Slide,
    requests: Sequence[Request],
    store: Path,
    options: EngineOptions = DEFAULT_OPTIONS,
    qc: QcConfig | None = None,
) -> Inference:
    """Run every request over its plan and write its heatmaps into `store`, all but what `Inference.finish` does.
    `options` says how (engine/options.py): the predictor options go to each model's predictor
    (`models.predictor`), the rest to the loader. The timings name the precision each task ran in (`auto` decides
    per device and model card).

    Raises before reading when a model cannot serve its plan; on any failure, partial heatmaps are discarded.
    """
    tasks = [r for r in requests if isinstance(r, TaskRequest)]
    names = [c for request in tasks for c in request.model.card.written_classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two tasks write heatmaps named {duplicates}; set heatmap_classes in a model card")
    for task in tasks:
        check_request(task)
    inference = Inference({"reads": [], "precision": {}}, [])  # precision: what each task's model ran in
    timings = inference.timings
    groups = read_groups(requests)
    qc_group = qc_read([g[0].plan for g in groups]) if qc is not None and qc.enabled else None
    try:
        for number, group in enumerate(groups):
            plan = group[0].plan
            recorder = QcRecorder(plan, store, qc) if qc is not None and number == qc_group else None
            names = [r.name for r in group]
            if recorder is not None:
                inference.recorder = (recorder, names)
            started = time.perf_counter()
            # The workers start (a spawned process re-imports torch: seconds on a GPU machine) and read ahead while
            # the models move to the device and the heatmaps are created.
            device = options.device
            tiles = iter(
                make_loader(slide, plan, options.batch_size, options.workers, device, options.loader, options.decode)
            )
            try:
                pairs: list[tuple[Predictor | EncoderPredictor, list[Stitcher]]] = []
                for request in group:
                    if isinstance(request, EmbedRequest):  # its vectors go to an embeddings file, not a heatmap
                        encoder = EncoderPredictor(request.encoder, device, options.predictor.precision)
                        timings["precision"][f"embed:{request.name}"] = "bf16" if encoder.bf16 else "fp32"
                        writer = request.writer()
                        inference.stitchers.append(writer)
                        pairs.append((encoder, [writer]))
                        continue
                    predictor = make_predictor(request.model, device, options.predictor)
                    timings["precision"][request.name] = "bf16" if getattr(predictor, "bf16", False) else "fp32"
                    card = request.model.card
                    fed: list[Stitcher] = [stitcher_class(card)(request.name, card, request.plan, store, request.dtype)]
                    if getattr(predictor, "guarded", False):  # its tiles' domain values: an image of their own
                        fed.append(DomainStitcher(request.name, card, request.plan, store))
                    inference.stitchers += fed
                    pairs.append((predictor, fed))
                timings["reads"].append(_run_group(slide, plan, names, pairs, tiles, options, started, recorder))
            finally:
                _close_reads(tiles)
                del tiles
    except BaseException:
        inference.abort()
        raise
    return inference


def _close_reads(tiles: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Stop and join the reading threads or worker processes now, also on failure. A DataLoader's iterator shuts
    its workers down only when it is collected: caught in a reference cycle by a failure, it can be copied into the
    next slide's forked workers, whose collection of it then prints a traceback ("can only test a child process");
    shut down here (torch's own method; there is no public one), that copy does nothing."""
    close = getattr(tiles, "close", None) or getattr(tiles, "_shutdown_workers", None)
    if close is not None:
        close()


class _Writes:
    """What follows each batch's forward pass (each stitcher placing its outputs, the QC recorder measuring the
    tiles) in one thread of its own, in batch order, while the models take the next batch: on a GPU the stitching
    and measuring would otherwise leave it idle between batches. At most `ahead` batches wait (their tiles and
    outputs held); a failure surfaces at the next batch or at `wait`."""

    def __init__(self, ahead: int = 2) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tile-writer")
        self.pending: collections.deque[Future[None]] = collections.deque()
        self.ahead = ahead

    def submit(self, write: Callable[[], None]) -> None:
        while len(self.pending) >= self.ahead:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(write))

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _written(
    idx: np.ndarray,
    batch: torch.Tensor,
    outputs: list[tuple[dict[str, torch.Tensor], list[Stitcher]]],
    following: int | None,
    recorder: QcRecorder | None,
) -> Callable[[], None]:
    def write() -> None:
        if recorder is not None:
            recorder.observe(idx, batch)
        for output, fed in outputs:
            for stitcher in fed:  # each writes its own outputs (a guarded model's domain: its own image)
                stitcher.aggregate(idx, output)
                stitcher.advance(following)

    return write


def _run_group(
    slide: Slide,
    plan: TilePlan,
    names: list[str],
    pairs: list[tuple[Predictor | EncoderPredictor, list[Stitcher]]],
    tiles: Iterator[tuple[torch.Tensor, torch.Tensor]],
    options: EngineOptions,
    started: float,
    recorder: QcRecorder | None = None,
) -> dict[str, Any]:
    """Feed every batch of `tiles` to each predictor, and its outputs to its stitchers (`_Writes`); `started` is
    when the group's setup began, so the reported seconds include the loader's start-up."""
    device = options.device
    bar = Progress(len(plan), f"{slide.slide_id} {'+'.join(names)}", enabled=options.progress)
    wait_s = compute_s = model_s = 0.0
    heap = HeapTrimmer()  # untrimmed, the freed heap kept a large slide's peak RSS 1007-1199 MB instead of ~803 MB
    writes = _Writes()
    tick = time.perf_counter()
    setup_s = tick - started
    try:
        with torch.inference_mode(), one_line_worker_errors():
            for indices, batch in tiles:
                got = time.perf_counter()
                wait_s += got - tick
                on_device = batch.to(device, non_blocking=True)
                idx: np.ndarray = indices.numpy()
                last = int(idx[-1])
                following = last + 1 if last + 1 < len(plan) else None
                outputs = []
                for predictor, fed in pairs:
                    forward = time.perf_counter()
                    outputs.append((predictor(on_device), fed))
                    model_s += time.perf_counter() - forward
                # the tiles as read (a predictor converts a copy): the recorder measures them, not the model's input
                writes.submit(_written(idx, batch, outputs, following, recorder))
                bar.update(len(idx))
                heap.after_batch()
                tick = time.perf_counter()
                compute_s += tick - got
            writes.wait()
    finally:
        writes.close()
    bar.close()
    elapsed = time.perf_counter() - started
    return {
        "tasks": names,
        "tiles": len(plan),
        "seconds": elapsed,
        "tiles_per_s": len(plan) / elapsed if elapsed > 0 else None,
        "setup_s": setup_s,
        "wait_for_tiles_s": wait_s,
        "compute_and_write_s": compute_s,
        "model_s": model_s,  # the models' forward passes alone (with the copy of their outputs to the CPU)
        "device": str(device),
    }
