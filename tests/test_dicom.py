"""DICOM WSI, as hospitals store slides: CMU-1-Small-Region and a three-level synthetic pyramid converted to standard
DICOM WSI series by wsidicomizer (the JPEG tiles carried over unchanged), read by every backend that takes them and
run as slides. The only DICOM in ../shared is non-standard and unreadable (test_reader_conformance.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from tests.helpers import CMU, run_cli
from wsi_pipeline.core.errors import SlideUnreadableError
from wsi_pipeline.run.inputs import assign_ids, discover
from wsi_pipeline.slide import Slide, backend_names
from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide
from wsi_pipeline.testing import ReaderConformance


def _to_dicom(slide: Path, folder: Path) -> Path:
    from wsidicomizer import WsiDicomizer

    folder.mkdir(parents=True)
    WsiDicomizer.convert(str(slide), output_path=str(folder))
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, tuple[Path, Path]]:
    """{name: (source slide, its DICOM series folder)}."""
    root = tmp_path_factory.mktemp("dicom")
    pyramid = write_synthetic_slide(root / "pyramid.svs", default_layout(5000, 4000, 0.25, seed=2, n_figures=5))
    return {
        "cmu": (CMU, _to_dicom(CMU, root / "series" / "CMU-1-Small-Region-dicom")),
        "pyramid": (pyramid, _to_dicom(pyramid, root / "pyramid-dicom")),
    }


class TestDicomSeriesThroughTheConformanceSuite(ReaderConformance):
    """The package's reader conformance suite with both series among its slides, for the backend that claims
    DICOM (OpenSlide): their stored pixels are those of the Aperio files they were converted from."""

    backend_name = "openslide"
    sources: ClassVar[dict[Path, Path]] = {}

    @pytest.fixture
    def more_slides(self, converted: dict[str, tuple[Path, Path]]) -> list[Path]:
        type(self).sources = {series: source for source, series in converted.values()}
        return list(self.sources)

    def stored_levels(self, path: Path) -> list[np.ndarray]:
        return super().stored_levels(self.sources.get(path, path))


def test_every_backend_that_takes_a_series_reads_the_pixels_it_was_converted_from(
    converted: dict[str, tuple[Path, Path]],
) -> None:
    readers = []
    for backend in backend_names():
        for source, series in converted.values():
            try:
                dicom = Slide(series, backend=backend)
            except SlideUnreadableError:
                continue  # a backend that does not claim DICOM says so in one line (exit 4)
            readers.append(backend)
            original = Slide(source)
            assert dicom.level_dimensions == original.level_dimensions and dicom.mpp.x == pytest.approx(original.mpp.x)
            for mpp in (original.mpp.x, 0.5, 0.972, 1.996, 8.0):
                x, y = 301.3, 517.9
                got = dicom.read_region(x, y, 300, 240, mpp)
                expected = original.read_region(x, y, 300, 240, mpp)
                level = dicom.best_level(mpp / original.mpp.x)
                if dicom.level_downsamples[level] == int(dicom.level_downsamples[level]):
                    assert np.array_equal(got, expected), (series.name, mpp)
                else:  # OpenSlide places a read of a level whose downsample is not whole (15.987) by level-0 px, and
                    # its DICOM and Aperio readers round that place apart by up to a level pixel (measured: at most
                    # 3 grey levels apart on 3 % of the pixels; the stored level pixels are identical)
                    difference = np.abs(got.astype(np.int16) - expected)
                    assert difference.max() <= 8 and difference.mean() < 0.5, (series.name, mpp)
                    continue  # and, as on the SVS, reads of it are not position-consistent to the pixel
                # position-consistent, as stitching needs: a region equals the same pixels of a larger read
                ratio = mpp / original.mpp.x
                part = dicom.read_region(x + 37 * ratio, y + 53 * ratio, 100, 80, mpp)
                assert np.array_equal(part, got[53:133, 37:137]), (series.name, mpp)
    assert "openslide" in readers  # OpenSlide 4 reads standard DICOM WSI


def test_auto_picks_a_reader_and_info_names_it(converted: dict[str, tuple[Path, Path]]) -> None:
    _, series = converted["cmu"]
    assert Slide(series).backend == "openslide"
    result = run_cli("info", str(series))
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line and not line.startswith(" "))
    assert lines["reader"] == "openslide" and lines["vendor"] == "dicom" and lines["slide_id"] == series.name
    assert lines["dimensions"].startswith("2220 x 2967")


def test_a_series_folder_is_one_slide_whether_given_or_found(converted: dict[str, tuple[Path, Path]]) -> None:
    _, series = converted["cmu"]
    instances = sorted(series.glob("*.dcm"))
    assert len(instances) >= 2  # levels, label, overview, thumbnail: one slide
    assert discover([str(series)]) == [series]
    parent = series.parent
    (parent / CMU.name).symlink_to(CMU)
    found = discover([str(parent)])
    assert sorted(p.name for p in found) == sorted([series.name, CMU.name])
    assert assign_ids(found)[series] == "CMU-1-Small-Region-dicom"


@pytest.mark.e2e  # the CLI in a subprocess, whole-slide inference
def test_run_on_a_dicom_series_gives_the_svs_figures(converted: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    source, series = converted["cmu"]
    common = [
        "--tasks",
        "epithelium_stroma,mitosis",
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        "tasks.epithelium_stroma.force=true",
        "--set",
        "tasks.mitosis.force=true",  # skin: both models' guards withhold their answers; forced, the figures compare
    ]
    figures = []
    for slide, out in ((source, tmp_path / "svs"), (series, tmp_path / "dicom")):
        result = run_cli("run", str(slide), "-o", str(out), *common)
        assert result.returncode == 0, result.stderr
        summary = json.loads(next(out.glob("*/summary.json")).read_text())
        figures.append(
            {t: {k: v for k, v in summary[t].items() if k != "domain"} for t in ("epithelium_stroma", "mitosis")}
        )
    assert figures[0] == figures[1]  # the same JPEG tiles decoded by the same library: equal, not only close
    assert figures[0]["mitosis"]["count"] > 0 and figures[0]["epithelium_stroma"]["epithelium_fraction"] > 0
