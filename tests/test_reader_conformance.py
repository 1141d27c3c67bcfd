"""The conformance suite every slide reader backend must pass (as zarr-python tests every store).

Each test runs once per registered backend. The references are independent of every backend: tifffile decodes the
stored pyramid pages of the same file, and the generator's truth says what a synthetic slide is. A new backend is
registered, added nowhere here, and must pass all of it.
"""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import CMU, DICOM, TCGA, damage_tile
from wsi_pipeline.core.errors import MissingMppError, SlideNotFoundError, SlideTruncatedError, SlideUnreadableError
from wsi_pipeline.slide import Slide, SlideReader, backend_names
from wsi_pipeline.slide.synth import SynthSpec, default_layout, write_synthetic_slide

BACKENDS = backend_names()


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSpec]:
    """A 5000 x 4000 px synthetic Aperio slide at 0.25 µm/px with three levels (YCbCr JPEG tiles)."""
    spec = default_layout(5000, 4000, 0.25, seed=2, n_figures=5, pen=True)
    return write_synthetic_slide(tmp_path_factory.mktemp("conformance") / "pyramid.svs", spec), spec


def stored_levels(path: Path) -> list[np.ndarray]:
    """Every pyramid level decoded by tifffile from the stored tiles (the reference)."""
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def assert_same_pixels(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal within one grey level on at least 99.9 % of values (JPEG decoders may round chroma differently)."""
    assert got.shape == expected.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert (diff <= 1).mean() >= 0.999, f"max difference {diff.max()}, {(diff > 1).mean():.4%} of values > 1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_geometry_mpp_and_bounds_of_a_real_slide(data_dir: Path, backend: str) -> None:
    slide = Slide(CMU, backend=backend)
    assert isinstance(slide.reader, SlideReader) and slide.backend == backend
    assert slide.dimensions == (2220, 2967) and slide.level_count == 1 and slide.level_downsamples == (1.0,)
    assert slide.mpp.x == pytest.approx(0.499) and slide.mpp.source == "slide metadata"
    assert (slide.bounds.x, slide.bounds.y, slide.bounds.width, slide.bounds.height) == (0, 0, 2220, 2967)
    assert slide.vendor == "aperio" and slide.objective_power == 20.0
    assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)
    label = slide.reader.read_associated("label")
    assert label.dtype == np.uint8 and label.ndim == 3 and label.shape[2] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_geometry_of_a_pyramid(pyramid_slide: tuple[Path, SynthSpec], backend: str) -> None:
    path, spec = pyramid_slide
    slide = Slide(path, backend=backend)
    levels = stored_levels(path)
    assert slide.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
    assert slide.level_downsamples[0] == 1.0
    for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True):
        assert ds == pytest.approx(spec.width / w, rel=0.01) and ds == pytest.approx(spec.height / h, rel=0.01)
    assert slide.mpp.mean == pytest.approx(spec.mpp) and slide.mpp.source == "slide metadata"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_level_reads_the_stored_pixels(
    data_dir: Path, pyramid_slide: tuple[Path, SynthSpec], backend: str
) -> None:
    for path in (CMU, pyramid_slide[0]):
        slide = Slide(path, backend=backend)
        for level, reference in enumerate(stored_levels(path)):
            ds = slide.level_downsamples[level]
            h, w = reference.shape[:2]
            # an interior crop (level px) where the downsample is whole; the corner where it is not (OpenSlide
            # places reads by level-0 px, and interpolates a level pixel that is not a whole level-0 pixel)
            x0, y0 = (w // 5 + 1, h // 7 + 3) if ds == int(ds) else (0, 0)
            width, height = min(300, w - x0), min(200, h - y0)
            got = slide.reader.read_level(x0, y0, level, width, height)
            assert_same_pixels(got, reference[y0 : y0 + height, x0 : x0 + width])


@pytest.mark.parametrize("backend", BACKENDS)
def test_regions_at_native_and_half_resolution(
    data_dir: Path, pyramid_slide: tuple[Path, SynthSpec], backend: str
) -> None:
    """Through the facade: a region at the slide's µm/px is the stored pixels; at twice it, their 2 x 2 mean."""
    for path in (CMU, pyramid_slide[0]):
        slide = Slide(path, backend=backend)
        level0 = stored_levels(path)[0]
        mpp = slide.mpp.x
        assert_same_pixels(slide.read_region(400, 600, 256, 192, mpp), level0[600:792, 400:656])
        half = slide.read_region(400, 600, 128, 96, 2 * mpp)
        block = level0[600:792, 400:656].astype(np.float64).reshape(96, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(half.astype(np.float64) - block).max() <= 1.0


@pytest.mark.parametrize("factor", [1.0, 2.0, 1.996, 3.888, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_region_equals_the_same_pixels_of_a_larger_read(
    data_dir: Path, pyramid_slide: tuple[Path, SynthSpec], backend: str, factor: float
) -> None:
    """Position-consistent reads at any µm/px, from fractional level-0 corners: what dense stitching relies on."""
    for path in (CMU, pyramid_slide[0]):
        slide = Slide(path, backend=backend)
        mpp = slide.mpp.x * factor
        x, y = 301.3, 517.9
        larger = slide.read_region(x, y, 300, 240, mpp)
        region = slide.read_region(x + 37 * factor, y + 53 * factor, 100, 80, mpp)
        assert np.array_equal(region, larger[53:133, 37:137]), (path.name, factor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_stored_tile_is_exit_5(pyramid_slide: tuple[Path, SynthSpec], tmp_path: Path, backend: str) -> None:
    damaged = tmp_path / "damaged.svs"
    col, row = damage_tile(pyramid_slide[0], damaged, 0, 25)
    tile = 256  # the generator's tile size
    slide = Slide(damaged, backend=backend)
    with pytest.raises(SlideTruncatedError) as err:
        slide.read_region(col * tile + 5, row * tile + 5, 32, 32, slide.mpp.x)
    assert err.value.exit_code == 5 and "damaged" in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_the_image_is_white(data_dir: Path, backend: str) -> None:
    slide = Slide(CMU, backend=backend)
    region = slide.reader.read_level(2100, 2900, 0, 200, 100)
    assert (region[67:, :] == 255).all() and (region[:, 120:] == 255).all()


def _read_in_worker(slide: Slide) -> bytes:
    return slide.read_region(500, 500, 64, 64, 0.998).tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_travels_to_spawned_workers(data_dir: Path, backend: str) -> None:
    slide = Slide(CMU, backend=backend)
    expected = _read_in_worker(slide)
    again = pickle.loads(pickle.dumps(slide))
    assert again.backend == backend and again.dimensions == slide.dimensions
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(_read_in_worker, [slide, slide]) == [expected, expected]


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_reads_from_threads_equal_serial_reads(pyramid_slide: tuple[Path, SynthSpec], backend: str) -> None:
    """The engine reads tiles from several threads of one process (`engine.loader: threads`), first reads of a
    fresh handle included: a backend must return what serial reads return."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = pyramid_slide
    places = [(x, y, mpp) for mpp in (0.25, 0.972, 2.0) for x in range(0, 4600, 700) for y in range(0, 3600, 900)]
    serial = Slide(path, backend=backend)
    expected = [serial.read_region(x, y, 96, 96, mpp) for x, y, mpp in places]
    fresh = pickle.loads(pickle.dumps(Slide(path, backend=backend)))  # nothing opened yet in this copy
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda place: fresh.read_region(*place[:2], 96, 96, place[2]), places * 3))
    assert len(got) == 3 * len(places)
    for index, region in enumerate(got):
        assert np.array_equal(region, expected[index % len(places)]), places[index % len(places)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_raise_the_same_errors(data_dir: Path, tmp_path: Path, backend: str) -> None:
    with pytest.raises(SlideNotFoundError):
        Slide(tmp_path / "absent.svs", backend=backend)
    cut = tmp_path / "cut.svs"
    cut.write_bytes(CMU.read_bytes()[:1_000_000])
    with pytest.raises(SlideTruncatedError) as truncated:
        Slide(cut, backend=backend)
    assert truncated.value.exit_code == 5
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    for path in (text, DICOM):
        with pytest.raises(SlideUnreadableError) as unreadable:
            Slide(path, backend=backend)
        assert unreadable.value.exit_code == 4
    no_mpp = Slide(TCGA, backend=backend)
    assert no_mpp.mpp_or_none is None and no_mpp.level_count == 2
    with pytest.raises(MissingMppError) as missing:
        _ = no_mpp.mpp
    assert missing.value.exit_code == 6 and "--slide-mpp" in str(missing.value)
