"""Macenko stain normalisation: the same pixels as torchstain's reference implementation on real H&E tiles, tiles
without enough stain left alone, and a model whose card asks for it sees normalised tiles wherever it runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import KATHER_CLASSES, held_out_report, train_small_kather_model
from wsi_pipeline.models import ModelCard, PredictorOptions, load_model, make_predictor, save_model
from wsi_pipeline.models.architectures import build, seeded
from wsi_pipeline.models.stain import normalise_batch, normalise_tile

KATHER = ("epithelium_stroma", "kather2016")

FP32 = PredictorOptions(precision="fp32")


def kather_tiles(data_dir: Path, per_class: int = 4) -> list[np.ndarray]:
    root = data_dir.joinpath(*KATHER)
    paths = [p for cls in ("01_TUMOR", "02_STROMA", "06_MUCOSA") for p in sorted((root / cls).iterdir())[:per_class]]
    return [np.array(Image.open(p).convert("RGB"))[:96, :96] for p in paths]


def test_macenko_equals_torchstain_on_real_tiles(data_dir: Path) -> None:
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    reference = NumpyMacenkoNormalizer()
    for rgb in kather_tiles(data_dir):
        ours = normalise_tile(rgb).astype(int)
        theirs = reference.normalize(rgb, stains=False)[0].astype(int)
        assert np.abs(ours - theirs).max() <= 1
        assert np.abs(ours - rgb.astype(int)).mean() > 3  # it did change the tile


def test_normalisation_brings_two_stainings_of_one_tile_together(data_dir: Path) -> None:
    """The same tissue stained more heavily (every optical density x 1.3), and with more haematoxylin and less
    eosin (x 1.4 and x 0.7 in HED space, on tumour tiles, which hold both stains): after normalisation the two
    versions are far closer than before. (A tile of almost one stain, e.g. stroma with few nuclei, has no stable
    second stain vector of its own: docs/models.md says so.)"""
    from skimage.color import hed2rgb, rgb2hed

    tiles = kather_tiles(data_dir, per_class=2)
    for rgb in tiles:
        od = -np.log((rgb.astype(float) + 1) / 240)
        heavier = np.clip(240 * np.exp(-1.3 * od) - 1, 0, 255).astype(np.uint8)
        before = np.abs(rgb.astype(float) - heavier).mean()
        assert np.abs(normalise_tile(rgb).astype(float) - normalise_tile(heavier)).mean() < 0.25 * before
    for rgb in tiles[:2]:  # 01_TUMOR
        restained = (np.clip(hed2rgb(rgb2hed(rgb) * np.array([1.4, 0.7, 1.0])), 0, 1) * 255).astype(np.uint8)
        before = np.abs(rgb.astype(float) - restained).mean()
        assert np.abs(normalise_tile(rgb).astype(float) - normalise_tile(restained)).mean() < 0.5 * before


def test_tiles_without_enough_stain_are_left_alone() -> None:
    glass = np.full((64, 64, 3), 242, np.uint8)
    assert np.array_equal(normalise_tile(glass), glass)
    speck = glass.copy()
    speck[:4, :4] = (120, 60, 150)  # 16 stained px of 4096: too few to estimate two stains
    assert np.array_equal(normalise_tile(speck), speck)
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        normalise_tile(glass, "reinhard")


def test_a_card_with_stain_normalisation_makes_the_predictor_normalise(data_dir: Path, tmp_path: Path) -> None:
    tiles = np.stack(kather_tiles(data_dir, per_class=1))
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    module = seeded(build("small_cnn", 2, width=4, blocks=2), seed=1).eval()
    card = ModelCard(
        name="m", task="epithelium_stroma", kind="classifier", architecture="small_cnn",
        architecture_args={"width": 4, "blocks": 2}, mpp=0.495, tile_px=96, classes=["epithelium", "stroma"],
    )  # fmt: skip
    plain = make_predictor(load_model(save_model(tmp_path / "plain", module, card)), torch.device("cpu"), FP32)
    normed_card = card.model_copy(update={"stain_normalisation": "macenko"})
    normed = make_predictor(load_model(save_model(tmp_path / "n", module, normed_card)), torch.device("cpu"), FP32)
    expected = plain.probabilities(normalise_batch(batch, "macenko"))
    assert torch.equal(normed.probabilities(batch), expected)
    assert not torch.equal(plain.probabilities(batch), expected)


@pytest.mark.e2e
def test_train_with_stain_normalisation_and_evaluate_reproduces_its_validation(data_dir: Path, tmp_path: Path) -> None:
    """Training normalised its tiles; `evaluate` (through the predictor) must normalise them the same way, or the
    held-out AUC would differ from the card's."""
    kather = data_dir.joinpath(*KATHER)
    model = tmp_path / "model"
    card = train_small_kather_model(kather, model, "--stain-normalisation", "macenko")
    assert card["stain_normalisation"] == "macenko"
    report = held_out_report(model, [kather], KATHER_CLASSES, "epithelium", tmp_path / "eval")
    assert report["roc_auc"]["value"] == pytest.approx(card["metrics"]["validation"]["roc_auc"], abs=1e-4)
