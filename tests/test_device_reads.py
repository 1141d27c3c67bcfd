"""Tiles decoded and resampled on the model's device (`engine.decode: device`) equal the CPU loader's tiles: on the
CPU (torchvision's libjpeg-turbo) pixel for pixel for a copy and a whole-pixel mean, and for exact area means on all
but a few values in a million, which are 1 off (the same fp32 weights summed in another order land on the other side
of a rounding edge); on CUDA (nvJPEG) within one grey level (skips without a GPU). Plans the path cannot serve fall
back to the CPU loader."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from tests.helpers import CMU, NDPI, damage_tile
from wsi_pipeline.core.errors import SlideTruncatedError
from wsi_pipeline.engine import make_loader
from wsi_pipeline.engine.device_reads import DeviceTileReads, device_read_refusal
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide
from wsi_pipeline.slide.tiling import TilePlan, plan_tiles
from wsi_pipeline.slide.tissue import detect_tissue
from wsi_pipeline.slide.tissue_config import TissueConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("dev") / "s.svs", default_layout(4000, 3000, 0.25, seed=3))


def _plan(slide: Slide, mpp: float, tile: int, limit: int = 40) -> TilePlan:
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), mpp, tile, 0, 0.1)
    for name in ("cols", "rows", "x", "y", "tissue_fraction"):
        setattr(plan, name, getattr(plan, name)[:limit])
    return plan


def _all(loader) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    pairs = [(i.numpy(), t.cpu().numpy()) for i, t in loader]
    return np.concatenate([i for i, _ in pairs]), np.concatenate([t for _, t in pairs])


@pytest.mark.parametrize(
    ("which", "mpp", "tile", "mode"),
    [("synthetic", 0.25, 128, "copy"), ("synthetic", 0.5, 96, "reduce"), ("synthetic", 0.972, 96, "area"),
     ("cmu", 0.5, 128, "area"), ("cmu", 0.998, 64, "reduce")],
)  # fmt: skip
def test_device_reads_equal_the_cpu_loader(data_dir: Path, synthetic: Path, which: str, mpp: float, tile: int,
                                           mode: str) -> None:  # fmt: skip
    slide = Slide(synthetic if which == "synthetic" else CMU, backend="tifffile")
    plan = _plan(slide, mpp, tile)
    assert len(plan) >= 10 and device_read_refusal(slide, plan) is None
    assert slide.region_blocks(float(plan.x[0]), float(plan.y[0]), tile, tile, mpp)[0].mode == mode
    loader = make_loader(slide, plan, 7, 0, CPU, decode="device")
    assert isinstance(loader, DeviceTileReads)
    indices, tiles = _all(loader)
    expected_indices, expected = _all(make_loader(slide, plan, 7, 2, CPU))
    assert np.array_equal(indices, expected_indices) and tiles.shape == (len(plan), 3, tile, tile)
    diff = np.abs(tiles.astype(np.int16) - expected.astype(np.int16))
    if mode == "area":
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-5, (int(diff.max()), float((diff > 0).mean()))
    else:
        assert diff.max() == 0


def test_plans_the_device_path_cannot_serve_fall_back_with_one_line(
    data_dir: Path, synthetic: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ndpi = Slide(NDPI)  # read by OpenSlide: no stored JPEG streams
    assert "gives no stored JPEG tiles" in str(device_read_refusal(ndpi, _plan(ndpi, 2.0, 64)))
    slide = Slide(synthetic, backend="tifffile")
    enlarging = _plan(slide, 0.2, 64)
    assert "enlarges" in str(device_read_refusal(slide, enlarging))
    with caplog.at_level(logging.INFO, logger="wsi_pipeline.engine"):
        loader = make_loader(slide, enlarging, 8, 0, CPU, decode="device")
    assert not isinstance(loader, DeviceTileReads)
    expected = f"{slide.slide_id}: tiles decoded on the CPU (the plan enlarges the slide (bicubic on the CPU))"
    assert [r.getMessage() for r in caplog.records] == [expected]
    assert "span 2 resampling blocks" in str(device_read_refusal(slide, _plan(slide, 0.25, 600)))


def test_a_torchvision_without_its_jpeg_decoder_falls_back(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision deprecated its image decoders in 0.29 (for TorchCodec); a release without them is simulated."""
    from wsi_pipeline.engine import gpu_decode

    slide = Slide(synthetic, backend="tifffile")
    plan = _plan(slide, 0.5, 96)
    _, expected = _all(make_loader(slide, plan, 8, 0, CPU))
    monkeypatch.setattr(gpu_decode, "decode_jpeg", None)
    assert f"torchvision {torchvision.__version__} has no io.decode_jpeg" in str(device_read_refusal(slide, plan))
    loader = make_loader(slide, plan, 8, 0, CPU, decode="device")
    assert not isinstance(loader, DeviceTileReads)
    assert np.array_equal(_all(loader)[1], expected)


def test_a_damaged_stored_tile_fails_the_read(data_dir: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.svs"
    tx, ty = damage_tile(CMU, damaged, 0, 20)
    slide = Slide(damaged, backend="tifffile")
    plan = plan_tiles(slide, detect_tissue(Slide(CMU), TissueConfig()), slide.mpp.x, 240, 0, 0.0)
    with pytest.raises(SlideTruncatedError) as err:
        _all(make_loader(slide, plan, 64, 0, CPU, decode="device"))
    assert err.value.exit_code == 5 and f"stored tile ({tx}, {ty}) of level 0 cannot be decoded" in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")
def test_nvjpeg_reads_match_the_cpu_loader(data_dir: Path, synthetic: Path) -> None:
    for path, mpp, tile in ((synthetic, 0.5, 224), (CMU, 0.5, 224), (synthetic, 0.972, 96)):
        slide = Slide(path, backend="tifffile")
        plan = _plan(slide, mpp, tile)
        _, gpu = _all(make_loader(slide, plan, 16, 0, torch.device("cuda"), decode="device"))
        _, cpu = _all(make_loader(slide, plan, 16, 0, CPU))
        diff = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
        assert (diff <= 1).mean() >= 0.999, (path.name, mpp, int(diff.max()))


def test_predict_with_device_decode_writes_the_same_heatmap(data_dir: Path, tmp_path: Path) -> None:
    from wsi_pipeline.config import load_config
    from wsi_pipeline.heatmap import open_heatmap
    from wsi_pipeline.run.settings import engine_options
    from wsi_pipeline.run.stages import predict_stage

    maps = []
    for decode in ("cpu", "device"):
        config = load_config(None, [f"engine.decode={decode}", "engine.precision=fp32"])
        with Slide(CMU) as slide:
            batch = config.task("metastasis").batch_size
            engine = engine_options(config, device="auto", workers=1, batch_size=batch, progress=False)
            result = predict_stage(slide, config, "metastasis", tmp_path / decode, engine, model_path=None)
        maps.append(open_heatmap(result["store"] / "tumour").channel("tumour"))
    assert result["tiles"] > 50 and maps[0].shape == maps[1].shape and float(maps[0].max()) > 0.1
    assert float(np.abs(maps[0] - maps[1]).max()) < 0.01  # a few pixels 1 grey level off move no tile further
