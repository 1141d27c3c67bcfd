"""Quality-control settings (a light module: the configuration imports it without scipy or scikit-image)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wsi_pipeline.core.schema import StrictModel

QcClass = Literal["out_of_focus", "fold", "bubble_or_edge", "pen", "too_dark", "too_faint"]
QC_CLASSES: tuple[QcClass, ...] = ("out_of_focus", "fold", "bubble_or_edge", "pen", "too_dark", "too_faint")


class QcConfig(StrictModel):
    """Quality control: where each class begins (docs/qc.md says how each was chosen, what it catches and what it
    cannot see), which classes leave the figures, and how much usable tissue a slide needs."""

    enabled: bool = Field(True, description="measure quality on the tiles of one read and write the qc image")
    exclude: list[QcClass] = Field(
        default_factory=lambda: list(QC_CLASSES),
        description="classes whose tiles are left out of every task's figures (counted area, counts, regions)",
    )
    min_usable: float = Field(
        0.5, ge=0, le=1, description="a slide whose usable share of analysed tissue is under this is flagged"
    )
    focus_min: float = Field(0.36, gt=0, description="out_of_focus below this fine / coarse detail ratio")
    fold_od_ratio: float = Field(1.9, gt=1, description="fold: tile optical density over this times the slide's")
    grey_dark_fraction: float = Field(0.02, ge=0, le=1, description="bubble_or_edge: share of dark grey px over this")
    pen_fraction: float = Field(0.4, ge=0, le=1, description="pen: share of ink-coloured px over this")
    dark_od: float = Field(1.9, gt=0, description="too_dark: tissue's mean optical density over this")
    faint_od: float = Field(0.15, ge=0, description="too_faint: tissue's mean optical density under this")
    min_texture: float = Field(0.02, ge=0, description="grey-OD spread under which focus is not judged (blank tile)")
