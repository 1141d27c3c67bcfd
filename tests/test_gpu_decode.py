"""Stored JPEG tiles decoded by torchvision (nvJPEG on a GPU) equal the direct reader's CPU decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CMU
from wsi_pipeline.engine.gpu_decode import assemble_region, decode_jpeg_tiles
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide


def _region(slide: Slide, device: torch.device, x: int, y: int, w: int, h: int) -> np.ndarray:
    streams = slide.reader.jpeg_streams(0, x, y, w, h)  # type: ignore[attr-defined]
    tiles = decode_jpeg_tiles([s for _, _, s in streams], device)
    page = slide.reader._tif.series[0].levels[0].pages[0]  # type: ignore[attr-defined]
    placed = [(tx, ty, tile) for (tx, ty, _), tile in zip(streams, tiles, strict=True)]
    sizes = (int(page.tilewidth), int(page.tilelength)), slide.level_dimensions[0]
    region = assemble_region(placed, *sizes, x, y, w, h)
    return region.permute(1, 2, 0).cpu().numpy()


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[Slide]:
    synthetic = write_synthetic_slide(tmp_path_factory.mktemp("gpu") / "s.svs", default_layout(3000, 2000, 0.25))
    return [Slide(CMU, backend="tifffile"), Slide(synthetic, backend="tifffile")]  # JPEG RGB and JPEG YCbCr


def test_torchvision_decode_of_the_stored_streams_equals_the_reader(slides: list[Slide]) -> None:
    for slide in slides:
        for x, y, w, h in ((0, 0, 300, 200), (517, 333, 700, 500), (1900, 1800, 400, 400)):
            expected = slide.reader.read_level(x, y, 0, w, h)
            assert np.array_equal(_region(slide, torch.device("cpu"), x, y, w, h), expected), (slide.path.name, x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")
def test_nvjpeg_decode_matches_the_cpu(slides: list[Slide]) -> None:
    for slide in slides:
        gpu = _region(slide, torch.device("cuda"), 517, 333, 700, 500).astype(np.int16)
        cpu = slide.reader.read_level(517, 333, 0, 700, 500).astype(np.int16)
        assert (np.abs(gpu - cpu) <= 1).mean() >= 0.999  # nvJPEG's IDCT and chroma upsampling may round otherwise
