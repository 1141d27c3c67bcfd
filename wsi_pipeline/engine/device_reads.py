"""Tiles read on the model's device (`engine.decode: device`): the stored JPEG tiles a batch touches are decoded
there in one call (nvJPEG through torchvision on CUDA; torchvision's libjpeg-turbo on the CPU, which is how this path
is tested without a GPU), each decoded once per batch, assembled and resampled there with the blocks of
`Slide.region_blocks` (the same global transform as `Slide.read_region`), and handed to the model without a host
round trip.

Plans this path cannot serve (a reader without stored JPEG tiles, an enlarging read, a tile of more rows than one
resampling block) are read by the CPU loader instead, with one log line saying why.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from wsi_pipeline.core.errors import SlideTruncatedError
from wsi_pipeline.engine.gpu_decode import assemble_region, decode_jpeg_tiles, missing_decoder
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.resample import _TIE_BIAS, Block, _area_weights
from wsi_pipeline.slide.tiling import TilePlan

LOG = logging.getLogger("wsi_pipeline.engine")
Batch = tuple[torch.Tensor, torch.Tensor]


def device_read_refusal(slide: Slide, plan: TilePlan) -> str | None:
    """Why the device path cannot read `plan` (None: it can). Every tile of a plan has the same level and mode."""
    reader: Any = slide.reader
    no_decoder = missing_decoder()
    if no_decoder is not None:
        return no_decoder
    if not hasattr(reader, "jpeg_streams") or not hasattr(reader, "stored_tile_size"):
        return f"the {slide.backend} reader gives no stored JPEG tiles"
    if len(plan) == 0:
        return "the plan has no tiles"
    size = plan.spec.tile_px
    blocks = slide.region_blocks(float(plan.x[0]), float(plan.y[0]), size, size, plan.spec.mpp)
    if len(blocks) != 1:
        return f"{size} px tiles span {len(blocks)} resampling blocks"
    if blocks[0].mode == "bicubic":
        return "the plan enlarges the slide (bicubic on the CPU)"
    if not reader.jpeg_streams(blocks[0].level, 0, 0, 1, 1):
        return f"level {blocks[0].level} is not stored as JPEG"
    return None


def resample_on_device(region: torch.Tensor, block: Block, height: int) -> torch.Tensor:
    """(3, n_rows, n_cols) uint8 level pixels -> (3, height, width) uint8, as `read_resampled` does on the CPU."""
    width = block.width
    if block.mode == "copy":
        return region[:, :height, :width]
    if block.mode == "reduce":
        # PIL's reduce: the k x k sum, correctly rounded (sum + k^2 / 2) // k^2; sums of uint8 are exact in fp32
        kx, ky = block.factor
        sums = F.avg_pool2d(region[None].float(), (ky, kx), ceil_mode=True, divisor_override=1)[0]
        return torch.div(sums.round().long() + (kx * ky) // 2, kx * ky, rounding_mode="floor")[:, :height, :width].to(
            torch.uint8
        )
    _, rows, cols = region.shape
    left, top, right, bottom = block.box
    device = str(region.device)
    vertical = _dense_weights(top, (bottom - top) / height, height, rows, device)
    across = _dense_weights(left, (right - left) / width, width, cols, device)
    values = vertical @ region.float() @ across.T  # (3, height, width): rows, then columns, as `area_mean`
    return torch.clamp(torch.floor(values + (0.5 + _TIE_BIAS)), 0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=1024)
def _dense_weights(first_edge: float, step: float, count: int, size: int, device: str) -> torch.Tensor:
    """`_area_weights` as a dense matrix kept on `device` (a plan's rows and columns share them: one copy each)."""
    return torch.from_numpy(_area_weights(first_edge, step, count, size).toarray()).to(device)


class DeviceTileReads:
    """Batches (plan indices on the CPU, uint8 tiles on `device`) of a plan, decoded and resampled on `device`."""

    def __init__(self, slide: Slide, plan: TilePlan, batch_size: int, device: torch.device) -> None:
        self.slide, self.plan, self.batch_size, self.device = slide, plan, batch_size, device
        self.reader: Any = slide.reader
        self.cpu_decode = False  # set once the device's decoder has refused this slide's streams

    def __len__(self) -> int:
        return -(-len(self.plan) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.plan), self.batch_size):
            stop = min(len(self.plan), start + self.batch_size)
            yield torch.arange(start, stop), self.read_batch(start, stop)

    def read_batch(self, start: int, stop: int) -> torch.Tensor:
        size, mpp = self.plan.spec.tile_px, self.plan.spec.mpp
        blocks = [
            self.slide.region_blocks(float(self.plan.x[i]), float(self.plan.y[i]), size, size, mpp)[0]
            for i in range(start, stop)
        ]
        wanted: dict[tuple[int, int], bytes] = {}
        per_tile = []
        for b in blocks:
            streams = self.reader.jpeg_streams(b.level, b.left, b.top, b.n_cols, b.n_rows)
            per_tile.append([(tx, ty) for tx, ty, _ in streams])
            wanted.update({(tx, ty): stream for tx, ty, stream in streams})
        places = list(wanted)
        level = blocks[0].level
        decoded = self._decode(level, places, [wanted[p] for p in places])
        tile_size = self.reader.stored_tile_size(level)
        level_size = self.slide.level_dimensions[level]
        out = torch.empty((stop - start, 3, size, size), dtype=torch.uint8, device=self.device)
        for row, (b, tiles) in enumerate(zip(blocks, per_tile, strict=True)):
            placed = [(tx, ty, decoded[(tx, ty)]) for tx, ty in tiles]
            region = assemble_region(placed, tile_size, level_size, b.left, b.top, b.n_cols, b.n_rows)
            out[row] = resample_on_device(region.to(self.device), b, size)
        return out

    def _decode(
        self, level: int, places: list[tuple[int, int]], streams: list[bytes]
    ) -> dict[tuple[int, int], torch.Tensor]:
        """Decoded stored tiles by place. Where the device's decoder refuses a batch (torchvision raises a
        RuntimeError), each stream is decoded on the CPU: one that fails there too is damaged (exit 5, naming the
        tile, as the CPU reader does); if none fails, the device decoder cannot take these streams, and they are
        decoded on the CPU from then on (one log line)."""
        if not self.cpu_decode:
            try:
                return dict(zip(places, decode_jpeg_tiles(streams, self.device), strict=True))
            except RuntimeError as exc:
                device_error = exc
        else:
            device_error = None
        tiles: dict[tuple[int, int], torch.Tensor] = {}
        for place, stream in zip(places, streams, strict=True):
            try:
                tiles[place] = decode_jpeg_tiles([stream], torch.device("cpu"))[0].to(self.device)
            except RuntimeError as exc:
                raise SlideTruncatedError(
                    f"{self.slide.path}: stored tile ({place[0]}, {place[1]}) of level {level} cannot be decoded "
                    f"({exc}); the file is damaged — copy it again from its source"
                ) from exc
        if device_error is not None:
            LOG.info("%s: the %s JPEG decoder refused these tiles (%s); decoding on the CPU", self.slide.slide_id,
                     self.device.type, device_error)  # fmt: skip
            self.cpu_decode = True
        return tiles

    def close(self) -> None:
        """Nothing runs in the background: batches are read when asked for."""


def device_loader(slide: Slide, plan: TilePlan, batch_size: int, device: torch.device) -> DeviceTileReads | None:
    """The device path for `plan`, or None (with one log line) where it cannot read it."""
    why = device_read_refusal(slide, plan)
    if why is not None:
        LOG.info("%s: tiles decoded on the CPU (%s)", slide.slide_id, why)
        return None
    return DeviceTileReads(slide, plan, batch_size, device)
