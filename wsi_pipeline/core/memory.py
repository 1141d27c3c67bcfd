"""Returning freed heap memory to the operating system.

glibc's malloc keeps memory that Python, numpy and torch free, for reuse: after the large short-lived arrays of
tissue detection, inference batches and heatmap bands, a process's RSS stays at its high-water mark and creeps up
with fragmentation (measured: +200 to +400 MB, varying run to run, over a 100 000 x 80 000 px slide's 887 tiles;
docs/benchmarks.md). `malloc_trim` hands the free pages back. During inference it is called only when the heap holds
more free memory than the work itself needs: pages handed back are faulted in afresh when reused, and trimming after
every batch cost ~5 % of end-to-end speed. Tuning the allocator instead (a fixed M_MMAP_THRESHOLD) also bounded the
RSS but cost 15-30 % of the CPU model's speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only (musl has none)  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def free_heap_bytes() -> int | None:
    """Bytes the C heap holds free (not handed back to the OS); None where glibc cannot say."""
    return None if _MALLINFO2 is None else int(_MALLINFO2().fordblks)


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc); a no-op where there is no malloc_trim."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class HeapTrimmer:
    """Hands free heap memory back when it passes twice what the first batch left free (a batch's own working set,
    which the next batch reuses) or `min_mb`, whichever is more; a no-op where glibc cannot say how much is free."""

    def __init__(self, min_mb: float = 64.0) -> None:
        self.min_bytes = min_mb * 2**20
        self.limit: float | None = None

    def after_batch(self) -> None:
        free = free_heap_bytes()
        if free is None:
            return
        if self.limit is None:
            self.limit = max(self.min_bytes, 2.0 * free)
        elif free > self.limit:
            release_free_memory()
