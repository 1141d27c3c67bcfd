"""Training tiles from slides annotated in QuPath and exported as GeoJSON (File › Export objects as GeoJSON).

A data folder holds slides and, beside each, `<slide stem>.geojson` (or `.geojson.gz`). Every classified polygon
annotation is a source of tiles of its class: a grid of tiles at the model's µm/px over the annotation, keeping
tiles that the annotation covers by at least `min_coverage`. QuPath coordinates are level-0 px of the bounded image,
so they are shifted by the slide's `openslide.bounds` offset. A slide is one group: its tiles stay on one side of
the train/validation split.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import shapely
from shapely.geometry import shape

from wsi_pipeline.core.errors import WsiError
from wsi_pipeline.slide import SLIDE_EXTENSIONS, Slide
from wsi_pipeline.training.data.items import DataError, SlideRegion, TileItem

ANNOTATION_SUFFIXES = (".geojson", ".geojson.gz", ".json")


def annotation_file(slide_path: Path) -> Path | None:
    for suffix in ANNOTATION_SUFFIXES:
        candidate = slide_path.with_name(slide_path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def is_annotated_folder(root: str | Path) -> bool:
    """Slides with QuPath exports beside them; a missing folder is not (the folder reader then says it is missing)."""
    root = Path(root)
    if not root.is_dir():
        return False
    return any(p.suffix.lower() in SLIDE_EXTENSIONS and annotation_file(p) for p in root.iterdir() if p.is_file())


def read_classified_polygons(path: Path) -> list[tuple[str, shapely.Geometry]]:
    """(class name, polygon) for each classified Polygon / MultiPolygon feature; a derived class (`names`) is
    joined with ': ' as QuPath shows it."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                data = json.load(handle)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"annotations {path} cannot be read as GeoJSON: {exc}") from exc
    features = data.get("features", []) if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    found = []
    for feature in features:
        props = feature.get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name") or ": ".join(cls.get("names", []))
        geometry = feature.get("geometry")
        if not name or not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        polygon = shapely.make_valid(shape(geometry))
        if not polygon.is_empty and polygon.area > 0:
            found.append((name, polygon))
    return found


def annotated_items(
    root: str | Path,
    class_map: Mapping[str, Sequence[str]] | None,
    *,
    mpp: float,
    tile_px: int,
    min_coverage: float = 0.75,
    max_tiles_per_class: int | None = 2000,
    seed: int = 0,
    strict: bool = True,
    default_mpp: float | None = None,
) -> tuple[list[TileItem], list[str]]:
    """Tiles from every annotated slide in `root`; `class_map` maps output classes to QuPath class names (default:
    one output class per QuPath class). Not `strict` (one class map over data folders of several layouts), a mapped
    name no annotation uses is no error, as long as every class has tiles. A slide without µm/px in its file is read
    at `default_mpp`."""
    root = Path(root)
    slides = sorted(p for p in root.iterdir() if p.suffix.lower() in SLIDE_EXTENSIONS and annotation_file(p))
    if not slides:
        raise DataError(f"{root}: no slide with a <slide stem>.geojson beside it")
    per_slide = {}
    for path in slides:
        # not None: `slides` holds only slides that have an annotation file
        polygons = read_classified_polygons(cast(Path, annotation_file(path)))
        per_slide[path] = polygons
    names = sorted({name for polygons in per_slide.values() for name, _ in polygons})
    mapping = dict(class_map) if class_map else {n: [n] for n in names}
    missing = sorted({n for ns in mapping.values() for n in ns} - set(names))
    if missing and (strict or len(missing) == sum(len(ns) for ns in mapping.values())):
        raise DataError(f"{root}: no annotation is classified {missing} (classes found: {names})")
    label_of = {qupath: label for label, cls in enumerate(mapping) for qupath in mapping[cls]}
    rng = np.random.default_rng(seed)
    items: list[TileItem] = []
    for path, polygons in per_slide.items():
        try:
            slide = Slide(path)
            if default_mpp and slide.mpp_or_none is None:
                slide = slide.with_mpp(default_mpp)
            offset, slide_mpp = (slide.bounds.x, slide.bounds.y), slide.mpp
        except WsiError as exc:
            raise DataError(f"annotated slide {path}: {exc}") from exc
        for label in range(len(mapping)):
            region = shapely.union_all([poly for name, poly in polygons if label_of.get(name) == label])
            if region.is_empty:
                continue
            region = shapely.affinity.translate(region, offset[0], offset[1])  # QuPath -> OpenSlide level 0
            # one grid per separate area, anchored at its own bounds: a grid over the union's bounds would cut a
            # small annotation far from the others wherever its lines happen to fall
            width, height = tile_px * mpp / slide_mpp.x, tile_px * mpp / slide_mpp.y
            parts = getattr(region, "geoms", [region])
            origins = np.concatenate([_tile_origins(part, width, height, min_coverage) for part in parts])
            if max_tiles_per_class and len(origins) > max_tiles_per_class:
                origins = origins[np.sort(rng.choice(len(origins), max_tiles_per_class, replace=False))]
            region_of = [SlideRegion(int(x), int(y), mpp, default_mpp) for x, y in origins]
            items += [TileItem(path, label, f"slide:{path.name}", region) for region in region_of]
    counts = np.bincount([i.label for i in items], minlength=len(mapping))
    empty = [c for c, n in zip(mapping, counts, strict=True) if n == 0]
    if len(mapping) < 2 or empty:
        raise DataError(
            f"{root}: need tiles of at least two classes; no tile of {empty or list(mapping)} fits inside its "
            f"annotations (tiles of {tile_px} px at {mpp} µm/px covered >= {min_coverage:.0%})"
        )
    return items, list(mapping)


def _tile_origins(region: Any, width: float, height: float, min_coverage: float) -> np.ndarray:
    """Top-left corners (level-0 px) of a grid of width x height tiles over `region`, anchored at its bounds,
    keeping tiles covered by at least `min_coverage` of their area."""
    x0, y0, x1, y1 = region.bounds
    xs = x0 + np.arange(max(1, int((x1 - x0) / width + 1e-6))) * width
    ys = y0 + np.arange(max(1, int((y1 - y0) / height + 1e-6))) * height
    gx, gy = np.meshgrid(xs, ys)
    boxes = shapely.box(gx.ravel(), gy.ravel(), gx.ravel() + width, gy.ravel() + height)
    shapely.prepare(region)
    coverage = shapely.area(shapely.intersection(boxes, region)) / (width * height)
    keep = coverage >= min_coverage
    return np.c_[np.round(gx.ravel()[keep]), np.round(gy.ravel()[keep])].astype(np.int64)
