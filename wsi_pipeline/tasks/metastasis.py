"""Metastasis: a tumour-probability map from a patch classifier run with a stride; lesions are thresholded regions
(CAMELYON16 style, with AJCC size categories) and candidates its local maxima; the slide score is the smoothed max."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from wsi_pipeline.models.folders import default_model_dir
from wsi_pipeline.tasks.base import Overlay, PointObjects, TaskConfig, TaskContext, TaskResult
from wsi_pipeline.tasks.registry import register_task

TUMOUR = (200, 0, 0)
CANDIDATE = (255, 80, 80)


class MetastasisConfig(TaskConfig):
    min_lesion_um: float = Field(0.0, ge=0, description="regions with a smaller longest diameter are dropped")
    smooth_sigma_um: float = Field(20.0, ge=0, description="Gaussian smoothing of the tumour map")
    candidate_distance_um: float = Field(
        75.0, gt=0, description="minimum distance between two tumour candidates (local maxima of the smoothed map)"
    )
    plausible_max_regions_per_mm2: float = Field(
        2.0,
        gt=0,
        description="more separate tumour regions than this per mm² of tissue is flagged: metastases are one or a "
        "few foci; positives scattered over the tissue are the model answering on tissue it does not know",
    )


class MetastasisTask:
    name = "metastasis"
    config_model = MetastasisConfig
    cohort_columns = ("score", "regions", "tumor_area_mm2", "largest_lesion_diameter_um", "category")
    report_columns = (("category", "metastasis"), ("score", "tumour score"))
    trainer = "classifier"  # what `train` makes for it
    point_table = None

    def default_config(self) -> MetastasisConfig:
        return MetastasisConfig(overlap_px=48, min_tissue=0.25)

    def default_model(self) -> Path | None:
        return default_model_dir(self.name)

    def postprocess(self, context: TaskContext) -> TaskResult:
        # imported here, not at module level: the CLI and the configuration load every task without zarr, dask
        # or scikit-image
        from scipy import ndimage

        from wsi_pipeline.heatmap import open_heatmap
        from wsi_pipeline.postprocess.maxima import find_peaks
        from wsi_pipeline.postprocess.regions import clipped_to, lesion_category
        from wsi_pipeline.tasks.common import positive_class, region_level, region_objects, regions_of

        cfg = context.config
        name = positive_class(context.card.written_classes, ("tumor", "tumour", "metastasis"))
        values, origin, scale = region_level(open_heatmap(context.heatmap_path(name)), name)
        px_um = scale[0] * context.slide_mpp[0]
        threshold = context.threshold(name)
        smoothed = ndimage.gaussian_filter(values, cfg.smooth_sigma_um / px_um) if cfg.smooth_sigma_um else values
        found = regions_of(values, origin, scale, threshold, context.slide_mpp)
        if context.counted_area is not None:  # lesions are tissue the model may judge: not glass, not another organ
            found = clipped_to(found, context.counted_area, context.slide_mpp)
        regions = [r for r in found if r.longest_diameter_um >= cfg.min_lesion_um]
        candidates = find_peaks(
            smoothed, min_distance=max(1, round(cfg.candidate_distance_um / px_um)), threshold=threshold / 2
        )
        rows, cols = np.indices(smoothed.shape)
        counted = context.inside(
            origin[0] + (cols.ravel() + 0.5) * scale[0], origin[1] + (rows.ravel() + 0.5) * scale[1]
        )
        largest = max((r.longest_diameter_um for r in regions), default=0.0)
        area = context.counted_mm2
        per_mm2 = len(regions) / area if area > 0 else 0.0
        summary = {
            "score": round(float(smoothed.ravel()[counted].max(initial=0.0)), 6),
            "threshold": threshold,
            "threshold_source": context.threshold_source(),
            "regions": len(regions),
            "tumor_area_mm2": round(sum(r.area_um2 for r in regions) / 1e6, 6),
            "largest_lesion_diameter_um": round(largest, 2),
            "category": lesion_category(largest) if regions else "negative",
            "candidates": len(candidates),
            "regions_per_mm2": round(per_mm2, 6),
            "counted_area_mm2": round(area, 6),
        }
        warnings, flagged = [], []
        if per_mm2 > cfg.plausible_max_regions_per_mm2:
            warnings.append(
                f"metastasis: {len(regions)} separate tumour regions, {per_mm2:.1f} per mm² of tissue, is implausible "
                f"(over tasks.metastasis.plausible_max_regions_per_mm2 = {cfg.plausible_max_regions_per_mm2:g}): "
                "scattered positives are the model answering on tissue it does not know; check the overlay"
            )
            flagged += ["regions", "category", "score"]
        label = "Tumor (implausible)" if flagged else "Tumor"
        xyp = np.c_[
            origin[0] + (candidates.cols + 0.5) * scale[0],
            origin[1] + (candidates.rows + 0.5) * scale[1],
            candidates.values.astype(np.float64),
        ]
        return TaskResult(
            summary,
            region_objects(context.slide_id, label, TUMOUR, regions),
            points=[PointObjects("candidate", "Tumor candidate", CANDIDATE, "Tumor probability", xyp, drawn=False)],
            overlay=Overlay(name, TUMOUR),
            warnings=warnings,
            flagged=flagged,
        )


register_task(MetastasisTask())
