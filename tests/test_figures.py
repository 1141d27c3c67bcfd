"""Overlay figures: the heatmap's colour map drawn on tissue only, the slide image untouched elsewhere, one image
pixel per figure pixel, a round scale bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from wsi_pipeline.export.figures import COLOUR_MAP, Marks, Outline, OverlayFigure, save_overlay, scale_bar_um

TOP, LEFT = 50, 20  # the figure's margins in px above and left of the slide image (0.5 in and 0.2 in at 100 dpi)


def test_heatmap_only_on_tissue_and_image_kept_elsewhere(tmp_path: Path) -> None:
    h, w = 1500, 1000
    image = np.full((h, w, 3), 200, np.uint8)
    image[:, :, 0] = 230  # a pale pink "slide"
    values = np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))
    tissue = np.zeros((h, w), bool)
    tissue[:, : w // 2] = True
    ring = np.array([[100, 100], [300, 100], [300, 300], [100, 100]], float)
    figure = OverlayFigure(
        "t", image, values, tissue, "p", 2.0, [Outline("Region", (255, 0, 0), [ring])],
        [Marks("Mitosis", (0, 0, 255), np.array([[700.0, 1200.0]]))],
    )  # fmt: skip
    save_overlay(tmp_path / "o.png", figure, alpha=0.6)
    png = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(float)
    assert png.shape[0] == h + 70 and png.shape[1] >= w + 150  # image 1:1, plus title, margins and colour bar
    off_tissue = png[TOP + 700 : TOP + 800, LEFT + 800 : LEFT + 900]
    assert np.abs(off_tissue - [230, 200, 200]).max() <= 1  # right half: no tissue, the slide shows unchanged
    for col in (100, 400):
        expected = 0.4 * np.array([230, 200, 200]) + 0.6 * 255 * np.array(colormaps[COLOUR_MAP](values[0, col])[:3])
        assert np.abs(png[TOP + 900, LEFT + col] - expected).max() <= 3  # blended colour map value on tissue


def test_scale_bar_is_round_and_near_a_fifth_of_the_width() -> None:
    assert scale_bar_um(1500, 1.0) == 250
    assert scale_bar_um(1500, 16.0) == 5000
    assert scale_bar_um(1600, 0.5) == 200


def test_the_overview_is_the_overlays_picture_reduced_and_matches_a_direct_read(data_dir: Path) -> None:
    """The exports read the slide once (run/outputs.slide_pictures): the overview is the overlays' picture shrunk by a
    box mean; it must have the size, place and colours of the slide read directly at the overview's µm/px."""
    from tests.helpers import CMU
    from wsi_pipeline.run.outputs import OVERVIEW_LONG_SIDE_PX, slide_pictures
    from wsi_pipeline.slide import Slide

    slide = Slide(CMU)
    detail, overview = slide_pictures(slide, overlays=True)
    alone, overview_alone = slide_pictures(slide, overlays=False)
    direct = slide.thumbnail(overview[2][0] * slide.mpp.x)
    assert detail is not None and alone is None
    assert max(detail[0].shape[:2]) >= 1500 and max(overview[0].shape[:2]) == OVERVIEW_LONG_SIDE_PX
    assert overview[0].shape == direct.shape == overview_alone[0].shape and overview[1:] == overview_alone[1:]
    shown, read = overview[0].astype(float), direct.astype(float)

    def difference(dy: int, dx: int) -> float:
        return float(
            np.abs(shown[1 + dy : shown.shape[0] - 1 + dy, 1 + dx : shown.shape[1] - 1 + dx] - read[1:-1, 1:-1]).mean()
        )

    # two resamplings differ in the finest texture (3.2 grey levels on average on CMU), not in place: a shift of one
    # px in any direction differs 2x more
    assert difference(0, 0) < 4 and min(
        difference(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    ) > 2 * difference(0, 0)
    assert np.array_equal(overview_alone[0], direct)
