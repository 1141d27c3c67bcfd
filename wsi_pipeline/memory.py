"""Returning freed heap memory to the operating system.

glibc's malloc keeps memory that Python, numpy and torch free, for reuse: after the large short-lived arrays of
tissue detection, inference batches and heatmap bands, a process's RSS stays at its high-water mark and creeps up
with fragmentation (measured: +200 to +400 MB, varying run to run, over a 100 000 x 80 000 px slide's 887 tiles;
docs/benchmarks.md). `malloc_trim` hands the free pages back. Tuning the allocator instead (a fixed
M_MMAP_THRESHOLD) also bounded the RSS but cost 15-30 % of the CPU model's speed (every large activation mmapped
and faulted in afresh).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only; musl has none
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc); a no-op where there is no malloc_trim."""
    if _TRIM is not None:
        _TRIM(0)
