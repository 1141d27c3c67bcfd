"""What a task is: its configuration model, and the objects and figures it makes of its finished heatmaps.

A task never reads a slide or runs a model: the engine has written its heatmaps when `postprocess` is called, and
the pipeline turns the returned `TaskResult` into summary.json entries, cohort columns, QuPath objects and overlays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import shapely
from pydantic import Field, model_validator

from wsi_pipeline.core.schema import StrictModel
from wsi_pipeline.models.card import ModelCard

Colour = tuple[int, int, int]


class TaskConfig(StrictModel):
    """One analysis task: where it reads (µm/px, tile size, overlap) and how its outputs are thresholded.

    `mpp` and `tile_px` default to the model card's: a model only works at the resolution it was trained at, and a
    classifier only on its own tile size, so a value that disagrees with the card is refused before any tile is read.
    Dense (fully convolutional) models may run on larger tiles than they were trained on.
    """

    enabled: bool = True
    mpp: float | None = Field(None, gt=0, le=64, description="µm/px the model sees; null = the model card's")
    tile_px: int | None = Field(
        None, gt=0, le=8192, description="tile edge in px at `mpp`; null = the model card's (dense: may be larger)"
    )
    overlap_px: int = Field(0, ge=0, description="overlap between neighbouring tiles in px at `mpp`")
    min_tissue: float = Field(0.1, ge=0, le=1, description="tiles with a smaller tissue fraction are skipped")
    batch_size: int = Field(64, gt=0, le=4096)
    model: str | None = Field(None, description="path to a model directory; None = the shipped default")
    threshold: float | None = Field(
        None, ge=0, le=1, description="probability above which a pixel/tile is positive; null = the model card's"
    )
    force: bool = Field(
        False,
        description="run even on slides the input guard finds unlike the model's training tissue, and keep (flagged) "
        "an answer the domain guard withholds",
    )
    min_in_domain: float = Field(
        0.5,
        ge=0,
        le=1,
        description="the share of a slide's analysed tissue the model's domain guard must accept for the task to "
        "give its slide-level answer; under it the answer is 'not applicable' (docs/models.md, Domain guard)",
    )

    @model_validator(mode="after")
    def _overlap_fits(self) -> TaskConfig:
        if self.tile_px is not None and self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px ({self.overlap_px}) must be smaller than tile_px ({self.tile_px})")
        return self


@dataclass
class RegionObject:
    """A region for QuPath (an annotation) and the overview: level-0 px of the slide (OpenSlide coordinates)."""

    cls: str
    colour: Colour
    object_id: str
    polygon: shapely.Geometry
    measurements: dict[str, float]


@dataclass
class PointObjects:
    """Points for QuPath (detections): `xyp` rows are level-0 x, y (OpenSlide coordinates) and a probability."""

    kind: str  # the id namespace, e.g. "mitosis"
    cls: str
    colour: Colour
    measurement: str  # the measurement name of the probability
    xyp: np.ndarray  # (N, 3) float64
    drawn: bool = True  # marked on the overview


@dataclass
class Overlay:
    """A heatmap to blend over the overview: its name in heatmaps.zarr and a colour."""

    heatmap: str
    colour: Colour
    label: str | None = None  # what its values are (None: "<heatmap> probability")
    note: str = ""  # added to the overlay's title (a slide model's answer)
    # blended into overview.png with the tasks' maps too (a slide model's attention, relative to each slide's own
    # most attended tile, would paint a negative slide as hot as a positive one: its own overlay only)
    on_overview: bool = True


@dataclass
class TileObjects:
    """Tiles for QuPath (`tile` objects, e.g. the tiles a slide model attended to most): level-0 px."""

    name: str
    size: tuple[float, float]  # level-0 edge (x, y)
    tiles: list[tuple[int, int, float, float, dict[str, float]]]  # (col, row, x, y, measurements)


@dataclass
class TaskResult:
    summary: dict[str, Any]
    regions: list[RegionObject] = field(default_factory=list)
    points: list[PointObjects] = field(default_factory=list)
    overlay: Overlay | None = None
    # figures the task itself finds implausible (one line each, naming the check and what to do; the pipeline puts
    # them in summary.json as `<task>.warnings`): the input guard judges a slide's colour before the model runs,
    # these judge what the model made of it
    warnings: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)  # summary keys the warnings are about (highlighted in the report)
    tiles: TileObjects | None = None  # written as QuPath tile objects


@dataclass(frozen=True)
class TaskContext:
    """What a task's post-processing may use: its finished heatmaps and the slide's geometry."""

    task: str
    slide_id: str
    card: ModelCard
    config: Any  # the task's own TaskConfig subclass
    heatmaps: Path  # the heatmaps.zarr store
    slide_mpp: tuple[float, float]  # (x, y) µm per level-0 px
    tissue_mm2: float
    tissue: shapely.Geometry | None = None  # the tissue polygons, level-0 px (None: not known)
    # the tissue the model's domain guard finds in domain, level-0 px (None: the model has no guard, all tissue counts)
    domain: shapely.Geometry | None = None

    @property
    def counted_area(self) -> shapely.Geometry | None:
        """Where figures count (docs/outputs.md): tissue the model's domain guard accepts, or all tissue without a
        guard; a detection or region outside it is kept, marked, and not counted."""
        return self.domain if self.domain is not None else self.tissue

    @property
    def counted_mm2(self) -> float:
        """The area figures are given per (mm²)."""
        if self.domain is None:
            return self.tissue_mm2
        return float(self.domain.area) * self.slide_mpp[0] * self.slide_mpp[1] / 1e6

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which level-0 points lie in the counted area (all of them when it is not known)."""
        area = self.counted_area
        if area is None:
            return np.ones(len(x), bool)
        return np.asarray(shapely.contains_xy(area, x, y), bool)

    def heatmap_path(self, name: str) -> Path:
        return self.heatmaps / name

    def threshold(self, cls: str) -> float:
        """The configured threshold, else the operating point the model card chose on validation data for `cls`."""
        return self.config.threshold if self.config.threshold is not None else self.card.threshold(cls)

    def threshold_source(self) -> str:
        """Where `threshold` comes from, for summary.json: "configuration" or "model card"."""
        return "configuration" if self.config.threshold is not None else "model card"


class Task(Protocol):
    """A registered analysis task (see docs/architecture.md, "Adding a task").

    Its attributes are only read, so they are read-only members here: a plain class attribute (`config_model =
    MyConfig`, `cohort_columns = ("count",)`) satisfies each, with its own narrower type."""

    @property
    def name(self) -> str: ...

    @property
    def config_model(self) -> type[TaskConfig]: ...

    @property
    def cohort_columns(self) -> tuple[str, ...]:
        """Summary keys written to cohort_summary.csv as <name>_<key>."""
        ...

    @property
    def report_columns(self) -> tuple[tuple[str, str], ...]:
        """(summary key, header) shown in report.html's table."""
        ...

    @property
    def point_table(self) -> str | None:
        """File name of a CSV of its first point set (e.g. mitoses.csv), or None."""
        ...

    @property
    def trainer(self) -> str:
        """What `train` makes for the task: "classifier" (labelled tiles; with `--kind class_map` a U-Net of
        per-pixel classes) or "point_detector" (a probability map trained on point-annotated images, as for
        mitosis). How a model's outputs are stitched is its card's `kind` (one vector or one map per tile), not
        this."""
        ...

    def default_config(self) -> TaskConfig: ...

    def default_model(self) -> Path | None:
        """The model folder used when `tasks.<name>.model` is not set (None: the user must set it)."""
        ...

    def postprocess(self, context: TaskContext) -> TaskResult: ...
