"""Train a patch classifier from folder-per-class tiles: seeded, resumable, early-stopped on validation (the loop
and its checkpoints are in `loop`). The selected epoch's weights are saved as a model folder (weights.safetensors +
model_card.json with the measured validation metrics).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsi_pipeline.models import ModelCard, save_model
from wsi_pipeline.models.input_guard import training_stats
from wsi_pipeline.training.classifier import class_maps
from wsi_pipeline.training.classifier.class_maps import ClassMapTargets
from wsi_pipeline.training.data.augment import AugmentConfig, augment
from wsi_pipeline.training.data.items import DataError, TileItem, load_tile, sample_items
from wsi_pipeline.training.loop import (
    CHECKPOINT,
    NORMALISATION,
    TrainConfig,
    build_model,
    command_line,
    fit,
    group_list,
    normalise,
    precise_batchnorm,
    run_epoch,
    selected_by,
)
from wsi_pipeline.training.metrics import balanced_accuracy, roc_auc, youden_threshold

__all__ = ["CHECKPOINT", "TrainConfig", "train_classifier"]


class _Tiles(Dataset):
    def __init__(
        self, items: list[TileItem], tile_px: int, aug: AugmentConfig | None, seed: int, stain: str | None = None
    ) -> None:
        self.items, self.tile_px, self.aug, self.seed, self.epoch = items, tile_px, aug, seed, 0
        self.stain = stain

    def __len__(self) -> int:
        return len(self.items)

    def without_augmentation(self) -> _Tiles:
        """The same tiles as the model is run on them (centre crop, no augmentation)."""
        return _Tiles(self.items, self.tile_px, None, self.seed, self.stain)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        offset = None
        if self.aug is not None:  # a tile larger than the model's: a seeded random part of it (centre otherwise)
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            offset = (float(rng.random()), float(rng.random()))
        tile = torch.from_numpy(load_tile(item, self.tile_px, offset, self.stain)).permute(2, 0, 1).contiguous()
        if self.aug is not None:
            tile = augment(tile, self.aug, self.seed, self.epoch, index)
        return tile, item.label


def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for batch, y in loader:
            probs.append(torch.softmax(model(normalise(batch, device)), 1).cpu().numpy())
            labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    metrics = {"balanced_accuracy": balanced_accuracy(labels, probs.argmax(1))}
    if probs.shape[1] == 2:
        metrics["roc_auc"] = roc_auc(labels == 1, probs[:, 1])
    return metrics


def selection_metric(n_classes: int) -> str:
    """Early stopping watches ROC AUC for two classes (threshold-free), balanced accuracy otherwise."""
    return "roc_auc" if n_classes == 2 else "balanced_accuracy"


def classifier_operating_point(
    probs: np.ndarray, labels: np.ndarray, classes: list[str]
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Two classes: the threshold on the first class's probability that maximises Youden's J on the validation
    split, and its complement for the second (a tile is then one or the other, never both); more classes: none
    (argmax)."""
    if len(classes) != 2:
        return {}, None
    point = youden_threshold(labels == 0, probs[:, 0])
    threshold = round(point["threshold"], 4)
    return {classes[0]: threshold, classes[1]: round(1 - threshold, 4)}, {
        "criterion": "Youden's J (balanced accuracy) on the validation split",
        "positive": classes[0],
        **point,
        "threshold": threshold,
    }


STATS_TILES = 2000  # training tiles measured for the card's colour statistics (the input guard)


def train_classifier(
    train_items: list[TileItem],
    val_items: list[TileItem],
    cfg: TrainConfig,
    out: Path,
    *,
    device: torch.device,
    augmentation: AugmentConfig | None = None,
    progress: bool = True,
    dense: ClassMapTargets | None = None,
) -> dict[str, Any]:
    """Train; keep the best epoch by the validation selection metric (or the last epoch); write the model folder
    and return its card. With `dense`, the network makes a class map per tile (a U-Net), trained and scored on
    each tile's labelled area (class_maps.py); the rest is the same."""
    if not train_items or not val_items:
        raise DataError("training needs tiles on both sides of the split")
    model = build_model(cfg, len(cfg.classes), device)
    watched = selection_metric(len(cfg.classes))
    aug = augmentation or AugmentConfig()
    counts = np.bincount([i.label for i in train_items], minlength=len(cfg.classes))
    weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    stain = cfg.extra.get("stain_normalisation")
    if dense is None:
        train_set: Dataset = _Tiles(train_items, cfg.tile_px, aug, cfg.seed, stain)
        val_set: Dataset = _Tiles(val_items, cfg.tile_px, None, cfg.seed, stain)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        evaluate: Any = _evaluate
    else:  # a dense class map learnt from the same tiles (class_maps.py)
        class_maps.check_map_shape(model, cfg.architecture, cfg.tile_px, dense)
        radius_px = dense.radius_um / cfg.mpp
        train_set = class_maps.TileMaps(train_items, cfg.tile_px, dense, radius_px, aug, cfg.seed, stain)
        val_set = class_maps.TileMaps(val_items, cfg.tile_px, dense, radius_px, None, cfg.seed, stain)
        evaluate = class_maps.evaluate_maps
        cfg.extra = {**cfg.extra, "targets": asdict(dense)}
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=cfg.workers)

    def batch_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if dense is not None:
            tiles, target, labels = batch
            logits = model(normalise(tiles, device))
            return class_maps.tile_loss(logits, target.to(device), labels.to(device), weight)
        tiles, labels = batch
        return loss_fn(model(normalise(tiles, device)), labels.to(device))

    def train_epoch(epoch: int, optimiser: torch.optim.Optimizer) -> float:
        return run_epoch(train_set, cfg, epoch, optimiser, batch_loss, device=device, progress=progress)

    latest: list[tuple[np.ndarray, np.ndarray]] = []  # (probabilities, labels) of the last epoch validated here

    def validate() -> dict[str, float]:
        latest[:] = [evaluate(model, val_loader, device)]
        return _metrics(*latest[0])

    started = time.perf_counter()
    state = fit(model, cfg, out, device=device, train_epoch=train_epoch, validate=validate, watched=watched)
    final = state.selected_metrics()  # measured in the loop
    # the operating point from the selected epoch's validation pass: the last one, unless another epoch was selected
    # or a finished run was resumed (nothing validated here), which alone need another pass over the tiles
    selected_last = bool(latest) and state.best_epoch == state.epoch
    # new statistics: the selected epoch's validation figures no longer hold
    batchnorm = precise_batchnorm(model, train_set, cfg, device, final) if cfg.recompute_batchnorm else {}
    selected_last = selected_last and not batchnorm
    probs, labels = latest[0] if selected_last else evaluate(model, val_loader, device)
    if batchnorm:
        final = _metrics(probs, labels)
    thresholds, point = classifier_operating_point(probs, labels, cfg.classes)
    geometry = {"kind": "classifier"} if dense is None else class_maps.card_geometry(dense)
    card = ModelCard(
        name=f"{cfg.task}-{cfg.architecture}",
        task=cfg.task,
        **geometry,
        architecture=cfg.architecture,
        architecture_args=cfg.architecture_args or {},
        mpp=cfg.mpp,
        tile_px=cfg.tile_px,
        classes=cfg.classes,
        activation="softmax",
        normalisation=NORMALISATION,
        stain_normalisation=stain,
        training={
            "config": asdict(cfg),
            "augmentation": asdict(aug),
            "train_tiles": len(train_items),
            "val_tiles": len(val_items),
            "train_groups": group_list({i.group for i in train_items}),
            "val_groups": group_list({i.group for i in val_items}),
            "best_epoch": state.best_epoch,
            "history": state.history,
            **({"batchnorm": batchnorm} if batchnorm else {}),
            "command": command_line(),
            "data": cfg.extra.get("data", []),
            "description": cfg.extra.get("description", ""),
        },
        metrics={
            "validation": final,
            "selected_by": selected_by(cfg, watched),
            "seconds": round(time.perf_counter() - started, 1),
            **({"operating_point": point} if point else {}),
        },
        thresholds=thresholds,
        input_stats=training_stats(load_tile(i, cfg.tile_px) for i in sample_items(train_items, STATS_TILES, cfg.seed)),
    )
    save_model(out, model.cpu(), card)
    return card.model_dump(mode="json")
