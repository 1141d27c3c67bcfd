"""`train-slide`: an attention-MIL slide classifier from a CSV of slide labels and the embeddings `embed` (or `run
--encoder`) wrote, split by patient so that no patient's slides sit on both sides; scored on the held-out fold."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipeline.engine.embeddings import read_embeddings
from wsi_pipeline.models.slide_mil import (
    GatedAttentionMIL,
    SlideEncoderRef,
    SlideModelCard,
    build_slide_model,
    save_slide_model,
    slide_prediction,
)
from wsi_pipeline.training.data.items import DataError, split_by_group
from wsi_pipeline.training.loop import command_line
from wsi_pipeline.training.metrics import bootstrap_auc, roc_auc, youden_threshold

SHOWN = 10  # missing slides named in a refusal
TUNING_FRACTION = 0.2  # of the training patients: they choose the epoch and the threshold, never the held-out ones


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    label: int
    group: str  # the patient (or the slide itself): a split keeps it on one side


@dataclass(frozen=True)
class SlideMilSettings:
    encoder: str
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    seed: int = 0
    max_tiles: int = 8192  # tiles drawn per bag and epoch in training (all of them to score)
    positive: str | None = None
    held_out: Path | None = None  # a second labels CSV: these slides are the held-out fold (no random split)


def read_slide_labels(path: Path, positive: str | None = None) -> tuple[list[SlideLabel], list[str]]:
    """`slide_id,label[,patient]` rows; exactly two label values, the positive one `positive` (else the larger)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"slide_id", "label"} <= set(rows[0]):
        raise DataError(f"{path}: needs a header with slide_id and label (and optionally patient)")
    values = sorted({r["label"].strip() for r in rows})
    if len(values) != 2:
        raise DataError(f"{path}: a slide classifier needs exactly two label values, found {values}")
    if positive is not None and positive not in values:
        raise DataError(f"--positive {positive!r} is not a label of {path} ({values})")
    classes = [v for v in values if v != positive] + [positive] if positive else values
    labels = [
        SlideLabel(
            r["slide_id"].strip(), classes.index(r["label"].strip()), (r.get("patient") or r["slide_id"]).strip()
        )
        for r in rows
    ]
    return labels, classes


def embeddings_of(root: Path, slide_id: str, encoder: str) -> Path | None:
    """Our layout (<root>/<slide_id>/embeddings/<encoder>.zarr or .h5), or a TRIDENT / CLAM folder of <slide_id>.h5."""
    for candidate in (
        root / slide_id / "embeddings" / f"{encoder}.zarr",
        root / slide_id / "embeddings" / f"{encoder}.h5",
        root / f"{slide_id}.h5",
    ):
        if candidate.exists():
            return candidate
    return None


def load_bags(root: Path, labels: list[SlideLabel], encoder: str) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Every labelled slide's tile vectors; slides without embeddings are named (all of them, up to SHOWN)."""
    paths = {s.slide_id: embeddings_of(root, s.slide_id, encoder) for s in labels}
    missing = [s for s, p in paths.items() if p is None]
    if missing:
        shown = ", ".join(missing[:SHOWN]) + (f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else "")
        raise DataError(
            f"{root}: no {encoder} embeddings for {len(missing)} of {len(labels)} labelled slides: {shown}; embed "
            f"them (wsi-pipeline embed SLIDES -o {root} --encoder ...) or drop them from the labels"
        )
    bags, attrs = [], []
    for label in labels:
        path = paths[label.slide_id]
        assert path is not None
        features, _, meta = read_embeddings(path)
        if not len(features):
            raise DataError(f"{path}: no tiles (no tissue found?); drop {label.slide_id} from the labels")
        bags.append(features)
        attrs.append(meta)
    dims = {b.shape[1] for b in bags}
    if len(dims) != 1:
        raise DataError(f"{root}: embeddings of different lengths {sorted(dims)}: not one encoder's")
    return bags, attrs


def encoder_ref(name: str, attrs: dict[str, Any], dim: int) -> SlideEncoderRef:
    encoder = attrs.get("encoder") if isinstance(attrs.get("encoder"), dict) else {}
    mpp = float(attrs.get("mpp") or 10.0 / float(attrs.get("target_magnification", 20.0)))
    return SlideEncoderRef(
        name=name, dim=dim, mpp=mpp, tile_px=int(attrs.get("tile_px") or attrs.get("patch_size") or 224),
        weights_sha256=(encoder or {}).get("weights_sha256") or None,
    )  # fmt: skip


def train_slide_classifier(labels_csv: Path, root: Path, out: Path, s: SlideMilSettings) -> SlideModelCard:
    """Fit on the training slides (AdamW, one slide per step); a fifth of their patients (the tuning fold) chooses
    the epoch and the operating point (Youden); the held-out fold, never used to choose anything, gives the card's
    figures: ROC AUC with a bootstrap 95 % interval, sensitivity and specificity at that threshold."""
    started = time.perf_counter()
    labels, classes = read_slide_labels(labels_csv, s.positive)
    if s.held_out is not None:
        held, held_classes = read_slide_labels(s.held_out, s.positive)
        if held_classes != classes:
            raise DataError(f"{s.held_out}: labels {held_classes} differ from {labels_csv}'s {classes}")
        shared = {h.group for h in held} & {t.group for t in labels}
        if shared:
            raise DataError(f"{s.held_out} shares patients with {labels_csv} (e.g. {sorted(shared)[0]}): not held out")
        train, val = labels, held
        labels = [*labels, *held]
    else:
        train, val = split_by_group(labels, s.val_fraction, s.seed)
    bags, attrs = load_bags(root, labels, s.encoder)
    index = {label.slide_id: i for i, label in enumerate(labels)}
    try:
        fit, tune = split_by_group(train, TUNING_FRACTION, s.seed + 1)
    except DataError:  # too few patients of a class to spare: the last epoch and a 0.5 threshold
        fit, tune = train, []
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    dim = bags[0].shape[1]
    card = SlideModelCard(name=out.name, encoder=encoder_ref(s.encoder, attrs[0], dim), classes=classes)
    model = build_slide_model(card)
    standardise(model, [bags[index[f.slide_id]] for f in fit], rng)
    optimiser = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    best: tuple[tuple[float, float], int, dict[str, torch.Tensor]] = ((-1.0, 0.0), -1, {})
    history = []
    for epoch in range(s.epochs):
        model.train()
        losses = []
        for i in rng.permutation(len(fit)):
            bag = bags[index[fit[i].slide_id]]
            if len(bag) > s.max_tiles:
                bag = bag[rng.choice(len(bag), s.max_tiles, replace=False)]
            logits, _ = model(torch.from_numpy(bag))
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([fit[i].label]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        record: dict[str, float] = {"epoch": epoch, "loss": float(np.mean(losses))}
        if tune:
            scores = score_slides(model, [bags[index[t.slide_id]] for t in tune])
            auc = roc_auc([t.label for t in tune], scores)
            tune_loss = log_loss([t.label for t in tune], scores)
            record |= {"tune_auc": auc, "tune_loss": tune_loss}
        history.append(record)
        key = (auc, -tune_loss) if tune else (float(epoch), 0.0)
        if key > best[0]:  # the best tuning AUC; among equal ones (1.0 is often reached at once), the surest
            best = (key, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    threshold = 0.5
    if tune:
        threshold = youden_threshold(
            [t.label for t in tune], score_slides(model, [bags[index[t.slide_id]] for t in tune])
        )["threshold"]
    truth = np.asarray([v.label for v in val])
    held_scores = np.asarray(score_slides(model, [bags[index[v.slide_id]] for v in val]))
    auc, low, high = bootstrap_auc(truth, held_scores)
    called = held_scores >= threshold
    card = card.model_copy(
        update={
            "threshold": float(threshold),
            "metrics": {
                "validation": {
                    "roc_auc": auc,
                    "roc_auc_ci95": [low, high],
                    "threshold": float(threshold),
                    "sensitivity": float(called[truth == 1].mean()),
                    "specificity": float((~called[truth == 0]).mean()),
                },
                "selected_by": "tuning-fold ROC AUC, then log loss (best epoch); threshold: Youden's J on the "
                "tuning fold; figures: the held-out fold"
                if tune
                else "the last epoch (too few patients to tune on); threshold 0.5; figures: the held-out fold",
                "slides": {"train": len(fit), "tune": len(tune), "validation": len(val)},
            },
            "training": {
                "labels": str(labels_csv),
                "embeddings": str(root),
                "split": f"held-out labels {s.held_out}"
                if s.held_out
                else "by patient (the labels' patient column; each slide alone without one)",
                "train_slides": [t.slide_id for t in fit],
                "tune_slides": [t.slide_id for t in tune],
                "val_slides": [v.slide_id for v in val],
                "best_epoch": best[1],
                "history": history,
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()},
                "seconds": round(time.perf_counter() - started, 1),
                "command": command_line(),
            },
        }
    )
    save_slide_model(out, model, card)
    return card


STATS_ROWS = 200_000  # training tiles the standardisation is measured on (a sample of a large cohort)


def standardise(model: GatedAttentionMIL, bags: list[np.ndarray], rng: np.random.Generator) -> None:
    """Set the model's feature mean and spread from the training bags' tiles (a sample of at most STATS_ROWS)."""
    rows = np.concatenate(bags)
    if len(rows) > STATS_ROWS:
        rows = rows[rng.choice(len(rows), STATS_ROWS, replace=False)]
    model.feature_mean.copy_(torch.from_numpy(rows.mean(0)))
    model.feature_scale.copy_(torch.from_numpy(np.maximum(rows.std(0), 1e-6)))


def log_loss(labels: list[int], scores: list[float]) -> float:
    p = np.clip(np.asarray(scores, np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(labels)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def score_slides(model: torch.nn.Module, bags: list[np.ndarray]) -> list[float]:
    model.eval()
    return [slide_prediction(model, bag)[0] for bag in bags]  # type: ignore[arg-type]
