"""The tifffile direct-decode backend beside OpenSlide: the same pixels on every real TIFF slide, `auto` choosing it
where it applies and OpenSlide elsewhere (with one log line), and a damaged stored tile failing the slide with
exit 5 and a message naming the level and tile."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CMU, NDPI, TCGA, damage_tile, run_cli
from wsi_pipeline.core.errors import SlideTruncatedError, SlideUnreadableError
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide


def test_same_pixels_as_openslide_on_every_level_of_real_slides(data_dir: Path, tmp_path: Path) -> None:
    synthetic = write_synthetic_slide(tmp_path / "s.svs", default_layout(3000, 2400, 0.25, seed=1, pen=True))
    for path in (CMU, TCGA, synthetic):  # JPEG RGB, JPEG 2000, JPEG YCbCr
        direct, reference = Slide(path, backend="tifffile"), Slide(path, backend="openslide")
        assert direct.level_dimensions == reference.level_dimensions
        assert direct.level_downsamples == pytest.approx(reference.level_downsamples, rel=1e-12)
        assert direct.associated_images == reference.associated_images
        assert direct.mpp_or_none == reference.mpp_or_none and direct.vendor == reference.vendor
        assert direct.objective_power == reference.objective_power and direct.bounds == reference.bounds
        for level, (w, h) in enumerate(direct.level_dimensions):
            got = direct.reader.read_level(0, 0, level, w, h)
            assert np.array_equal(got, reference.reader.read_level(0, 0, level, w, h)), (path.name, level)


def test_auto_prefers_direct_decode_and_falls_back_to_openslide(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert Slide(CMU).backend == "tifffile" and Slide(TCGA).backend == "tifffile"
    with caplog.at_level(logging.INFO, logger="wsi_pipeline.slide"):
        ndpi = Slide(NDPI)
    assert ndpi.backend == "openslide"  # straight to OpenSlide: no line on every NDPI
    assert not [r.getMessage() for r in caplog.records if "reading it with OpenSlide" in r.getMessage()]
    with pytest.raises(SlideUnreadableError, match="does not handle this file \\(NDPI layout\\)"):
        Slide(NDPI, backend="tifffile")  # forced, it says why it cannot


def test_a_damaged_tile_fails_with_its_level_and_place(data_dir: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.svs"
    tx, ty = damage_tile(CMU, damaged, 0, 20)
    slide = Slide(damaged)  # the directories are intact: it opens
    assert slide.backend == "tifffile"
    with pytest.raises(SlideTruncatedError) as err:
        slide.read_region(tx * 240 + 10, ty * 240 + 10, 64, 64, slide.mpp.x)
    assert err.value.exit_code == 5 and f"stored tile ({tx}, {ty}) of level 0" in str(err.value)
    result = run_cli("predict", str(damaged), "-o", str(tmp_path / "o"), "--task", "epithelium_stroma", "--no-progress")
    assert result.returncode == 5, result.stderr
    assert result.stderr.count("error:") == 1 and f"stored tile ({tx}, {ty}) of level 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / "o").rglob("zarr.json"))  # nothing that looks complete


def test_a_process_forked_while_another_thread_opens_a_slide_reads_its_own(data_dir: Path) -> None:
    """Tile-reading worker processes are forked while the batch's preparing thread may be opening the next slide
    (holding the reader's open lock): the child must not inherit that lock held (it hung, in CI)."""
    import os
    import time

    from wsi_pipeline.slide.backends import tifffile_direct

    slide = Slide(CMU, backend="tifffile")
    expected = slide.read_region(0, 0, 64, 64, slide.mpp.x)
    with tifffile_direct._OPEN_LOCK:  # as another thread opening a slide at the moment of the fork
        pid = os.fork()
        if pid == 0:  # the child: a fresh reading state, as a DataLoader worker has
            try:
                same = np.array_equal(slide.read_region(0, 0, 64, 64, slide.mpp.x), expected)
            finally:
                os._exit(0 if same else 1)
    deadline = time.monotonic() + 20  # the read itself takes milliseconds
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid, "the forked reader waited for a lock held at the fork"
    assert os.waitstatus_to_exitcode(done[1]) == 0
