"""The conformance suite every slide reader backend must pass (as zarr-python tests every store).

Each check reads the same files through the backend under test and compares them with references independent of
every backend: tifffile's decode of the stored pyramid pages, and the generator's truth for a synthetic slide. A
subclass names its backend (`backend_name`, or a `backend` fixture that is parametrised over several) and may add
slides of its own (`more_slides`) or replace the synthetic pyramid and its reference (`pyramid_slide`,
`stored_levels`) for a format that is not a tiled TIFF. Geometry, µm/px and its source, stored pixels of every
level, regions at native and half resolution, position-consistent reads at any µm/px, a damaged tile, white outside
the image, pickling into spawned workers, concurrent reads from threads, and the errors for missing, cut and
non-slide files.
"""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tifffile

from wsi_pipeline.core.errors import SlideNotFoundError, SlideTruncatedError, SlideUnreadableError
from wsi_pipeline.slide import Slide, SlideReader
from wsi_pipeline.slide.synth import SynthSpec, default_layout, write_synthetic_slide
from wsi_pipeline.testing.files import damage_tile

GENERATOR_TILE_PX = 256  # the synthetic slide's stored tile size


def assert_same_pixels(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal within one grey level on at least 99.9 % of values (JPEG decoders may round chroma differently)."""
    assert got.shape == expected.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert (diff <= 1).mean() >= 0.999, f"max difference {diff.max()}, {(diff > 1).mean():.4%} of values > 1"


def _read_in_worker(slide: Slide) -> bytes:
    return slide.read_region(500, 500, 64, 64, 2 * slide.mpp.x).tobytes()


class ReaderConformance:
    """Subclass as `TestSomething(ReaderConformance)` in a test file; pytest collects the checks from there."""

    backend_name: ClassVar[str] = ""

    @pytest.fixture
    def backend(self) -> str:
        if not self.backend_name:
            pytest.fail("set backend_name (or override the backend fixture) in the conformance subclass")
        return self.backend_name

    @pytest.fixture(scope="class")
    @classmethod
    def pyramid_slide(cls, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSpec]:
        """A 5000 x 4000 px synthetic Aperio slide at 0.25 µm/px with three levels (YCbCr JPEG tiles)."""
        spec = default_layout(5000, 4000, 0.25, seed=2, n_figures=5, pen=True)
        return write_synthetic_slide(tmp_path_factory.mktemp("conformance") / "pyramid.svs", spec), spec

    @pytest.fixture
    def more_slides(self) -> list[Path]:
        """Real slides of the backend's format (tiled TIFFs, which `stored_levels` decodes) read beside the pyramid."""
        return []

    def stored_levels(self, path: Path) -> list[np.ndarray]:
        """Every pyramid level decoded by tifffile from the stored tiles (the reference)."""
        with tifffile.TiffFile(path) as tif:
            return [level.asarray() for level in tif.series[0].levels]

    def test_geometry_of_a_pyramid(self, pyramid_slide: tuple[Path, SynthSpec], backend: str) -> None:
        path, spec = pyramid_slide
        slide = Slide(path, backend=backend)
        assert isinstance(slide.reader, SlideReader) and slide.backend == backend
        levels = self.stored_levels(path)
        assert slide.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        assert slide.level_downsamples[0] == 1.0
        for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True):
            assert ds == pytest.approx(spec.width / w, rel=0.01) and ds == pytest.approx(spec.height / h, rel=0.01)
        assert slide.mpp.mean == pytest.approx(spec.mpp) and slide.mpp.source == "slide metadata"

    def test_every_level_reads_the_stored_pixels(
        self, pyramid_slide: tuple[Path, SynthSpec], more_slides: list[Path], backend: str
    ) -> None:
        for path in (*more_slides, pyramid_slide[0]):
            slide = Slide(path, backend=backend)
            for level, reference in enumerate(self.stored_levels(path)):
                ds = slide.level_downsamples[level]
                h, w = reference.shape[:2]
                # an interior crop (level px) where the downsample is whole; the corner where it is not (OpenSlide
                # places reads by level-0 px, and interpolates a level pixel that is not a whole level-0 pixel)
                x0, y0 = (w // 5 + 1, h // 7 + 3) if ds == int(ds) else (0, 0)
                width, height = min(300, w - x0), min(200, h - y0)
                got = slide.reader.read_level(x0, y0, level, width, height)
                assert_same_pixels(got, reference[y0 : y0 + height, x0 : x0 + width])

    def test_regions_at_native_and_half_resolution(
        self, pyramid_slide: tuple[Path, SynthSpec], more_slides: list[Path], backend: str
    ) -> None:
        """Through the facade: a region at the slide's µm/px is the stored pixels; at twice it, their 2 x 2 mean."""
        for path in (*more_slides, pyramid_slide[0]):
            slide = Slide(path, backend=backend)
            level0 = self.stored_levels(path)[0]
            mpp = slide.mpp.x
            assert_same_pixels(slide.read_region(400, 600, 256, 192, mpp), level0[600:792, 400:656])
            half = slide.read_region(400, 600, 128, 96, 2 * mpp)
            block = level0[600:792, 400:656].astype(np.float64).reshape(96, 2, 128, 2, 3).mean(axis=(1, 3))
            assert np.abs(half.astype(np.float64) - block).max() <= 1.0

    @pytest.mark.parametrize("factor", [1.0, 2.0, 1.996, 3.888, 0.5])
    def test_a_region_equals_the_same_pixels_of_a_larger_read(
        self, pyramid_slide: tuple[Path, SynthSpec], more_slides: list[Path], backend: str, factor: float
    ) -> None:
        """Position-consistent reads at any µm/px, from fractional level-0 corners: what dense stitching relies on."""
        for path in (*more_slides, pyramid_slide[0]):
            slide = Slide(path, backend=backend)
            mpp = slide.mpp.x * factor
            x, y = 301.3, 517.9
            larger = slide.read_region(x, y, 300, 240, mpp)
            region = slide.read_region(x + 37 * factor, y + 53 * factor, 100, 80, mpp)
            assert np.array_equal(region, larger[53:133, 37:137]), (path.name, factor)

    def test_a_damaged_stored_tile_is_exit_5(
        self, pyramid_slide: tuple[Path, SynthSpec], tmp_path: Path, backend: str
    ) -> None:
        damaged = tmp_path / "damaged.svs"
        col, row = damage_tile(pyramid_slide[0], damaged, 0, 25)
        slide = Slide(damaged, backend=backend)
        with pytest.raises(SlideTruncatedError) as err:
            slide.read_region(col * GENERATOR_TILE_PX + 5, row * GENERATOR_TILE_PX + 5, 32, 32, slide.mpp.x)
        assert err.value.exit_code == 5 and "damaged" in str(err.value)

    def test_outside_the_image_is_white(self, pyramid_slide: tuple[Path, SynthSpec], backend: str) -> None:
        slide = Slide(pyramid_slide[0], backend=backend)
        width, height = slide.level_dimensions[0]
        region = slide.reader.read_level(width - 120, height - 67, 0, 200, 100)
        assert (region[67:, :] == 255).all() and (region[:, 120:] == 255).all()
        inside = self.stored_levels(pyramid_slide[0])[0][height - 67 :, width - 120 :]
        assert_same_pixels(region[:67, :120], inside)  # and inside, the image

    def test_reader_travels_to_spawned_workers(self, pyramid_slide: tuple[Path, SynthSpec], backend: str) -> None:
        slide = Slide(pyramid_slide[0], backend=backend)
        expected = _read_in_worker(slide)
        again = pickle.loads(pickle.dumps(slide))
        assert again.backend == backend and again.dimensions == slide.dimensions
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.map(_read_in_worker, [slide, slide]) == [expected, expected]

    def test_concurrent_reads_from_threads_equal_serial_reads(
        self, pyramid_slide: tuple[Path, SynthSpec], backend: str
    ) -> None:
        """The engine reads tiles from several threads of one process (`engine.loader: threads`), first reads of a
        fresh handle included: a backend must return what serial reads return."""
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

    def test_missing_cut_and_non_slide_files_raise_the_same_errors(
        self, pyramid_slide: tuple[Path, SynthSpec], tmp_path: Path, backend: str
    ) -> None:
        with pytest.raises(SlideNotFoundError):
            Slide(tmp_path / "absent.svs", backend=backend)
        cut = tmp_path / "cut.svs"
        cut.write_bytes(pyramid_slide[0].read_bytes()[:1_000_000])
        with pytest.raises(SlideTruncatedError) as truncated:
            Slide(cut, backend=backend)
        assert truncated.value.exit_code == 5
        text = tmp_path / "notes.svs"
        text.write_text("not a slide\n")
        with pytest.raises(SlideUnreadableError) as unreadable:
            Slide(text, backend=backend)
        assert unreadable.value.exit_code == 4
