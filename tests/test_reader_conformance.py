"""Every registered backend through the conformance suite the package ships (`wsi_pipeline.testing`, as a
third-party backend runs it), with the real slides of ../shared beside the synthetic pyramid, and the checks only
real files allow: a real slide's geometry and associated images, a file with no µm/px, a DICOM no backend reads.
A new backend is registered, added nowhere here, and must pass all of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CMU, DICOM, TCGA
from wsi_pipeline.core.errors import MissingMppError, SlideTruncatedError, SlideUnreadableError
from wsi_pipeline.slide import Slide, SlideReader, backend_names
from wsi_pipeline.slide.backends.tifffile_direct import TiffDirectReader
from wsi_pipeline.slide.reader import register_backend, unregister_backend
from wsi_pipeline.testing import ReaderConformance

BACKENDS = backend_names()


class TestEveryBackend(ReaderConformance):
    @pytest.fixture(params=BACKENDS)
    def backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def more_slides(self, data_dir: Path) -> list[Path]:
        return [CMU]


class ThirdPartyReader(TiffDirectReader):
    """A backend of a plugin's own: here the direct reader under another name."""

    backend = "third_party"


class TestAThirdPartyBackend(ReaderConformance):
    """What a plugin's test file holds: a backend registered under its own name runs the suite with one import and
    one attribute. It accepts no file by itself, so `auto` never picks it in other tests of this process."""

    backend_name = "third_party"

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _registered(cls) -> Iterator[None]:
        register_backend(cls.backend_name, ThirdPartyReader, accepts=lambda path: False, priority=-100)
        yield
        unregister_backend(cls.backend_name)


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
def test_real_files_raise_the_same_errors(data_dir: Path, tmp_path: Path, backend: str) -> None:
    cut = tmp_path / "cut.svs"
    cut.write_bytes(CMU.read_bytes()[:1_000_000])
    with pytest.raises(SlideTruncatedError) as truncated:
        Slide(cut, backend=backend)
    assert truncated.value.exit_code == 5
    with pytest.raises(SlideUnreadableError) as unreadable:
        Slide(DICOM, backend=backend)
    assert unreadable.value.exit_code == 4
    no_mpp = Slide(TCGA, backend=backend)
    assert no_mpp.mpp_or_none is None and no_mpp.level_count == 2
    with pytest.raises(MissingMppError) as missing:
        _ = no_mpp.mpp
    assert missing.value.exit_code == 6 and "--slide-mpp" in str(missing.value)
