"""What `run` makes of each task's domain image (models/domain.py): the tissue the model may answer on, and whether
it answers at all.

Per slide and task: the in-domain share of the analysed tissue (tiles weighted by their tissue fraction) and the
in-domain tissue itself (level-0 polygons), inside which the task counts its figures. Under
`tasks.<task>.min_in_domain` the task's slide-level answer is withheld ("not applicable"); its maps are kept, and
`tasks.<task>.force: true` keeps the answer, flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from wsi_pipeline.engine.stitch import domain_heatmap
from wsi_pipeline.heatmap import Heatmap
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.slide.tiling import TilePlan
from wsi_pipeline.tasks import TaskResult


@dataclass(frozen=True)
class DomainFinding:
    """One task's domain on one slide (guarded: the model has a fitted guard)."""

    guarded: bool
    model_domain: str  # the card's domain, one line ("" when the card does not say)
    in_domain_fraction: float | None = None
    area: shapely.Geometry | None = None  # in-domain tissue, level-0 px (None: unguarded, all tissue counts)

    def summary(self, minimum: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"model_domain": self.model_domain or "not stated in the model card"}
        if not self.guarded:
            entry["guard"] = "none: the model card has no domain guard, tiles unlike its training data are not flagged"
            return entry
        entry |= {"guard": "fitted", "in_domain_fraction": self.in_domain_fraction, "min_in_domain": minimum}
        return entry


def domain_finding(
    store: Path, task: str, card: ModelCard, plan: TilePlan, tissue: shapely.Geometry | None
) -> DomainFinding:
    """The task's domain from its domain image (absent: the model ran unguarded)."""
    from wsi_pipeline.heatmap import open_heatmap

    line = card.domain.line() if card.domain is not None else ""
    path = store / domain_heatmap(task)
    if not path.exists():
        return DomainFinding(False, line)
    heat = open_heatmap(path)
    values = heat.channel(heat.channels[0], 0)
    tile_values = values[plan.rows, plan.cols]
    weights = plan.tissue_fraction.astype(np.float64)
    inside = tile_values <= 1.0
    fraction = float(weights[inside].sum() / weights.sum()) if weights.sum() > 0 else 0.0
    area = tiles_area(heat, values.shape, plan, inside, tissue)  # unanalysed tiles are no tissue
    return DomainFinding(True, line, round(fraction, 4), area)


def tiles_area(
    heat: Heatmap, shape: tuple[int, ...], plan: TilePlan, chosen: np.ndarray, tissue: shapely.Geometry | None
) -> shapely.Geometry:
    """The level-0 area of the plan's `chosen` tiles (bool per tile) on a one-px-per-tile image `heat` of `shape`,
    within `tissue` when known."""
    from wsi_pipeline.postprocess.regions import heatmap_regions
    from wsi_pipeline.tasks.common import level_transform

    marked = np.zeros(shape, np.float32)
    marked[plan.rows[chosen], plan.cols[chosen]] = 1.0
    origin, scale = level_transform(heat, 0)
    polygons = [r.polygon for r in heatmap_regions(marked, 0.5, origin, scale, (1.0, 1.0))]
    area = shapely.union_all(polygons) if polygons else shapely.Polygon()
    return area.intersection(tissue) if tissue is not None else area


def withheld_reason(finding: DomainFinding, minimum: float, task: str) -> str | None:
    """Why the task's answer is not given on this slide, or None."""
    if not finding.guarded or finding.in_domain_fraction is None or finding.in_domain_fraction >= minimum:
        return None
    domain = f" ({finding.model_domain})" if finding.model_domain else ""
    return (
        f"{task}: not applicable: tissue unlike this model's training data{domain}, in domain "
        f"{100 * finding.in_domain_fraction:.0f} % of tissue (under tasks.{task}.min_in_domain = {100 * minimum:.0f} %)"
    )


def apply_domain(result: TaskResult, finding: DomainFinding, minimum: float, forced: bool, task: str) -> TaskResult:
    """The task's result as `run` reports it: its domain beside the figures, and withheld when too little of the
    tissue is in domain (forced: kept, with the reason as a warning)."""
    summary = result.summary | {"domain": finding.summary(minimum)}
    reason = withheld_reason(finding, minimum, task)
    if reason is None:
        return TaskResult(summary, result.regions, result.points, result.overlay, result.warnings, result.flagged)
    if forced:
        kept = f"{reason}; kept because tasks.{task}.force is set: do not trust these figures"
        return TaskResult(
            summary, result.regions, result.points, result.overlay, [*result.warnings, kept], result.flagged
        )
    withheld = {
        "not_applicable": reason.removeprefix(f"{task}: "),
        "domain": summary["domain"],
        "threshold": summary.get("threshold"),
    }
    return TaskResult(withheld, overlay=result.overlay, warnings=[reason])
