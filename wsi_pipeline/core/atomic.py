"""Write-then-rename helpers: a reader never sees a file that looks finished but is not."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsi_pipeline.core.errors import OutputError, OutputWriteError, write_failure
from wsi_pipeline.core.layout import HOST_TAG, TEMPORARY_MARK, temporary_sibling


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only when the block ends without error.

    Works for files and directories (e.g. a zarr store). A full disk becomes an OutputError naming the fix.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (write_failure(exc, final.parent) or exc) from exc
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            if not tmp.is_dir():  # a folder where this file goes was not written by this writer: never removed
                raise OutputError(
                    f"cannot write {final}: a folder of that name is in the way; move it, or write to another -o folder"
                )
            shutil.rmtree(final)  # a folder (a zarr store) replaced by its new version
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        failure = write_failure(exc, final)
        if failure is not None:
            raise failure from exc
        raise
    except Exception as exc:
        _remove(tmp)
        failure = _diagnose(final.parent, final)
        if failure is not None:  # a library that hid the errno (torch.save raises RuntimeError on a full disk)
            raise failure from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def _diagnose(folder: Path, target: Path) -> OutputWriteError | None:
    """Why writing into `folder` failed, when the failing library did not say: a 4 KiB probe file shows a full,
    read-only or forbidden folder (written only after a failure, so it costs nothing on success)."""
    probe = folder / f".probe{TEMPORARY_MARK}{os.getpid()}"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return write_failure(exc, target)
    finally:
        _remove(probe)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # absent, or on a read-only file system (EROFS, not ENOENT)
            path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary outputs left in `folder` by processes of this host that no longer run (a killed run);
    returns them. Another host's temporaries are left alone: whether its process runs cannot be told from here
    (a shard on another node of a cluster may be building one right now)."""
    removed = []
    for entry in folder.glob(f".*{TEMPORARY_MARK}*"):
        parts = entry.name.rsplit(TEMPORARY_MARK, 1)[1].split("-")
        try:
            pid = int(parts[0])
        except ValueError:
            continue
        host = parts[1] if len(parts) == 3 else HOST_TAG  # names made before hosts were recorded: this host's
        if host != HOST_TAG or pid == os.getpid() or _alive(pid):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
