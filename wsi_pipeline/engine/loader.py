"""Tile loading: batches of uint8 tiles read ahead of the model, in threads of this process (the default) or in
DataLoader worker processes.

Threads are the default because every shipped reader releases the GIL while it works (imagecodecs' decoders,
OpenSlide through ctypes, PIL's and scipy's resampling): they read as fast as processes here (benchmarks/read.py)
without a forked copy of torch per worker, which is what the peak RSS summed over the process tree counts, and
without their start-up. Processes stay for a plugin backend that holds the GIL (`engine.loader: processes`).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsi_pipeline.core.errors import WsiError, shut_down_through_signals
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import TilePlan

LoaderKind = Literal["threads", "processes"]
DecodeKind = Literal["cpu", "device"]
Batch = tuple[torch.Tensor, torch.Tensor]  # plan indices (int64), tiles (n, 3, T, T) uint8


def default_workers() -> int:
    """Tile-reading workers: every core but the one that runs the model, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


class TileDataset(Dataset):
    """Tiles of one plan as uint8 (3, T, T) tensors; the slide handle is opened in each worker."""

    def __init__(self, slide: Slide, plan: TilePlan) -> None:
        self.slide = slide
        self.x = plan.x
        self.y = plan.y
        self.tile_px = plan.spec.tile_px
        self.mpp = plan.spec.mpp

    def __len__(self) -> int:
        return int(self.x.size)

    def rgb(self, index: int) -> np.ndarray:
        """Tile `index` as (T, T, 3) uint8."""
        return self.slide.read_region(float(self.x[index]), float(self.y[index]), self.tile_px, self.tile_px, self.mpp)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.from_numpy(self.rgb(index)).permute(2, 0, 1).contiguous()

    def read_batch(self, start: int, stop: int, pin: bool) -> Batch:
        """Tiles `start` .. `stop` - 1 written straight into one (n, 3, T, T) tensor (pinned for a CUDA copy)."""
        tiles = torch.empty((stop - start, 3, self.tile_px, self.tile_px), dtype=torch.uint8, pin_memory=pin)
        view = tiles.numpy()
        for row, index in enumerate(range(start, stop)):
            view[row] = self.rgb(index).transpose(2, 0, 1)
        return torch.arange(start, stop), tiles


class ThreadedLoader:
    """Batches in plan order, each read by one of `workers` threads (0: read in the calling thread)."""

    def __init__(self, dataset: TileDataset, batch_size: int, workers: int, pin: bool) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers
        self.pin = pin

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> ThreadedReads:
        return ThreadedReads(self)


class ThreadedReads:
    """One pass over a `ThreadedLoader`: reading starts at once (the first batches are read while the models move
    to the device), at most 2 x workers batches ahead. `close` (also on garbage collection) cancels the batches not
    yet started and waits for those in progress, so no reading thread outlives the slide."""

    def __init__(self, loader: ThreadedLoader) -> None:
        self.loader = loader
        total, size = len(loader.dataset), loader.batch_size
        self._ranges = iter([(start, min(total, start + size)) for start in range(0, total, size)])
        self._pending: collections.deque[Future[Batch]] = collections.deque()
        self._pool = ThreadPoolExecutor(loader.workers, thread_name_prefix="tile-reader") if loader.workers else None
        self._submit(2 * loader.workers)

    def _submit(self, count: int) -> None:
        if self._pool is None:
            return
        for _, (start, stop) in zip(range(count), self._ranges, strict=False):
            self._pending.append(self._pool.submit(self.loader.dataset.read_batch, start, stop, self.loader.pin))

    def __iter__(self) -> ThreadedReads:
        return self

    def __next__(self) -> Batch:
        if self._pool is None:
            start, stop = next(self._ranges)
            return self.loader.dataset.read_batch(start, stop, self.loader.pin)
        if not self._pending:
            self.close()
            raise StopIteration
        try:
            batch = self._pending.popleft().result()
        except BaseException:  # a failed read (or an interrupt while waiting) ends the pass here
            self.close()
            raise
        self._submit(1)
        return batch

    def close(self) -> None:
        pool = getattr(self, "_pool", None)  # None also when __init__ did not get that far
        if pool is not None:  # the reads write into pinned buffers a later batch reuses: waited for past signals
            shut_down_through_signals(pool, self._pending)

    def __del__(self) -> None:
        self.close()


def make_loader(
    slide: Slide,
    plan: TilePlan,
    batch_size: int,
    workers: int,
    device: torch.device,
    kind: LoaderKind = "threads",
    decode: DecodeKind = "cpu",
) -> Iterable[Batch]:
    """Batches (plan indices, uint8 tiles) of `plan`, read by `workers` threads or worker processes, or with
    `decode="device"` decoded on `device` where the plan allows it (`device_reads`)."""
    if decode == "device":
        from wsi_pipeline.engine.device_reads import device_loader

        on_device = device_loader(slide, plan, batch_size, device)
        if on_device is not None:
            return on_device
    dataset = TileDataset(slide, plan)
    pin = device.type == "cuda"
    if kind == "threads":
        return ThreadedLoader(dataset, batch_size, workers, pin)
    # A fork after CUDA is initialised is unsafe; CPU runs keep the cheaper fork start.
    context = None
    if workers > 0 and device.type == "cuda":
        context = multiprocessing.get_context("spawn")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context=context,
    )


@contextlib.contextmanager
def one_line_worker_errors() -> Iterator[None]:
    """DataLoader re-raises a worker's exception with the worker's traceback inside its message; users get the
    original one-line message (same error type, same exit status)."""
    try:
        yield
    except WsiError as exc:
        text = str(exc)
        if "DataLoader worker" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if last.startswith(type(exc).__module__) else last
        raise type(exc)(message) from None
