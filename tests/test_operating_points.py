"""Operating points chosen on data: Youden's J for classifiers, best F1 (figure-free fields counted) for mitosis,
written into the card and used by tasks unless the configuration sets a threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.models import ModelCard, load_card
from wsi_pipeline.tasks import TaskConfig, TaskContext
from wsi_pipeline.training.classifier.train import classifier_operating_point
from wsi_pipeline.training.detector.evaluate import operating_point
from wsi_pipeline.training.metrics import youden_threshold


def test_youden_threshold_on_fixed_scores() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.9])
    point = youden_threshold(labels, scores)
    # cutting between 0.4 and 0.6 misses one positive (0.3) and calls no negative: J = 0.75 + 1 - 1 = 0.75;
    # cutting between 0.2 and 0.3 calls one negative (0.4): J = 1 + 0.75 - 1 = 0.75 too, and it comes first
    assert point["threshold"] == pytest.approx(0.25)
    assert point["sensitivity"] == 1.0 and point["specificity"] == 0.75
    assert point["balanced_accuracy"] == pytest.approx(0.875)
    with pytest.raises(ValueError, match="positive and negative"):
        youden_threshold([1, 1], [0.2, 0.3])


def test_classifier_point_is_on_the_first_class_and_its_complement_on_the_second() -> None:
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.35, 0.65], [0.2, 0.8]])
    labels = np.array([0, 0, 1, 1])  # label 0 = the first class (epithelium, tumour)
    thresholds, point = classifier_operating_point(probs, labels, ["epithelium", "stroma"])
    assert thresholds == {"epithelium": pytest.approx(0.525), "stroma": pytest.approx(0.475)}
    assert point["positive"] == "epithelium" and point["balanced_accuracy"] == 1.0
    assert classifier_operating_point(np.ones((2, 3)) / 3, np.array([0, 1]), ["a", "b", "c"]) == ({}, None)


def test_mitosis_point_is_the_best_f1_with_fields_and_the_lowest_of_equals() -> None:
    curve = [
        {"threshold": 0.2, "f1_with_fields": 0.80},
        {"threshold": 0.3, "f1_with_fields": 0.90},
        {"threshold": 0.4, "f1_with_fields": 0.90},
        {"threshold": 0.5, "f1_with_fields": 0.85},
    ]
    assert operating_point(curve)["threshold"] == 0.3


def test_tasks_use_the_cards_threshold_unless_one_is_configured(tmp_path: Path) -> None:
    card = ModelCard(
        name="m",
        task="metastasis",
        kind="classifier",
        architecture="small_cnn",
        mpp=1.0,
        tile_px=64,
        classes=["tumour", "normal"],
        thresholds={"tumour": 0.3, "normal": 0.7},
    )
    context = TaskContext("metastasis", "s", card, TaskConfig(), tmp_path, (1.0, 1.0), 1.0)
    assert context.threshold("tumour") == 0.3 and context.threshold_source() == "model card"
    configured = TaskContext("metastasis", "s", card, TaskConfig(threshold=0.6), tmp_path, (1.0, 1.0), 1.0)
    assert configured.threshold("tumour") == 0.6 and configured.threshold_source() == "configuration"
    assert card.model_copy(update={"thresholds": {}}).threshold("tumour") == 0.5  # no operating point: 0.5
    with pytest.raises(ValueError, match="thresholds must name classes"):
        ModelCard.model_validate({**card.model_dump(), "thresholds": {"lesion": 0.4}})


def test_every_shipped_card_carries_its_operating_point() -> None:
    from wsi_pipeline.models.folders import DEFAULTS_DIR

    for task in ("epithelium_stroma", "metastasis", "mitosis"):
        card = load_card(DEFAULTS_DIR / task)
        assert set(card.thresholds) <= set(card.classes) and card.thresholds, task
        point = card.metrics["operating_point"]
        assert point["threshold"] == card.thresholds[card.classes[0]], task
