"""The overlapped batch (run/flow.py): its order, its bound and where each step runs, failed writes and interrupts.

The slides here are generators with the real slide's shape (PREPARED, INFERRED, an outcome; a `finally` that
discards), timed so that the steps overlap; whole runs through the CLI compare the overlapped batch with one slide
at a time (tests/test_run.py) and interrupt it (tests/test_faults.py)."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from wsi_pipeline.core.errors import OutputWriteError, wait_through_signals
from wsi_pipeline.run.flow import Start, run_slides
from wsi_pipeline.run.pipeline import INFERRED, PREPARED, SlideOutcome, SlideSteps


class Journal:
    """What the slides did, from every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, bool]] = []  # slide, step, in the calling thread
        self.active: set[str] = set()
        self.most_active = 0
        self.discarded: list[str] = []

    def note(self, slide: str, step: str) -> None:
        with self.lock:
            self.events.append((slide, step, threading.current_thread() is threading.main_thread()))
            if step == "begin":
                self.active.add(slide)
                self.most_active = max(self.most_active, len(self.active))
            elif step in ("end", "discarded"):
                self.active.discard(slide)

    def where(self, step: str) -> set[bool]:
        return {main for _, s, main in self.events if s == step}


def slide(journal: Journal, name: str, seconds: float = 0.05, fail: str = "", finish_s: float = 0.05) -> SlideSteps:
    journal.note(name, "begin")
    ended = False
    try:
        journal.note(name, "prepare")
        time.sleep(seconds)
        if fail == "skip":
            ended = True
            return SlideOutcome(Path(name), name, "skipped")
        yield PREPARED
        journal.note(name, "model")
        time.sleep(seconds)
        if fail == "interrupt":
            raise KeyboardInterrupt
        yield INFERRED
        journal.note(name, "finish")
        time.sleep(finish_s)
        if fail == "write":
            raise OutputWriteError(f"cannot write {name}: no space left on the device")
        ended = True
        return SlideOutcome(Path(name), name, "done")
    finally:
        journal.note(name, "end" if ended else "discarded")
        if not ended:
            journal.discarded.append(name)


def starts(journal: Journal, names: list[str], finish_s: float = 0.05, **fails: str) -> list[Start]:
    return [(Path(n), n, partial(slide, journal, n, fail=fails.get(n, ""), finish_s=finish_s)) for n in names]


NAMES = [f"s{i}" for i in range(6)]


@pytest.mark.parametrize("in_flight", [1, 2, 3, 4])
def test_slides_end_in_order_within_the_bound_and_the_model_runs_in_the_calling_thread(in_flight: int) -> None:
    """Finishing takes twice the model's time here: with 4 in flight two slides wait to be finished, in order."""
    journal = Journal()
    recorded: list[str] = []
    run_slides(
        starts(journal, NAMES, finish_s=0.1, s4="skip"),
        in_flight,
        lambda o: recorded.append(f"{o.slide_id}:{o.status}"),
    )
    assert recorded == ["s0:done", "s1:done", "s2:done", "s3:done", "s4:skipped", "s5:done"]
    assert journal.most_active == in_flight  # overlapped as far as allowed, never further
    assert journal.where("model") == {True}  # the models stay in the thread that loaded them
    assert journal.where("prepare") == journal.where("finish") == {in_flight == 1}
    assert not journal.discarded


def test_a_failed_write_stops_the_batch_after_the_slides_before_it() -> None:
    journal = Journal()
    recorded: list[str] = []
    with pytest.raises(OutputWriteError, match="cannot write s2"):
        run_slides(starts(journal, NAMES, s2="write"), 3, lambda o: recorded.append(f"{o.slide_id}:{o.status}"))
    assert recorded == ["s0:done", "s1:done", "s2:failed"]  # as one slide at a time would have it
    assert "s2" in journal.discarded and not journal.active  # the slides begun after it are discarded, not left
    assert not [s for s, step, _ in journal.events if step == "finish" and s > "s2"]  # none finished after it


def test_an_interrupt_discards_every_slide_not_finished() -> None:
    journal = Journal()
    recorded: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_slides(starts(journal, NAMES, s3="interrupt"), 3, lambda o: recorded.append(o.slide_id))
    assert recorded == ["s0", "s1", "s2"][: len(recorded)] and len(recorded) >= 2  # those ended before it, in order
    assert not journal.active  # nothing begun is left running or half-written
    began = {s for s, step, _ in journal.events if step == "begin"}
    assert began - set(recorded) == set(journal.discarded) and "s3" in journal.discarded


def test_an_interrupt_while_a_slide_is_recorded_records_it_still() -> None:
    """SIGTERM can arrive while the manifest is being written for a slide whose folder is complete: the slide is
    recorded again before the interrupt goes on (it was lost from the manifest once), and only once."""
    journal = Journal()
    recorded: list[str] = []
    calls: list[str] = []

    def record(outcome: SlideOutcome) -> None:
        calls.append(outcome.slide_id)
        if outcome.slide_id == "s1" and calls.count("s1") == 1:
            raise KeyboardInterrupt  # in the middle of writing s1's row
        if outcome.slide_id not in recorded:
            recorded.append(outcome.slide_id)

    with pytest.raises(KeyboardInterrupt):
        run_slides(starts(journal, NAMES), 3, record)
    assert recorded[:2] == ["s0", "s1"] and calls.count("s1") == 2
    assert recorded == [f"s{i}" for i in range(len(recorded))]  # in order, nothing skipped
    assert not journal.active
    began = {s for s, step, _ in journal.events if step == "begin"}
    assert began - set(recorded) == set(journal.discarded)


def test_a_second_interrupt_while_the_other_threads_are_awaited_still_discards_cleanly() -> None:
    """A signal can land while the batch waits for the other threads' steps (a second Ctrl-C, the handler's
    interrupt delivered again after a finaliser dropped it, a worker's SIGCHLD). Python 3.11's `Thread.join`, cut
    short by one, marks the thread it waits for as ended while it still runs; the batch then closed a slide still
    running in the finisher ("generator already executing", exit 1 instead of 130, in CI). Nothing may cut that wait
    short: the slide that was exporting ends and is recorded, the others are discarded."""
    journal = Journal()
    recorded: list[str] = []
    timings = {"s2": 1.5}  # s2's export is still running when s3's model is interrupted

    def interrupted_twice(name: str) -> SlideSteps:
        steps = slide(journal, name, seconds=timings.get(name, 0.05), fail="interrupt" if name == "s3" else "")
        yield next(steps)  # prepared
        if name == "s3":  # the same interrupt again, while the batch waits for s2's export
            threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        return (yield from steps)

    main = threading.main_thread().ident
    assert main is not None
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_slides(
                [(Path(n), n, partial(interrupted_twice, n)) for n in NAMES], 3, lambda o: recorded.append(o.slide_id)
            )
        time.sleep(0.3)  # a second interrupt not yet landed would land here
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not journal.active  # nothing left running: s2 was waited for, not closed while it ran
    assert recorded == ["s0", "s1", "s2"]  # s2's folder was complete: it is in the manifest
    began = {s for s, step, _ in journal.events if step == "begin"}
    assert began - set(recorded) == set(journal.discarded) and "s3" in journal.discarded


def test_waiting_through_signals_outlasts_them_and_skips_what_was_cancelled() -> None:
    """The wait behind the batch's, the tile loader's and the stitching writer's shutdown: a signal raised in it is
    handed back only once the running step is done, and a step cancelled in the queue does not hold it forever
    (`concurrent.futures.wait` never counts such a future as done)."""
    main = threading.main_thread().ident
    assert main is not None
    pool = ThreadPoolExecutor(1)
    running = pool.submit(time.sleep, 0.6)
    queued = pool.submit(time.sleep, 5)
    pool.shutdown(wait=False, cancel_futures=True)
    threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGINT)).start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        started = time.monotonic()
        late = wait_through_signals([running, queued])
        waited = time.monotonic() - started
    finally:
        signal.signal(signal.SIGINT, previous)
    assert isinstance(late, KeyboardInterrupt) and running.done() and queued.cancelled()
    assert 0.4 < waited < 3
