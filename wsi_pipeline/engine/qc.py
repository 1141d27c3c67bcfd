"""The quality-control image of a slide, from the tiles one read already brings (slide/qc.py): no second read.

The recorder sees every batch of the chosen read as uint8 tiles, keeps a few numbers per tile, and when the read is
over classifies the tiles against the slide's own tissue (folds are relative to it) and writes the image `qc`: one
channel per class, one px per tile of that read's plan, 255 where the tile falls in the class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.engine.stitch import tile_grid_geometry
from wsi_pipeline.heatmap import HeatmapWriter
from wsi_pipeline.slide.qc import FEATURES, QC_CLASSES, QcConfig, classify, tile_features
from wsi_pipeline.slide.tiling import TilePlan

QC_HEATMAP = "qc"


def qc_read(plans: Sequence[TilePlan]) -> int | None:
    """Which of the run's reads measures quality: the one read closest to 1 µm/px (finer detail costs more to
    measure and is averaged down anyway; a coarser read cannot see a blur of 2 µm). None when nothing is read."""
    if not plans:
        return None
    return min(range(len(plans)), key=lambda i: abs(math.log(plans[i].spec.mpp / 1.0)))


class QcRecorder:
    """Per-tile quality numbers of one read, classified and written as the `qc` image when the read ends."""

    def __init__(self, plan: TilePlan, store: Path, config: QcConfig) -> None:
        self.plan, self.store, self.config = plan, store, config
        self.features = np.zeros((len(plan), len(FEATURES)), np.float32)
        self.seconds = 0.0  # spent measuring (reported with the run's timings)

    def observe(self, indices: np.ndarray, tiles: torch.Tensor) -> None:
        """`tiles`: (n, 3, T, T) uint8, on any device."""
        started = time.perf_counter()
        rgb = tiles.permute(0, 2, 3, 1).cpu().numpy()
        self.features[indices] = tile_features(rgb, self.plan.spec.mpp)
        self.seconds += time.perf_counter() - started

    def flags(self) -> np.ndarray:
        return classify(self.features, self.config)

    def finalize(self) -> Path:
        spec = self.plan.spec
        n_cols, n_rows = self.plan.grid
        geometry = tile_grid_geometry(self.plan)
        attrs = {
            "task": "qc",
            "kind": "qc",
            "plan": self.plan.saved_params,
            "qc": self.config.model_dump(mode="json"),
            "measured_at_mpp": spec.mpp,
        }
        writer = HeatmapWriter(self.store, QC_HEATMAP, list(QC_CLASSES), geometry, "uint8", attrs=attrs)
        try:
            grid = np.zeros((len(QC_CLASSES), n_rows, n_cols), np.float32)
            flags = self.flags()
            grid[:, self.plan.rows, self.plan.cols] = flags.T.astype(np.float32)
            writer.write(0, 0, grid)
            writer.advance(n_rows)
            return writer.close()
        except BaseException:
            writer.abort()
            raise
