"""Errors a user can act on: each names the fix and carries a distinct exit status for scripts and the manifest."""

from __future__ import annotations

import _thread
import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterable, MutableSequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any


class WsiError(Exception):
    """Base of every error the pipeline reports to a user (never a traceback)."""

    exit_code = 1
    kind = "error"

    def one_line(self) -> str:
        """The message on one line, whatever its source put in it (a wrapped library message, a path list)."""
        return " ".join(str(self).split())


class UsageError(WsiError):
    """The command line asks for something impossible (no slides, a bad --shard, two slides sharing an id)."""

    exit_code = 2
    kind = "usage"


class SlideNotFoundError(WsiError):
    exit_code = 3
    kind = "slide-not-found"


class SlideUnreadableError(WsiError):
    exit_code = 4
    kind = "slide-unreadable"


class SlideTruncatedError(WsiError):
    exit_code = 5
    kind = "slide-truncated"


class SlideTooLargeError(WsiError):
    """A slide whose stated size no glass slide has (a damaged or forged header, or a wrong µm/px): refused before
    any allocation that grows with it."""

    exit_code = 5
    kind = "slide-too-large"


class MissingMppError(WsiError):
    exit_code = 6
    kind = "missing-mpp"


class ConfigError(WsiError):
    exit_code = 7
    kind = "bad-config"


class NoTissueError(WsiError):
    exit_code = 8
    kind = "no-tissue"


class OutputError(WsiError):
    exit_code = 9
    kind = "output"


class OutputWriteError(OutputError):
    """A write the file system refused (full, over quota, read-only, forbidden): it stops a batch, since every
    later slide would fail the same way."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, preemption, `scancel`, `kill`) raised in the main thread, so that it
    unwinds exactly like Ctrl-C: every `finally` discards what was being written. A KeyboardInterrupt subclass, so
    that code which already handles Ctrl-C (DataLoader workers included) handles it the same way."""

    exit_code = 128 + signal.SIGTERM


_RECEIVED: list[int] = []  # signals taken by the handler; checked again at safe points (`raise_if_signalled`)
_RAISED: list[BaseException] = []  # the interrupt the handler raised last, to know it again if it is swallowed


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_if_signalled() -> None:
    """Raise the interrupt again if one was received: a library that catches the first KeyboardInterrupt (and goes
    on) cannot make the run ignore Ctrl-C or SIGTERM. Called per batch of tiles and between stages and slides."""
    if _RECEIVED:
        raise _interrupt(_RECEIVED[0])


def install_signal_handlers() -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM raises `Terminated` in this process, also where the parent left
    SIGINT ignored (a background job); forked workers inherit them (torch's worker loop ends quietly on a
    KeyboardInterrupt). After the first of either, both are ignored: the unwinding that discards partial outputs must
    not be cut short, and a second signal during interpreter shutdown would end the process uncaught."""

    def _handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not _RECEIVED:
            _RECEIVED.append(signum)
        _RAISED[:] = [_interrupt(_RECEIVED[0])]
        raise _RAISED[0]

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    previous = sys.unraisablehook

    def _quiet_interrupts(unraisable: Any) -> None:
        # The handler's exception can land in a __del__ or weakref callback, where Python cannot raise it and prints
        # "Exception ignored in ..." with a traceback instead. That print is noise in front of the one line the user
        # should see. The interrupt itself is delivered again at once: the next safe point can be a whole stage
        # away, past a scheduler's grace before SIGKILL (`KillWait`). Only the handler's own exception is delivered
        # again: a copy raised by `raise_if_signalled` in a finaliser may be dropped while the first one is still
        # unwinding, and raising again then would cut that cleanup short.
        if _RECEIVED and isinstance(unraisable.exc_value, KeyboardInterrupt):
            if _RAISED and unraisable.exc_value is _RAISED[0]:
                _deliver_again(_RECEIVED[0])
            return
        previous(unraisable)

    def _deliver_again(signum: int) -> None:
        # Python runs signal handlers, and lets them be set, only in the main thread, where the handler raised. The
        # interrupt is asked for from a new thread, which runs once this thread lets go of the GIL, past this hook:
        # asked for here, the handler would run at the hook's own next bytecode and be dropped with it (and
        # `threading.Thread.start` waits for the thread, which would let it run in here). Should it land in a
        # finaliser again, this hook asks again.
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signum, _handler)
        with contextlib.suppress(RuntimeError):  # no new threads at interpreter shutdown: the safe points remain
            # typeshed types interrupt_main's signum as signal.Signals; it takes any signal number, as here an int
            _thread.start_new_thread(_thread.interrupt_main, (signum,))  # type: ignore[arg-type]

    sys.unraisablehook = _quiet_interrupts


def wait_through_signals(futures: Iterable[Future[Any]]) -> BaseException | None:
    """Wait until every future is done, whatever signal handlers raise in this thread meanwhile (a second Ctrl-C,
    the interrupt delivered again, a worker's SIGCHLD); returns the first such exception, for the caller to raise
    unless another is already on its way up. Used instead of `Thread.join` (`ThreadPoolExecutor.shutdown(wait=True)`)
    where the caller then discards what those threads write: in Python 3.11 a join cut short by a signal marks the
    thread it waited for as ended while it still runs (threading.py, bpo-45274's handler), and the discarding then
    raced the thread (CI: a slide closed while it ran, "generator already executing", exit 1 instead of 130)."""
    # a future cancelled in its executor's queue never reaches the state `wait` counts as done
    pending = [future for future in futures if not future.cancelled()]
    late: BaseException | None = None
    while True:
        try:
            wait(pending)
            return late
        except BaseException as exc:
            late = late or exc


def shut_down_through_signals(pool: ThreadPoolExecutor, futures: MutableSequence[Future[Any]]) -> None:
    """Cancel what `pool` has not begun, wait for what it runs (`futures`: all it was given and may still run, then
    emptied) past signals, then join its threads; a signal that came meanwhile (`wait_through_signals`) is raised."""
    pending = list(futures)
    futures.clear()
    pool.shutdown(wait=False, cancel_futures=True)
    late = wait_through_signals(pending)
    try:
        pool.shutdown(wait=True)  # its threads are idle now: joined at once, none left behind
    except BaseException as exc:  # a signal in that join leaves an idle thread to end on its own
        late = late or exc
    if late is not None:
        raise late


# errno values of a failed write, with what the user can do about each.
_WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on the device", "free disk space, or write elsewhere (another -o)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or write elsewhere (another -o)"),
    errno.EROFS: ("the file system is read-only", "write to a writable file system (another -o)"),
    errno.EACCES: ("permission denied", "fix the folder's permissions, or write elsewhere (another -o)"),
    errno.EPERM: ("operation not permitted", "fix the folder's permissions, or write elsewhere (another -o)"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give -o a folder (or a path that does not exist)"),
}


_OUTPUT_FOLDER: list[str] = []  # the folder the running command writes (set when it takes its lock)


def remember_output_folder(path: str | os.PathLike[str]) -> None:
    """The folder a failed write is named by when the library that failed does not say which file it was writing
    (a full disk under zarr's threads): the user's -o, not "the output folder"."""
    _OUTPUT_FOLDER[:] = [os.fspath(path)]


def write_failure(exc: BaseException, path: str | os.PathLike[str] | None = None) -> OutputWriteError | None:
    """The OutputError (exit 9, one line naming the path and the fix) for an OSError of a failed write; None for
    any other exception. `path` (what the user asked for, not a hidden temporary) wins over the OSError's own file
    name. Looks through the exception's causes: zarr and dask re-raise from inner ones."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_FAILURES:
            reason, fix = _WRITE_FAILURES[seen.errno]
            fallback = f"the output folder {_OUTPUT_FOLDER[0]}" if _OUTPUT_FOLDER else "the output folder"
            where = path if path is not None else (seen.filename or fallback)
            return OutputWriteError(f"cannot write {os.fspath(where)}: {reason}; {fix}")
        seen = seen.__cause__ or seen.__context__
    return None
