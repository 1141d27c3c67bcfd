"""Progress per slide: a tqdm bar on a terminal, plain log lines (tiles/s, ETA) in batch logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from wsi_pipeline.core.errors import raise_if_signalled


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
        raise_if_signalled()
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


class BatchProgress:
    """Slides done of the batch, elapsed time and ETA: a tqdm bar on a terminal, one plain line per slide in logs."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.done = 0
        self.failed = 0
        self.started = time.perf_counter()
        self.enabled = enabled
        self.bar = (
            tqdm(total=total, desc="slides", unit="slide", file=self.stream, position=0, leave=True)
            if enabled and self.stream.isatty()
            else None
        )

    def update(self, failed: bool = False) -> None:
        raise_if_signalled()
        self.done += 1
        self.failed += int(failed)
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        failed = f", {self.failed} failed" if self.failed else ""
        return f"slides {self.done}/{self.total} done{failed}, elapsed {_clock(elapsed)}, ETA {_clock(eta)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no slide finished yet
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
