"""A slide file that claims any size: a BigTIFF whose one level is `width` x `height` px, every tile entry pointing at
the same white tile (a 10^6 x 10^6 px slide in 15 MB), for the slide-size guard's tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def write_claimed_size_tiff(path: Path, width: int, height: int, mpp: float, tile: int = 1024) -> Path:
    """A BigTIFF whose one level claims width x height px: every tile entry points at the same white deflate tile."""
    data = zlib.compress(np.full((tile, tile, 3), 255, np.uint8).tobytes(), 9)
    n = -(-width // tile) * -(-height // tile)
    data_offset = 16  # after the BigTIFF header
    arrays_offset = data_offset + len(data)
    offsets = np.full(n, data_offset, np.uint64).tobytes()
    counts = np.full(n, len(data), np.uint64).tobytes()
    ifd_offset = arrays_offset + len(offsets) + len(counts)
    per_cm = round(1e4 / mpp)

    def entry(tag: int, typ: int, count: int, value: bytes) -> bytes:  # BigTIFF: tag, type, count, value or offset
        return struct.pack("<HHQ", tag, typ, count) + value.ljust(8, b"\0")

    tags = [
        entry(256, 16, 1, struct.pack("<Q", width)),
        entry(257, 16, 1, struct.pack("<Q", height)),
        entry(258, 3, 3, struct.pack("<HHH", 8, 8, 8)),
        entry(259, 3, 1, struct.pack("<H", 8)),
        entry(262, 3, 1, struct.pack("<H", 2)),
        entry(277, 3, 1, struct.pack("<H", 3)),
        entry(282, 5, 1, struct.pack("<II", per_cm, 1)),
        entry(283, 5, 1, struct.pack("<II", per_cm, 1)),
        entry(284, 3, 1, struct.pack("<H", 1)),
        entry(296, 3, 1, struct.pack("<H", 3)),
        entry(322, 3, 1, struct.pack("<H", tile)),
        entry(323, 3, 1, struct.pack("<H", tile)),
        entry(324, 16, n, struct.pack("<Q", arrays_offset)),
        entry(325, 16, n, struct.pack("<Q", arrays_offset + len(offsets))),
    ]
    with open(path, "wb") as fh:
        fh.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd_offset))
        fh.write(data)
        fh.write(offsets)
        fh.write(counts)
        fh.write(struct.pack("<Q", len(tags)) + b"".join(tags) + struct.pack("<Q", 0))
    return path
