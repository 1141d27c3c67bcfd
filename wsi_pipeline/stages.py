"""Per-slide stages that write files: tissue detection and tile planning (the CLI only parses and delegates)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from .atomic import write_json
from .config import Config, TaskConfig, TissueConfig
from .errors import ConfigError
from .export.overlay import Overview, save_mask_png
from .export.qupath import feature, object_id, write_feature_collection
from .models.card import ModelCard
from .slide import Slide
from .tiling import TilePlan, plan_tiles
from .tissue import TissueMask, detect_tissue, require_tissue

TISSUE_COLOR = (0, 160, 60)
TILE_COLOR = (30, 90, 220)


@dataclass
class TissueOutputs:
    tissue: TissueMask
    files: dict[str, Path]
    summary: dict[str, Any]


def tissue_stage(slide: Slide, params: TissueConfig, out_dir: Path, *, require: bool = True) -> TissueOutputs:
    """Detect tissue and write tissue.geojson, tissue_mask.png, overview.png and tissue.json under `out_dir`."""
    tissue = detect_tissue(slide, params)
    if require:
        require_tissue(tissue, slide)
    out_dir.mkdir(parents=True, exist_ok=True)
    offset = (slide.bounds.x, slide.bounds.y)
    mpp = slide.mpp
    features = (
        feature(
            poly,
            "annotation",
            object_id_=object_id(slide.slide_id, "tissue", i),
            class_name="Tissue",
            color=TISSUE_COLOR,
            offset=offset,
            measurements={"Area mm^2": poly.area * mpp.x * mpp.y / 1e6},
        )
        for i, poly in enumerate(tissue.polygons)
    )
    files = {
        "geojson": out_dir / "tissue.geojson",
        "mask": out_dir / "tissue_mask.png",
        "overview": out_dir / "overview.png",
        "summary": out_dir / "tissue.json",
    }
    write_feature_collection(files["geojson"], features)
    save_mask_png(tissue.mask, files["mask"])
    overview = Overview(tissue.thumbnail, tissue.origin, tissue.scale)
    overview.outline(tissue.geometry, TISSUE_COLOR)
    overview.save(files["overview"])
    summary = {
        "slide": str(slide.path),
        "slide_id": slide.slide_id,
        "slide_mpp": [mpp.x, mpp.y],
        "mpp_source": mpp.source,
        **tissue.summary(),
        "params": params.model_dump(mode="json"),
    }
    write_json(files["summary"], summary)
    return TissueOutputs(tissue, files, summary)


def tiles_stage(
    slide: Slide,
    tissue: TissueMask,
    out_dir: Path,
    name: str,
    *,
    mpp: float,
    tile_px: int,
    overlap_px: int,
    min_tissue: float,
    tissue_params: TissueConfig,
) -> tuple[TilePlan, dict[str, Path]]:
    """Plan tiles and write tiles-<name>.json (the plan), .geojson (QuPath tile objects) and .png (overview)."""
    plan = plan_tiles(slide, tissue, mpp, tile_px, overlap_px, min_tissue)
    plan.params["tissue"] = tissue_params.model_dump(mode="json")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {kind: out_dir / f"tiles-{name}.{kind}" for kind in ("json", "geojson", "png")}
    plan.save(files["json"])
    w, h = plan.tile_size_level0
    offset = (slide.bounds.x, slide.bounds.y)
    features = (
        feature(
            shapely.box(x, y, x + w, y + h),
            "tile",
            object_id_=object_id(slide.slide_id, name, c, r),
            offset=offset,
            measurements={"Tissue fraction": float(f)},
        )
        for c, r, x, y, f in zip(
            plan.cols.tolist(),
            plan.rows.tolist(),
            plan.x.tolist(),
            plan.y.tolist(),
            plan.tissue_fraction.tolist(),
            strict=True,
        )
    )
    write_feature_collection(files["geojson"], features)
    overview = Overview(tissue.thumbnail, tissue.origin, tissue.scale)
    overview.outline(tissue.geometry, TISSUE_COLOR)
    overview.boxes(plan.x, plan.y, w, h, (*TILE_COLOR, 160))
    overview.save(files["png"])
    return plan, files


def task_tiling(task: str, task_cfg: TaskConfig, card: ModelCard) -> tuple[float, int]:
    """A task's (µm/px, tile px): the configured ones, the model card's where none is configured. A value the model
    cannot serve is refused by `engine.check_request` before any tile is read."""
    mpp = card.mpp if task_cfg.mpp is None else task_cfg.mpp
    tile_px = card.tile_px if task_cfg.tile_px is None else task_cfg.tile_px
    if task_cfg.overlap_px >= tile_px:
        raise ConfigError(
            f"tasks.{task}.overlap_px ({task_cfg.overlap_px}) must be smaller than the tile size ({tile_px} px, "
            f"{'configured' if task_cfg.tile_px is not None else f'from model {card.name}'})"
        )
    return mpp, tile_px


def task_plan(slide: Slide, tissue: TissueMask, task: str, task_cfg: TaskConfig, card: ModelCard) -> TilePlan:
    """A task's tiles over the slide's tissue (see `task_tiling`)."""
    mpp, tile_px = task_tiling(task, task_cfg, card)
    return plan_tiles(slide, tissue, mpp, tile_px, task_cfg.overlap_px, task_cfg.min_tissue)


def write_tissue_heatmap(store: Path, tissue: TissueMask) -> Path:
    """The tissue mask as the `tissue` heatmap (uint8, 255 = tissue) at the mask's µm/px."""
    from .heatmap import CHUNK, HeatmapGeometry, HeatmapWriter

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
    out_dir: Path,
    *,
    model_path: str | None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one task over the slide and write its heatmaps (and `tissue`) into out_dir/heatmaps.zarr."""
    from .engine import TaskRequest, predict_slide, resolve_device
    from .models import resolve_model

    task_cfg = getattr(config.tasks, task)
    model = resolve_model(task, model_path or task_cfg.model)  # before any tile is read
    torch_device = resolve_device(device)
    tissue = detect_tissue(slide, config.tissue)
    require_tissue(tissue, slide)
    card = model.card
    plan = task_plan(slide, tissue, task, task_cfg, card)
    store = out_dir / "heatmaps.zarr"
    timings = predict_slide(
        slide,
        [TaskRequest(task, model, plan)],
        store,
        device=torch_device,
        batch_size=batch_size or task_cfg.batch_size,
        workers=workers,
        progress=progress,
    )
    write_tissue_heatmap(store, tissue)
    return {
        "store": store,
        "heatmaps": [*card.written_classes, "tissue"],
        "tiles": len(plan),
        "timings": timings,
        "model": card.name,
    }
