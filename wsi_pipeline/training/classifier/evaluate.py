"""`wsi-pipeline evaluate` for patch classifiers: metrics on a folder-per-class dataset, JSON + ROC curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from wsi_pipeline.core.atomic import atomic_path, write_json
from wsi_pipeline.models import LoadedModel
from wsi_pipeline.training.data.items import TileItem, load_tile
from wsi_pipeline.training.metrics import balanced_accuracy, bootstrap_auc, roc_auc


def predict_items_and_bf16_difference(
    model: LoadedModel, items: list[TileItem], device: torch.device, batch: int = 64
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """fp32 and bf16 scores per tile, through the same predictor `run` uses (any model format; a dense model's map
    scored on each tile's labelled area, as in its training: classifier/class_maps.py), and the largest |bf16 - fp32| of
    any output (at every pixel of a dense map): the figure `engine.precision: auto` reads from the card; and each
    tile's domain value (models/domain.py; None without a guard), read from the same fp32 forward pass."""
    from wsi_pipeline.models import PredictorOptions, make_predictor
    from wsi_pipeline.training.classifier.class_maps import item_scores, label_areas, scoring_radius_px

    card = model.card
    # torch for both (the cards' figures were measured so; the guard's features are read from its hooks)
    predictors = [make_predictor(model, device, PredictorOptions(p, runtime="torch")) for p in ("fp32", "bf16")]
    radius = scoring_radius_px(card.training, card.mpp)  # used by dense models only
    scores: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    domain: list[np.ndarray] = []
    largest = 0.0
    with torch.inference_mode():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            tiles = torch.from_numpy(np.stack([load_tile(i, card.tile_px) for i in chunk])).permute(0, 3, 1, 2)
            tiles = tiles.to(device)
            fp32 = predictors[0].probabilities(tiles).numpy()
            tap, guard = getattr(predictors[0], "tap", None), getattr(predictors[0], "guard", None)
            if tap is not None and guard is not None:
                domain.append(guard.tile_scores(tap.windows(tiles.shape[-1])).numpy())
            bf16 = predictors[1].probabilities(tiles).numpy()
            largest = max(largest, float(np.abs(bf16 - fp32).max()))
            for out, probs in zip(scores, (fp32, bf16), strict=True):
                if probs.ndim == 4:
                    probs = item_scores(probs, label_areas(chunk, card.tile_px, card.output_stride, radius))
                out.append(probs)
    values = np.concatenate(domain) if domain else None
    return np.concatenate(scores[0]), np.concatenate(scores[1]), largest, values


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    y = labels[order].astype(bool)
    tpr = np.r_[0, np.cumsum(y) / max(1, y.sum())]
    fpr = np.r_[0, np.cumsum(~y) / max(1, (~y).sum())]
    return fpr, tpr


def roc_png(path: Path, fpr: np.ndarray, tpr: np.ndarray, title: str) -> None:
    curve_png(path, fpr, tpr, title, "false positive rate", "true positive rate", diagonal=True)


def curve_png(
    path: Path,
    xs: np.ndarray,
    ys: np.ndarray,
    title: str,
    x_label: str,
    y_label: str,
    *,
    x_max: float = 1.0,
    diagonal: bool = False,
    size: int = 400,
) -> None:
    """A curve drawn with PIL (the project has no plotting library; a ROC or FROC needs only axes and a line)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    pad = 40
    span = size - 2 * pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return pad + x / x_max * span, size - pad - y * span

    draw.rectangle([pad, pad, size - pad, size - pad], outline=(0, 0, 0))
    if diagonal:
        draw.line([to_px(0, 0), to_px(x_max, 1)], fill=(180, 180, 180))
    points = [to_px(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
    if len(points) > 1:
        draw.line(points, fill=(200, 0, 0), width=2)
    for px, py in points:
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(200, 0, 0))
    draw.text((pad, 12), title, fill=(0, 0, 0))
    draw.text((size // 2 - 50, size - 28), f"{x_label} (0 to {x_max:g})", fill=(0, 0, 0))
    draw.text((4, pad - 14), y_label, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def evaluate_classifier(
    model: LoadedModel,
    items: list[TileItem],
    classes: list[str],
    out: Path,
    device: torch.device,
    positive: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Balanced accuracy over the model's classes (argmax); ROC AUC (bootstrap 95 % interval) for `positive` vs the
    rest; sensitivity, specificity and balanced accuracy at `threshold` on `positive` (default: the card's)."""
    names = model.card.classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        from wsi_pipeline.training.data.items import DataError

        raise DataError(f"data classes {unknown} are not among the model's classes {names}")
    labels = np.array([names.index(classes[i.label]) for i in items])
    probs, probs_bf16, bf16_difference, domain = predict_items_and_bf16_difference(model, items, device)
    positive = positive or names[0]
    pos = names.index(positive)
    auc, low, high = bootstrap_auc(labels == pos, probs[:, pos], n=1000, seed=0)
    report = {
        "model": model.card.name,
        "tiles": len(items),
        "classes": classes,
        "balanced_accuracy": balanced_accuracy(labels, probs.argmax(1)),
        "roc_auc": {"positive": positive, "value": auc, "ci95": [low, high], "bootstrap": 1000},
        "at_operating_point": _at_threshold(
            labels == pos, probs[:, pos], model.card.threshold(positive) if threshold is None else threshold
        ),
        "bf16": {
            "max_abs_difference": bf16_difference,
            "roc_auc": roc_auc(labels == pos, probs_bf16[:, pos]),
            "note": "the same tiles run under bf16 autocast; the figures above are fp32",
        },
        # tiles the model's domain guard finds unlike its training data (None: the model has no guard)
        "domain_flagged_fraction": None if domain is None else round(float(np.mean(domain > 1.0)), 4),
        "confusion": {
            names[t]: {names[p]: int(((labels == t) & (probs.argmax(1) == p)).sum()) for p in range(len(names))}
            for t in sorted(set(labels.tolist()))
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evaluation.json", report)
    fpr, tpr = roc_points(labels == pos, probs[:, pos])
    roc_png(out / "roc.png", fpr, tpr, f"{model.card.name}: {positive} AUC {auc:.3f} [{low:.3f}, {high:.3f}]")
    return report


def _at_threshold(positives: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    called = scores >= threshold
    sensitivity = float(called[positives].mean()) if positives.any() else float("nan")
    specificity = float((~called[~positives]).mean()) if (~positives).any() else float("nan")
    return {
        "threshold": threshold,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2,
    }
