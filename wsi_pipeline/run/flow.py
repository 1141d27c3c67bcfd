"""Slides overlapped so that the model does not wait between them: while slide N is in the model (in the calling
thread), one thread opens slide N+1, finds its tissue and plans its tiles, and another post-processes and exports
slide N-1. Each slide runs the same steps as alone (`pipeline.slide_steps`), in the same order, so its outputs are
the same; only which thread runs a step changes.

Why threads and not processes: the model's forward pass, the readers and the numeric libraries release the GIL,
and a slide's steps share its opened slide, tissue mask and plans without pickling (a process per stage would copy
them, and a second torch per process is what the memory benchmark counts). At most `in_flight` slides have begun
and not ended (1: one slide at a time, all in the calling thread, as before this module existed).

Faults stay each slide's own: a slide that fails is recorded and the others go on; a failed write (full disk)
stops the batch after the slides before it are recorded, as one slide at a time would; an interrupt (Ctrl-C,
SIGTERM) reaches the other threads at their next safe point (`raise_if_signalled`), and every slide not finished
discards its temporary folder before the interrupt goes on.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from wsi_pipeline.core.errors import OutputWriteError, wait_through_signals
from wsi_pipeline.run.pipeline import SlideOutcome, SlideSteps


@dataclass(eq=False)  # one slide is one object: compared by identity
class SlideInFlight:
    """One slide between its steps: its generator, and its outcome once it has ended."""

    path: Path
    slide_id: str
    steps: SlideSteps
    outcome: SlideOutcome | None = None
    write_error: OutputWriteError | None = field(default=None, repr=False)

    def step(self) -> SlideInFlight:
        """Run the slide's next step (to its next stop, or to its end). A failed write ends it as failed and is
        kept, to stop the batch once the slides before it are recorded."""
        if self.outcome is None:
            try:
                next(self.steps)
            except StopIteration as stop:
                self.outcome = stop.value
            except OutputWriteError as exc:
                self.write_error = exc
                self.outcome = SlideOutcome(self.path, self.slide_id, "failed", str(exc))
        return self

    def close(self) -> None:
        """Discard a slide that has not ended (its generator's `finally` removes its temporary folder)."""
        if self.outcome is None:
            self.steps.close()


Start = tuple[Path, str, Callable[[], SlideSteps]]  # a slide's path, its id, and what creates its steps


def run_slides(starts: Sequence[Start], in_flight: int, record: Callable[[SlideOutcome], None]) -> None:
    """Every slide of `starts`, `record`ed in their order as each ends (in the calling thread). Raises the first
    failed write (after recording that slide as failed) and any interrupt."""
    if in_flight <= 1:
        for path, slide_id, start in starts:
            flight = SlideInFlight(path, slide_id, start())
            while flight.outcome is None:
                flight.step()
            _record(flight, record)
        return
    with (
        ThreadPoolExecutor(1, thread_name_prefix="slide-prepare") as preparer,
        ThreadPoolExecutor(1, thread_name_prefix="slide-finish") as finisher,
    ):
        _Overlap(starts, in_flight, record, preparer, finisher).run()


def _record(flight: SlideInFlight, record: Callable[[SlideOutcome], None]) -> None:
    assert flight.outcome is not None
    if flight.write_error is None:
        record(flight.outcome)
        return
    with contextlib.suppress(Exception):  # the disk that refused the slide may refuse the manifest too
        record(flight.outcome)
    raise flight.write_error


class _Overlap:
    """The model's turn of each slide in the calling thread; the slides' first steps, in order, in `preparer`, and
    their last steps, in order, in `finisher`."""

    def __init__(
        self,
        starts: Sequence[Start],
        in_flight: int,
        record: Callable[[SlideOutcome], None],
        preparer: ThreadPoolExecutor,
        finisher: ThreadPoolExecutor,
    ) -> None:
        self.starts = starts
        self.in_flight = in_flight
        self.record = record
        self.preparer = preparer
        self.finisher = finisher
        self.finishing: collections.deque[Future[SlideInFlight]] = collections.deque()
        self.prepared: Future[SlideInFlight] | None = None
        self.live: list[SlideInFlight] = []  # begun, not yet recorded
        self.halted = False  # a write failed: no slide takes another step

    def step(self, flight: SlideInFlight) -> SlideInFlight:
        if not self.halted:
            flight.step()
            self.halted = flight.write_error is not None
        return flight

    def prepare(self, index: int) -> Future[SlideInFlight]:
        path, slide_id, start = self.starts[index]
        flight = SlideInFlight(path, slide_id, start())
        self.live.append(flight)
        return self.preparer.submit(self.step, flight)

    def run(self) -> None:
        try:
            self.prepared = self.prepare(0) if self.starts else None
            for index in range(len(self.starts)):
                assert self.prepared is not None
                flight = self.prepared.result()
                # slides begun and not ended: this one, the next, those finishing
                while self.finishing and len(self.finishing) + 2 > self.in_flight:
                    self.record_oldest()
                if flight.write_error is None and index + 1 < len(self.starts):
                    self.prepared = self.prepare(index + 1)
                if flight.outcome is None:
                    self.step(flight)  # the model's turn, here
                if flight.outcome is None:
                    self.finishing.append(self.finisher.submit(self.step, flight))
                else:
                    done: Future[SlideInFlight] = Future()
                    done.set_result(flight)
                    self.finishing.append(done)
                if self.halted:
                    break
                while self.finishing and self.finishing[0].done():
                    self.record_oldest()
            while self.finishing:
                self.record_oldest()
        except OutputWriteError:  # the batch ends at that slide, as one slide at a time would
            self.stop(record_ended=False)
            raise
        except BaseException:  # an interrupt, or a fault outside any slide (a lock file that is a link)
            self.stop(record_ended=True)
            raise
        late = self.stop(record_ended=False)
        if late is not None:
            raise late

    def record_oldest(self) -> None:
        """Record the oldest slide; it leaves the queue only once recorded, so that an interrupt in the middle of
        writing the manifest leaves it for `stop` to record (a SIGTERM just as a slide's folder appeared once left
        no manifest at all, in tests/test_faults.py)."""
        flight = self.finishing[0].result()
        _record(flight, self.record)
        self.finishing.popleft()
        self.live.remove(flight)

    def stop(self, record_ended: bool) -> BaseException | None:
        """After the last slide, a failed write or an interrupt: wait for the steps running in the other threads
        (an interrupt reaches them at their next safe point); unless a write failed, record the slides that ended
        meanwhile, as far as they ended in order (their folders are complete); discard every slide not ended.
        Returns the first exception a signal handler raised meanwhile (the caller raises it unless another is
        already on its way up): nothing cuts this short, since a slide discarded while it runs would be left half
        written."""
        self.halted = True
        for pool in (self.preparer, self.finisher):  # what has not begun is cancelled
            pool.shutdown(wait=False, cancel_futures=True)
        # what runs is waited for, past signals (not joined: see wait_through_signals); joined as run_slides ends
        late = wait_through_signals([*self.finishing, *([self.prepared] if self.prepared else [])])
        while record_ended and self.finishing and not self.finishing[0].cancelled():
            if self.finishing[0].exception() is not None:
                break
            flight = self.finishing[0].result()
            if flight.outcome is None or flight.write_error is not None:
                break
            with contextlib.suppress(BaseException):  # the interrupt on its way up goes on (raised again once
                _record(flight, self.record)  # the manifest is written, at the progress bar's safe point)
            self.finishing.popleft()
            self.live.remove(flight)
        for flight in self.live:
            try:
                flight.close()
            except BaseException as exc:  # the others are discarded all the same
                late = late or exc
        self.live.clear()
        return late
