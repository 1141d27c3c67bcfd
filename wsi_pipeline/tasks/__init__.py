"""Analysis tasks: a `Task` protocol, a registry, and one module per built-in task.

Everything that depends on which tasks exist (configuration sections, `--tasks`, post-processing, summary entries,
cohort columns, QuPath objects) iterates the registry; adding a task is one module that calls `register_task`.
"""

from wsi_pipeline.tasks.base import Overlay, PointObjects, RegionObject, Task, TaskConfig, TaskContext, TaskResult
from wsi_pipeline.tasks.registry import (
    get_task,
    load_builtin,
    load_plugins,
    parse_task_list,
    register_task,
    registered,
    task_model,
    task_names,
    tasks,
    unregister_task,
)

load_builtin()

__all__ = [
    "Overlay",
    "PointObjects",
    "RegionObject",
    "Task",
    "TaskConfig",
    "TaskContext",
    "TaskResult",
    "get_task",
    "load_plugins",
    "parse_task_list",
    "register_task",
    "registered",
    "task_model",
    "task_names",
    "tasks",
    "unregister_task",
]
