"""What `train` and `evaluate` read from data folders: tiles, annotated slides, or point-annotated images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..tasks import get_task


def training_items(
    task: str,
    folders: Sequence[str],
    class_map: Mapping[str, list[str]] | None,
    group_pattern: str,
    mpp: float | None,
    tile_px: int | None = None,
) -> tuple[list[Any], list[str]]:
    """Every folder's items and the class names (all folders must give the same classes). A dense task reads
    point-annotated images; a classifier task folder-per-class tiles, or slides with QuPath GeoJSON exports."""
    if get_task(task).model_kind == "dense":
        from .points import point_images

        return [image for folder in folders for image in point_images(folder, mpp)], [task]
    from .annotations import annotated_items, is_annotated_folder
    from .data import folder_items

    items: list[Any] = []
    classes: list[str] | None = None
    for folder in folders:
        if is_annotated_folder(folder):  # slides + QuPath GeoJSON exports
            if mpp is None or tile_px is None:
                raise ConfigError(f"{folder}: tiles from annotated slides need --mpp and --tile-px")
            found, names = annotated_items(folder, dict(class_map) if class_map else None, mpp=mpp, tile_px=tile_px)
        else:
            found, names = folder_items(folder, dict(class_map) if class_map else None, group_pattern or None)
        if classes is not None and names != classes:
            raise ConfigError(f"{folder} has classes {names}, the other data folders {classes}")
        items += found
        classes = names
    assert classes is not None
    return items, classes
