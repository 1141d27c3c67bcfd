"""Mitosis: a dense probability map; mitoses are its local maxima (chunked with a halo via dask)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from wsi_pipeline.models.folders import default_model_dir
from wsi_pipeline.tasks.base import Overlay, PointObjects, TaskConfig, TaskContext, TaskResult
from wsi_pipeline.tasks.registry import register_task

COLOUR = (0, 90, 255)
GREY = (150, 150, 150)
IMPLAUSIBLE = "Mitosis (implausible count)"  # every detection of a slide whose count is flagged
NOT_COUNTED = "Mitosis (not counted)"  # outside the tissue, or where the model's domain guard rejects the tissue


class MitosisConfig(TaskConfig):
    min_distance_um: float = Field(10.0, gt=0, description="minimum distance between two detected mitoses")
    smooth_sigma_um: float = Field(1.0, ge=0, description="Gaussian smoothing before peak finding")
    match_radius_um: float = Field(7.5, gt=0, description="a detection within this radius of a truth is a hit")
    hpf_area_mm2: float = Field(0.237, gt=0, description="area of one high-power field (0.55 mm FN at 40x)")
    plausible_max_per_mm2: float = Field(
        50.0,
        gt=0,
        description="a count above this many per mm² of tissue is flagged as implausible: Nottingham grading's top "
        "mitotic score starts at 20 per 10 HPF (8.4 per mm²); far above that over a whole slide, the model is "
        "taking ordinary nuclei for mitoses",
    )


class MitosisTask:
    name = "mitosis"
    config_model = MitosisConfig
    cohort_columns = ("count", "per_mm2", "per_10_hpf")
    report_columns = (("count", "mitoses"), ("per_mm2", "mitoses / mm²"), ("per_10_hpf", "mitoses / 10 HPF"))
    trainer = "point_detector"  # what `train` makes for it
    point_table = "mitoses.csv"

    def default_config(self) -> MitosisConfig:
        # the network is fully convolutional: 512 px tiles (its card says 96, the training crop) cost fewer reads
        return MitosisConfig(tile_px=512, overlap_px=64, min_tissue=0.1, batch_size=16)

    def default_model(self) -> Path | None:
        return default_model_dir(self.name)

    def postprocess(self, context: TaskContext) -> TaskResult:
        # imported here, not at module level: the CLI and the configuration load every task without zarr, dask
        # or scikit-image
        import dask.array as da

        from wsi_pipeline.heatmap import open_heatmap
        from wsi_pipeline.postprocess.maxima import find_peaks
        from wsi_pipeline.tasks.common import level_transform, positive_class

        cfg = context.config
        name = positive_class(context.card.written_classes, ("mitosis",))
        heat = open_heatmap(context.heatmap_path(name))
        origin, scale = level_transform(heat, 0)
        px_um = scale[0] * context.slide_mpp[0]
        channel = heat.channels.index(name)
        values = da.from_zarr(heat.levels[0])[channel].astype(np.float32) * heat.attrs["value_scale"]
        peaks = find_peaks(
            values,
            min_distance=max(1, round(cfg.min_distance_um / px_um)),
            threshold=context.threshold(name),
            sigma=cfg.smooth_sigma_um / px_um,
        )
        x = origin[0] + (peaks.cols + 0.5) * scale[0]
        y = origin[1] + (peaks.rows + 0.5) * scale[1]
        counted = context.inside(x, y)  # in tissue (and in the model's domain): the rest is kept, marked, not counted
        count = int(counted.sum())
        area = context.counted_mm2
        per_mm2 = count / area if area > 0 else 0.0
        summary = {
            "count": count,
            "per_mm2": round(per_mm2, 6),
            "per_10_hpf": round(per_mm2 * 10 * cfg.hpf_area_mm2, 6),
            "not_counted": int((~counted).sum()),
            "counted_area_mm2": round(area, 6),
            "hpf_area_mm2": cfg.hpf_area_mm2,
            "threshold": context.threshold(name),
            "threshold_source": context.threshold_source(),
            "min_distance_um": cfg.min_distance_um,
        }
        warnings, flagged = [], []
        label = "Mitosis"
        if per_mm2 > cfg.plausible_max_per_mm2:
            warnings.append(
                f"mitosis: {per_mm2:.0f} per mm² of tissue is implausible (over tasks.mitosis.plausible_max_per_mm2 = "
                f"{cfg.plausible_max_per_mm2:g}): the model takes this slide's ordinary nuclei for mitoses (another "
                "organ, stain or scanner than its training data?); do not use the count before checking some fields "
                "(wsi-pipeline evaluate)"
            )
            flagged += ["count", "per_mm2", "per_10_hpf"]
            label = IMPLAUSIBLE  # QuPath filters detections by classification
        xyp = np.c_[x, y, peaks.values]
        points = [PointObjects("mitosis", label, COLOUR, "Mitosis probability", xyp[counted])]
        if not counted.all():
            points.append(PointObjects("mitosis-not-counted", NOT_COUNTED, GREY, "Mitosis probability", xyp[~counted]))
        return TaskResult(summary, points=points, overlay=Overlay(name, COLOUR), warnings=warnings, flagged=flagged)


register_task(MitosisTask())
