"""The seam between the pipeline and slide-reading libraries: a `SlideReader` protocol and a registry of backends.

A backend wraps one library (OpenSlide today; tifffile direct decode, wsidicom, ... tomorrow) behind the same few
calls, the way hs2p separates its reader protocol from its backends. Every backend must pass the conformance suite
in tests/test_reader_conformance.py: same geometry, properties, µm/px, bounds, pixels and errors for the same file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from wsi_pipeline.core.errors import ConfigError, SlideTruncatedError, SlideUnreadableError


@runtime_checkable
class SlideReader(Protocol):
    """One opened slide file. Must be picklable (tile-reading workers receive it) and must reopen its library
    handle lazily in each process: a handle must never cross a fork."""

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]  # OpenSlide's property names (`openslide.mpp-x`, `openslide.bounds-x`, ...)
    associated_images: tuple[str, ...]

    def read_level(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3): pixels [x, x + width) x [y, y + height) of `level`, in that level's own
        pixels (negative or past the edge allowed: white there, as are transparent pixels). Errors:
        SlideUnreadableError (or SlideTruncatedError) naming the level and place."""
        ...

    def read_associated(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as RGB uint8."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backend:
    """A registered reader: `open` raises SlideUnreadableError for files it cannot read; `accepts` is a cheap test
    (e.g. the file's extension) that `auto` uses to try the backend at all; higher `priority` is tried first."""

    name: str
    open: Callable[[Path], SlideReader]
    accepts: Callable[[Path], bool]
    priority: int = 0
    versions: Callable[[], dict[str, str]] = dict  # library versions for run records


_BACKENDS: dict[str, Backend] = {}
_BUILTIN = ("wsi_pipeline.slide.backends.openslide", "wsi_pipeline.slide.backends.tifffile_direct")


def register_backend(
    name: str,
    open_: Callable[[Path], SlideReader],
    *,
    accepts: Callable[[Path], bool] = lambda _path: True,
    priority: int = 0,
    versions: Callable[[], dict[str, str]] = dict,
) -> None:
    """Make a backend available to `open_reader(path, backend=name)` and to `auto`."""
    _BACKENDS[name] = Backend(name, open_, accepts, priority, versions)


def unregister_backend(name: str) -> None:
    """Remove a registered backend (a test's own, when it ends)."""
    _BACKENDS.pop(name, None)


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_BACKENDS)


def backend_versions() -> dict[str, str]:
    """The versions of every registered backend's libraries (for run records)."""
    _load_builtin()
    return {key: value for backend in _BACKENDS.values() for key, value in backend.versions().items()}


def check_backend_name(name: str) -> str:
    """`auto` or a registered backend, else a ConfigError listing the choices."""
    if name != "auto" and name not in backend_names():
        raise ConfigError(f"slide.backend: unknown reader backend {name!r}; choose auto or one of {backend_names()}")
    return name


def open_reader(path: Path, backend: str = "auto") -> SlideReader:
    """Open `path` with the named backend, or with `auto`: every backend that accepts the file, highest priority
    first, until one opens it. A damaged file (SlideTruncatedError) stops the search: no backend will read it."""
    _load_builtin()
    check_backend_name(backend)
    if backend != "auto":
        return _BACKENDS[backend].open(path)
    candidates = sorted((b for b in _BACKENDS.values() if b.accepts(path)), key=lambda b: -b.priority)
    error: SlideUnreadableError | None = None
    for candidate in candidates:
        try:
            return candidate.open(path)
        except SlideTruncatedError:
            raise
        except SlideUnreadableError as exc:
            error = exc  # the last one tried is the most general reader (OpenSlide): its advice fits best
    if error is not None:
        raise error
    raise SlideUnreadableError(f"{path}: no slide reader accepts this file ({', '.join(backend_names())} tried)")
