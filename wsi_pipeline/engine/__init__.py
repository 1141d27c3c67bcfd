"""The engine: tile loading (`loader`), batched inference (`predict`), stitching into heatmaps (`stitch`), devices,
and its options bound once per run (`options`).

Knows nothing of OpenSlide (an import contract checks it): it reads tiles through `Slide` and runs models through
`Predictor`s, so a new reader backend or model format needs no change here.
"""

from wsi_pipeline.engine.device import resolve_device
from wsi_pipeline.engine.loader import TileDataset, default_workers, make_loader
from wsi_pipeline.engine.options import EngineOptions
from wsi_pipeline.engine.predict import TaskRequest, check_geometry, check_request, predict_slide, read_groups
from wsi_pipeline.engine.stitch import (
    STITCHERS,
    ClassifierStitcher,
    DenseCrop,
    DenseStitcher,
    Stitcher,
    dense_crop,
    tile_measurements,
)

__all__ = [
    "STITCHERS",
    "ClassifierStitcher",
    "DenseCrop",
    "DenseStitcher",
    "EngineOptions",
    "Stitcher",
    "TaskRequest",
    "TileDataset",
    "check_geometry",
    "check_request",
    "default_workers",
    "dense_crop",
    "make_loader",
    "predict_slide",
    "read_groups",
    "resolve_device",
    "tile_measurements",
]
