"""Metrics: ROC AUC (with a bootstrap interval), balanced accuracy, detection matching within a radius in µm, and
the CAMELYON16 lesion-level FROC. Inputs are plain arrays, so these know nothing of slides or models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.stats import rankdata

CAMELYON_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting one half
    (Mann-Whitney U from average ranks)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative examples")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auc(
    labels: np.ndarray, scores: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """AUC and its percentile bootstrap interval (resamples with one class only are drawn again)."""
    y, s = np.asarray(labels), np.asarray(scores)
    rng = np.random.default_rng(seed)
    values: list[float] = []
    while len(values) < n:
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            values.append(roc_auc(y[idx], s[idx]))
    low, high = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return roc_auc(y, s), float(low), float(high)


def youden_threshold(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, float]:
    """The operating point of a score that maximises Youden's J (sensitivity + specificity - 1, i.e. balanced
    accuracy), as a threshold halfway between the two scores it separates, with its sensitivity and specificity.
    Positives are labels == 1 and scores >= threshold."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        raise ValueError("an operating point needs positive and negative examples")
    values = np.unique(s)
    cuts = np.r_[values[0] - 1e-6, (values[:-1] + values[1:]) / 2, values[-1] + 1e-6]
    order = np.sort(s[y]), np.sort(s[~y])
    tpr = 1 - np.searchsorted(order[0], cuts, side="left") / y.sum()
    tnr = np.searchsorted(order[1], cuts, side="left") / (~y).sum()
    best = int(np.argmax(tpr + tnr))
    return {
        "threshold": float(np.clip(cuts[best], 0.0, 1.0)),
        "sensitivity": float(tpr[best]),
        "specificity": float(tnr[best]),
        "balanced_accuracy": float((tpr[best] + tnr[best]) / 2),
    }


def balanced_accuracy(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray) -> float:
    """Mean of per-class recall over the classes present in `labels`."""
    y, p = np.asarray(labels), np.asarray(predictions)
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


@dataclass
class DetectionScore:
    true_positives: int
    false_positives: int
    false_negatives: int
    matches: list[tuple[int, int]]  # (detection index, truth index)

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 0.0

    @property
    def recall(self) -> float:
        real = self.true_positives + self.false_negatives
        return self.true_positives / real if real else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def match_detections(detections: np.ndarray, truths: np.ndarray, radius: float) -> DetectionScore:
    """One-to-one matching of detection and truth points (same units, e.g. µm) within `radius`, with the most
    matches possible (Hungarian assignment; among those, the smallest total distance)."""
    det = np.asarray(detections, dtype=np.float64).reshape(-1, 2)
    tru = np.asarray(truths, dtype=np.float64).reshape(-1, 2)
    if not len(det) or not len(tru):
        return DetectionScore(0, len(det), len(tru), [])
    dist = cdist(det, tru)
    # A disallowed pair costs more than any set of allowed ones, so the assignment maximises the number of matches.
    forbidden = radius * (min(len(det), len(tru)) + 1) + 1.0
    cost = np.where(dist <= radius, dist, forbidden)
    rows, cols = linear_sum_assignment(cost)
    matches = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if dist[r, c] <= radius]
    tp = len(matches)
    return DetectionScore(tp, len(det) - tp, len(tru) - tp, matches)


@dataclass
class FrocSlide:
    """One slide's lesion candidates: probability and the lesion each lies in (0 = none, -1 = ignored region such
    as isolated tumour cells, which CAMELYON16 neither rewards nor penalises), and the number of lesions to find."""

    probabilities: np.ndarray
    lesion_ids: np.ndarray
    n_lesions: int


@dataclass
class Froc:
    fp_per_slide: np.ndarray
    sensitivity: np.ndarray
    sensitivity_at: dict[float, float]

    @property
    def score(self) -> float:
        """CAMELYON16's FROC score: mean sensitivity at 0.25, 0.5, 1, 2, 4 and 8 false positives per slide."""
        return float(np.mean(list(self.sensitivity_at.values())))


def froc(slides: Sequence[FrocSlide], fp_rates: Sequence[float] = CAMELYON_FP_RATES) -> Froc:
    """Lesion-level FROC as in CAMELYON16: a lesion is found when any candidate inside it passes the threshold (each
    lesion counts once); every candidate outside all lesions is a false positive."""
    total_lesions = sum(s.n_lesions for s in slides)
    if total_lesions == 0:
        raise ValueError("FROC needs at least one lesion")
    probs = np.concatenate([np.asarray(s.probabilities, np.float64) for s in slides]) if slides else np.zeros(0)
    lesion = np.concatenate([np.asarray(s.lesion_ids, np.int64) for s in slides]) if slides else np.zeros(0, int)
    slide_of = np.concatenate([np.full(len(s.probabilities), i) for i, s in enumerate(slides)]) if slides else lesion
    fps, sens = [0.0], [0.0]
    for threshold in np.unique(probs)[::-1]:
        chosen = probs >= threshold
        fp = int((chosen & (lesion == 0)).sum())
        hit = chosen & (lesion > 0)
        tp = len(set(zip(slide_of[hit].tolist(), lesion[hit].tolist(), strict=True)))
        fps.append(fp / len(slides))
        sens.append(tp / total_lesions)
    fp_arr, sens_arr = np.asarray(fps), np.asarray(sens)
    # CAMELYON16 interpolates sensitivity at each FP rate; np.interp needs increasing x, so each FP level keeps the
    # highest sensitivity reached at it (the last operating point with that many false positives).
    levels = np.unique(fp_arr)
    best = np.array([sens_arr[fp_arr == level].max() for level in levels])
    at = {float(r): float(np.interp(r, levels, best)) for r in fp_rates}
    return Froc(fp_arr, sens_arr, at)
