"""The task seam: a fourth task defined in this file alone (a hand-set "haematoxylin density" dense model) runs
through `wsi-pipeline run` and gets its heatmap, summary entry, cohort columns and QuPath objects, with no edit
outside tests; a fifth (a point detector) is trained by `wsi-pipeline train` for its own class. The subprocesses load
this file as a plugin (`plugins: [this file:register]`, `WSI_PIPELINE_PLUGINS=this file:register_detector`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import Field

from tests.helpers import amibr_subset, run_cli, write_density_model
from wsi_pipeline.heatmap import open_heatmap
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
    trainer = "classifier"  # `train` would make a classifier (or, with --kind class_map, a class map) for it

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


DETECTOR = "atypical_figure"


class AtypicalFigureTask:
    """A point-detector task of a plugin: `train` makes it a detector of its own class, not of mitoses."""

    name = DETECTOR
    config_model = TaskConfig
    cohort_columns = ()
    report_columns = ()
    point_table = None
    trainer = "point_detector"

    def default_config(self) -> TaskConfig:
        return TaskConfig(enabled=False)

    def default_model(self) -> Path | None:
        return None

    def postprocess(self, context: TaskContext) -> TaskResult:
        return TaskResult({})


def register_detector() -> None:
    register_task(AtypicalFigureTask())


def test_a_task_that_lacks_part_of_the_protocol_is_refused_when_registered() -> None:
    from wsi_pipeline.core.errors import ConfigError
    from wsi_pipeline.tasks import task_names

    class Old(HaematoxylinTask):  # written for the protocol before `trainer` and `report_columns`
        name = "old_style"
        model_kind = "dense"
        trainer = property(lambda self: (_ for _ in ()).throw(AttributeError("trainer")))
        report_columns = property(lambda self: (_ for _ in ()).throw(AttributeError("report_columns")))

    with pytest.raises(ConfigError, match=r"task old_style: lacks report_columns, trainer .*\(model_kind is now"):
        register_task(Old())
    wrong = AtypicalFigureTask()
    wrong.trainer = "dense"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="trainer 'dense' is not one of classifier, point_detector"):
        register_task(wrong)
    assert "old_style" not in task_names() and DETECTOR not in task_names()


def test_what_train_makes_is_named_by_the_task_and_the_kind_option() -> None:
    """A task's `trainer` decides between a classifier and a point detector; `kind` only chooses a classifier
    task's output (a vector, or a class map, formerly "dense"); a point detector takes no kind."""
    from wsi_pipeline.core.errors import ConfigError
    from wsi_pipeline.training.settings import load_train_settings

    tiles = {"tile_px": 96, "mpp": 0.5}
    vector = load_train_settings("epithelium_stroma", None, (), tiles)
    assert (vector.point_detector, vector.makes_maps, vector.arch) == (False, False, "small_cnn")
    for name in ("class_map", "dense"):
        maps = load_train_settings("epithelium_stroma", None, (), {**tiles, "kind": name})
        assert (maps.kind, maps.point_detector, maps.makes_maps, maps.arch) == ("class_map", False, True, "small_unet")
    points = load_train_settings("mitosis", None, (), {})
    assert (points.point_detector, points.makes_maps, points.arch, points.kind) == (True, True, "dense_fcn", None)
    for name in ("dense", "class_map"):  # what recipes said of the mitosis model before: still accepted
        assert load_train_settings("mitosis", None, (), {"kind": name}).kind is None
    with pytest.raises(ConfigError, match="mitosis trains a point detector: its models are dense"):
        load_train_settings("mitosis", None, (), {"kind": "classifier"})
    with registered(AtypicalFigureTask()):
        assert load_train_settings(DETECTOR, None, (), {}).point_detector


def test_a_registered_task_joins_the_configuration_and_the_cohort_columns() -> None:
    from wsi_pipeline.config import Config, load_config
    from wsi_pipeline.run.cohort import cohort_columns
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


@pytest.mark.e2e
def test_a_plugin_point_detector_task_trains_and_evaluates_its_own_class(data_dir: Path, tmp_path: Path) -> None:
    """`train` and `evaluate` of a point-detector task that only this file defines: the card is the plugin's (task,
    class, threshold and name), not a mitosis model's, and `evaluate --held-out` reads its threshold by that class."""
    subset = amibr_subset(data_dir, tmp_path / "subset", slides=6)
    plugin = {"WSI_PIPELINE_PLUGINS": f"{Path(__file__).resolve()}:register_detector"}
    out = tmp_path / "model"
    common = ["--device", "cpu"]
    train = ["--mpp", "0.25", "--epochs", "1", "--arch-arg", "width=4", "--val-fraction", "0.4", "--workers", "0"]
    result = run_cli("train", DETECTOR, str(subset), "-o", str(out), *train, *common, env=plugin)
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert (card["task"], card["classes"], card["kind"]) == (DETECTOR, [DETECTOR], "dense")
    assert card["name"].startswith(f"{DETECTOR}-") and list(card["thresholds"]) == [DETECTOR]
    report = tmp_path / "report"
    result = run_cli("evaluate", DETECTOR, str(out), str(subset), "--held-out", "-o", str(report), *common, env=plugin)
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((report / "evaluation.json").read_text())
    assert evaluation["at_threshold"] == pytest.approx(card["metrics"]["validation"])
    assert evaluation["params"]["threshold"] == card["thresholds"][DETECTOR]
