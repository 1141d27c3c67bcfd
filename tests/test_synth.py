"""The synthetic-slide generator writes real pyramidal Aperio TIFFs with exact, known content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from tests.helpers import run_cli
from wsi_pipeline.slide.synth import SynthSpec, read_truth, truth_path


def test_openslide_opens_it_as_aperio(synthetic_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = synthetic_slide
    osr = openslide.OpenSlide(str(path))
    assert osr.properties["openslide.vendor"] == "aperio"
    assert float(osr.properties["openslide.mpp-x"]) == spec.mpp
    assert osr.dimensions == (6000, 4000)
    assert [round(d) for d in osr.level_downsamples] == [1, 4, 16]
    assert "thumbnail" in osr.associated_images
    assert osr.properties["openslide.objective-power"] == "20"


def test_pixels_match_the_spec(synthetic_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = synthetic_slide
    osr = openslide.OpenSlide(str(path))

    def pixel(x: float, y: float, level: int = 0) -> np.ndarray:
        return np.asarray(osr.read_region((int(x), int(y)), level, (1, 1)).convert("RGB"))[0, 0].astype(int)

    assert (pixel(10, 10) == 255).all()  # glass
    hole = spec.holes[0]
    assert (pixel(hole.cx, hole.cy) == 255).all()  # inside the hole
    for f in spec.figures:
        r, g, b = pixel(f.x, f.y)
        assert r < 70 and g < 40 and b < 100, (f, (r, g, b))
    pen = spec.pen[0]
    r, g, b = pixel((pen.x0 + pen.x1) / 2, (pen.y0 + pen.y1) / 2)
    assert g > r + 50  # green ink
    # tissue reads as H&E: red and blue above green, on every level
    region = spec.regions[0]
    for level in range(3):
        r, g, b = pixel(region.cx + 200, region.cy + 200, level)
        assert r > g + 30 and b > g + 10 and r < 250


def test_truth_round_trip(synthetic_slide: tuple[Path, SynthSpec]) -> None:
    path, spec = synthetic_slide
    assert truth_path(path).exists()
    assert read_truth(path) == spec
    assert len(spec.figures) == 12
    assert spec.tissue_area_um2() == spec.tissue_geometry().area * 0.25


@pytest.mark.e2e
def test_synth_command(tmp_path: Path) -> None:
    out = tmp_path / "cli.svs"
    result = run_cli(
        "synth",
        str(out),
        "--width",
        "3000",
        "--height",
        "2000",
        "--mpp",
        "0.25",
        "--seed",
        "5",
        "--figures",
        "3",
        "--pen",
    )
    assert result.returncode == 0, result.stderr
    osr = openslide.OpenSlide(str(out))
    assert osr.dimensions == (3000, 2000) and float(osr.properties["openslide.mpp-x"]) == 0.25
    assert len(read_truth(out).figures) == 3
