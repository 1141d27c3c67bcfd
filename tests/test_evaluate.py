"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.training.metrics import FrocSlide, balanced_accuracy, bootstrap_auc, froc, match_detections, roc_auc


def test_auc_hand_computed() -> None:
    # positives 0.9, 0.4; negatives 0.8, 0.1: pairs (0.9>0.8, 0.9>0.1, 0.4<0.8, 0.4>0.1) -> 3/4
    assert roc_auc([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1]) == 0.75
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])


def test_bootstrap_interval_contains_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(200)]
    s = np.r_[rng.normal(1, 1, 200), rng.normal(0, 1, 200)]
    auc, low, high = bootstrap_auc(y, s, n=300)
    assert low < auc < high and 0.7 < auc < 0.82 and high - low < 0.12  # true AUC Phi(1/sqrt 2) = 0.760


def test_balanced_accuracy() -> None:
    # class 0: 3 of 4 right; class 1: 1 of 2 right -> (0.75 + 0.5) / 2
    assert balanced_accuracy([0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]) == 0.625


def test_detection_matching_is_one_to_one_within_radius() -> None:
    truths = np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0]])
    dets = np.array([[1.0, 0.0], [9.0, 0.0], [5.0, 0.0], [50.0, 50.0]])
    score = match_detections(dets, truths, radius=7.5)
    # (1,0)->(0,0) and (9,0)->(10,0); (5,0) is within 7.5 of both but they are taken; (50,50) matches nothing
    assert (score.true_positives, score.false_positives, score.false_negatives) == (2, 2, 1)
    assert sorted(score.matches) == [(0, 0), (1, 1)]
    assert score.precision == 0.5 and score.recall == pytest.approx(2 / 3) and score.f1 == pytest.approx(4 / 7)
    # a greedy nearest match would pair (5,0) with (0,0) first and lose one: the assignment keeps the maximum
    tricky = match_detections(np.array([[5.0, 0.0], [-2.0, 0.0]]), np.array([[0.0, 0.0], [10.0, 0.0]]), 7.5)
    assert tricky.true_positives == 2
    assert match_detections(np.zeros((0, 2)), truths, 5).false_negatives == 3


def test_froc_hand_computed() -> None:
    # slide A: lesions 1 and 2; candidates 0.9 in lesion 1, 0.8 outside, 0.7 in lesion 1 again, 0.3 in lesion 2
    # slide B: no lesion; candidate 0.6 outside, 0.5 in an ignored region (-1)
    a = FrocSlide(np.array([0.9, 0.8, 0.7, 0.3]), np.array([1, 0, 1, 2]), n_lesions=2)
    b = FrocSlide(np.array([0.6, 0.5]), np.array([0, -1]), n_lesions=0)
    result = froc([a, b])
    # thresholds 0.9: tp 1 fp 0; 0.8: tp 1 fp 1; 0.7: 1,1; 0.6: 1,2; 0.5: 1,2; 0.3: 2,2 (fp per slide = fp / 2)
    assert result.fp_per_slide.tolist() == [0, 0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert result.sensitivity.tolist() == [0, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0]
    assert result.sensitivity_at[0.25] == 0.5 and result.sensitivity_at[8.0] == 1.0
    assert result.score == pytest.approx((0.5 + 0.5 + 1 + 1 + 1 + 1) / 6)
