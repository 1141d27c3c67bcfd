"""Progress per slide: a tqdm bar on a terminal, plain log lines (tiles/s, ETA) in batch logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, every_s: float = 10.0, enabled: bool = True
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.label = label
        self.done = 0
        self.started = time.perf_counter()
        self.every_s = every_s
        self.last_line = self.started
        self.enabled = enabled
        self.bar = (
            tqdm(total=total, desc=label, unit="tile", file=self.stream, dynamic_ncols=True)
            if (enabled and self.stream.isatty())
            else None
        )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(
            f"{self.label}: {self.done}/{self.total} tiles ({rate:.1f} tiles/s, ETA {eta:.0f} s)",
            file=self.stream,
            flush=True,
        )
        self.last_line = time.perf_counter()

    def close(self) -> float:
        elapsed = time.perf_counter() - self.started
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()
        return elapsed
