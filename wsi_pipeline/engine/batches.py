"""Each batch of a read through the models and on to the stitchers: the engine's inner loop (`run_read`), with the
stitching and QC measuring of each batch in a thread behind the forward pass."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from wsi_pipeline.core.errors import shut_down_through_signals
from wsi_pipeline.core.memory import HeapTrimmer
from wsi_pipeline.core.progress import Progress
from wsi_pipeline.engine.embeddings import EncoderPredictor
from wsi_pipeline.engine.loader import one_line_worker_errors
from wsi_pipeline.engine.options import EngineOptions
from wsi_pipeline.engine.qc import QcRecorder
from wsi_pipeline.engine.stitch import Stitcher
from wsi_pipeline.models import Predictor
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import TilePlan

Batch = tuple[torch.Tensor, torch.Tensor]


def close_reads(tiles: Iterator[Batch]) -> None:
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
        """Past signals: the stitchers these writes fill are discarded next, on failure or interrupt."""
        shut_down_through_signals(self.pool, self.pending)


def _written(
    idx: np.ndarray,
    batch: torch.Tensor,
    outputs: list[tuple[dict[str, torch.Tensor], list[Stitcher]]],
    following: int | None,
    recorder: QcRecorder | None,
    heap: HeapTrimmer,
) -> Callable[[], None]:
    def write() -> None:
        if recorder is not None:
            recorder.observe(idx, batch)
        for output, fed in outputs:
            for stitcher in fed:  # each writes its own outputs (a guarded model's domain: its own image)
                stitcher.aggregate(idx, output)
                stitcher.advance(following)
        # here, not in the models' thread: asking glibc how much of its heap is free walks every arena (~1 ms a
        # batch with the reading threads' arenas: 0.43 s of a 15-slide run in which the model then waited)
        heap.after_batch()

    return write


def run_read(
    slide: Slide,
    plan: TilePlan,
    names: list[str],
    pairs: list[tuple[Predictor | EncoderPredictor, list[Stitcher]]],
    tiles: Iterator[Batch],
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
                writes.submit(_written(idx, batch, outputs, following, recorder, heap))
                bar.update(len(idx))
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
