"""The task seam: a fourth task defined in this file alone (a hand-set "haematoxylin density" dense model) runs
through `wsi-pipeline run` and gets its heatmap, summary entry, cohort columns and QuPath objects, with no edit
outside tests. The subprocess loads this file as a plugin (`plugins: [this file:register]`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import Field

from tests.helpers import run_cli
from wsi_pipeline.heatmap import open_heatmap
from wsi_pipeline.models import ModelCard, save_model
from wsi_pipeline.models.architectures import build
from wsi_pipeline.slide.synth import SynthSpec
from wsi_pipeline.tasks import Overlay, TaskConfig, TaskContext, TaskResult, register_task, registered
from wsi_pipeline.tasks.common import region_level, region_objects, regions_of

NAME = "haematoxylin_density"
CHANNEL = "haematoxylin"
COLOUR = (60, 30, 160)


class HaematoxylinConfig(TaskConfig):
    report_quantile: float = Field(0.9, ge=0, le=1, description="quantile of the density over tissue reported")


class HaematoxylinTask:
    name = NAME
    config_model = HaematoxylinConfig
    cohort_columns = ("mean_density", "dense_area_mm2")
    report_columns = (("mean_density", "haematoxylin density"),)
    point_table = None
    model_kind = "dense"

    def default_config(self) -> HaematoxylinConfig:
        return HaematoxylinConfig(enabled=False, tile_px=256, overlap_px=16, min_tissue=0.1, batch_size=16)

    def default_model(self) -> Path | None:
        return None  # a user task: its model is configured

    def postprocess(self, context: TaskContext) -> TaskResult:
        values, origin, scale = region_level(open_heatmap(context.heatmap_path(CHANNEL)), CHANNEL)
        regions = regions_of(values, origin, scale, context.threshold(CHANNEL), context.slide_mpp)
        summary = {
            "mean_density": round(float(values.mean()), 6),
            "dense_area_mm2": round(sum(r.area_um2 for r in regions) / 1e6, 6),
            "regions": len(regions),
        }
        return TaskResult(
            summary,
            region_objects(context.slide_id, "Haematoxylin dense", COLOUR, regions),
            overlay=Overlay(CHANNEL, COLOUR),
        )


def register() -> None:
    register_task(HaematoxylinTask())


def write_density_model(directory: Path) -> Path:
    """A hand-set dense network that marks dark (haematoxylin-dense) pixels: sigmoid(40 (0.5 - mean3x3) - 6)."""
    card = ModelCard(
        name="hand-set-haematoxylin-density",
        task=NAME,
        kind="dense",
        architecture="tiny_fcn",
        architecture_args={"width": 1, "depth": 1, "stride": 1},
        mpp=0.5,
        tile_px=256,
        output_stride=1,
        halo_px=1,
        classes=[CHANNEL],
        activation="sigmoid",
        normalisation={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        training={"data": "none: weights are set by hand", "purpose": "the task-registry test"},
    )
    module = build(card.architecture, 1, **card.architecture_args)
    with torch.no_grad():
        module[0].weight.fill_(-1.0 / 27.0)
        module[0].bias.fill_(0.5)
        module[2].weight.fill_(40.0)
        module[2].bias.fill_(-6.0)
    return save_model(directory, module, card)


def test_a_registered_task_joins_the_configuration_and_the_cohort_columns() -> None:
    from wsi_pipeline.config import Config, load_config
    from wsi_pipeline.run.batch import cohort_columns
    from wsi_pipeline.run.inputs import select_tasks

    assert NAME not in Config().model_dump()["tasks"]
    with registered(HaematoxylinTask()):
        config = load_config(None, [f"tasks.{NAME}.report_quantile=0.5"])
        assert config.task(NAME).report_quantile == 0.5 and config.task(NAME).tile_px == 256
        assert NAME not in select_tasks(config, None)  # disabled by default: only run when asked for
        assert select_tasks(config, f"mitosis,{NAME}") == ["mitosis", NAME]
        assert cohort_columns()[-3:] == [f"{NAME}_mean_density", f"{NAME}_dense_area_mm2", "warnings"]
    assert NAME not in Config().model_dump()["tasks"] and f"{NAME}_mean_density" not in cohort_columns()


@pytest.mark.e2e
def test_run_writes_the_plugin_tasks_heatmap_summary_cohort_and_qupath_objects(
    synthetic_slide: tuple[Path, SynthSpec], tmp_path: Path
) -> None:
    path, spec = synthetic_slide
    model = write_density_model(tmp_path / "model")
    config = tmp_path / "plugin.yaml"
    config.write_text(f"plugins: ['{Path(__file__).resolve()}:register']\ntasks:\n  {NAME}:\n    model: {model}\n")
    out = tmp_path / "out"
    result = run_cli(
        "run", str(path), "-o", str(out), "-c", str(config), "--tasks", NAME, "--workers", "1", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    slide_dir = out / path.name.removesuffix(".svs")
    heat = open_heatmap(slide_dir / "heatmaps.zarr" / CHANNEL)
    grid = [math.ceil((size - 16) / 240) for size in (spec.height, spec.width)]  # 256 px tiles, 16 px overlap
    assert heat.attrs["task"] == NAME and heat.levels[0].shape == (1, *((n - 1) * 240 + 256 for n in grid))
    values = heat.channel(CHANNEL)
    figures = np.array([[f.y, f.x] for f in spec.figures]).round().astype(int)
    assert (values[figures[:, 0], figures[:, 1]] > 0.9).all()  # every planted dark figure is dense
    assert values[5:60, spec.width - 60 : spec.width - 5].max() < 0.05  # glass in the top-right corner is not
    summary = json.loads((slide_dir / "summary.json").read_text())[NAME]
    levels = heat.levels
    region_values = np.asarray(levels[next(i for i, a in enumerate(levels) if max(a.shape[1:]) <= 8192)][0], np.float32)
    assert summary["mean_density"] == pytest.approx(float(region_values.mean()), abs=1e-5)
    assert summary["regions"] >= len(spec.figures) and summary["dense_area_mm2"] > 0
    row = next(csv.DictReader((out / "cohort_summary.csv").open()))
    assert float(row[f"{NAME}_mean_density"]) == summary["mean_density"]
    assert float(row[f"{NAME}_dense_area_mm2"]) == summary["dense_area_mm2"]
    features = json.loads((slide_dir / "qupath.geojson").read_text())["features"]
    dense = [f for f in features if f["properties"].get("classification", {}).get("name") == "Haematoxylin dense"]
    assert len(dense) == summary["regions"] and all(f["properties"]["objectType"] == "annotation" for f in dense)
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert tiles and all(f["properties"]["name"] == NAME for f in tiles)
    assert {"haematoxylin mean", "haematoxylin max", "Tissue fraction"} <= set(tiles[0]["properties"]["measurements"])
    record = json.loads((slide_dir / "run.json").read_text())
    assert record["tasks"] == [NAME] and record["models"][NAME]["card"]["task"] == NAME
