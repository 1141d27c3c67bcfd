"""Opening real slides, µm/px with its source, bad input, and region reads at a target µm/px."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import openslide
import pytest

from tests.helpers import CMU, DICOM, NDPI, TCGA
from wsi_pipeline.core.errors import MissingMppError, SlideNotFoundError, SlideTruncatedError, SlideUnreadableError
from wsi_pipeline.slide import Slide, slide_id_for
from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide


def test_aperio_svs_geometry_and_mpp(data_dir: Path) -> None:
    s = Slide(CMU)
    info = s.info()
    assert info["dimensions"] == [2220, 2967]
    assert info["level_count"] == 1
    assert info["vendor"] == "aperio"
    assert info["mpp"] == {"x": 0.499, "y": 0.499, "source": "slide metadata"}
    assert info["objective_power"] == 20.0
    assert info["bounds"] == {"x": 0, "y": 0, "width": 2220, "height": 2967}
    assert info["associated_images"] == ["label", "macro", "thumbnail"]


def test_ndpi_levels_and_mpp_from_resolution_tags(data_dir: Path) -> None:
    s = Slide(NDPI)
    assert s.vendor == "hamamatsu"
    assert s.level_count == 7
    assert s.level_downsamples == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    assert s.dimensions == (3968, 4864)
    # 43826 px per cm in the TIFF tags
    assert s.mpp.x == pytest.approx(1e4 / 43826, rel=1e-9)
    assert s.mpp.source == "TIFF resolution tags"


def test_slide_without_mpp_needs_an_override(data_dir: Path) -> None:
    s = Slide(TCGA)
    assert s.mpp_or_none is None
    with pytest.raises(MissingMppError, match="--slide-mpp") as err:
        _ = s.mpp
    assert err.value.exit_code == 6
    s2 = Slide(TCGA, mpp=1.0)
    assert (s2.mpp.x, s2.mpp.source) == (1.0, "--mpp")
    assert s2.level_downsamples[1] == pytest.approx(2.0005055, rel=1e-6)


def test_mpp_from_tiff_tags_only_and_none(tmp_path: Path) -> None:
    spec = default_layout(1200, 900, 0.5)
    tags = Slide(write_synthetic_slide(tmp_path / "tags.svs", spec, record_mpp="tiff-tags"))
    assert (tags.mpp.x, tags.mpp.source) == (pytest.approx(0.5), "TIFF resolution tags")
    none = Slide(write_synthetic_slide(tmp_path / "none.svs", spec, record_mpp="none"))
    assert none.mpp_or_none is None


def test_missing_and_unreadable_files(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError) as err:
        Slide(tmp_path / "absent.svs")
    assert err.value.exit_code == 3
    with pytest.raises(SlideUnreadableError, match="OpenSlide cannot read") as err2:
        Slide(DICOM)
    assert err2.value.exit_code == 4
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(SlideUnreadableError, match="does not recognise"):
        Slide(text)


@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.999])
def test_truncated_real_slide_is_reported(data_dir: Path, tmp_path: Path, fraction: float) -> None:
    data = CMU.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideTruncatedError, match="truncated") as err:
        Slide(cut)
    assert err.value.exit_code == 5


def test_truncated_synthetic_slide_whose_directories_survive(tmp_path: Path) -> None:
    """tifffile writes each directory after its tiles: cutting the last tiles of the last level leaves valid
    directories pointing past the end of the file."""
    path = write_synthetic_slide(tmp_path / "s.svs", default_layout(3000, 2000, 0.5))
    data = path.read_bytes()
    path.write_bytes(data[:-2000])
    with pytest.raises(SlideTruncatedError):
        Slide(path)


def test_read_at_native_mpp_equals_openslide(data_dir: Path) -> None:
    s = Slide(CMU)
    region = s.read_region(321, 654, 300, 200, 0.499)
    ref = np.asarray(openslide.OpenSlide(str(CMU)).read_region((321, 654), 0, (300, 200)).convert("RGB"))
    assert region.dtype == np.uint8 and region.shape == (200, 300, 3)
    assert np.array_equal(region, ref)


def test_read_at_half_resolution_is_area_average(data_dir: Path) -> None:
    s = Slide(CMU)
    region = s.read_region(100, 100, 150, 120, 0.998)
    full = np.asarray(openslide.OpenSlide(str(CMU)).read_region((100, 100), 0, (300, 240)).convert("RGB"))
    ref = full.astype(np.float64).reshape(120, 2, 150, 2, 3).mean(axis=(1, 3))
    assert np.abs(region.astype(np.float64) - ref).max() <= 0.5  # the mean, correctly rounded


def test_block_reads_match_one_resize(data_dir: Path) -> None:
    """Regions taller than one read block are stitched without a seam."""
    s = Slide(CMU)
    region = s.read_region(0, 0, 700, 1400, 0.998)  # 3 blocks of output rows (512 each), 2800 level-0 rows
    full = openslide.OpenSlide(str(CMU)).read_region((0, 0), 0, (1400, 2800)).convert("RGB")
    assert np.array_equal(region, np.asarray(full.reduce(2)))
    # a non-integral factor (x 7/3): every block is the exact area mean of the whole, correctly rounded (at 3x, each
    # output pixel is a 7 x 7 block: an independent reference)
    region = s.read_region(0, 0, 600, 1200, 0.499 * 1400 / 600)
    tripled = np.repeat(np.repeat(np.asarray(full, np.float64), 3, axis=0), 3, axis=1)
    exact = tripled.reshape(1200, 7, 600, 7, 3).mean(axis=(1, 3))
    assert np.abs(region - exact).max() <= 0.5 + 1e-4


def test_best_level_and_downsampled_read_from_pyramid(data_dir: Path) -> None:
    s = Slide(TCGA, mpp=1.0)
    assert s.best_level(1.0) == 0
    assert s.best_level(2.0) == 1  # 2.0005 is within the 1 % slack
    assert s.best_level(1.9) == 0
    region = s.read_region(1000, 1000, 64, 64, 2.0)
    level1 = np.asarray(openslide.OpenSlide(str(TCGA)).read_region((1000, 1000), 1, (64, 64)).convert("RGB"))
    assert np.abs(region.astype(int) - level1.astype(int)).mean() < 2.0


def test_out_of_bounds_is_white(data_dir: Path) -> None:
    s = Slide(CMU)
    region = s.read_region(2100, 2900, 200, 150, 0.499)
    assert (region[67:, :] == 255).all() and (region[:, 120:] == 255).all()
    assert (region[:60, :110] != 255).any()


def _read_in_worker(slide: Slide) -> bytes:
    return slide.read_region(500, 500, 64, 64, 0.998).tobytes()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_slide_handle_is_reopened_in_worker_processes(data_dir: Path, method: str) -> None:
    s = Slide(CMU, backend="openslide")  # the OpenSlide handle; every backend: tests/test_reader_conformance.py
    expected = s.read_region(500, 500, 64, 64, 0.998).tobytes()  # parent handle opened before the fork
    state = pickle.loads(pickle.dumps(s))
    assert state.reader._handle is None  # the backend handle does not travel
    with multiprocessing.get_context(method).Pool(2) as pool:
        results = pool.map(_read_in_worker, [s, s, s])
    assert all(r == expected for r in results)


def test_slide_id_is_filesystem_safe() -> None:
    assert slide_id_for("/a/b/TCGA-CR-7395-01A-01-TS1.svs") == "TCGA-CR-7395-01A-01-TS1"
    assert slide_id_for("x/slide name (copy).ome.tiff") == "slide_name_copy_.ome"
    assert slide_id_for("/x/..svs") == "slide"
