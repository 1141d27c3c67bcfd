"""`train` and `evaluate` as functions: settings in, a model folder or a report out (the CLI parses, these act)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.engine import resolve_device
from wsi_pipeline.models import load_model
from wsi_pipeline.tasks import get_task, load_plugins
from wsi_pipeline.training.data.items import split_by_group
from wsi_pipeline.training.data.sources import matching_groups, training_items
from wsi_pipeline.training.loop import TrainConfig
from wsi_pipeline.training.settings import TrainSettings


def train_model(settings: TrainSettings, data: tuple[str, ...], out: Path) -> tuple[dict[str, Any], int, int]:
    """Train a model for `settings.task` into `out`; returns its card and the train / validation item counts."""
    s = settings
    class_map = s.class_map()
    items, classes = training_items(s.task, data, class_map, s.group_pattern, s.mpp, s.tile_px, s.default_mpp)
    items = matching_groups(items, s.groups, "training data")
    cfg = TrainConfig(
        task=s.task,
        classes=classes,
        architecture=s.arch or "",
        architecture_args=s.architecture_args(),
        mpp=s.model_mpp,
        tile_px=s.model_tile_px,
        epochs=s.epochs,
        lr=s.lr,
        batch_size=s.batch_size,
        schedule=s.schedule,
        select=s.select,
        patience=s.patience,
        seed=s.seed,
        workers=s.workers,
        freeze_backbone=s.freeze_backbone,
        init_checkpoint=s.init,
        init_head=s.init_head,
        recompute_batchnorm=s.recompute_batchnorm,
        average_epochs=s.average_epochs,
        precision=s.precision,
        extra={
            "data": [*data, *([s.val_data] if s.val_data else [])],
            "description": s.describe,
            "augment": dict(s.augment),
            **({"stain_normalisation": s.stain_normalisation} if s.stain_normalisation else {}),
        },
    )
    if s.val_data:
        train_items = items
        val_items, val_classes = training_items(
            s.task, (s.val_data,), class_map, s.group_pattern, s.mpp, s.tile_px, s.default_mpp
        )
        val_items = matching_groups(val_items, s.groups, "--val-data")
        if val_classes != cfg.classes:
            raise ConfigError(f"--val-data classes {val_classes} differ from the training classes {cfg.classes}")
    else:
        train_items, val_items = split_by_group(items, s.val_fraction, s.seed)
    device = resolve_device(s.device)
    if s.from_embeddings is not None and s.encoder is not None:
        from wsi_pipeline.training.classifier.from_embeddings import train_head

        card = train_head(
            train_items, val_items, cfg, out, device=device, encoder_dir=Path(s.encoder),
            cache=Path(s.from_embeddings), head_kind=s.head,
        )  # fmt: skip
    elif s.point_detector:
        from wsi_pipeline.training.detector.train import train_point_detector

        card = train_point_detector(train_items, val_items, cfg, out, device=device, augmentation=s.augmentation())
    else:
        from wsi_pipeline.training.classifier.class_maps import ClassMapTargets
        from wsi_pipeline.training.classifier.train import train_classifier

        dense = ClassMapTargets() if s.kind == "class_map" else None
        card = train_classifier(
            train_items, val_items, cfg, out, device=device, augmentation=s.augmentation(), dense=dense
        )
    return card, len(train_items), len(val_items)


def evaluate_model(
    task: str,
    model_dir: str,
    data: tuple[str, ...],
    out: Path,
    *,
    class_map: dict[str, list[str]] | None,
    positive: str | None,
    held_out: bool,
    group_pattern: str,
    mpp: float | None,
    threshold: float | None,
    radius_um: float,
    device: str,
    groups: str | None = None,
    default_mpp: float | None = None,
) -> dict[str, Any]:
    """Evaluate a model on labelled data and write OUT/evaluation.json and a curve; returns the report."""
    load_plugins()  # a plugin's task (WSI_PIPELINE_PLUGINS, entry points) is evaluated like a built-in one
    model = load_model(model_dir, task=task)
    items, classes = training_items(
        task, data, class_map, group_pattern, mpp or model.card.mpp, model.card.tile_px, default_mpp
    )
    items = matching_groups(items, groups, "evaluation data")
    if held_out:
        held = set(model.card.training.get("val_groups", []))
        items = [i for i in items if i.group in held]
        if not items:
            raise ConfigError(f"--held-out: none of DATA is among {model_dir}'s validation sources")
    if get_task(task).trainer == "point_detector":  # points, not tiles
        from wsi_pipeline.training.detector.evaluate import DetectionParams, evaluate_detector

        chosen = model.card.threshold(model.card.classes[0]) if threshold is None else threshold
        params = DetectionParams(threshold=chosen, radius_um=radius_um)
        return evaluate_detector(model, items, out, resolve_device(device), params)
    from wsi_pipeline.training.classifier.evaluate import evaluate_classifier

    return evaluate_classifier(model, items, classes, out, resolve_device(device), positive, threshold)
