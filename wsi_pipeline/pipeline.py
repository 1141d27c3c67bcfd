"""One slide, end to end: tissue, tiles, inference, post-processing, exports. Resumable and all-or-nothing.

Everything for a slide is built in `OUT/.<slide_id>.tmp-<pid>-<random>/` and renamed to `OUT/<slide_id>/` when
complete, so `OUT/<slide_id>/` exists only when finished. Its `run.json` records a compatibility key (configuration
of the tasks run, model cards and weights, µm/px); a re-run skips a slide whose key matches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import shapely
from scipy import ndimage

from . import __version__
from .atomic import write_json, write_text
from .config import Config
from .engine import TaskRequest, dense_crop, predict_slide, resolve_device
from .errors import WsiError
from .export.overlay import Overview, draw_points, heat_overlay
from .export.qupath import feature, object_id, write_feature_collection
from .heatmap import Heatmap, open_heatmap
from .models import LoadedModel
from .postprocess.maxima import find_peaks
from .postprocess.regions import Region, heatmap_regions, lesion_category
from .slide import Slide
from .stages import TISSUE_COLOR, task_plan, tissue_stage, write_tissue_heatmap

RUN_FORMAT = "wsi-pipeline/run@1"
COLORS = {
    "Tumor": (200, 0, 0),
    "Epithelium": (150, 0, 200),
    "Stroma": (230, 150, 0),
    "Mitosis": (0, 90, 255),
    "Tumor candidate": (255, 80, 80),
}
# Point objects each task exports as QuPath detections: (task, id kind, class, measurement name).
POINT_OBJECTS = (
    ("mitosis", "mitosis", "Mitosis", "Mitosis probability"),
    ("metastasis", "candidate", "Tumor candidate", "Tumor probability"),
)
# Region extraction reads the finest pyramid level no larger than this (px per side): enough for mm-scale regions.
_REGION_LEVEL_MAX_PX = 8192


@dataclass
class SlideOutcome:
    slide: Path
    slide_id: str
    status: str  # done | failed | skipped
    error: str = ""
    seconds: float = 0.0
    tiles: int = 0
    summary: dict[str, Any] | None = None


@dataclass
class _TaskResult:
    summary: dict[str, Any]
    features: list[dict[str, Any]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)  # [x, y, probability] in level-0 px
    overlay: tuple[Heatmap, str, tuple[int, int, int]] | None = None


def weights_digest(model: LoadedModel) -> str:
    path = model.path / "weights.safetensors" if model.path else None
    if path is None or not path.exists():
        return "in-memory"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def compatibility_key(config: Config, tasks: list[str], models: dict[str, LoadedModel], mpp: float) -> str:
    parts = {
        "tissue": config.tissue.model_dump(mode="json"),
        "tasks": {t: getattr(config.tasks, t).model_dump(mode="json", exclude={"model", "batch_size"}) for t in tasks},
        "models": {t: [models[t].card.model_dump(mode="json"), weights_digest(models[t])] for t in tasks},
        "mpp": round(mpp, 9),
        "format": RUN_FORMAT,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def completed_run(slide_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((slide_dir / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if record.get("complete") and record.get("format") == RUN_FORMAT else None


def positive_class(classes: list[str], preferred: tuple[str, ...]) -> str:
    """The class a task reports on: the first preferred name present, else the last class."""
    return next((c for c in preferred if c in classes), classes[-1])


def process_slide(
    path: Path,
    slide_id: str,
    out_root: Path,
    config: Config,
    tasks: list[str],
    models: dict[str, LoadedModel],
    *,
    device: str = "auto",
    workers: int = 1,
    mpp: float | None = None,
    default_mpp: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SlideOutcome:
    """Run `tasks` on one slide into OUT/<slide_id>/; never raises for bad input (the outcome says what failed)."""
    started = time.perf_counter()
    final = out_root / slide_id
    tmp = out_root / f".{slide_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        slide = Slide(path, mpp=mpp)
        if slide.mpp_or_none is None and default_mpp is not None:
            slide = Slide(path, mpp=default_mpp)
        key = compatibility_key(config, tasks, models, slide.mpp.mean)
        previous = completed_run(final)
        if previous and previous.get("compatibility") == key and not overwrite:
            return SlideOutcome(
                path,
                slide_id,
                "skipped",
                seconds=time.perf_counter() - started,
                tiles=int(previous.get("tiles", 0)),
                summary=json.loads((final / "summary.json").read_text()),
            )
        tmp.mkdir(parents=True)
        record = _run(slide, slide_id, tmp, config, tasks, models, device, workers, progress)
        record.update(
            {"compatibility": key, "format": RUN_FORMAT, "complete": True, "seconds": time.perf_counter() - started}
        )
        write_json(tmp / "run.json", record)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        summary = json.loads((final / "summary.json").read_text())
        return SlideOutcome(
            path, slide_id, "done", seconds=time.perf_counter() - started, tiles=record["tiles"], summary=summary
        )
    except WsiError as exc:
        return SlideOutcome(path, slide_id, "failed", str(exc), time.perf_counter() - started)
    except Exception as exc:  # an unexpected bug must not stop the other slides either
        return SlideOutcome(
            path,
            slide_id,
            "failed",
            f"internal error {type(exc).__name__}: {exc} (please report)",
            time.perf_counter() - started,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    slide: Slide,
    slide_id: str,
    out: Path,
    config: Config,
    tasks: list[str],
    models: dict[str, LoadedModel],
    device: str,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tissue = tissue_stage(slide, config.tissue, out).tissue
    timings["tissue_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    requests = []
    for task in tasks:
        plan = task_plan(slide, tissue, task, getattr(config.tasks, task), models[task].card)
        requests.append(TaskRequest(task, models[task], plan))
    timings["tiling_s"] = time.perf_counter() - t0
    store = out / "heatmaps.zarr"
    t0 = time.perf_counter()
    inference = (
        predict_slide(
            slide,
            requests,
            store,
            device=resolve_device(device),
            batch_size=max(getattr(config.tasks, t).batch_size for t in tasks) if tasks else 1,
            workers=workers,
            progress=progress,
        )
        if requests
        else {"reads": []}
    )
    write_tissue_heatmap(store, tissue)
    timings["inference_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mpp = slide.mpp
    tissue_mm2 = tissue.area_mm2
    results: dict[str, _TaskResult] = {}
    for request in requests:
        post = {"mitosis": _mitosis, "metastasis": _metastasis, "epithelium_stroma": _epithelium_stroma}
        results[request.name] = post[request.name](request, store, config, (mpp.x, mpp.y), tissue_mm2, slide_id)
    timings["postprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = {
        "slide_id": slide_id,
        "slide": str(slide.path),
        "mpp": mpp.mean,
        "mpp_source": mpp.source,
        "tissue_area_mm2": round(tissue_mm2, 6),
        **{t: r.summary for t, r in results.items()},
    }
    write_json(out / "summary.json", summary)
    _write_mitoses_csv(out / "mitoses.csv", results.get("mitosis"), slide)
    offset = (slide.bounds.x, slide.bounds.y)
    write_feature_collection(
        out / "qupath.geojson", _qupath_features(slide_id, tissue.polygons, results, requests, store, offset)
    )
    if config.export.geojson_gzip:
        write_feature_collection(
            out / "qupath.geojson.gz", _qupath_features(slide_id, tissue.polygons, results, requests, store, offset)
        )
    _write_overview(out / "overview.png", tissue, results)
    timings["export_s"] = time.perf_counter() - t0
    return {
        "slide": str(slide.path),
        "slide_id": slide_id,
        "slide_info": slide.info(),
        "config": config.model_dump(mode="json"),
        "tasks": tasks,
        "models": {
            t: {
                "path": str(models[t].path),
                "card": models[t].card.model_dump(mode="json"),
                "weights_sha256_16": weights_digest(models[t]),
            }
            for t in tasks
        },
        "tiles": sum(len(r.plan) for r in requests),
        "timings": timings,
        "inference": inference,
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import openslide
    import torch
    import zarr

    return {
        "wsi_pipeline": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "openslide": openslide.__library_version__,
        "openslide_python": openslide.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }


def _level_for_regions(heat: Heatmap) -> int:
    for level, arr in enumerate(heat.levels):
        if max(arr.shape[1:]) <= _REGION_LEVEL_MAX_PX:
            return level
    return len(heat.levels) - 1


def _transform(heat: Heatmap, level: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(origin, scale) in level-0 px of a heatmap level's pixel edges."""
    t = heat.attrs["level0_px"]
    factor = 2**level
    return (t["origin"][0], t["origin"][1]), (t["scale"][0] * factor, t["scale"][1] * factor)


def _region_level(heat: Heatmap, name: str) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """One channel at the level used for regions and overlays, with its (origin, scale) in level-0 px."""
    level = _level_for_regions(heat)
    origin, scale = _transform(heat, level)
    return heat.channel(name, level), origin, scale


def _regions(
    values: np.ndarray,
    origin: tuple[float, float],
    scale: tuple[float, float],
    threshold: float,
    mpp: tuple[float, float],
) -> list[Region]:
    return heatmap_regions(values, threshold, origin, scale, mpp, simplify_px=scale[0] / 4)


def _mitosis(
    request: TaskRequest, store: Path, config: Config, mpp: tuple[float, float], tissue_mm2: float, slide_id: str
) -> _TaskResult:
    cfg = config.tasks.mitosis
    name = positive_class(request.model.card.written_classes, ("mitosis",))
    heat = open_heatmap(store / name)
    origin, scale = _transform(heat, 0)
    px_um = scale[0] * mpp[0]
    values = da.from_zarr(heat.levels[0])[heat.channels.index(name)].astype(np.float32) * heat.attrs["value_scale"]
    peaks = find_peaks(
        values,
        min_distance=max(1, round(cfg.min_distance_um / px_um)),
        threshold=cfg.threshold,
        sigma=cfg.smooth_sigma_um / px_um,
    )
    x = origin[0] + (peaks.cols + 0.5) * scale[0]
    y = origin[1] + (peaks.rows + 0.5) * scale[1]
    count = len(peaks)
    per_mm2 = count / tissue_mm2 if tissue_mm2 > 0 else 0.0
    summary = {
        "count": count,
        "per_mm2": round(per_mm2, 6),
        "per_10_hpf": round(per_mm2 * 10 * cfg.hpf_area_mm2, 6),
        "hpf_area_mm2": cfg.hpf_area_mm2,
        "threshold": cfg.threshold,
        "min_distance_um": cfg.min_distance_um,
    }
    return _TaskResult(summary, points=np.c_[x, y, peaks.values].tolist(), overlay=(heat, name, COLORS["Mitosis"]))


def _metastasis(
    request: TaskRequest, store: Path, config: Config, mpp: tuple[float, float], tissue_mm2: float, slide_id: str
) -> _TaskResult:
    cfg = config.tasks.metastasis
    name = positive_class(request.model.card.written_classes, ("tumor", "tumour", "metastasis"))
    heat = open_heatmap(store / name)
    values, origin, scale = _region_level(heat, name)
    px_um = scale[0] * mpp[0]
    smoothed = ndimage.gaussian_filter(values, cfg.smooth_sigma_um / px_um) if cfg.smooth_sigma_um else values
    regions = [
        r for r in _regions(values, origin, scale, cfg.threshold, mpp) if r.longest_diameter_um >= cfg.min_lesion_um
    ]
    candidates = find_peaks(smoothed, min_distance=max(1, round(75.0 / px_um)), threshold=cfg.threshold / 2)
    largest = max((r.longest_diameter_um for r in regions), default=0.0)
    summary = {
        "score": round(float(smoothed.max(initial=0.0)), 6),
        "threshold": cfg.threshold,
        "regions": len(regions),
        "tumor_area_mm2": round(sum(r.area_um2 for r in regions) / 1e6, 6),
        "largest_lesion_diameter_um": round(largest, 2),
        "category": lesion_category(largest) if regions else "negative",
        "candidates": len(candidates),
    }
    points = [
        [origin[0] + (c + 0.5) * scale[0], origin[1] + (r + 0.5) * scale[1], float(v)]
        for r, c, v in zip(candidates.rows, candidates.cols, candidates.values, strict=True)
    ]
    return _TaskResult(
        summary,
        [_region_feature(slide_id, "Tumor", i, r) for i, r in enumerate(regions)],
        points=points,
        overlay=(heat, name, COLORS["Tumor"]),
    )


def _epithelium_stroma(
    request: TaskRequest, store: Path, config: Config, mpp: tuple[float, float], tissue_mm2: float, slide_id: str
) -> _TaskResult:
    cfg = config.tasks.epithelium_stroma
    written = request.model.card.written_classes
    summary: dict[str, Any] = {"threshold": cfg.threshold}
    features = []
    for cls, label in (("epithelium", "Epithelium"), ("stroma", "Stroma")):
        if cls not in written:
            continue
        regions = _regions(*_region_level(open_heatmap(store / cls), cls), cfg.threshold, mpp)
        area = sum(r.area_um2 for r in regions) / 1e6
        summary[f"{cls}_area_mm2"] = round(area, 6)
        features += [_region_feature(slide_id, label, i, r) for i, r in enumerate(regions)]
    if "epithelium_area_mm2" in summary:
        summary["epithelium_fraction"] = round(summary["epithelium_area_mm2"] / tissue_mm2, 6) if tissue_mm2 else 0.0
    overlay_cls = "epithelium" if "epithelium" in written else written[0]
    return _TaskResult(
        summary, features, overlay=(open_heatmap(store / overlay_cls), overlay_cls, COLORS["Epithelium"])
    )


def _region_feature(slide_id: str, cls: str, index: int, region: Region) -> dict[str, Any]:
    return {
        "cls": cls,
        "id": object_id(slide_id, cls, index),
        "polygon": region.polygon,
        "measurements": {
            "Area µm^2": region.area_um2,
            "Max diameter µm": region.longest_diameter_um,
            "Max probability": region.max_probability,
        },
    }


def _qupath_features(
    slide_id: str,
    tissue_polygons: list,
    results: dict[str, _TaskResult],
    requests: list[TaskRequest],
    store: Path,
    offset: tuple[float, float],
) -> Iterator[dict]:
    """Everything QuPath should show, one feature at a time (see docs/outputs.md)."""
    for i, poly in enumerate(tissue_polygons):
        yield feature(
            poly,
            "annotation",
            object_id_=object_id(slide_id, "tissue", i),
            class_name="Tissue",
            color=TISSUE_COLOR,
            offset=offset,
        )
    for result in results.values():
        for f in result.features:
            yield feature(
                f["polygon"],
                "annotation",
                object_id_=f["id"],
                class_name=f["cls"],
                color=COLORS[f["cls"]],
                measurements=f["measurements"],
                offset=offset,
            )
    for task, kind, cls, measurement in POINT_OBJECTS:
        for i, (x, y, p) in enumerate(results[task].points if task in results else []):
            yield feature(
                shapely.Point(x, y),
                "detection",
                object_id_=object_id(slide_id, kind, i),
                class_name=cls,
                color=COLORS[cls],
                measurements={measurement: p},
                offset=offset,
            )
    for request in requests:
        yield from _tile_features(slide_id, request, store, offset)


def _tile_features(slide_id: str, request: TaskRequest, store: Path, offset: tuple[float, float]) -> Iterator[dict]:
    """Every analysed tile as a QuPath `tile` with the task's probabilities (mean and max over the tile's own
    heatmap area for dense tasks), read one tile row at a time."""
    plan, card = request.plan, request.model.card
    heats = {c: open_heatmap(store / c) for c in card.written_classes}
    w, h = plan.tile_size_level0
    crop = dense_crop(plan, card.output_stride) if card.kind == "dense" else None
    for row in np.unique(plan.rows):
        idx = np.flatnonzero(plan.rows == row)
        if card.kind == "classifier":
            band = {
                c: np.asarray(heat.levels[0][0, int(row)], np.float32) * heat.attrs["value_scale"]
                for c, heat in heats.items()
            }
        else:
            assert crop is not None
            step, margin = crop.step, crop.margin
            y0, y1 = int(row) * step + margin, int(row) * step + margin + step
            band = {
                c: np.asarray(heat.levels[0][0, y0:y1], np.float32) * heat.attrs["value_scale"]
                for c, heat in heats.items()
            }
        for i in idx.tolist():
            col = int(plan.cols[i])
            measurements: dict[str, float] = {"Tissue fraction": float(plan.tissue_fraction[i])}
            for c, values in band.items():
                if card.kind == "classifier":
                    measurements[f"{c} probability"] = float(values[col])
                else:
                    block = values[:, col * step + margin : col * step + margin + step]
                    measurements[f"{c} mean"] = float(block.mean()) if block.size else 0.0
                    measurements[f"{c} max"] = float(block.max()) if block.size else 0.0
            x, y = float(plan.x[i]), float(plan.y[i])
            yield feature(
                shapely.box(x, y, x + w, y + h),
                "tile",
                object_id_=object_id(slide_id, request.name, col, int(row)),
                name=request.name,
                measurements=measurements,
                offset=offset,
            )


def _write_mitoses_csv(path: Path, result: _TaskResult | None, slide: Slide) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["x", "y", "probability"])
    if result is not None:
        bx, by = slide.bounds.x, slide.bounds.y
        for x, y, p in result.points:
            writer.writerow([f"{x - bx:.2f}", f"{y - by:.2f}", f"{p:.4f}"])
    write_text(path, buffer.getvalue())


def _write_overview(path: Path, tissue: Any, results: dict[str, _TaskResult]) -> None:
    overview = Overview(tissue.thumbnail, tissue.origin, tissue.scale)
    for result in results.values():
        if result.overlay is not None and result.overlay[0] is not None:
            heat, name, color = result.overlay
            values, origin, scale = _region_level(heat, name)
            heat_overlay(overview, values, origin, scale, color)
    overview.outline(tissue.geometry, TISSUE_COLOR)
    for result in results.values():
        for f in result.features:
            overview.outline(f["polygon"], COLORS[f["cls"]])
    if "mitosis" in results and results["mitosis"].points:
        pts = np.asarray(results["mitosis"].points)
        draw_points(overview, pts[:, 0], pts[:, 1], COLORS["Mitosis"])
    overview.save(path)
