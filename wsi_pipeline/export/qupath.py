"""QuPath GeoJSON (see docs/outputs.md): streamed FeatureCollections QuPath imports by drag-and-drop.

Coordinates are level-0 pixels of the image as QuPath opens it: OpenSlide coordinates minus `openslide.bounds-*`.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import mapping

from wsi_pipeline.core.atomic import atomic_path

OBJECT_TYPES = ("annotation", "detection", "tile", "cell", "tmaCore")
# Stable ids: the same object in a re-run gets the same UUID, so outputs of identical runs are identical.
_NAMESPACE = uuid.UUID("8a3c5b8e-51f6-4d8e-9d0b-2f1e6f0a7c11")


def object_id(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts)))


def to_qupath_geometry(geometry: shapely.Geometry, offset: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """GeoJSON geometry in QuPath pixel coordinates (shifted by -offset, rounded to 2 decimals as QuPath does)."""
    shift = np.asarray(offset, dtype=float)
    moved = shapely.transform(geometry, lambda xy: np.round(xy - shift, 2))
    return mapping(moved)


def _number(value: float) -> float | str:
    """QuPath writes non-finite measurements as strings."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def feature(
    geometry: shapely.Geometry,
    object_type: str,
    *,
    object_id_: str,
    class_name: str | None = None,
    color: tuple[int, int, int] | None = None,
    measurements: Mapping[str, float] | None = None,
    name: str | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"objectType must be one of {OBJECT_TYPES}, got {object_type!r}")
    return {
        "type": "Feature",
        "id": object_id_,
        "geometry": to_qupath_geometry(geometry, offset),
        "properties": _properties(object_type, name, class_name, color, measurements),
    }


def _properties(
    object_type: str,
    name: str | None,
    class_name: str | None,
    color: tuple[int, int, int] | None,
    measurements: Mapping[str, float] | None,
) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["name"] = name
    if class_name is not None:
        props["classification"] = {"name": class_name, "color": list(color or (255, 0, 0))}
    if measurements:
        props["measurements"] = {k: _number(v) for k, v in measurements.items()}
    return props


def write_feature_collection(
    path: str | os.PathLike[str], features: Iterable[Mapping[str, Any]], *, compress: bool | None = None
) -> int:
    """Stream features to `path` one at a time (never the whole list in memory); gzip when the name ends .gz.

    Returns the number of features written. The file appears only when complete.
    """
    return write_feature_collections([path], features, compress=compress)


def write_feature_collections(
    paths: Sequence[str | os.PathLike[str]], features: Iterable[Mapping[str, Any]], *, compress: bool | None = None
) -> int:
    """The same collection to every path of `paths` from one pass over `features` (each made and serialised once:
    qupath.geojson and its .gz), each gzipped when its name ends .gz; each file appears only when complete."""
    targets = [Path(p) for p in paths]
    count = 0
    with contextlib.ExitStack() as stack:
        handles = []
        for target in targets:
            tmp = stack.enter_context(atomic_path(target))
            zipped = target.suffix == ".gz" if compress is None else compress
            opened = gzip.open(tmp, "wt", encoding="utf-8") if zipped else open(tmp, "w", encoding="utf-8")  # noqa: SIM115
            handles.append(stack.enter_context(opened))
        for fh in handles:
            fh.write('{"type": "FeatureCollection", "features": [')
        for feat in features:
            text = (",\n" if count else "\n") + json.dumps(feat, allow_nan=False, separators=(",", ":"))
            for fh in handles:
                fh.write(text)
            count += 1
        for fh in handles:
            fh.write("\n]}\n")
    return count


TISSUE_COLOR = (0, 160, 60)


def tissue_features(
    slide_id: str, polygons: Iterable[shapely.Geometry], mpp: tuple[float, float], offset: tuple[float, float]
) -> Iterator[dict[str, Any]]:
    """The tissue outline as QuPath annotations of class `Tissue`, each with its area (the one place they are made:
    `tissue.geojson` and `qupath.geojson` carry the same objects)."""
    for i, poly in enumerate(polygons):
        yield feature(
            poly,
            "annotation",
            object_id_=object_id(slide_id, "tissue", i),
            class_name="Tissue",
            color=TISSUE_COLOR,
            offset=offset,
            measurements={"Area mm^2": poly.area * mpp[0] * mpp[1] / 1e6},
        )


def tile_features(
    slide_id: str,
    name: str,
    tiles: Iterable[tuple[int, int, float, float, Mapping[str, float]]],
    size: tuple[float, float],
    offset: tuple[float, float],
) -> Iterator[dict[str, Any]]:
    """Tiles as QuPath `tile` objects: (col, row, x, y, measurements) each, `size` their level-0 edge (x, y).
    Their measurements become heatmaps in QuPath with *Measure › Show measurement maps*. The squares' corners are
    computed a few thousand tiles at a time as `feature` would (shapely's box, the same rounding): a slide has tens
    of thousands of tiles, and a shapely box and transform per tile was most of the time of qupath.geojson."""
    w, h = size
    shift = np.asarray(offset, dtype=float)
    remaining = iter(tiles)
    for chunk in iter(lambda: list(itertools.islice(remaining, 4096)), []):  # itertools.batched from 3.12
        x = np.array([t[2] for t in chunk], dtype=float)[:, None]
        y = np.array([t[3] for t in chunk], dtype=float)[:, None]
        # shapely.box(x, y, x + w, y + h): counter-clockwise from (maxx, miny), closed
        corners = np.stack([np.hstack([x + w, x + w, x, x, x + w]), np.hstack([y, y + h, y + h, y, y])], axis=-1)
        rings = np.round(corners - shift, 2).tolist()
        for (col, row, _, _, measurements), ring in zip(chunk, rings, strict=True):
            yield {
                "type": "Feature",
                "id": object_id(slide_id, name, col, row),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": _properties("tile", name, None, None, measurements),
            }
