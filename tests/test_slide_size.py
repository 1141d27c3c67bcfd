"""Slide size (#34, defect 3): a header may claim any size. Every allocation that grows with the slide is bounded:
level reads go in blocks of at most MAX_BLOCK_LEVEL_PX, and a slide whose whole picture at the tissue detector's
µm/px would exceed MAX_PICTURE_PX (no glass slide is that large) is refused in one line with exit 5."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CMU, run_cli
from tests.helpers.claimed_size import write_claimed_size_tiff
from wsi_pipeline.core.errors import SlideTooLargeError
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.facade import MAX_PICTURE_PX
from wsi_pipeline.slide.resample import MAX_BLOCK_LEVEL_PX, region_blocks


@pytest.mark.parametrize(("scale", "width", "height"), [(32.0, 31250, 400), (1.0, 3000, 1500), (0.37, 500, 300)])
def test_blocks_of_a_single_level_read_are_bounded_and_cover_the_output(scale: float, width: int, height: int) -> None:
    """A thumbnail row band of a slide with only its full-resolution level (10^6 px wide at 32 level px per output
    px: once one 16 384 x 10^6 px block, 45.8 GiB), a plain read and an enlargement."""
    blocks = region_blocks((1.0,), 0.3, 0.7, width, height, (scale, scale))
    assert max(b.n_cols * b.n_rows for b in blocks) <= MAX_BLOCK_LEVEL_PX * 1.05  # the filter's margins aside
    covered = np.zeros((height, width), np.int8)
    for b in blocks:
        covered[b.rows[0] : b.rows[1], b.cols[0] : b.cols[1]] += 1
        assert b.width == b.cols[1] - b.cols[0]
    assert (covered == 1).all()  # every output pixel written once


def test_a_large_single_level_slide_is_read_in_pieces_with_the_same_pixels(tmp_path: Path) -> None:
    """60 000 x 40 000 px, one level: its 8 µm/px picture (1 875 x 1 250 px) is many blocks; every pixel white, as
    stored; and a region is the same whichever blocks it is cut into."""
    slide = Slide(write_claimed_size_tiff(tmp_path / "big.tif", 60_000, 40_000, 0.25))
    assert slide.level_count == 1 and len(slide.region_blocks(0, 0, 1875, 1250, 8.0)) > 1
    assert (slide.thumbnail(8.0) == 255).all()


def test_a_slide_larger_than_any_glass_slide_is_refused_naming_its_size(tmp_path: Path) -> None:
    slide = Slide(write_claimed_size_tiff(tmp_path / "huge.tif", 10**6, 10**6, 0.25))
    with pytest.raises(SlideTooLargeError, match=r"1000000 x 1000000 px at 0.25 µm/px is 250 x 250 mm") as refused:
        slide.thumbnail(8.0)
    assert refused.value.exit_code == 5
    assert (31250 * 31250) > MAX_PICTURE_PX > 9375 * 6250  # refused at 250 mm, a 75 x 50 mm slide passes


def test_a_real_slide_asked_for_whole_at_too_fine_a_scale_is_not_called_too_large(data_dir: Path) -> None:
    """CMU-1 is 1 x 1.5 mm: its whole picture at 0.01 µm/px is over the limit, and the message says to read regions,
    not that the slide is larger than any glass slide (it once did, for TCGA-CR-7395 at a detector's 0.25 µm/px)."""
    with Slide(CMU) as slide, pytest.raises(SlideTooLargeError, match=r"\(1 x 1 mm\) would be .* read it in regions"):
        slide.thumbnail(0.01)


@pytest.mark.e2e  # the CLI in a subprocess
def test_tissue_and_run_refuse_it_in_one_line_and_the_other_slides_go_on(tmp_path: Path, data_dir: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    huge = write_claimed_size_tiff(slides / "huge.tif", 10**6, 10**6, 0.25)
    (slides / CMU.name).symlink_to(CMU)
    tissue = run_cli("tissue", str(huge), "-o", str(tmp_path / "t"))
    assert tissue.returncode == 5 and "Traceback" not in tissue.stderr, tissue.stderr
    assert tissue.stderr.strip().count("\n") == 0 and "larger than any glass slide" in tissue.stderr
    run = run_cli("run", str(slides), "-o", str(tmp_path / "o"), "--tasks", "epithelium_stroma", "--no-progress")
    assert run.returncode == 1, run.stderr  # one slide failed
    rows = {r["slide_id"]: r for r in csv.DictReader((tmp_path / "o" / "manifest.csv").open())}
    assert rows["huge"]["status"] == "failed" and "larger than any glass slide" in rows["huge"]["error"]
    assert rows[CMU.stem]["status"] == "done"
    assert not (tmp_path / "o" / "huge").exists()
