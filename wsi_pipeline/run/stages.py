"""Per-slide stages: tissue detection, tile planning, one task's prediction (the single-slide commands delegate
here, and `run` uses the same stages). What they write into a slide's folder is made by `run.outputs`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.config import Config, TissueConfig
from wsi_pipeline.core.atomic import remove_stale_temporaries
from wsi_pipeline.core.errors import ConfigError, write_failure
from wsi_pipeline.core.inventory import invalidate
from wsi_pipeline.core.layout import SlideLayout
from wsi_pipeline.engine import EngineOptions, TaskRequest, predict_slide
from wsi_pipeline.heatmap import CHUNK, HeatmapGeometry, HeatmapWriter, begin_store, finish_store
from wsi_pipeline.models import LoadedModel
from wsi_pipeline.models.input_guard import outside_reason
from wsi_pipeline.models.loading import load_card
from wsi_pipeline.run.outputs import write_tile_files, write_tissue_files
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import TilePlan, plan_tiles
from wsi_pipeline.slide.tissue import TissueMask, detect_tissue, require_tissue
from wsi_pipeline.tasks import get_task, task_model
from wsi_pipeline.tasks.reading import read_spec

log = logging.getLogger(__name__)


@dataclass
class TissueOutputs:
    tissue: TissueMask
    files: dict[str, Path]
    summary: dict[str, Any]


def _layout(out: SlideLayout | Path) -> SlideLayout:
    """Stages take a slide's folder as a path or as its layout."""
    return out if isinstance(out, SlideLayout) else SlideLayout(Path(out))


def tissue_stage(
    slide: Slide, params: TissueConfig, out: SlideLayout | Path, *, require: bool = True, overview: bool = True
) -> TissueOutputs:
    """Detect tissue and write tissue.geojson, tissue_mask.png, tissue.json and (with `overview`) overview.png."""
    out = _layout(out)
    tissue = detect_tissue(slide, params)
    if require:
        require_tissue(tissue, slide)
    out.root.mkdir(parents=True, exist_ok=True)
    if invalidate(out.run_record):
        log.info(
            "%s: removed (tissue rewrites this slide's tissue files; the next run redoes the slide)", out.run_record
        )
    files, summary = write_tissue_files(out, slide, tissue, params, overview=overview)
    return TissueOutputs(tissue, files, summary)


def tiles_stage(
    slide: Slide,
    tissue: TissueMask,
    out: SlideLayout | Path,
    name: str,
    *,
    mpp: float,
    tile_px: int,
    overlap_px: int,
    min_tissue: float,
    tissue_params: TissueConfig,
) -> tuple[TilePlan, dict[str, Path]]:
    """Plan tiles and write tiles-<name>.json (the plan), .geojson (QuPath tile objects) and .png (overview)."""
    out = _layout(out)
    plan = plan_tiles(slide, tissue, mpp, tile_px, overlap_px, min_tissue)
    plan.tissue_params = tissue_params.model_dump(mode="json")
    return plan, write_tile_files(out, slide, tissue, name, plan)


@dataclass(frozen=True)
class TileRequest:
    """What `tiles` plans: a name and the grid's µm/px, size, overlap and minimum tissue."""

    name: str
    mpp: float
    tile_px: int
    overlap_px: int
    min_tissue: float


def tile_request(
    config: Config,
    task: str | None,
    mpp: float | None,
    tile_px: int | None,
    overlap_px: int | None,
    min_tissue: float | None,
) -> TileRequest:
    """The tiles `run` would read for `task` (configured values, else its model card's), explicit values winning;
    without a task, `mpp` and `tile_px` are needed (overlap 0 and minimum tissue 0.1 by default)."""
    if task is not None:
        t = config.task(task)
        default = get_task(task, "--task").default_model()
        model_dir = Path(t.model) if t.model is not None else default
        if model_dir is None:  # no model configured and none shipped
            raise ConfigError(f"--task {task}: the task ships no model; set tasks.{task}.model")
        spec = read_spec(task, t, load_card(model_dir))
        mpp = spec.mpp if mpp is None else mpp
        tile_px = spec.tile_px if tile_px is None else tile_px
        overlap_px = spec.overlap_px if overlap_px is None else overlap_px
        min_tissue = spec.min_tissue if min_tissue is None else min_tissue
    if mpp is None or tile_px is None:
        raise ConfigError("give --mpp and --tile-px (e.g. --mpp 0.5 --tile-px 224), or --task NAME")
    if mpp <= 0:
        raise ConfigError(f"--mpp must be positive, got {mpp}")
    overlap_px = 0 if overlap_px is None else overlap_px
    min_tissue = 0.1 if min_tissue is None else min_tissue
    return TileRequest(task or f"{mpp:g}um-{tile_px}px", mpp, tile_px, overlap_px, min_tissue)


def write_tissue_heatmap(store: Path, tissue: TissueMask) -> Path:
    """The tissue mask as the `tissue` heatmap (uint8, 255 = tissue) at the mask's µm/px."""
    h, w = tissue.mask.shape
    geometry = HeatmapGeometry(h, w, tissue.scale[0], 0.0, (tissue.slide_mpp[1], tissue.slide_mpp[0]), (1.0, 1.0))
    writer = HeatmapWriter(store, "tissue", ["tissue"], geometry, dtype="uint8", attrs={"task": "tissue"})
    try:
        for y0 in range(0, h, CHUNK):  # a band at a time: a float copy of a large slide's whole mask is ~30 MB
            writer.write(y0, 0, tissue.mask[None, y0 : y0 + CHUNK].astype(np.float32))
            writer.advance(y0 + CHUNK)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def predict_stage(
    slide: Slide,
    config: Config,
    task: str,
    out: SlideLayout | Path,
    engine: EngineOptions,
    *,
    model_path: str | None,
) -> dict[str, Any]:
    """Run one task over the slide with `engine` (settings.engine_options) and write its heatmaps (and `tissue`)
    into the slide's heatmaps.zarr."""
    out = _layout(out)
    task_cfg = config.task(task)
    # before any tile is read; errors name the option the model came from
    model: LoadedModel = task_model(task, model_path or task_cfg.model, "--model" if model_path else None)
    card = model.card
    spec = read_spec(task, task_cfg, card)  # a geometry the model cannot take: refused before the slide is read
    tissue = detect_tissue(slide, config.tissue)
    require_tissue(tissue, slide)
    plan = spec.plan(slide, tissue)
    reason = outside_reason(tissue, card.input_stats)
    if reason is not None:  # predict runs the one task it was asked for; `run` skips it unless forced
        log.warning("warning: %s: the %s model is not to be trusted here: %s", slide.slide_id, task, reason)
    if invalidate(out.run_record):
        log.info("%s: removed (predict changes this slide's heatmaps; the next run redoes the slide)", out.run_record)
    if out.root.is_dir():  # images an earlier predict left half-built (a full disk, a kill) beside the store
        remove_stale_temporaries(out.root)
    try:
        begin_store(out.heatmaps)  # incomplete until this task's heatmaps and `tissue` are all in place
        timings = predict_slide(slide, [TaskRequest(task, model, plan)], out.heatmaps, engine, config.qc)
        write_tissue_heatmap(out.heatmaps, tissue)
        finish_store(out.heatmaps)
    except OSError as exc:
        failure = write_failure(exc, out.heatmaps)
        if failure is None:
            raise
        raise failure from exc
    return {
        "store": out.heatmaps,
        "heatmaps": [*card.written_classes, "tissue"],
        "tiles": len(plan),
        "timings": timings,
        "model": card.name,
    }
