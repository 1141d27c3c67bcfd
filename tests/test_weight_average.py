"""`average_epochs` (stochastic weight averaging): the trained model holds the mean of the last N epochs' weights,
also when the run was killed and resumed in the averaging phase; recipes that would average weights without new
BatchNorm statistics, or with a selected epoch, are refused. The card's figures measure the averaged model:
tests/test_batchnorm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.training.data.items import DataError
from wsi_pipeline.training.loop import TrainConfig, fit
from wsi_pipeline.training.settings import load_train_settings


class _Interrupted(Exception):
    pass


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _fit(model: nn.Module, out: Path, ends: dict[int, dict[str, torch.Tensor]], stop_at: int | None = None) -> None:
    """Four epochs of a deterministic step; `ends` collects each epoch's final weights."""
    cfg = TrainConfig(
        task="epithelium_stroma", classes=["a", "b"], epochs=4, select="last", recompute_batchnorm=True,
        average_epochs=2, lr=0.1,
    )  # fmt: skip
    inputs = torch.linspace(-1, 1, 24).reshape(8, 3)

    def train_epoch(epoch: int, optimiser: torch.optim.Optimizer) -> float:
        if epoch == stop_at:
            raise _Interrupted
        optimiser.zero_grad()
        loss = model(inputs * (epoch + 1)).square().mean()
        loss.backward()
        optimiser.step()
        ends[epoch + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return float(loss)

    fit(model, cfg, out, device=torch.device("cpu"), train_epoch=train_epoch, validate=lambda: {"m": 0.0}, watched="m")


def test_the_model_is_the_mean_of_the_last_epochs_also_after_a_resume(tmp_path: Path) -> None:
    ends: dict[int, dict[str, torch.Tensor]] = {}
    straight = _model()
    _fit(straight, tmp_path / "straight", ends)
    weights = straight.state_dict()
    for key, value in weights.items():
        if value.is_floating_point():
            assert torch.allclose(value, (ends[3][key] + ends[4][key]) / 2, atol=1e-6), key
        else:  # BatchNorm's batch counter: the latest
            assert torch.equal(value, ends[4][key])
    assert not torch.allclose(weights["0.weight"], ends[4]["0.weight"])  # the epochs differ: a mean, not the last

    resumed_ends: dict[int, dict[str, torch.Tensor]] = {}
    with pytest.raises(_Interrupted):  # killed after epoch 3, the first averaged one
        _fit(_model(), tmp_path / "resumed", resumed_ends, stop_at=3)
    resumed = _model()
    _fit(resumed, tmp_path / "resumed", resumed_ends)
    assert set(resumed_ends) == {1, 2, 3, 4}
    for key, value in resumed.state_dict().items():
        assert torch.allclose(value.float(), weights[key].float(), atol=1e-6), key


def test_averaging_needs_the_last_epoch_and_new_batchnorm_statistics(tmp_path: Path) -> None:
    base = {"tile_px": 96, "mpp": 0.5, "epochs": 4, "average_epochs": 2}
    for wrong, words in [
        ({"select": "best", "recompute_batchnorm": True}, "select: last"),
        ({"select": "last"}, "recompute_batchnorm"),
        ({"select": "last", "recompute_batchnorm": True, "average_epochs": 5}, "more than epochs 4"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_train_settings("metastasis", None, (), {**base, **wrong})
    cfg = TrainConfig(task="metastasis", classes=["a", "b"], epochs=4, select="last", average_epochs=2)
    with pytest.raises(DataError, match="recompute_batchnorm"):  # the loop refuses it too (a TrainConfig by hand)
        fit(_model(), cfg, tmp_path, device=torch.device("cpu"), train_epoch=lambda *_: 0.0, validate=dict,
            watched="m")  # fmt: skip
