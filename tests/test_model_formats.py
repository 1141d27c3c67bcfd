"""The model-format seam: a format registered from this file alone (TorchScript here) runs through the engine and
writes the same heatmap as the same network in the built-in format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.helpers import CMU
from wsi_pipeline.engine import TaskRequest, predict_slide
from wsi_pipeline.heatmap import open_heatmap
from wsi_pipeline.models import LoadedModel, ModelCard, register_format
from wsi_pipeline.models.architectures import build, seeded
from wsi_pipeline.slide import Slide
from wsi_pipeline.tiling import plan_tiles
from wsi_pipeline.tissue import detect_tissue
from wsi_pipeline.tissue_config import TissueConfig


class ScriptedPredictor:
    """An adapter: a TorchScript module, fed as the card says (mean/std, softmax), no Python class needed."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        self.card = model.card
        self.scripted = torch.jit.script(model.module).to(device).eval()
        self.mean = torch.tensor(self.card.normalisation.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.card.normalisation.std, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = torch.softmax(self.scripted((batch.float() / 255 - self.mean) / self.std), dim=1).cpu()
        return {name: probs[:, i] for i, name in enumerate(self.card.classes) if name in self.card.written_classes}


def test_a_registered_format_runs_through_the_engine(data_dir: Path, tmp_path: Path) -> None:
    register_format("torchscript-test", ScriptedPredictor)
    card = ModelCard(
        name="seeded-colour",
        task="metastasis",
        kind="classifier",
        architecture="small_cnn",
        architecture_args={"width": 4, "blocks": 2},
        mpp=1.0,
        tile_px=64,
        classes=["normal", "tumour"],
    )
    module = seeded(build("small_cnn", 2, width=4, blocks=2), 3).eval()
    slide = Slide(CMU)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), 1.0, 64, 0, 0.2)
    maps = {}
    for fmt in ("torch", "torchscript-test"):
        model = LoadedModel(card, module, None, format=fmt)
        store = tmp_path / f"{fmt}.zarr"
        request = TaskRequest("metastasis", model, plan, dtype="float32")
        cpu = torch.device("cpu")
        predict_slide(slide, [request], store, device=cpu, batch_size=8, workers=0, progress=False, precision="fp32")
        maps[fmt] = open_heatmap(store / "tumour").channel("tumour")
    covered = maps["torch"] > 0
    assert covered.sum() == len(plan)  # one value per kept tile
    assert np.abs(maps["torch"] - maps["torchscript-test"]).max() < 1e-5
