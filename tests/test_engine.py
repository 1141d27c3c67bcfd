"""Inference engine + heatmaps: seamless dense stitching, exact classifier maps, OME-Zarr, bad models, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import CMU
from wsi_pipeline.config import TissueConfig
from wsi_pipeline.engine import TaskRequest, predict_slide, resolve_device
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.heatmap import HeatmapGeometry, HeatmapWriter, open_heatmap
from wsi_pipeline.models import ModelCard, load_model, save_model
from wsi_pipeline.models.architectures import build, seeded
from wsi_pipeline.models.loading import ModelError
from wsi_pipeline.slide import Slide
from wsi_pipeline.tiling import plan_tiles
from wsi_pipeline.tissue import detect_tissue

CPU = torch.device("cpu")


def dense_model(tmp: Path, stride: int = 1, halo: int = 4, mpp: float = 0.499) -> Path:
    card = ModelCard(
        name=f"tiny-fcn-s{stride}",
        task="mitosis",
        kind="dense",
        architecture="tiny_fcn",
        architecture_args={"width": 8, "depth": 3, "stride": stride},
        mpp=mpp,
        tile_px=64,
        output_stride=stride,
        halo_px=halo,
        classes=["mitosis"],
        activation="sigmoid",
        normalisation={"mean": [0.8, 0.6, 0.7], "std": [0.2, 0.25, 0.2]},
    )
    module = seeded(build("tiny_fcn", 1, **card.architecture_args), seed=1)
    return save_model(tmp / card.name, module, card)


def classifier_model(tmp: Path, mpp: float = 0.998) -> Path:
    card = ModelCard(
        name="small-cnn",
        task="epithelium_stroma",
        kind="classifier",
        architecture="small_cnn",
        architecture_args={"width": 8},
        mpp=mpp,
        tile_px=32,
        classes=["epithelium", "stroma", "other"],
        heatmap_classes=["epithelium", "stroma"],
    )
    module = seeded(build("small_cnn", 3, width=8), seed=2).eval()
    return save_model(tmp / card.name, module, card)


@pytest.fixture(scope="module")
def cmu(data_dir: Path) -> tuple[Slide, object]:
    slide = Slide(CMU)
    return slide, detect_tissue(slide, TissueConfig())


def _reference_dense(slide: Slide, plan, model) -> np.ndarray:
    """The network run once on the whole grid region (what stitching must reproduce)."""
    tile, overlap = plan.params["tile_px"], plan.params["overlap_px"]
    n_cols, n_rows = plan.grid
    width, height = (n_cols - 1) * (tile - overlap) + tile, (n_rows - 1) * (tile - overlap) + tile
    rgb = slide.read_region(slide.bounds.x, slide.bounds.y, width, height, plan.params["mpp"])
    card = model.card
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(card.normalisation.mean).view(1, 3, 1, 1)) / torch.tensor(card.normalisation.std).view(
        1, 3, 1, 1
    )
    with torch.inference_mode():
        return torch.sigmoid(model.module(x))[0, 0].numpy()


@pytest.mark.parametrize(("tile_px", "stride"), [(64, 1), (128, 1), (96, 2)])
def test_dense_stitching_equals_whole_region(cmu, tmp_path: Path, tile_px: int, stride: int) -> None:
    slide, tissue = cmu
    model = load_model(dense_model(tmp_path, stride=stride), task="mitosis")
    plan = plan_tiles(slide, tissue, 0.499, tile_px, overlap_px=16, min_tissue=0.0)
    store = tmp_path / "heatmaps.zarr"
    predict_slide(
        slide,
        [TaskRequest("mitosis", model, plan, dtype="float32")],
        store,
        device=CPU,
        batch_size=16,
        workers=2,
        progress=False,
    )
    stitched = open_heatmap(store / "mitosis").channel("mitosis")
    reference = _reference_dense(slide, plan, model)
    assert stitched.shape == reference.shape
    assert np.abs(stitched - reference).max() <= 1e-4


def test_classifier_heatmap_is_one_value_per_tile(cmu, tmp_path: Path) -> None:
    slide, tissue = cmu
    model = load_model(classifier_model(tmp_path))
    plan = plan_tiles(slide, tissue, 0.998, 32, overlap_px=0, min_tissue=0.5)
    store = tmp_path / "heatmaps.zarr"
    predict_slide(
        slide,
        [TaskRequest("epithelium_stroma", model, plan, dtype="float32")],
        store,
        device=CPU,
        batch_size=64,
        workers=0,
        progress=False,
    )
    epi = open_heatmap(store / "epithelium").channel("epithelium")
    stroma = open_heatmap(store / "stroma").channel("stroma")
    assert not (store / "other").exists()
    assert epi.shape == (plan.grid[1], plan.grid[0])
    written = np.zeros(epi.shape, bool)
    for i in range(0, len(plan), 37):  # spot-check tiles against a direct forward pass
        rgb = slide.read_region(int(plan.x[i]), int(plan.y[i]), 32, 32, 0.998)
        x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.inference_mode():
            p = torch.softmax(model.module.cpu()(x), 1)[0].numpy()
        r, c = int(plan.rows[i]), int(plan.cols[i])
        assert epi[r, c] == pytest.approx(p[0], abs=1e-5) and stroma[r, c] == pytest.approx(p[1], abs=1e-5)
    written[plan.rows, plan.cols] = True
    total = epi + stroma
    assert np.all(total[written] > 0) and np.all(total[~written] == 0)  # no gaps, nothing outside the plan


def test_writer_bands_are_chunk_aligned_and_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    geometry = HeatmapGeometry(70, 45, 1.0, 0.0, (0.5, 0.5), (1.0, 1.0))
    writer = HeatmapWriter(tmp_path / "h.zarr", "x", ["x"], geometry, dtype="float32", chunk=16)
    canvas = np.zeros((70, 45), np.float32)
    for y in range(0, 70, 7):
        for x in range(0, 45, 9):
            block = rng.random((1, 7, 9), dtype=np.float32)
            writer.write(y, x, block)
            canvas[y : y + 7, x : x + 9] = block[0, : min(7, 70 - y), : min(9, 45 - x)]
        writer.advance(y + 7)
        if y + 7 >= 16:  # the band above the last chunk boundary is on disk: writing into it again is refused
            with pytest.raises(RuntimeError, match="already written"):
                writer.write((y + 7) // 16 * 16 - 1, 0, block)
    path = writer.close()
    heat = open_heatmap(path)
    assert np.array_equal(heat.channel("x"), canvas)
    assert [lv.shape for lv in heat.levels] == [(1, 70, 45), (1, 35, 22), (1, 17, 11), (1, 8, 5)]
    assert np.allclose(heat.channel("x", 1), canvas[:70, :44].reshape(35, 2, 22, 2).mean(axis=(1, 3)), atol=1e-6)


def test_ome_zarr_readers_open_it(cmu, tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    slide, tissue = cmu
    model = load_model(dense_model(tmp_path, stride=2, halo=4))
    plan = plan_tiles(slide, tissue, 0.499, 64, overlap_px=16, min_tissue=0.2)
    store = tmp_path / "heatmaps.zarr"
    predict_slide(slide, [TaskRequest("mitosis", model, plan)], store, device=CPU, workers=0, progress=False)
    nodes = list(Reader(parse_url(str(store / "mitosis")))())
    image = nodes[0]
    assert len(image.data) >= 3
    assert image.data[0].dtype == np.float16
    datasets = image.metadata["coordinateTransformations"]
    scales = [t[0]["scale"] for t in datasets]
    assert scales[0] == pytest.approx([1.0, 0.998, 0.998]) and scales[2] == pytest.approx([1.0, 3.992, 3.992])
    attrs = json.loads((store / "mitosis" / "zarr.json").read_text())["attributes"]
    assert attrs["ome"]["version"] == "0.5" and attrs["wsi_pipeline"]["complete"] is True
    assert zarr.open_group(str(store), mode="r")["mitosis"]["0"].chunks == (1, 512, 512)


def test_bad_models_fail_before_reading(cmu, tmp_path: Path) -> None:
    slide, tissue = cmu
    with pytest.raises(ModelError, match="not a epithelium_stroma model"):
        load_model(dense_model(tmp_path), task="epithelium_stroma")
    broken = dense_model(tmp_path / "b")
    (broken / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be read"):
        load_model(broken)
    mismatched = dense_model(tmp_path / "m")
    card = json.loads((mismatched / "model_card.json").read_text())
    card["architecture_args"]["width"] = 12
    (mismatched / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match architecture"):
        load_model(mismatched)
    model = load_model(dense_model(tmp_path / "h", halo=12))
    plan = plan_tiles(slide, tissue, 0.499, 64, overlap_px=16)
    with pytest.raises(ConfigError, match="needs at least 24"):
        predict_slide(
            slide, [TaskRequest("mitosis", model, plan)], tmp_path / "s.zarr", device=CPU, workers=0, progress=False
        )
    assert not (tmp_path / "s.zarr").exists()


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
