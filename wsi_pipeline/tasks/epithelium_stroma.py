"""Epithelium / stroma: per-class probability maps of a patch classifier; regions of each class and their areas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from wsi_pipeline.models.folders import default_model_dir
from wsi_pipeline.tasks.base import Overlay, RegionObject, TaskConfig, TaskContext, TaskResult
from wsi_pipeline.tasks.registry import register_task

CLASSES = (("epithelium", "Epithelium", (150, 0, 200)), ("stroma", "Stroma", (230, 150, 0)))


class EpitheliumStromaConfig(TaskConfig):
    plausible_fraction: tuple[float, float] = Field(
        (0.01, 0.95),
        description="an epithelium fraction of the tissue outside this range is flagged: carcinoma and most organs "
        "the model serves hold some epithelium and some stroma; 0 on a carcinoma means its epithelium was missed",
    )


class EpitheliumStromaTask:
    name = "epithelium_stroma"
    config_model = EpitheliumStromaConfig
    cohort_columns = ("epithelium_area_mm2", "stroma_area_mm2", "epithelium_fraction")
    report_columns = (("epithelium_fraction", "epithelium fraction"),)
    trainer = "classifier"  # what `train` makes for it
    point_table = None

    def default_config(self) -> EpitheliumStromaConfig:
        # tiles overlap by half: each tile stands for its central half (24 µm with the shipped 96 px model at
        # 0.495 µm/px), so a nucleus is judged by a tile centred near it, as the model was trained
        return EpitheliumStromaConfig(overlap_px=48, min_tissue=0.25)

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
            if context.counted_area is not None:  # areas of tissue (not the glass a tile or a map's edge also
                # covers) that the model's domain guard accepts
                found = clipped_to(found, context.counted_area, context.slide_mpp)
            summary[f"{cls}_area_mm2"] = round(sum(r.area_um2 for r in found) / 1e6, 6)
            regions += region_objects(context.slide_id, label, colour, found)
        warnings, flagged = [], []
        if "epithelium_area_mm2" in summary:
            area = context.counted_mm2
            fraction = summary["epithelium_area_mm2"] / area if area else 0.0
            summary["epithelium_fraction"] = round(fraction, 6)
            summary["counted_area_mm2"] = round(area, 6)
            low, high = context.config.plausible_fraction
            if area and not low <= fraction <= high:
                warnings.append(
                    f"epithelium_stroma: an epithelium fraction of {fraction:.4f} is implausible (outside "
                    f"tasks.epithelium_stroma.plausible_fraction = [{low:g}, {high:g}]): the model does not recognise "
                    "this slide's epithelium or stroma (another organ or epithelium type than its training data?); "
                    "check the overlay"
                )
                flagged.append("epithelium_fraction")
        overlay_cls = "epithelium" if "epithelium" in written else written[0]
        return TaskResult(
            summary, regions, overlay=Overlay(overlay_cls, CLASSES[0][2]), warnings=warnings, flagged=flagged
        )


register_task(EpitheliumStromaTask())
