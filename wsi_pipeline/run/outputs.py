"""Everything written into a slide's folder, assembled in one place from finished artefacts and the tasks' results:
tissue and tile files, summary.json, QuPath objects, point tables, the overview and the overlays. The exporters
themselves (`export/`) know nothing of tasks; the cohort files (manifest, cohort table, report) are `run.cohort`'s."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image

from wsi_pipeline.config import ExportConfig, TissueConfig
from wsi_pipeline.core.atomic import write_json, write_text
from wsi_pipeline.core.errors import raise_if_signalled
from wsi_pipeline.core.layout import SlideLayout
from wsi_pipeline.engine import TaskRequest, tile_measurements
from wsi_pipeline.engine.stitch import domain_heatmap
from wsi_pipeline.export.figures import MIN_LONG_SIDE_PX, Marks, Outline, OverlayFigure, save_overlay
from wsi_pipeline.export.overlay import Overview, draw_points, heat_overlay, sample_on_grid, save_mask_png
from wsi_pipeline.export.qupath import (
    TISSUE_COLOR,
    feature,
    object_id,
    tile_features,
    tissue_features,
    write_feature_collection,
    write_feature_collections,
)
from wsi_pipeline.heatmap import open_heatmap
from wsi_pipeline.run.qc import QcFinding, qc_features, write_qc_overlay
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import TilePlan
from wsi_pipeline.slide.tissue import TissueMask
from wsi_pipeline.tasks import TaskResult, get_task, task_names
from wsi_pipeline.tasks.common import region_level

TILE_COLOR = (30, 90, 220)


def qupath_offset(slide: Slide) -> tuple[float, float]:
    """OpenSlide coordinates minus this are QuPath's (the bounds corner is QuPath's origin)."""
    return (slide.bounds.x, slide.bounds.y)


def plan_tile_features(
    slide_id: str, name: str, plan: TilePlan, offset: tuple[float, float]
) -> Iterator[dict[str, Any]]:
    """QuPath tile objects of a plan with their tissue fraction."""
    rows = zip(
        plan.cols.tolist(),
        plan.rows.tolist(),
        plan.x.tolist(),
        plan.y.tolist(),
        plan.tissue_fraction.tolist(),
        strict=True,
    )
    tiles = ((c, r, float(x), float(y), {"Tissue fraction": float(f)}) for c, r, x, y, f in rows)
    return tile_features(slide_id, name, tiles, plan.tile_size_level0, offset)


def write_tissue_files(
    out: SlideLayout, slide: Slide, tissue: TissueMask, params: TissueConfig, *, overview: bool = True
) -> tuple[dict[str, Path], dict[str, Any]]:
    """tissue.geojson, tissue_mask.png, tissue.json and (with `overview`) overview.png; their paths and the summary."""
    mpp = slide.mpp
    files = {"geojson": out.tissue_geojson, "mask": out.tissue_mask, "summary": out.tissue_summary}
    write_feature_collection(
        files["geojson"], tissue_features(slide.slide_id, tissue.polygons, (mpp.x, mpp.y), qupath_offset(slide))
    )
    save_mask_png(tissue.mask, files["mask"])
    if overview:
        files["overview"] = out.overview
        picture = Overview(tissue.thumbnail, tissue.origin, tissue.scale)
        picture.outline(tissue.geometry, TISSUE_COLOR)
        picture.save(files["overview"])
    summary = {
        "slide": str(slide.path),
        "slide_id": slide.slide_id,
        "slide_mpp": [mpp.x, mpp.y],
        "mpp_source": mpp.source,
        **tissue.summary(),
        "params": params.model_dump(mode="json"),
    }
    write_json(files["summary"], summary)
    return files, summary


def write_tile_files(out: SlideLayout, slide: Slide, tissue: TissueMask, name: str, plan: TilePlan) -> dict[str, Path]:
    """tiles-<name>.json (the plan), .geojson (QuPath tile objects) and .png (overview); their paths."""
    out.root.mkdir(parents=True, exist_ok=True)
    files = {kind: out.tiles(name, kind) for kind in ("json", "geojson", "png")}
    plan.save(files["json"])
    write_feature_collection(files["geojson"], plan_tile_features(slide.slide_id, name, plan, qupath_offset(slide)))
    picture = Overview(tissue.thumbnail, tissue.origin, tissue.scale)
    picture.outline(tissue.geometry, TISSUE_COLOR)
    picture.boxes(plan.x, plan.y, *plan.tile_size_level0, (*TILE_COLOR, 160))
    picture.save(files["png"])
    return files


def write_task_outputs(
    out: SlideLayout,
    slide: Slide,
    tissue: TissueMask,
    requests: list[TaskRequest],
    results: dict[str, TaskResult],
    guard: dict[str, dict[str, Any]],
    export: ExportConfig,
    quality: QcFinding | None = None,
    slide_figures: dict[str, Any] | None = None,
) -> None:
    """What `run` writes of a slide's task results: summary.json, the point tables, qupath.geojson (and .gz), the
    overview, each task's overlay and (when quality was measured) the QC overlay."""
    slide_id, mpp = slide.slide_id, slide.mpp
    summary = {
        "slide_id": slide_id,
        "slide": str(slide.path),
        "mpp": mpp.mean,
        "mpp_source": mpp.source,
        **(slide_figures or {}),
        "tissue_area_mm2": round(tissue.area_mm2, 6),
        **{t: _task_summary(r) for t, r in results.items()},
        **({"input_guard": guard} if guard else {}),
        **({"qc": quality.summary() | _qc_warning(quality)} if quality is not None else {}),
    }
    # between files, an interrupt is acted on (this runs beside the model, in a thread that only sees the signal
    # at such points): a scheduler's grace before SIGKILL is seconds
    write_json(out.summary, summary)
    offset = qupath_offset(slide)
    write_point_tables(out, results, offset)
    raise_if_signalled()
    features = qupath_features(slide_id, tissue, results, requests, out, offset)
    if quality is not None:
        features = chain(features, qc_features(quality, slide_id, (mpp.x, mpp.y), offset))
    write_feature_collections([out.qupath, *([out.qupath_gz] if export.geojson_gzip else [])], features)
    raise_if_signalled()
    detail, picture = slide_pictures(slide, any(r.overlay is not None for r in results.values()))
    write_overview(out, tissue, results, picture)
    if detail is not None:
        write_task_overlays(out, slide, tissue, results, detail)
    raise_if_signalled()
    if quality is not None and quality.measured:
        title = f"{slide_id}: quality control, usable {100 * (quality.usable_fraction or 0.0):.0f} % of analysed tissue"
        write_qc_overlay(out.overlay("qc"), quality, *picture, tissue.geometry, title)


def _qc_warning(quality: QcFinding) -> dict[str, Any]:
    warning = quality.warning()
    return {"warnings": [warning]} if warning else {}


def _task_summary(result: TaskResult) -> dict[str, Any]:
    """A task's figures with its warnings and the keys they flag (report.html marks those cells)."""
    extra = {"warnings": result.warnings} if result.warnings else {}
    return result.summary | extra | ({"flagged": result.flagged} if result.flagged else {})


def qupath_features(
    slide_id: str,
    tissue: TissueMask,
    results: dict[str, TaskResult],
    requests: list[TaskRequest],
    out: SlideLayout,
    offset: tuple[float, float],
) -> Iterator[dict[str, Any]]:
    """Everything QuPath should show, one feature at a time (see docs/outputs.md): tissue and regions as
    annotations, points as detections, every analysed tile as a `tile` with the task's probabilities."""
    yield from tissue_features(slide_id, tissue.polygons, tissue.slide_mpp, offset)
    for result in results.values():
        for region in result.regions:
            yield feature(
                region.polygon,
                "annotation",
                object_id_=region.object_id,
                class_name=region.cls,
                color=region.colour,
                measurements=region.measurements,
                offset=offset,
            )
    for result in results.values():
        for points in result.points:
            for i, (x, y, p) in enumerate(points.xyp.tolist()):
                yield feature(
                    shapely.Point(x, y),
                    "detection",
                    object_id_=object_id(slide_id, points.kind, i),
                    class_name=points.cls,
                    color=points.colour,
                    measurements={points.measurement: p},
                    offset=offset,
                )
    for result in results.values():
        if result.tiles is not None:
            yield from tile_features(slide_id, result.tiles.name, result.tiles.tiles, result.tiles.size, offset)
    for request in requests:
        card, plan = request.model.card, request.plan
        heats = {c: open_heatmap(out.heatmap(c)) for c in card.written_classes}
        tiles = (
            (int(plan.cols[i]), int(plan.rows[i]), float(plan.x[i]), float(plan.y[i]), measurements)
            for i, measurements in tile_measurements(plan, card, heats)
        )
        yield from tile_features(slide_id, request.name, tiles, plan.tile_size_level0, offset)


def write_point_tables(out: SlideLayout, results: dict[str, TaskResult], offset: tuple[float, float]) -> None:
    """Each task with a point table (mitosis: mitoses.csv) writes its first point set in QuPath coordinates."""
    for name, result in results.items():
        if name not in task_names():  # the slide classifier's result: no point table
            continue
        table = get_task(name).point_table
        if table is None:
            continue
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["x", "y", "probability"])
        for x, y, p in result.points[0].xyp.tolist() if result.points else []:
            writer.writerow([f"{x - offset[0]:.2f}", f"{y - offset[1]:.2f}", f"{p:.4f}"])
        write_text(out.table(table), buffer.getvalue())


OVERVIEW_LONG_SIDE_PX = 1000  # the report shows it beside overlays of 600 px and more


Picture = tuple[np.ndarray, tuple[float, float], tuple[float, float]]  # RGB, its level-0 origin, level-0 px per px


def overlay_mpp(slide: Slide) -> float:
    """The µm/px of the overlays' picture: its long side MIN_LONG_SIDE_PX."""
    b, mpp = slide.bounds, slide.mpp
    return max(b.width * mpp.x, b.height * mpp.y) / MIN_LONG_SIDE_PX


def slide_pictures(slide: Slide, overlays: bool) -> tuple[Picture | None, Picture]:
    """The slide pictures the exports draw on: the overlays' (long side at least MIN_LONG_SIDE_PX, when there are
    overlays) and the overview's (1000 px on its long side, or the slide's own resolution if coarser; the tissue
    mask's thumbnail is ~150 px for a small slide). The slide is read once: the overview is the overlays' picture
    reduced (a box mean; a second exact read of a small slide cost ~0.1 s of its ~0.7 s of exports)."""
    b, mpp = slide.bounds, slide.mpp
    target = max(mpp.x, max(b.width * mpp.x, b.height * mpp.y) / OVERVIEW_LONG_SIDE_PX)
    origin, overview_scale = (float(b.x), float(b.y)), (target / mpp.x, target / mpp.y)
    if not overlays:
        return None, (slide.thumbnail(target), origin, overview_scale)
    image = slide.thumbnail(overlay_mpp(slide))  # finer than the overview's, which it only shrinks to
    h, w = image.shape[:2]
    size = (max(1, round(b.width * mpp.x / target)), max(1, round(b.height * mpp.y / target)))
    overview = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return (image, origin, (b.width / w, b.height / h)), (overview, origin, overview_scale)


WITHHELD_COLOR = (150, 150, 150)  # the legend's swatch of a task whose answer is withheld on this slide


def write_overview(
    out: SlideLayout,
    tissue: TissueMask,
    results: dict[str, TaskResult],
    picture: Picture,
) -> None:
    """`picture` (slide_pictures' overview) with every task's heatmap overlay, the tissue outline, regions, (drawn)
    points and a legend. A task whose answer is withheld here ("not applicable": tissue unlike its training data) is
    not painted at all, and says so in the legend: its map over normal skin once showed a lymph-node model's tumour
    in red on the first picture of the report. Elsewhere a guarded task is painted only on the tiles its guard
    kept (its own overlay hatches the others)."""
    overview = Overview(*picture)
    shown = {task: result for task, result in results.items() if result.overlay and result.overlay.on_overview}
    withheld = {task for task, result in results.items() if "not_applicable" in result.summary}
    for task, result in shown.items():
        if result.overlay is not None and task not in withheld:
            name = result.overlay.heatmap
            values, origin, scale = region_level(open_heatmap(out.heatmap(name)), name)
            everywhere = np.ones((overview.image.height, overview.image.width), bool)
            outside = _outside_domain(out, task, overview.origin, overview.scale, everywhere)
            heat_overlay(
                overview, values, origin, scale, result.overlay.colour, where=None if outside is None else ~outside
            )
    overview.outline(tissue.geometry, TISSUE_COLOR)
    kept = {task: result for task, result in results.items() if task not in withheld}
    for result in kept.values():
        for region in result.regions:
            overview.outline(region.polygon, region.colour)
    for result in kept.values():
        for points in result.points:
            if points.drawn and len(points.xyp):
                xyp = np.asarray(points.xyp)
                draw_points(overview, xyp[:, 0], xyp[:, 1], points.colour)
    entries = [("tissue outline", TISSUE_COLOR)]
    for task, result in results.items():
        if task in withheld:
            entries.append((f"{task}: not applicable here", WITHHELD_COLOR))
            continue
        if task in shown and result.overlay is not None:
            entries.append((f"{task}: {result.overlay.heatmap}", result.overlay.colour))
        entries += [(f"{task}: {p.cls}", p.colour) for p in result.points if p.drawn and len(p.xyp)]
    overview.legend(entries)
    overview.save(out.overview)


def _rings(geometry: shapely.Geometry, origin: tuple[float, float], scale: tuple[float, float]) -> list[np.ndarray]:
    """Exterior and interior rings of (multi)polygons in image px of a grid at `origin`, `scale`."""
    rings = []
    for poly in getattr(geometry, "geoms", [geometry]):
        if poly.is_empty or poly.geom_type != "Polygon":
            continue
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, dtype=np.float64)
            rings.append(np.c_[(xy[:, 0] - origin[0]) / scale[0], (xy[:, 1] - origin[1]) / scale[1]])
    return rings


def _outside_domain(
    out: SlideLayout, task: str, origin: tuple[float, float], scale: tuple[float, float], on_tissue: np.ndarray
) -> np.ndarray | None:
    """Tissue px of the picture whose tile the task's domain guard rejected (None: the model has no guard)."""
    path = out.heatmap(domain_heatmap(task))
    if not path.exists():
        return None
    heat = open_heatmap(path)
    values, v_origin, v_scale = region_level(heat, heat.channels[0])
    sampled = sample_on_grid(values, v_origin, v_scale, origin, scale, on_tissue.shape, fill=np.nan)
    return on_tissue & (np.nan_to_num(sampled, nan=0.0) > 1.0)


def write_task_overlays(
    out: SlideLayout, slide: Slide, tissue: TissueMask, results: dict[str, TaskResult], picture: Picture
) -> list[str]:
    """`overlay-<task>.png` for every task with an overlay, all drawn on `picture` (slide_pictures' overlays' one);
    returns the tasks drawn."""
    drawn = [name for name, result in results.items() if result.overlay is not None]
    image, origin, scale = picture
    h, w = image.shape[:2]
    slide_id, picture_mpp = slide.slide_id, overlay_mpp(slide)
    on_tissue = sample_on_grid(tissue.mask.astype(np.float32), tissue.origin, tissue.scale, origin, scale, (h, w)) > 0
    tissue_outline = Outline("Tissue", TISSUE_COLOR, _rings(tissue.geometry, origin, scale))
    for name in drawn:
        raise_if_signalled()
        result = results[name]
        overlay = result.overlay
        assert overlay is not None
        values, v_origin, v_scale = region_level(open_heatmap(out.heatmap(overlay.heatmap)), overlay.heatmap)
        outlines: dict[str, Outline] = {}
        for region in result.regions:
            outline = outlines.setdefault(region.cls, Outline(region.cls, region.colour))
            outline.rings += _rings(region.polygon, origin, scale)
        marks = [
            Marks(p.cls, p.colour, np.c_[(p.xyp[:, 0] - origin[0]) / scale[0], (p.xyp[:, 1] - origin[1]) / scale[1]])
            for p in result.points
            if p.drawn
        ]
        domain = result.summary.get("domain") or {}
        label = overlay.label or f"{overlay.heatmap} probability"
        title = f"{slide_id} — {name}: {label}{f' — {overlay.note}' if overlay.note else ''}"
        if "not_applicable" in result.summary:
            title += " — not applicable here"
        if "model_domain" in domain:
            title += f"\nmodel domain: {domain['model_domain']}"
            if domain.get("in_domain_fraction") is not None:
                title += f"; in domain {100 * domain['in_domain_fraction']:.0f} % of tissue"
            else:  # the reader must not take an answer on another organ for a checked one
                title += "; no domain guard: tissue unlike it is not flagged"
        figure = OverlayFigure(
            title=title,
            image=image,
            values=sample_on_grid(values, v_origin, v_scale, origin, scale, (h, w), fill=np.nan),
            tissue=on_tissue,
            value_label=label,
            um_per_px=picture_mpp,
            outlines=[tissue_outline, *outlines.values()],
            marks=marks,
            outside=_outside_domain(out, name, origin, scale, on_tissue),
        )
        save_overlay(out.overlay(name), figure)
    return drawn
