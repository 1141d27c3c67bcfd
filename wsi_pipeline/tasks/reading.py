"""What a task reads, resolved once: the µm/px, tile size, overlap and minimum tissue of its tiles, from its
configuration where set and its model card where not, checked against what the model can take before the first
slide. `run`, `predict`, `tiles --task` and the engine's plans all come from a `ReadSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.engine import check_geometry
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import TilePlan, plan_tiles
from wsi_pipeline.slide.tissue import TissueMask
from wsi_pipeline.tasks.base import TaskConfig


@dataclass(frozen=True)
class ReadSpec:
    task: str
    mpp: float
    tile_px: int
    overlap_px: int
    min_tissue: float
    card: ModelCard

    def plan(self, slide: Slide, tissue: TissueMask) -> TilePlan:
        """The task's tiles over a slide's tissue."""
        return plan_tiles(slide, tissue, self.mpp, self.tile_px, self.overlap_px, self.min_tissue)


def read_spec(task: str, task_cfg: TaskConfig, card: ModelCard) -> ReadSpec:
    """A task's read geometry: the configured values, the model card's where none is configured (a dense model's
    `run_tile_px`). A dense model's overlap is at least twice its halo: with that, its stitched map equals one pass
    over the whole region whatever the overlap, so a smaller one (a classifier's default, e.g.) would only add
    seams. A value the model cannot serve is refused here (exit 7), before any slide is opened."""
    mpp = card.mpp if task_cfg.mpp is None else task_cfg.mpp
    default_tile = card.run_tile_px or card.tile_px
    tile_px = default_tile if task_cfg.tile_px is None else task_cfg.tile_px
    overlap_px = max(task_cfg.overlap_px, 2 * card.halo_px) if card.kind == "dense" else task_cfg.overlap_px
    if overlap_px >= tile_px:
        raise ConfigError(
            f"tasks.{task}.overlap_px ({overlap_px}) must be smaller than the tile size ({tile_px} px, "
            f"{'configured' if task_cfg.tile_px is not None else f'from model {card.name}'})"
        )
    check_geometry(task, card, mpp, tile_px, overlap_px)
    return ReadSpec(task, mpp, tile_px, overlap_px, task_cfg.min_tissue, card)
