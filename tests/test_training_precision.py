"""`precision: bf16` (mixed-precision training): the forward pass runs in bf16 on channels-last tensors, the weights,
gradients and optimiser stay fp32, and the card's validation figures are those of the saved fp32 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from tests.helpers import KATHER_CLASSES, held_out_report, train_small_kather_model
from wsi_pipeline.training.loop import TrainConfig, build_model, normalise, run_epoch

CPU = torch.device("cpu")


class _Tiles(TensorDataset):
    epoch = 0  # run_epoch seeds augmentation through it


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_forward_pass_runs_in_the_asked_precision_on_fp32_weights(precision: str) -> None:
    cfg = TrainConfig(
        task="epithelium_stroma", classes=["a", "b"], architecture_args={"width": 4, "blocks": 2}, tile_px=32,
        batch_size=8, precision=precision,
    )  # fmt: skip
    model = build_model(cfg, 2, CPU)
    seen: list[tuple[torch.dtype, bool]] = []
    conv = model[0]
    conv.register_forward_hook(
        lambda _m, _i, out: seen.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))
    )
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (16,), generator=generator)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = conv.weight.detach().clone()

    def batch_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(normalise(batch[0], CPU)), batch[1])

    loss = run_epoch(_Tiles(tiles, labels), cfg, 0, optimiser, batch_loss, device=CPU, progress=False)
    assert seen == [(torch.bfloat16, True)] * 2 if precision == "bf16" else seen == [(torch.float32, False)] * 2
    assert loss > 0 and conv.weight.dtype == torch.float32 and not torch.equal(conv.weight, before)


def test_a_fp32_recipe_keeps_the_checkpoint_fingerprint_of_runs_made_before_the_setting() -> None:
    """A killed fp32 run of an earlier version resumes; a bf16 run is another configuration."""
    fp32 = TrainConfig(task="epithelium_stroma", classes=["a", "b"])
    assert "precision" not in json.loads(fp32.fingerprint())
    assert (
        json.loads(TrainConfig(task="epithelium_stroma", classes=["a", "b"], precision="bf16").fingerprint())[
            "precision"
        ]
        == "bf16"
    )


@pytest.mark.e2e
def test_a_bf16_trained_model_is_saved_in_fp32_and_its_card_measures_it(data_dir: Path, tmp_path: Path) -> None:
    kather = data_dir / "epithelium_stroma" / "kather2016"
    model = tmp_path / "model"
    card = train_small_kather_model(kather, model, "--precision", "bf16")
    assert card["training"]["config"]["precision"] == "bf16"
    weights = load_file(str(model / "weights.safetensors"))
    assert {tensor.dtype for name, tensor in weights.items() if "num_batches" not in name} == {torch.float32}
    # validation ran in fp32 on the saved weights: `evaluate` (the engine's path) measures the same
    report = held_out_report(model, [kather], KATHER_CLASSES, "epithelium", tmp_path / "eval")
    assert report["roc_auc"]["value"] == pytest.approx(card["metrics"]["validation"]["roc_auc"], abs=1e-4)
