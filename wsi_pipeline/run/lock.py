"""Keep two runs from writing the same output folder at once.

POSIX record locks (fcntl.lockf, which also work on NFS, unlike flock on some clusters): a whole run holds
`OUT/.lock` exclusively; a shard (`--shard I/N`) holds it shared plus `OUT/.lock-shard-I-of-N` exclusively, so the
shards of one array job run side by side while a second whole run, or the same shard twice, is refused.
The kernel drops the locks when the process ends, however it ends (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from wsi_pipeline.core.errors import OutputError, UsageError, WsiError, remember_output_folder
from wsi_pipeline.core.layout import RunLayout


class OutputLockedError(WsiError):
    exit_code = 11
    kind = "output-locked"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    return ""


def running_shards(root: Path) -> list[str]:
    """The shards that hold their lock now, as `I-of-N: pid … on host`: while shards run, `OUT/.lock` is held
    shared, and only each shard's own file names its process. Asked only when a lock was refused; the probe holds a
    shared lock for an instant (Python has no portable F_GETLK), in which that shard itself could not start."""
    held = []
    for path in sorted(root.glob(".lock-shard-*")):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted beside no exclusive holder: not running
            except OSError:
                held.append(f"shard {path.name.removeprefix('.lock-shard-')}: {_holder(fd) or 'holder unknown'}")
            finally:
                os.close(fd)
    return held


def _take(path: Path, shared: bool, what: Path | None = None) -> int:
    try:  # O_NOFOLLOW: a lock file planted as a link would have this run truncate whatever it points to
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OutputError(
            f"{path} is a symbolic link; a run never follows a link it did not create: remove it and run again"
        ) from None
    try:
        fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        # running shards exclude an exclusive holder; the file's text may be a SIGKILLed holder's, so they go first
        holder = (", ".join(running_shards(path.parent)) if what is None else "") or _holder(fd)
        os.close(fd)
        raise OutputLockedError(
            f"another run is writing {what or path.parent} ({holder or 'holder unknown'}); wait for it to finish, "
            "or give this run another -o folder (shards of one job use --shard I/N)"
        ) from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def _release(fd: int, exclusive: bool) -> None:
    if exclusive:  # the holder's name goes with the lock, so a later refusal never names a process long ended
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    os.close(fd)


@contextlib.contextmanager
def slide_lock(out: Path, slide_id: str) -> Iterator[None]:
    """OUT/<slide_id>/ alone: its lock file (OUT/.locks/<slide_id>) held exclusively. A run takes it for each slide
    it builds (beside OUT's own lock), so that a single-slide command and a shard never write one slide at once.
    Never take OUT's lock again inside a run: POSIX locks are per process, a second one would change the first."""
    layout = RunLayout(out)
    layout.slide_locks.mkdir(parents=True, exist_ok=True)
    fd = _take(layout.slide_lock(slide_id), shared=False, what=layout.slide(slide_id).root)
    try:
        yield
    finally:
        _release(fd, True)


@contextlib.contextmanager
def single_slide_lock(out: Path, slide_id: str) -> Iterator[None]:
    """What `predict`, `tissue` and `tiles` hold: OUT's lock shared (so a whole run, which holds it exclusively,
    refuses them and they it) and the slide's own lock; commands on different slides of one folder run side by
    side. A slide named like one of the run's own files is refused (exit 2) before anything is made."""
    remember_output_folder(out)
    if RunLayout.reserved_slide_id(slide_id):
        raise UsageError(
            f"slide {slide_id}: its output folder would be {slide_id}/, a name the run's own files use "
            f"({', '.join(RunLayout.OWN_NAMES)}); rename the slide file"
        )
    out.mkdir(parents=True, exist_ok=True)
    fd = _take(RunLayout(out).lock, shared=True)
    try:
        with slide_lock(out, slide_id):
            yield
    finally:
        _release(fd, False)


@contextlib.contextmanager
def output_lock(out: Path, shard: tuple[int, int] | None = None) -> Iterator[None]:
    remember_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = RunLayout(out)
    fds = [(_take(layout.lock, shared=shard is not None), shard is None)]
    try:
        if shard is not None:
            fds.append((_take(layout.shard_lock(shard), shared=False), True))
        yield
    finally:
        for fd, exclusive in fds:
            _release(fd, exclusive)
