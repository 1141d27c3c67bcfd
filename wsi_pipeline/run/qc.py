"""What `run` makes of a slide's `qc` image (engine/qc.py): per-class shares of the analysed tissue, the usable
share, and the failed tissue every task's figures leave out (docs/qc.md).

Shares weigh each tile by its tissue fraction, as the domain guard's do. A tile counts as failed when it falls in a
class of `qc.exclude`; classes not excluded are still measured and reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from wsi_pipeline.engine.qc import QC_HEATMAP
from wsi_pipeline.run.domain import tiles_area
from wsi_pipeline.slide.qc_config import QC_CLASSES, QcConfig
from wsi_pipeline.slide.tiling import TilePlan


@dataclass(frozen=True)
class QcFinding:
    """One slide's quality (measured: the run read it; else `reason` says why not)."""

    measured: bool
    reason: str = ""
    fractions: dict[str, float] = field(default_factory=dict)  # share of analysed tissue in each class
    usable_fraction: float | None = None
    excluded: tuple[str, ...] = ()
    areas: dict[str, shapely.Geometry] = field(default_factory=dict)  # per class, level-0 px
    failed: shapely.Geometry | None = None  # tissue left out of the figures (union of excluded classes)
    min_usable: float = 0.0
    measured_at_mpp: float | None = None
    plan: TilePlan | None = None  # the read that was measured
    hits: dict[str, np.ndarray] = field(default_factory=dict)  # per class, the plan's tiles in it

    @property
    def flagged(self) -> bool:
        return self.usable_fraction is not None and self.usable_fraction < self.min_usable

    def summary(self) -> dict[str, Any]:
        if not self.measured:
            return {"measured": False, "reason": self.reason}
        return {
            "measured": True,
            "measured_at_mpp": self.measured_at_mpp,
            "fractions": self.fractions,
            "usable_fraction": self.usable_fraction,
            "excluded_classes": list(self.excluded),
            "min_usable": self.min_usable,
            "flagged": ["usable_fraction"] if self.flagged else [],
        }

    def warning(self) -> str | None:
        """The slide's line when too little of its tissue is usable."""
        if not self.flagged:
            return None
        assert self.usable_fraction is not None
        worst = max(self.fractions, key=lambda c: self.fractions[c])
        return (
            f"quality control: only {100 * self.usable_fraction:.0f} % of the analysed tissue is usable (under "
            f"qc.min_usable = {100 * self.min_usable:.0f} %; most is {worst.replace('_', ' ')}, "
            f"{100 * self.fractions[worst]:.0f} %): rescan the slide or check the figures by eye"
        )

    def counted(self, area: shapely.Geometry | None) -> shapely.Geometry | None:
        """`area` (tissue or in-domain tissue) less the failed tissue; None stays None when nothing failed."""
        if self.failed is None or self.failed.is_empty or area is None:
            return area
        return area.difference(self.failed)


def qc_finding(store: Path, plans: list[TilePlan], config: QcConfig, tissue: shapely.Geometry | None) -> QcFinding:
    """The slide's quality from its `qc` image (absent: QC was off or no task read the slide)."""
    from wsi_pipeline.heatmap import open_heatmap

    path = store / QC_HEATMAP
    if not config.enabled:
        return QcFinding(False, "qc.enabled is false")
    if not path.exists():
        return QcFinding(False, "no task read the slide's tissue")
    heat = open_heatmap(path)
    saved = heat.attrs.get("plan", {})
    plan = next((p for p in plans if json.loads(json.dumps(p.saved_params)) == saved), None)
    if plan is None:  # cannot happen when the image was written by this run
        return QcFinding(False, "the qc image does not match any of this run's reads")
    weights = plan.tissue_fraction.astype(np.float64)
    total = float(weights.sum())
    fractions: dict[str, float] = {}
    areas: dict[str, shapely.Geometry] = {}
    failed_tiles = np.zeros(len(plan), bool)
    hits: dict[str, np.ndarray] = {}
    for cls in QC_CLASSES:
        values = heat.channel(cls, 0)
        hit = values[plan.rows, plan.cols] > 0.5
        hits[cls] = np.flatnonzero(hit)
        fractions[cls] = round(float(weights[hit].sum() / total), 4) if total > 0 else 0.0
        if cls in config.exclude:
            failed_tiles |= hit
        if hit.any():
            areas[cls] = tiles_area(heat, values.shape, plan, hit, tissue)
    usable = round(1.0 - float(weights[failed_tiles].sum() / total), 4) if total > 0 else 0.0
    excluded = tuple(c for c in QC_CLASSES if c in config.exclude)
    failed_parts = [areas[c] for c in excluded if c in areas]
    failed = shapely.union_all(failed_parts) if failed_parts else None
    return QcFinding(
        True,
        fractions=fractions,
        usable_fraction=usable,
        excluded=excluded,
        areas=areas,
        failed=failed,
        min_usable=config.min_usable,
        measured_at_mpp=float(heat.attrs.get("measured_at_mpp", plan.spec.mpp)),
        plan=plan,
        hits=hits,
    )


# one colour per class in QuPath and the QC overlay
QC_COLOURS: dict[str, tuple[int, int, int]] = {
    "out_of_focus": (230, 159, 0),
    "fold": (213, 94, 0),
    "bubble_or_edge": (86, 180, 233),
    "pen": (0, 158, 115),
    "too_dark": (60, 60, 60),
    "too_faint": (204, 121, 167),
}


def qc_class_name(cls: str) -> str:
    return f"QC: {cls}"


def qc_features(
    finding: QcFinding, slide_id: str, mpp: tuple[float, float], offset: tuple[float, float]
) -> Iterator[dict[str, Any]]:
    """Each class's tissue as one QuPath annotation classified `QC: <class>`, with its area and share."""
    from wsi_pipeline.export.qupath import feature, object_id

    for cls, area in finding.areas.items():
        if area.is_empty:
            continue
        yield feature(
            area,
            "annotation",
            object_id_=object_id(slide_id, "qc", cls),
            class_name=qc_class_name(cls),
            color=QC_COLOURS[cls],
            measurements={
                "Area µm^2": float(area.area) * mpp[0] * mpp[1],
                "Share of analysed tissue": finding.fractions[cls],
                "Left out of figures": float(cls in finding.excluded),
            },
            offset=offset,
        )


def write_qc_overlay(
    path: Path,
    finding: QcFinding,
    picture: np.ndarray,
    origin: tuple[float, float],
    scale: tuple[float, float],
    tissue: shapely.Geometry,
    title: str,
) -> None:
    """`overlay-qc.png`: the slide with each class's tiles shaded in its colour, the tissue outline and a legend
    giving each class's share (and whether it leaves the figures)."""
    from wsi_pipeline.export.overlay import Overview

    overview = Overview(picture, origin, scale)
    plan = finding.plan
    entries = [(title, (255, 255, 255))]
    if plan is not None:
        w, h = plan.tile_size_level0
        for cls, index in finding.hits.items():
            if len(index):
                overview.boxes(plan.x[index], plan.y[index], w, h, (*QC_COLOURS[cls], 70), fill=True)
    overview.outline(tissue, (40, 40, 40))
    for cls in QC_CLASSES:
        share = finding.fractions.get(cls, 0.0)
        left_out = "left out" if cls in finding.excluded else "kept"
        entries.append((f"{cls.replace('_', ' ')}: {100 * share:.1f} % ({left_out})", QC_COLOURS[cls]))
    overview.legend(entries)
    overview.save(path)
