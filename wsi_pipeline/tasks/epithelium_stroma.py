"""Epithelium / stroma: per-class probability maps of a patch classifier; regions of each class and their areas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_pipeline.models.folders import default_model_dir
from wsi_pipeline.tasks.base import Overlay, RegionObject, TaskConfig, TaskContext, TaskResult
from wsi_pipeline.tasks.registry import register_task

CLASSES = (("epithelium", "Epithelium", (150, 0, 200)), ("stroma", "Stroma", (230, 150, 0)))


class EpitheliumStromaTask:
    name = "epithelium_stroma"
    config_model = TaskConfig
    cohort_columns = ("epithelium_area_mm2", "stroma_area_mm2", "epithelium_fraction")
    report_columns = (("epithelium_fraction", "epithelium fraction"),)
    trainer = "classifier"  # what `train` makes for it
    point_table = None

    def default_config(self) -> TaskConfig:
        # tiles overlap by half: each tile stands for its central half (24 µm with the shipped 96 px model at
        # 0.495 µm/px), so a nucleus is judged by a tile centred near it, as the model was trained
        return TaskConfig(overlap_px=48, min_tissue=0.25)

    def default_model(self) -> Path | None:
        return default_model_dir(self.name)

    def postprocess(self, context: TaskContext) -> TaskResult:
        # imported here, not at module level: the CLI and the configuration load every task without zarr, dask
        # or scikit-image
        from wsi_pipeline.heatmap import open_heatmap
        from wsi_pipeline.postprocess.regions import clipped_to
        from wsi_pipeline.tasks.common import region_level, region_objects, regions_of

        written = context.card.written_classes
        shown = [cls for cls, _, _ in CLASSES if cls in written]
        summary: dict[str, Any] = {
            "threshold": {cls: context.threshold(cls) for cls in shown},
            "threshold_source": context.threshold_source(),
        }
        regions: list[RegionObject] = []
        for cls, label, colour in CLASSES:
            if cls not in written:
                continue
            found = regions_of(
                *region_level(open_heatmap(context.heatmap_path(cls)), cls), context.threshold(cls), context.slide_mpp
            )
            if context.tissue is not None:  # areas of tissue: not the glass a tile or a map's edge also covers
                found = clipped_to(found, context.tissue, context.slide_mpp)
            summary[f"{cls}_area_mm2"] = round(sum(r.area_um2 for r in found) / 1e6, 6)
            regions += region_objects(context.slide_id, label, colour, found)
        if "epithelium_area_mm2" in summary:
            tissue = context.tissue_mm2
            summary["epithelium_fraction"] = round(summary["epithelium_area_mm2"] / tissue, 6) if tissue else 0.0
        overlay_cls = "epithelium" if "epithelium" in written else written[0]
        return TaskResult(summary, regions, overlay=Overlay(overlay_cls, CLASSES[0][2]))


register_task(EpitheliumStromaTask())
