"""The task registry: everything that depends on which tasks exist iterates this, never a list of names.

Tasks register themselves on import (the built-ins below, a plugin with `register_task`). Plugins are named in the
configuration (`plugins: [my_lab.tasks, path/to/file.py, pkg.module:register]`), in `WSI_PIPELINE_PLUGINS`
(colon-free specs separated by commas), or as `wsi_pipeline.plugins` entry points of an installed package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_pipeline.core.errors import ConfigError, UsageError
from wsi_pipeline.models.folders import ModelError
from wsi_pipeline.tasks.base import Task

if TYPE_CHECKING:
    from wsi_pipeline.models.loading import LoadedModel

_TASKS: dict[str, Task] = {}
_LISTENERS: list[Callable[[], None]] = []
_LOADED_PLUGINS: set[str] = set()
_BUILTIN = (
    "wsi_pipeline.tasks.epithelium_stroma",
    "wsi_pipeline.tasks.mitosis",
    "wsi_pipeline.tasks.metastasis",
)


TASK_ATTRIBUTES = ("name", "config_model", "cohort_columns", "report_columns", "point_table", "trainer")
TASK_METHODS = ("default_config", "default_model", "postprocess")
TRAINERS = ("classifier", "point_detector")
# names the slide's own outputs use (summary.json keys, overlay-<name>.png, configuration sections)
RESERVED_TASK_NAMES = ("qc", "tissue", "input_guard", "slide_classifier", "embeddings")


def register_task(task: Task) -> Task:
    """Add (or replace) a task; configuration and cohort columns follow at once. A task that lacks part of the
    `Task` protocol is refused here, naming what it lacks, rather than failing when a run first reads it."""
    missing = [a for a in TASK_ATTRIBUTES if not hasattr(task, a)]
    missing += [f"{m}()" for m in TASK_METHODS if not callable(getattr(task, m, None))]
    label = getattr(task, "name", type(task).__name__)
    if missing:
        hint = " (model_kind is now trainer)" if "trainer" in missing and hasattr(task, "model_kind") else ""
        lacks = ", ".join(missing)
        raise ConfigError(f"task {label}: lacks {lacks} of the Task protocol{hint}; see docs/architecture.md")
    if task.name in RESERVED_TASK_NAMES:
        raise ConfigError(f"task {label}: the name is the slide's own ({', '.join(RESERVED_TASK_NAMES)}); rename it")
    if task.trainer not in TRAINERS:
        raise ConfigError(f"task {label}: trainer {task.trainer!r} is not one of {', '.join(TRAINERS)}")
    _TASKS[task.name] = task
    _changed()
    return task


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)
    _changed()


@contextlib.contextmanager
def registered(task: Task) -> Iterator[Task]:
    """The task registered for the duration of a block (tests)."""
    previous = _TASKS.get(task.name)
    register_task(task)
    try:
        yield task
    finally:
        if previous is None:
            unregister_task(task.name)
        else:
            register_task(previous)


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` whenever the set of tasks changes (the configuration model rebuilds itself so)."""
    _LISTENERS.append(listener)


def _changed() -> None:
    for listener in _LISTENERS:
        listener()


def tasks() -> list[Task]:
    """Every registered task, in registration order."""
    return list(_TASKS.values())


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str, option: str = "task") -> Task:
    """The registered task `name`; an unknown name is a usage mistake (exit 2), as for `--tasks`."""
    try:
        return _TASKS[name]
    except KeyError:
        raise UsageError(f"{option}: unknown task {name!r}; choose from {', '.join(_TASKS)}") from None


def task_model(name: str, configured: str | None, option: str | None = None) -> LoadedModel:
    """Task `name`'s model: the configured folder, else the task's own default; checked before any tile is read."""
    from wsi_pipeline.models.loading import load_model  # torch, only when a model is loaded

    if configured is not None:
        return load_model(configured, task=name, option=option or f"tasks.{name}.model", defer_network=True)
    default = get_task(name).default_model()
    if default is None:
        raise ModelError(f"task {name} ships no model; set tasks.{name}.model to a model folder")
    return load_model(default, task=name, option=f"tasks.{name}.model", defer_network=True)


def parse_task_list(text: str, option: str = "--tasks") -> list[str]:
    """`a,b` -> ['a', 'b'], each checked against the registry."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise UsageError(f"{option} {text!r} names no task; choose from {', '.join(_TASKS)}")
    unknown = [t for t in names if t not in _TASKS]
    if unknown:
        raise UsageError(f"{option}: unknown task(s) {', '.join(unknown)}; choose from {', '.join(_TASKS)}")
    return names


def load_plugins(specs: Sequence[str] = ()) -> None:
    """Import plugin modules (once each): `specs`, then `WSI_PIPELINE_PLUGINS`, then installed entry points.

    A spec is a module name or a .py file, optionally `:function` to call after import.
    """
    env = [s for s in os.environ.get("WSI_PIPELINE_PLUGINS", "").split(",") if s.strip()]
    for spec in [*specs, *env]:
        _load(spec.strip())
    for point in entry_points(group="wsi_pipeline.plugins"):
        if point.value not in _LOADED_PLUGINS:
            _LOADED_PLUGINS.add(point.value)
            loaded = point.load()
            if callable(loaded):
                loaded()


def _load(spec: str) -> None:
    if spec in _LOADED_PLUGINS:
        return
    target, _, function = spec.partition(":") if not _is_windows_drive(spec) else (spec, "", "")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            name = f"wsi_pipeline_plugin_{abs(hash(str(path)))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        if function:
            getattr(module, function)()
    except (ImportError, FileNotFoundError, AttributeError) as exc:
        raise ConfigError(f"plugins: cannot load {spec!r} ({exc}); give a module name or a .py file") from exc
    _LOADED_PLUGINS.add(spec)


def _is_windows_drive(spec: str) -> bool:
    return len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/"


def load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)
