"""What `train` and `evaluate` read from data folders: tiles, annotated slides, or point-annotated images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.tasks import get_task
from wsi_pipeline.training.data.items import DataError


def training_items(
    task: str,
    folders: Sequence[str],
    class_map: Mapping[str, list[str]] | None,
    group_pattern: str,
    mpp: float | None,
    tile_px: int | None = None,
    default_mpp: float | None = None,
) -> tuple[list[Any], list[str]]:
    """Every folder's items and the class names (all folders must give the same classes). A point-detector task
    reads point-annotated images (one class, named after the task); a classifier task folder-per-class tiles, or
    slides with QuPath GeoJSON exports (read at `default_mpp` where a slide's file has no µm/px)."""
    if get_task(task).trainer == "point_detector":
        from wsi_pipeline.training.data.points import point_images

        return [image for folder in folders for image in point_images(folder, mpp)], [task]
    from wsi_pipeline.training.data.annotations import annotated_items, is_annotated_folder
    from wsi_pipeline.training.data.items import folder_items
    from wsi_pipeline.training.data.nuclei import is_nuclei_folder, nucleus_items

    items: list[Any] = []
    classes: list[str] | None = None
    mapping = dict(class_map) if class_map else None
    several = len(folders) > 1 and mapping is not None  # one class map across data folders of different layouts
    for folder in folders:
        if is_annotated_folder(folder):  # slides + QuPath GeoJSON exports
            if mpp is None or tile_px is None:
                raise ConfigError(f"{folder}: tiles from annotated slides need --mpp and --tile-px")
            found, names = annotated_items(
                folder, mapping, mpp=mpp, tile_px=tile_px, strict=not several, default_mpp=default_mpp
            )
        elif is_nuclei_folder(folder):  # fields with labelled nucleus centres
            if mpp is None or tile_px is None:
                raise ConfigError(f"{folder}: tiles around labelled nuclei need --mpp and --tile-px")
            found, names = nucleus_items(folder, mapping, model_mpp=mpp, tile_px=tile_px)
        else:
            found, names = folder_items(folder, mapping, group_pattern or None, strict=not several)
        if classes is not None and names != classes:
            raise ConfigError(f"{folder} has classes {names}, the other data folders {classes}")
        items += found
        classes = names
    assert classes is not None
    counts = [sum(1 for i in items if i.label == label) for label in range(len(classes))]
    empty = [cls for cls, n in zip(classes, counts, strict=True) if n == 0]
    if not classes:
        raise DataError(f"{', '.join(folders)}: no class folders (a folder of tiles per class, or --class NAME=FOLDER)")
    if len(classes) < 2:
        raise DataError(f"{', '.join(folders)}: only one class ({classes[0]}) has tiles; a model needs at least two")
    if empty:
        raise DataError(f"{', '.join(folders)}: no tiles for class(es) {empty}; every class needs tiles")
    check_class_names(classes)
    return items, classes


def check_class_names(classes: Sequence[str]) -> None:
    """Refuse, before any training, a class name the model card would refuse at the end (a heatmap's folder name)."""
    from wsi_pipeline.models.card import CLASS_NAME, RESERVED_HEATMAP

    for cls in classes:
        if not CLASS_NAME.fullmatch(cls) or cls == RESERVED_HEATMAP:
            raise DataError(
                f"class name {cls!r} cannot name a heatmap (letters, digits, '_', '.', '-'; not {RESERVED_HEATMAP!r}); "
                "give it another with --class NAME=FOLDER"
            )


def matching_groups(items: list[Any], pattern: str | None, what: str) -> list[Any]:
    """The items whose source (group) matches `pattern` (all when None); none matching is an error."""
    if pattern is None:
        return items
    import re

    regex = re.compile(pattern)
    kept = [item for item in items if regex.search(item.group)]
    if not kept:
        examples = sorted({item.group for item in items})[:3]
        raise DataError(f"{what}: no source matches --groups {pattern!r} (sources look like {examples})")
    return kept
