"""Detection metrics of a dense mitosis model on point-annotated images, with the pipeline's own post-processing
(Gaussian smoothing, local maxima at least `min_distance_um` apart, threshold) so the figures describe what `run`
reports.

Per threshold: figure-centre recall (an AMi-Br crop's own figure is found), recall, precision and F1 over every
annotated figure (one-to-one matching within `radius_um`), false detections per crop, and false detections per mm²
on figure-free fields. Detections are found once at the lowest threshold and filtered by value, which equals
running the peak finder at each threshold (a peak is only ever suppressed by a higher one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_pipeline.core.atomic import write_json
from wsi_pipeline.models import LoadedModel, ModelCard, ModelError
from wsi_pipeline.postprocess.maxima import find_peaks
from wsi_pipeline.training.data.items import DataError
from wsi_pipeline.training.data.points import PointImage, Prepared, prepare
from wsi_pipeline.training.metrics import match_detections

# steps of 0.025: across centres the curves are steep (recall 0.87 -> 0.84 between 0.50 and 0.55 on one centre);
# python floats: they go into checkpoints
THRESHOLDS = tuple(float(round(t, 3)) for t in np.arange(0.05, 0.99, 0.025))


@dataclass(frozen=True)
class DetectionParams:
    threshold: float = 0.5
    min_distance_um: float = 10.0
    smooth_sigma_um: float = 1.0
    radius_um: float = 7.5


def predict_map(
    model: nn.Module, card: ModelCard, rgb: np.ndarray, device: torch.device, bf16: bool = False
) -> np.ndarray:
    """The model's probability map of one RGB image (padded with white to a multiple of the output stride), in fp32
    or under bf16 autocast."""
    s = card.output_stride
    h, w = rgb.shape[:2]
    ph, pw = -h % s, -w % s
    padded = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=255) if ph or pw else rgb
    mean = torch.tensor(card.normalisation.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(card.normalisation.std, device=device).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].to(device).float() / 255
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model((x - mean) / std)[0, 0].float()
    return torch.sigmoid(logits).cpu().numpy()[: (h + ph) // s, : (w + pw) // s]


def detect(prob: np.ndarray, card: ModelCard, params: DetectionParams, threshold: float) -> np.ndarray:
    """(N, 3) detections: x, y in input px (pixel index coordinates) and the smoothed peak value."""
    px_um = card.mpp * card.output_stride
    peaks = find_peaks(
        prob,
        min_distance=max(1, round(params.min_distance_um / px_um)),
        threshold=threshold,
        sigma=params.smooth_sigma_um / px_um,
    )
    s = card.output_stride
    return np.c_[peaks.cols * s + (s - 1) / 2, peaks.rows * s + (s - 1) / 2, peaks.values]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def detection_metrics(
    model: nn.Module,
    card: ModelCard,
    crops: list[Prepared],
    fields: list[Prepared],
    device: torch.device,
    params: DetectionParams | None = None,
) -> dict[str, Any]:
    """Metrics at `params.threshold` and a curve over THRESHOLDS."""
    params = params or DetectionParams()
    model.eval()
    radius = params.radius_um / card.mpp
    lowest = min(THRESHOLDS[0], params.threshold)
    crop_dets = [detect(predict_map(model, card, c.rgb, device), card, params, lowest) for c in crops]
    field_dets, field_mm2 = [], 0.0
    for f in fields:
        dets = detect(predict_map(model, card, f.rgb, device), card, params, lowest)
        usable = _usable_centres(f)
        rows = np.clip(dets[:, 1].astype(int), 0, usable.shape[0] - 1)
        cols = np.clip(dets[:, 0].astype(int), 0, usable.shape[1] - 1)
        inside = usable[rows, cols]
        field_dets.append(dets[inside])
        field_mm2 += usable.sum() * card.mpp**2 / 1e6
    curve = [_at(t, crops, crop_dets, field_dets, field_mm2, radius) for t in sorted({*THRESHOLDS, params.threshold})]
    at = next(row for row in curve if row["threshold"] == params.threshold)
    return {"at_threshold": at, "curve": curve, "params": params.__dict__, "crops": len(crops), "fields": len(fields)}


def _usable_centres(field: Prepared) -> np.ndarray:
    """Pixels of a figure-free field where a detection counts as false (far from any painted figure)."""
    return field.usable if field.usable is not None else np.ones(field.rgb.shape[:2], bool)


def _at(
    threshold: float,
    crops: list[Prepared],
    crop_dets: list[np.ndarray],
    field_dets: list[np.ndarray],
    field_mm2: float,
    radius: float,
) -> dict[str, float | None]:
    """One operating point; a figure that cannot be measured (no centred crops, no figure-free field) is None."""
    tp = fp = fn = centres = centre_hits = 0
    for crop, dets in zip(crops, crop_dets, strict=True):
        kept = dets[dets[:, 2] >= threshold, :2]
        score = match_detections(kept, crop.points, radius)
        tp, fp, fn = tp + score.true_positives, fp + score.false_positives, fn + score.false_negatives
        if crop.centre_index is not None:
            centres += 1
            centre_hits += any(t == crop.centre_index for _, t in score.matches)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    field_fp = sum(int((d[:, 2] >= threshold).sum()) for d in field_dets)
    # precision and F1 once more with the detections on figure-free fields counted as false: what a slide, mostly
    # free of figures, sees; the operating point is chosen on this F1
    all_precision = tp / (tp + fp + field_fp) if tp + fp + field_fp else 0.0
    return {
        "threshold": threshold,
        "centre_recall": centre_hits / centres if centres else None,
        "recall": recall,
        "precision": precision,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "false_per_crop": fp / len(crops) if crops else None,
        "false_per_mm2_figure_free": field_fp / field_mm2 if field_mm2 else None,
        "precision_with_fields": all_precision,
        "f1_with_fields": 2 * all_precision * recall / (all_precision + recall) if all_precision + recall else 0.0,
    }


def operating_point(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The threshold of best F1 over validation crops and figure-free fields (the lowest of equals: peak heights
    fall on other scanners, so of two equal points the lower one keeps more figures there)."""
    best = max(curve, key=lambda row: (round(row["f1_with_fields"], 9), -row["threshold"]))
    return {"criterion": "best F1 within the match radius over validation crops and figure-free fields", **best}


def evaluate_detector(
    model: LoadedModel, images: list[PointImage], out: Path, device: torch.device, params: DetectionParams
) -> dict[str, Any]:
    """`wsi-pipeline evaluate` of a point-detector task (mitosis): detection metrics, OUT/evaluation.json and
    OUT/froc.png."""
    card = model.card
    if card.kind != "dense":
        raise DataError(f"{card.name} is a {card.kind} model; evaluating a point detector needs a dense one")
    if model.module is None:  # whole-image maps run the torch module (safetensors or TorchScript), not a runtime
        raise ModelError(
            f"{model.path}: point-detector evaluation cannot run {card.format} models yet; evaluate the safetensors or "
            "TorchScript folder it was exported from (the same network)"
        )
    prepared = [prepare(i, card.mpp, card.tile_px) for i in images]
    crops = [p for p in prepared if len(p.points)]
    fields = [p for p in prepared if not len(p.points)]
    if not crops:
        raise DataError("point-detector evaluation needs images with annotated points")
    module = model.module.to(device)
    report = detection_metrics(module, card, crops, fields, device, params)
    report = {"model": card.name, **report, "bf16": bf16_difference(module, card, crops + fields, device)}
    # tiles the model's domain guard finds unlike its training data (None: the model has no guard)
    report["domain_flagged_fraction"] = guard_flagged_fraction(model, crops + fields)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evaluation.json", report)
    at = report["at_threshold"]
    froc_png(
        out / "froc.png",
        report["curve"],
        f"{card.name}: recall {_fmt(at['centre_recall'] or at['recall'])} at {_fmt(at['false_per_crop'])} FP/crop "
        f"(t={params.threshold})",
    )
    return report


def guard_flagged_fraction(model: LoadedModel, images: list[Prepared]) -> float | None:
    """The share of the evaluated images' run tiles the guard flags, the tiles cut as calibration cuts them (a crop
    mirrored out to the run tile, a field in run tiles); None without a guard."""
    from wsi_pipeline.training.domain import flagged_share, input_px, layer_features, run_tiles, values_of

    if model.guard is None or model.card.domain_guard is None:
        return None
    size = input_px(model.card)
    tiles = np.stack([tile for image in images for tile in run_tiles(image.rgb, image.usable, size)])
    return flagged_share(values_of(model.guard, layer_features(model, model.card.domain_guard.layers, tiles)))


BF16_IMAGES = 64  # every crop and field would double the evaluation's time for a figure that is a maximum anyway


def bf16_difference(model: nn.Module, card: ModelCard, images: list[Prepared], device: torch.device) -> dict:
    """The largest |bf16 - fp32| of the probability map over (up to BF16_IMAGES of) the evaluated images, evenly
    spread over them: the figure `engine.precision: auto` reads from the card."""
    from wsi_pipeline.models.predictor import conv_bn_fused

    step = max(1, len(images) // BF16_IMAGES)
    chosen = images[::step][:BF16_IMAGES]
    as_run = conv_bn_fused(model)  # the engine's module: folding BatchNorm changes bf16's error, not fp32's
    largest = 0.0
    for image in chosen:
        fp32 = predict_map(model, card, image.rgb, device)
        largest = max(largest, float(np.abs(predict_map(as_run, card, image.rgb, device, bf16=True) - fp32).max()))
    return {"max_abs_difference": largest, "images": len(chosen), "note": "bf16 autocast against fp32, same maps"}


def froc_png(path: Path, curve: list[dict[str, float | None]], title: str) -> None:
    """Figure-centre recall against false detections per crop, one point per threshold."""
    from wsi_pipeline.training.classifier.evaluate import curve_png

    xs = np.array([row["false_per_crop"] for row in curve])
    ys = np.array([row["centre_recall"] if row["centre_recall"] is not None else row["recall"] for row in curve])
    order = np.argsort(xs, kind="stable")
    x_max = max(1.0, float(xs.max()))
    curve_png(path, xs[order], ys[order], title, "false detections per crop", "figure recall", x_max=x_max)
