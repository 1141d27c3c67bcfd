"""Batched inference over tile plans, stitched into heatmaps.

Tiles are read and decoded in DataLoader worker processes (each opens the slide itself) and travel as uint8; the
model card's normalisation is applied on the device. One read feeds every task whose plan has the same µm/px, tile
size and overlap. On CUDA: pinned memory, non-blocking copies, channels_last and bf16 autocast; on the CPU, fp32.

Stitching: a classifier's tile (col, row) becomes heatmap pixel (row, col), which stands for the tile's central
stride x stride square. A dense network's tile contributes only its centre (the overlap/2 border is cut, except at
the grid's outer edges), so with overlap/2 >= the model's halo the stitched map equals the network run on the whole
region at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError, WsiError
from .heatmap import HeatmapGeometry, HeatmapWriter
from .memory import HeapTrimmer
from .models import LoadedModel
from .progress import Progress
from .slide import Slide
from .tiling import TilePlan


def default_workers() -> int:
    """Tile-reading worker processes: every core but the one that runs the model, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


def resolve_device(name: str) -> torch.device:
    """`auto` -> the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


class TileDataset(Dataset):
    """Tiles of one plan as uint8 (3, T, T) tensors; the slide handle is opened in each worker."""

    def __init__(self, slide: Slide, plan: TilePlan) -> None:
        self.slide = slide
        self.x = plan.x
        self.y = plan.y
        self.tile_px = int(plan.params["tile_px"])
        self.mpp = float(plan.params["mpp"])

    def __len__(self) -> int:
        return int(self.x.size)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        rgb = self.slide.read_region(int(self.x[index]), int(self.y[index]), self.tile_px, self.tile_px, self.mpp)
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


@dataclass
class TaskRequest:
    """One task to run: its name, its loaded model and its tile plan."""

    name: str
    model: LoadedModel
    plan: TilePlan
    dtype: str = "float16"


def check_request(request: TaskRequest) -> None:
    """Refuse a plan the model cannot be run on, before any tile is read."""
    card, params = request.model.card, request.plan.params
    tile, overlap = int(params["tile_px"]), int(params["overlap_px"])
    key = f"tasks.{request.name}"
    if abs(float(params["mpp"]) - card.mpp) > 1e-6 * card.mpp:
        raise ConfigError(f"{key}.mpp is {params['mpp']} but model {card.name} expects {card.mpp} µm/px")
    if card.kind == "classifier" and tile != card.tile_px:
        raise ConfigError(f"{key}.tile_px is {tile} but classifier {card.name} expects {card.tile_px} px tiles")
    if card.kind == "dense":
        stride = card.output_stride
        if tile % stride or overlap % (2 * stride):
            raise ConfigError(
                f"{key}: tile_px ({tile}) must be a multiple of the output stride {stride} and "
                f"overlap_px ({overlap}) a multiple of {2 * stride}"
            )
        if overlap // 2 < card.halo_px:
            raise ConfigError(
                f"{key}.overlap_px is {overlap} but model {card.name} needs at least "
                f"{2 * card.halo_px} (twice its halo of {card.halo_px} px) to stitch without seams"
            )


@dataclass(frozen=True)
class DenseCrop:
    """Where a dense tile's output lands, in output px: `out_tile` per tile, grid `step`, and the `margin` cut on
    inner edges (overlap/2 at the output stride)."""

    out_tile: int
    margin: int
    step: int

    def first_row(self, row: int) -> int:
        """The first heatmap row a tile of grid row `row` writes."""
        return row * self.step + (0 if row == 0 else self.margin)


def dense_crop(plan: TilePlan, output_stride: int) -> DenseCrop:
    tile, overlap = int(plan.params["tile_px"]), int(plan.params["overlap_px"])
    return DenseCrop(tile // output_stride, overlap // 2 // output_stride, plan.stride_px // output_stride)


def heatmap_geometry(request: TaskRequest) -> HeatmapGeometry:
    card, plan = request.model.card, request.plan
    tile, overlap, stride = int(plan.params["tile_px"]), int(plan.params["overlap_px"]), plan.stride_px
    n_cols, n_rows = plan.grid
    mpp = float(plan.params["mpp"])
    dsx, dsy = plan.params["downsample"]
    if card.kind == "classifier":
        return HeatmapGeometry(n_rows, n_cols, stride, overlap / 2, (mpp, mpp), (dsx, dsy))
    os_ = card.output_stride
    return HeatmapGeometry(
        ((n_rows - 1) * stride + tile) // os_, ((n_cols - 1) * stride + tile) // os_, os_, 0.0, (mpp, mpp), (dsx, dsy)
    )


@dataclass
class _Sink:
    """Turns one task's batch outputs into heatmap writes (one single-channel heatmap per written class)."""

    request: TaskRequest
    writers: list[tuple[int, HeatmapWriter]]  # (class index, writer)
    device: torch.device
    mean: torch.Tensor = field(init=False)
    std: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        norm = self.request.model.card.normalisation
        self.mean = torch.tensor(norm.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, device=self.device).view(1, 3, 1, 1)

    def forward(self, unit: torch.Tensor) -> np.ndarray:
        """Probabilities (B, C[, h, w]) for a batch of RGB in [0, 1] on the device."""
        card = self.request.model.card
        x = ((unit - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.request.model.module(x)
        out = out.float()
        out = torch.softmax(out, dim=1) if card.activation == "softmax" else torch.sigmoid(out)
        return out.cpu().numpy()

    def consume(self, indices: np.ndarray, probs: np.ndarray) -> None:
        plan, card = self.request.plan, self.request.model.card
        n_cols, n_rows = plan.grid
        if card.kind == "classifier":
            if probs.ndim != 2:
                raise ConfigError(f"classifier {card.name} returned shape {probs.shape}; expected (batch, classes)")
            for i, p in zip(indices.tolist(), probs, strict=True):
                self._put(int(plan.rows[i]), int(plan.cols[i]), p[:, None, None])
            return
        crop = dense_crop(plan, card.output_stride)
        out_tile, margin, step = crop.out_tile, crop.margin, crop.step
        if probs.shape[-2:] != (out_tile, out_tile):
            raise ConfigError(
                f"dense model {card.name} returned {probs.shape[-2:]} per tile; expected "
                f"{(out_tile, out_tile)} for {plan.params['tile_px']} px tiles at output stride {card.output_stride}"
            )
        for i, p in zip(indices.tolist(), probs, strict=True):
            col, row = int(plan.cols[i]), int(plan.rows[i])
            x0 = 0 if col == 0 else margin
            x1 = out_tile if col == n_cols - 1 else margin + step
            y0 = 0 if row == 0 else margin
            y1 = out_tile if row == n_rows - 1 else margin + step
            self._put(row * step + y0, col * step + x0, p[:, y0:y1, x0:x1])

    def _put(self, y: int, x: int, block: np.ndarray) -> None:
        for index, writer in self.writers:
            writer.write(y, x, block[index : index + 1])

    def advance(self, next_index: int | None) -> None:
        """Tell the writer the first heatmap row the next tile can touch."""
        plan, card = self.request.plan, self.request.model.card
        if next_index is None:
            return
        row = int(plan.rows[next_index])
        first = row if card.kind == "classifier" else dense_crop(plan, card.output_stride).first_row(row)
        for _, writer in self.writers:
            writer.advance(first)


def read_groups(requests: Sequence[TaskRequest]) -> list[list[TaskRequest]]:
    """Tasks whose plans read identical tiles (same µm/px, size, overlap and kept tiles) share one read."""
    groups: dict[tuple[Any, ...], list[TaskRequest]] = {}
    for request in requests:
        p = request.plan
        key = (
            p.params["mpp"],
            p.params["tile_px"],
            p.params["overlap_px"],
            p.params["min_tissue"],
            tuple(p.params["bounds"]),
            len(p),
        )
        groups.setdefault(key, []).append(request)
    return list(groups.values())


def predict_slide(
    slide: Slide,
    requests: Sequence[TaskRequest],
    store: Path,
    *,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every request over its plan and write one heatmap per request into `store`; returns timings.

    Raises before reading when a model cannot serve its plan; on any failure, partial heatmaps are discarded.
    """
    names = [c for request in requests for c in request.model.card.written_classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two tasks write heatmaps named {duplicates}; set heatmap_classes in a model card")
    for request in requests:
        check_request(request)
    timings: dict[str, Any] = {"reads": []}
    for group in read_groups(requests):
        plan = group[0].plan
        sinks = []
        started = time.perf_counter()
        # The workers start (a spawn re-imports torch: seconds on a GPU machine) and read ahead while the models move
        # to the device and the heatmaps are created.
        tiles = iter(make_loader(slide, plan, batch_size, workers, device))
        try:
            for request in group:
                card = request.model.card
                request.model.module = request.model.module.to(device).eval().to(memory_format=torch.channels_last)
                geometry = heatmap_geometry(request)
                attrs = {"task": request.name, "model_card": card.model_dump(mode="json"), "plan": plan.params}
                writers = [
                    (card.classes.index(name), HeatmapWriter(store, name, [name], geometry, request.dtype, attrs=attrs))
                    for name in card.written_classes
                ]
                sinks.append(_Sink(request, writers, device))
            timings["reads"].append(_run_group(slide, plan, sinks, tiles, device, progress, started))
            for sink in sinks:
                for _, writer in sink.writers:
                    writer.close()
        except BaseException:
            for sink in sinks:
                for _, writer in sink.writers:
                    if not writer.closed:
                        writer.abort()
            raise
        finally:
            del tiles  # shuts the workers down now, also on failure
    return timings


@contextlib.contextmanager
def _one_line_worker_errors() -> Iterator[None]:
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


def _run_group(
    slide: Slide,
    plan: TilePlan,
    sinks: list[_Sink],
    tiles: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    progress: bool,
    started: float,
) -> dict[str, Any]:
    """Feed every batch of `tiles` to each sink; `started` is when the group's setup began, so the reported seconds
    include the loader's start-up."""
    names = "+".join(s.request.name for s in sinks)
    bar = Progress(len(plan), f"{slide.slide_id} {names}", enabled=progress)
    wait_s = compute_s = 0.0
    heap = HeapTrimmer()  # untrimmed, the freed heap kept a large slide's peak RSS 1007-1199 MB instead of ~803 MB
    tick = time.perf_counter()
    setup_s = tick - started
    with torch.inference_mode(), _one_line_worker_errors():
        for indices, batch in tiles:
            got = time.perf_counter()
            wait_s += got - tick
            unit = batch.to(device, non_blocking=True).float().div_(255.0)
            idx = indices.numpy()
            last = int(idx[-1])
            following = last + 1 if last + 1 < len(plan) else None
            for sink in sinks:
                sink.consume(idx, sink.forward(unit))
                sink.advance(following)
            bar.update(len(idx))
            heap.after_batch()
            tick = time.perf_counter()
            compute_s += tick - got
    bar.close()
    elapsed = time.perf_counter() - started
    return {
        "tasks": [s.request.name for s in sinks],
        "tiles": len(plan),
        "seconds": elapsed,
        "tiles_per_s": len(plan) / elapsed if elapsed > 0 else None,
        "setup_s": setup_s,
        "wait_for_tiles_s": wait_s,
        "compute_and_write_s": compute_s,
        "device": str(device),
    }
