"""`recompute_batchnorm` ("precise BN", torch's `swa_utils.update_bn`): after training, every BatchNorm holds the
average over batches of the un-augmented training tiles of its inputs' mean and (unbiased) variance, and the card's
validation figures are those of the recomputed model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import held_out_report, train_small_kather_model
from wsi_pipeline.models.architectures import build, seeded
from wsi_pipeline.training.loop import normalise, recompute_batchnorm

KATHER = ("epithelium_stroma", "kather2016")
CLASSES = ["--class", "epithelium=01_TUMOR,06_MUCOSA", "--class", "stroma=02_STROMA"]


def test_statistics_are_the_plain_moments_of_the_tiles(data_dir: Path) -> None:
    root = data_dir.joinpath(*KATHER)
    paths = [p for cls in ("01_TUMOR", "02_STROMA") for p in sorted((root / cls).iterdir())[:12]]
    tiles = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"))[:96, :96] for p in paths]))
    tiles = tiles.permute(0, 3, 1, 2).contiguous()
    model = seeded(build("small_cnn", 2, width=8, blocks=2), 3).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first.momentum = 0.3
    seen = recompute_batchnorm(model, DataLoader(TensorDataset(tiles), batch_size=6), torch.device("cpu"))
    assert seen == len(tiles) and not model.training and first.momentum == 0.3
    inputs: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda _module, args: inputs.append(args[0]))
    with torch.no_grad():
        model(normalise(tiles, torch.device("cpu")))  # eval: the first BatchNorm's inputs do not depend on it
    hook.remove()
    per_batch = inputs[0].reshape(4, 6, first.num_features, -1).transpose(1, 2).reshape(4, first.num_features, -1)
    assert torch.allclose(first.running_mean, per_batch.mean(2).mean(0), atol=1e-4)  # 4 batches of 6 tiles
    assert torch.allclose(first.running_var, per_batch.var(2, unbiased=True).mean(0), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))  # not the initial value


@pytest.mark.e2e
@pytest.mark.parametrize("averaged", [0, 2], ids=["last_epoch", "mean_of_two_epochs"])
def test_the_card_measures_the_recomputed_model(data_dir: Path, tmp_path: Path, averaged: int) -> None:
    """Also with `--average-epochs` (stochastic weight averaging, tests/test_weight_average.py), whose averaged
    weights need the new statistics."""
    kather = data_dir.joinpath(*KATHER)
    model = tmp_path / "model"
    card = train_small_kather_model(kather, model, "--recompute-batchnorm", "--average-epochs", str(averaged), epochs=3)
    assert card["training"]["batchnorm"]["recomputed_on_training_tiles"] == card["training"]["train_tiles"]
    assert set(card["training"]["batchnorm"]["validation_before"]) == {"balanced_accuracy", "roc_auc"}
    assert card["training"]["config"]["average_epochs"] == averaged
    selected = "mean of the weights of the last 2 epochs" if averaged else "last epoch"
    assert card["metrics"]["selected_by"] == selected
    report = held_out_report(model, [kather], CLASSES, "epithelium", tmp_path / "eval")
    assert report["roc_auc"]["value"] == pytest.approx(card["metrics"]["validation"]["roc_auc"], abs=1e-4)
