"""Train a point detector (the mitosis model): a probability map that is a Gaussian of `sigma_um` at every figure
centre on a background of 0.

Each epoch draws one window per positive image, placed so that its figure lies anywhere in the window's inner part
(a figure always in the middle would teach the network the position, not the figure), and negative windows from
figure-free fields (MITOS-2012 areas far from any painted figure, or images with no points). Flips and 90° rotations
move image and target together; colour and stain jitter come from `augment`. Black padding (crops at the edge of
their source image) gets no loss. Every draw is seeded by (seed, epoch, index).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from wsi_pipeline.models import ModelCard, save_model
from wsi_pipeline.models.card import ColourStats
from wsi_pipeline.models.input_guard import training_stats
from wsi_pipeline.training.data.augment import AugmentConfig, augment
from wsi_pipeline.training.data.items import DataError
from wsi_pipeline.training.data.points import PointImage, Prepared, prepare
from wsi_pipeline.training.detector.evaluate import detection_metrics, operating_point
from wsi_pipeline.training.loop import (
    NORMALISATION,
    TrainConfig,
    build_model,
    command_line,
    fit,
    normalise,
    precise_batchnorm,
    run_epoch,
    selected_by,
)

PAD_VALUE = 8  # pixels darker than this in every channel are padding, not tissue


@dataclass(frozen=True)
class DenseTargets:
    sigma_um: float = 2.0  # Gaussian at each figure centre
    window_px: int = 96
    margin_px: int = 16  # the figure stays this far inside the window
    negatives_per_positive: float = 0.5
    positive_weight: float = 20.0  # loss weight 1 + w * target: figures are a tiny fraction of the pixels
    output_stride: int = 4
    halo_px: int = 32


def gaussian_target(points: np.ndarray, shape: tuple[int, int], stride: int, sigma_px: float) -> np.ndarray:
    """(h, w) map at the output stride: max over points of exp(-d^2 / 2 sigma^2), d from the output pixel's
    centre in input px (pixel index coordinates: output px j covers input px stride*j .. stride*j + stride - 1)."""
    h, w = shape
    target = np.zeros(shape, np.float32)
    if not len(points):
        return target
    ys = (np.arange(h) * stride + (stride - 1) / 2)[:, None, None]
    xs = (np.arange(w) * stride + (stride - 1) / 2)[None, :, None]
    d2 = (xs - points[:, 0]) ** 2 + (ys - points[:, 1]) ** 2
    target[:] = np.exp(-d2.min(axis=2) / (2 * sigma_px**2))
    return target


class TrainingWindows(Dataset):
    """An epoch's training windows: one around a figure per crop, then negatives from figure-free fields."""

    def __init__(
        self,
        positives: list[Prepared],
        negatives: list[Prepared],
        targets: DenseTargets,
        mpp: float,
        aug: AugmentConfig | None,
        seed: int,
    ) -> None:
        self.positives, self.negatives, self.targets, self.mpp, self.aug, self.seed = (
            positives,
            negatives,
            targets,
            mpp,
            aug,
            seed,
        )
        self.n_neg = round(len(positives) * targets.negatives_per_positive) if negatives else 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.positives) + self.n_neg

    def without_augmentation(self) -> TrainingWindows:
        """The same windows without colour or stain jitter (flips and turns stay: they leave BatchNorm's per-channel
        statistics as they are), for recomputing BatchNorm on tiles as the model is run on them."""
        plain = copy.copy(self)
        plain.aug = None
        return plain

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.targets
        rng = np.random.default_rng([self.seed, self.epoch, index])
        w = t.window_px
        if index < len(self.positives):
            image = self.positives[index]
            x0, y0 = self._around_figure(image, rng)
        else:
            image = self.negatives[int(rng.integers(len(self.negatives)))]
            x0, y0 = self._anywhere(image, rng)
        rgb = _window(image.rgb, x0, y0, w)
        points = image.points - np.array([x0, y0])
        out = w // t.output_stride
        target = gaussian_target(points, (out, out), t.output_stride, t.sigma_um / self.mpp)
        valid = (rgb.max(axis=2) > PAD_VALUE).astype(np.float32)
        # an output px gets loss only where its whole footprint is tissue
        valid = valid.reshape(out, t.output_stride, out, t.output_stride).min(axis=(1, 3))
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        maps = torch.from_numpy(np.stack([target, valid]))
        if rng.random() < 0.5:
            x, maps = x.flip(-1), maps.flip(-1)
        turns = int(rng.integers(4))
        x, maps = torch.rot90(x, turns, (-2, -1)), torch.rot90(maps, turns, (-2, -1))
        if self.aug is not None:
            x = augment(x.contiguous(), self.aug, self.seed, self.epoch, index)
        return x, maps[0].contiguous(), maps[1].contiguous()

    def _around_figure(self, image: Prepared, rng: np.random.Generator) -> tuple[int, int]:
        h, w_img = image.rgb.shape[:2]
        w, m = self.targets.window_px, self.targets.margin_px
        i = image.centre_index if image.centre_index is not None else int(rng.integers(len(image.points)))
        cx, cy = image.points[i]
        lo_x, hi_x = max(0, int(cx) - w + m), min(w_img - w, int(cx) - m)
        lo_y, hi_y = max(0, int(cy) - w + m), min(h - w, int(cy) - m)
        x0 = int(rng.integers(lo_x, hi_x + 1)) if hi_x >= lo_x else max(0, min(w_img - w, int(cx) - w // 2))
        y0 = int(rng.integers(lo_y, hi_y + 1)) if hi_y >= lo_y else max(0, min(h - w, int(cy) - w // 2))
        return x0, y0

    def _anywhere(self, image: Prepared, rng: np.random.Generator) -> tuple[int, int]:
        if image.usable_windows is not None:
            ys, xs = np.nonzero(image.usable_windows)
            k = int(rng.integers(len(ys)))
            return int(xs[k]), int(ys[k])
        h, w_img = image.rgb.shape[:2]
        w = self.targets.window_px
        return int(rng.integers(max(1, w_img - w + 1))), int(rng.integers(max(1, h - w + 1)))


def _window(rgb: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """A size x size window, padded with black where it leaves the image (black gets no loss)."""
    out = np.zeros((size, size, 3), np.uint8)
    part = rgb[y0 : y0 + size, x0 : x0 + size]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def train_point_detector(
    train_images: list[PointImage],
    val_images: list[PointImage],
    cfg: TrainConfig,
    out: Path,
    *,
    device: torch.device,
    targets: DenseTargets | None = None,
    augmentation: AugmentConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a point detector for `cfg.task` (its one class, `cfg.classes`) and write the model folder; the card
    carries held-out detection metrics."""
    targets = targets or DenseTargets()
    cfg.extra = {**cfg.extra, "targets": asdict(targets)}
    aug = augmentation or AugmentConfig(flips=False, rotate90=False, scale=0.0)
    split = {
        side: [prepare(i, cfg.mpp, targets.window_px) for i in images]
        for side, images in (("train", train_images), ("val", val_images))
    }
    positives = [p for p in split["train"] if len(p.points)]
    negatives = [p for p in split["train"] if not len(p.points)]
    val_crops = [p for p in split["val"] if len(p.points)]
    val_fields = [p for p in split["val"] if not len(p.points)]
    if not positives or not val_crops:
        raise DataError(f"{cfg.task} training needs images with figures on both sides of the split")
    model = build_model(cfg, 1, device)
    dataset = TrainingWindows(positives, negatives, targets, cfg.mpp, aug, cfg.seed)

    def batch_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, target, valid = (t.to(device) for t in batch)
        logits = model(normalise(x, device))[:, 0]
        weight = valid * (1 + targets.positive_weight * target)
        loss = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()
        return loss / weight.sum().clamp(min=1)

    def train_epoch(epoch: int, optimiser: torch.optim.Optimizer) -> float:
        return run_epoch(dataset, cfg, epoch, optimiser, batch_loss, device=device, progress=progress)

    card = detector_card(cfg, targets, {})

    reports: list[dict[str, Any]] = []  # full reports (with the curve) of the epochs validated in this process

    def validate() -> dict[str, float]:
        reports.append(detection_metrics(model, card, val_crops, val_fields, device))
        return reports[-1]["at_threshold"]

    started = time.perf_counter()
    state = fit(model, cfg, out, device=device, train_epoch=train_epoch, validate=validate, watched="f1")
    # the last validation belongs to the last epoch; measure again only when another epoch was selected or when a
    # finished run was resumed (nothing validated here)
    selected_last = bool(reports) and state.best_epoch == state.epoch
    batchnorm: dict[str, Any] = {}
    if cfg.recompute_batchnorm:  # new statistics: the selected epoch's validation figures no longer hold
        batchnorm = precise_batchnorm(model, dataset, cfg, device, state.selected_metrics())
    selected_last = selected_last and not batchnorm
    report = reports[-1] if selected_last else detection_metrics(model, card, val_crops, val_fields, device)
    point = operating_point(report["curve"])
    card = detector_card(
        cfg,
        targets,
        {
            "validation": {k: v for k, v in point.items() if k != "criterion"},
            "operating_point": {"criterion": point["criterion"], "threshold": point["threshold"]},
            "validation_curve": report["curve"],
            "selected_by": selected_by(cfg, "f1"),
            "seconds": round(time.perf_counter() - started, 1),
        },
        training={
            "config": asdict(cfg),
            "augmentation": {**asdict(aug), "flips": True, "rotate90": True, "shifted_windows": True},
            "train_images": {"with_figures": len(positives), "figure_free_fields": len(negatives)},
            "val_images": {"with_figures": len(val_crops), "figure_free_fields": len(val_fields)},
            "train_groups": sorted({p.group for p in split["train"]}),
            "val_groups": sorted({p.group for p in split["val"]}),
            "best_epoch": state.best_epoch,
            "history": state.history,
            **({"batchnorm": batchnorm} if batchnorm else {}),
            "command": command_line(),
            "data": cfg.extra.get("data", []),
            "description": cfg.extra.get("description", ""),
        },
        input_stats=training_stats(p.rgb for p in split["train"]),
        thresholds={cfg.classes[0]: point["threshold"]},
    )
    save_model(out, model.cpu(), card)
    return card.model_dump(mode="json")


def detector_card(
    cfg: TrainConfig,
    targets: DenseTargets,
    metrics: dict[str, Any],
    training: dict[str, Any] | None = None,
    input_stats: ColourStats | None = None,
    thresholds: dict[str, float] | None = None,
) -> ModelCard:
    return ModelCard(
        name=f"{cfg.task}-{cfg.architecture}",
        task=cfg.task,
        kind="dense",
        architecture=cfg.architecture,
        architecture_args=cfg.architecture_args or {},
        mpp=cfg.mpp,
        tile_px=cfg.tile_px,
        output_stride=targets.output_stride,
        halo_px=targets.halo_px,
        classes=list(cfg.classes),
        activation="sigmoid",
        normalisation=NORMALISATION,
        training=training or {},
        metrics=metrics,
        input_stats=input_stats,
        thresholds=thresholds or {},
    )
