"""Decoding stored JPEG tiles on the GPU (nvJPEG through `torchvision.io.decode_jpeg(..., device="cuda")`), in
batches, so that a read-bound model is fed without the CPU decoding every pixel.

The streams come from the slide backend (`TiffDirectReader.jpeg_streams`: shared tables spliced in, RGB tiles
marked as such), so that the GPU decodes the same pixels as the CPU path. What is here decodes and assembles a
region of one level on the device; `engine.device_reads` feeds the engine's batches from it (docs/readers.md).
"""

from __future__ import annotations

import torch
import torchvision

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision deprecated its image decoders in 0.29 (for TorchCodec) and will remove them
    decode_jpeg = None


def missing_decoder() -> str | None:
    """Why this installation cannot decode JPEG on the device (None: it can)."""
    if decode_jpeg is None:
        return f"torchvision {torchvision.__version__} has no io.decode_jpeg (0.29 has)"
    return None


def decode_jpeg_tiles(streams: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """uint8 (3, h, w) tensors on `device`, one per JPEG stream, decoded in one batch."""
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    if not data:
        return []
    assert decode_jpeg is not None, missing_decoder()  # device_read_refusal keeps such plans on the CPU loader
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(decoded)


def assemble_region(
    tiles: list[tuple[int, int, torch.Tensor]],
    tile_size: tuple[int, int],
    level_size: tuple[int, int],
    x: int,
    y: int,
    width: int,
    height: int,
) -> torch.Tensor:
    """Place decoded stored tiles (tile x, tile y, (3, th, tw)) into the (3, height, width) region of their level
    (`level_size` = (width, height)) whose corner is level pixel (x, y); white outside the image (edge tiles are
    stored padded to the full tile size)."""
    tw, th = tile_size
    iw, ih = level_size
    device = tiles[0][2].device if tiles else torch.device("cpu")
    out = torch.full((3, height, width), 255, dtype=torch.uint8, device=device)
    for tx, ty, tile in tiles:
        h, w = tile.shape[1:]
        ax0, ay0 = max(tx * tw, x), max(ty * th, y)
        ax1, ay1 = min(tx * tw + w, x + width, iw), min(ty * th + h, y + height, ih)
        if ax0 < ax1 and ay0 < ay1:
            out[:, ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                :, ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw
            ]
    return out
