"""Tile loading: DataLoader worker processes read and decode tiles (each opens the slide itself) and send uint8."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import WsiError
from ..slide import Slide
from ..tiling import TilePlan


def default_workers() -> int:
    """Tile-reading worker processes: every core but the one that runs the model, at least one."""
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

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        rgb = self.slide.read_region(float(self.x[index]), float(self.y[index]), self.tile_px, self.tile_px, self.mpp)
        return index, torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def make_loader(slide: Slide, plan: TilePlan, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    # A fork after CUDA is initialised is unsafe; CPU runs keep the cheaper fork start.
    context = None
    if workers > 0 and device.type == "cuda":
        context = multiprocessing.get_context("spawn")
    return DataLoader(
        TileDataset(slide, plan),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
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
