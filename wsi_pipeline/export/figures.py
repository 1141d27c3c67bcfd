"""Overlay figures a person can read without a viewer: the slide with one task's heatmap in a perceptually uniform
colour map (transparent off tissue), its regions and detections, a colour bar, a legend and a scale bar in µm.

Drawn with Pillow on one canvas: a matplotlib figure per picture (axes, artists, Agg's compositing, its PNG writer)
cost ~0.95 s per overlay and was most of a small slide's export time (benchmarks/cohort.py); the picture is
the same: matplotlib's own colour map and its DejaVu Sans font, the layout it had (margins in px at 100 dpi).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.core.atomic import atomic_path

COLOUR_MAP = "viridis"
MIN_LONG_SIDE_PX = 1500
_NICE_UM = (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000)


@dataclass
class Outline:
    """Polygons (rings of image px) of one class drawn as outlines."""

    label: str
    colour: tuple[int, int, int]
    rings: list[np.ndarray] = field(default_factory=list)  # each (N, 2): x, y in image px


@dataclass
class Marks:
    """Points of one class drawn as rings."""

    label: str
    colour: tuple[int, int, int]
    xy: np.ndarray  # (N, 2) image px


@dataclass
class OverlayFigure:
    title: str
    image: np.ndarray  # RGB uint8 (H, W, 3): the slide at `um_per_px`
    values: np.ndarray  # float (H, W) in [0, 1]; NaN where the heatmap does not reach
    tissue: np.ndarray  # bool (H, W): the heatmap is drawn only here
    value_label: str
    um_per_px: float
    outlines: list[Outline] = field(default_factory=list)
    marks: list[Marks] = field(default_factory=list)
    outside: np.ndarray | None = None  # bool (H, W): tissue outside the model's domain, greyed and hatched


def scale_bar_um(width_px: int, um_per_px: float) -> int:
    """A round length near a fifth of the image width."""
    target = width_px * um_per_px / 5
    return min(_NICE_UM, key=lambda um: abs(np.log(um / target)))


def _hatched(image: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Out-of-domain tissue: the slide in grey with diagonal stripes instead of the heatmap's colours (its values
    are not answers). The values of the `outside` pixels, in their order (float, one grey per pixel)."""
    grey = image[outside].mean(axis=-1) * 0.5 + 110
    rows, cols = np.nonzero(outside)
    return np.where((rows + cols) % 10 < 2, grey - 70, grey)


DPI = 100  # the layout below is the one the matplotlib figure had: inches at 100 dots each
LEFT, BOTTOM, RIGHT = 20, 20, 200  # px: breathing room left and below; the colour bar and its labels on the right
TITLE_LINE = 25  # px per title line (the title sits in 25 px + one line each above the slide)


def _font(size: int) -> Any:
    """DejaVu Sans, the font matplotlib ships (and drew these pictures with), at `size` px; Pillow's own otherwise."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _colour_table() -> np.ndarray:
    """The colour map as 256 RGB rows (0..255)."""
    from matplotlib import colormaps

    return np.asarray(colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0, np.float64)


def _blend(fig_spec: OverlayFigure, alpha: float) -> np.ndarray:
    """The heatmap blended into the slide image on tissue (uint8 RGB). Computed on the shown pixels alone: on a
    slide with little tissue most of the picture is the slide itself (a third of the time of the whole image)."""
    blended = fig_spec.image.copy()
    shown = fig_spec.tissue & np.isfinite(fig_spec.values)
    if shown.any():
        index = np.rint(np.clip(np.nan_to_num(fig_spec.values[shown]), 0.0, 1.0) * 255).astype(np.intp)
        mixed = (1 - alpha) * fig_spec.image[shown] + alpha * _colour_table()[index]
        blended[shown] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    if fig_spec.outside is not None and fig_spec.outside.any():
        blended[fig_spec.outside] = np.clip(_hatched(fig_spec.image, fig_spec.outside) + 0.5, 0, 255)[:, None]
    return blended


def save_overlay(path: str | os.PathLike[str], fig_spec: OverlayFigure, alpha: float = 0.6) -> None:
    """Write the figure as PNG, the slide image drawn at one image px per figure px (at least 1500 px long)."""
    from PIL import Image, ImageDraw

    h, w = fig_spec.image.shape[:2]
    top = TITLE_LINE * (fig_spec.title.count("\n") + 2)
    canvas = Image.new("RGB", (LEFT + w + RIGHT, top + h + BOTTOM), "white")
    canvas.paste(Image.fromarray(_blend(fig_spec, alpha)), (LEFT, top))
    draw = ImageDraw.Draw(canvas)
    for outline in fig_spec.outlines:
        for ring in outline.rings:
            if len(ring) > 1:
                draw.line([(LEFT + x, top + y) for x, y in ring.tolist()], fill=outline.colour, width=2, joint="curve")
    for marks in fig_spec.marks:
        for x, y in marks.xy.tolist():
            draw.ellipse((LEFT + x - 4, top + y - 4, LEFT + x + 4, top + y + 4), outline=marks.colour, width=2)
    _legend(draw, fig_spec, LEFT + w, top)
    _scale_bar(draw, fig_spec, LEFT, top + h)
    _colour_bar(canvas, draw, fig_spec.value_label, LEFT + w + 25, top, h)
    draw.multiline_text((LEFT, 8), fig_spec.title, fill="black", font=_font(19), spacing=6)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)  # 3x faster than the default level, 1.5x larger


def _legend(draw: Any, fig_spec: OverlayFigure, right: int, top: int) -> None:
    """Each outline class, point class (with its count) and out-of-domain tissue, in a box at the top right."""
    entries: list[tuple[str, str, tuple[int, int, int]]] = [("line", o.label, o.colour) for o in fig_spec.outlines]
    entries += [("ring", f"{m.label} ({len(m.xy)})", m.colour) for m in fig_spec.marks]
    if fig_spec.outside is not None and fig_spec.outside.any():
        entries.append(("hatch", "outside the model's domain", (150, 150, 150)))
    if not entries:
        return
    font = _font(15)
    width = 40 + max(int(draw.textlength(label, font=font)) for _, label, _ in entries)
    x0, y0 = right - width - 16, top + 8
    draw.rectangle((x0, y0, x0 + width + 8, y0 + 22 * len(entries) + 8), fill=(255, 255, 255), outline=(200, 200, 200))
    for i, (kind, label, colour) in enumerate(entries):
        y = y0 + 15 + 22 * i
        if kind == "line":
            draw.line((x0 + 8, y, x0 + 32, y), fill=colour, width=3)
        elif kind == "ring":
            draw.ellipse((x0 + 15, y - 5, x0 + 25, y + 5), outline=colour, width=2)
        else:
            draw.rectangle((x0 + 8, y - 6, x0 + 32, y + 6), fill=(170, 170, 170), outline=(90, 90, 90))
            for offset in range(0, 24, 6):
                draw.line((x0 + 8 + offset, y + 6, x0 + 14 + offset, y - 6), fill=(90, 90, 90), width=1)
        draw.text((x0 + 40, y), label, fill="black", font=font, anchor="lm")


def _scale_bar(draw: Any, fig_spec: OverlayFigure, left: int, bottom: int) -> None:
    """A round length (near a fifth of the width) as a bar in a box at the bottom left."""
    w = fig_spec.image.shape[1]
    bar_um = scale_bar_um(w, fig_spec.um_per_px)
    length = bar_um / fig_spec.um_per_px
    thickness = max(2, round(fig_spec.image.shape[0] / 200))
    font = _font(16)
    x0, y0 = left + 10, bottom - 56
    draw.rectangle((x0, y0, x0 + length + 20, bottom - 10), fill="white", outline="black")
    draw.rectangle((x0 + 10, y0 + 10, x0 + 10 + length, y0 + 10 + thickness), fill="black")
    draw.text((x0 + 10 + length / 2, bottom - 16), f"{bar_um} µm", fill="black", font=font, anchor="md")


def _colour_bar(canvas: Any, draw: Any, label: str, x: int, top: int, h: int) -> None:
    """The colour map from 0 (bottom) to 1 (top) with ticks every 0.2 and the values' name beside it."""
    from PIL import Image, ImageDraw

    table = _colour_table().astype(np.uint8)
    rows = table[np.linspace(255, 0, h).round().astype(np.intp)]
    canvas.paste(Image.fromarray(np.repeat(rows[:, None, :], 25, axis=1)), (x, top))
    draw.rectangle((x, top, x + 25, top + h - 1), outline="black")
    font = _font(14)
    for tick in np.linspace(0.0, 1.0, 6):
        y = top + (h - 1) * (1 - tick)
        draw.line((x + 25, y, x + 30, y), fill="black", width=1)
        draw.text((x + 34, y), f"{tick:.1f}", fill="black", font=font, anchor="lm")
    name = _font(16)
    size = (int(draw.textlength(label, font=name)) + 4, 22)
    text = Image.new("RGB", size, "white")
    ImageDraw.Draw(text).text((2, 11), label, fill="black", font=name, anchor="lm")
    rotated = text.rotate(90, expand=True)
    canvas.paste(rotated, (x + 70, top + max(0, (h - rotated.size[1]) // 2)))
