"""A hand-set (not trained) dense model for demonstrations and tests: it responds to dark round objects such as the
figures the synthetic-slide generator plants, so a run on a synthetic slide has a known right answer."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch

from wsi_pipeline.models.architectures import build
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.loading import save_model


def figure_detector_card(mpp: float) -> ModelCard:
    return ModelCard(
        name="demo-dark-figure-detector",
        task="mitosis",
        kind="dense",
        architecture="tiny_fcn",
        architecture_args={"width": 1, "depth": 1, "stride": 1},
        mpp=mpp,
        tile_px=512,
        output_stride=1,
        halo_px=1,
        classes=["mitosis"],
        activation="sigmoid",
        normalisation={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        training={
            "data": "none: weights are set by hand",
            "purpose": "demonstrations and tests only; it marks "
            "any dark round object (mean RGB below ~0.35) and is not a mitosis model",
        },
        metrics={},
    )


def write_figure_detector(directory: str | Path, mpp: float) -> Path:
    card = figure_detector_card(mpp)
    # tiny_fcn of depth 1: 3x3 conv, ReLU, 1x1 conv head, in an nn.Sequential (`build` types any model nn.Module)
    module = cast(torch.nn.Sequential, build(card.architecture, 1, **card.architecture_args))
    first, last = cast(torch.nn.Conv2d, module[0]), cast(torch.nn.Conv2d, module[2])
    assert first.bias is not None and last.bias is not None  # both are built with a bias
    with torch.no_grad():
        first.weight.fill_(-1.0 / 27.0)  # minus the mean of a 3x3x3 neighbourhood in [0, 1]
        first.bias.fill_(0.5)  # positive where the neighbourhood is darker than mid-grey
        last.weight.fill_(40.0)
        last.bias.fill_(-6.0)  # figures (mean ~0.19) -> ~1.0; nuclei (~0.46) -> ~0.01; glass, eosin -> ~0.0
    return save_model(directory, module, card)


def write_tissue_classifier(directory: str | Path, task: str, classes: list[str], mpp: float, tile_px: int) -> Path:
    """A hand-set `colour_logistic` classifier whose first class fires on stained tiles (mean RGB well below white)
    and whose other classes stay low: on a synthetic slide its regions must reproduce the tissue."""
    card = ModelCard(
        name=f"demo-stain-classifier-{task}",
        task=task,
        kind="classifier",
        architecture="colour_logistic",
        mpp=mpp,
        tile_px=tile_px,
        classes=classes,
        activation="softmax" if len(classes) > 1 else "sigmoid",
        normalisation={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        training={"data": "none: weights are set by hand", "purpose": "tests and demonstrations only"},
    )
    # pool, flatten, linear, in an nn.Sequential (`build` types any model nn.Module)
    module = cast(torch.nn.Sequential, build("colour_logistic", len(classes)))
    linear = cast(torch.nn.Linear, module[2])
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0].fill_(-20.0 / 3)  # -20 x mean channel: darker than white -> class 0
        linear.bias[0] = 17.0  # mean channel 0.85 is the break-even point (white 1.0 -> -3, eosin ~0.77 -> +1.6)
    return save_model(directory, module, card)
