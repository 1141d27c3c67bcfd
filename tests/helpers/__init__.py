"""Helpers shared by the test modules (no test module imports another): data paths, the CLI in a subprocess, and
the stitched-versus-whole-region comparison of dense models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from wsi_pipeline.testing import damage_tile  # noqa: F401  (the suites' helper, for the other tests)

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("WSI_SHARED_DATA", ROOT.parent / "shared" / "data"))
SLIDES = DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
NDPI = SLIDES / "Hamamatsu-fluorescence-DAPI.ndpi"
DICOM = SLIDES / "DICOM-column-major-unreadable-by-openslide.dcm"


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "wsi_pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


def held_out_report(model: Path, data: list[Path], classes: list[str], positive: str, out: Path) -> dict[str, Any]:
    """`wsi-pipeline evaluate epithelium_stroma MODEL DATA... --held-out` as a user runs it; its evaluation.json."""
    import json

    result = run_cli(
        "evaluate", "epithelium_stroma", str(model), *map(str, data), *classes, "--positive", positive,
        "--held-out", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads((out / "evaluation.json").read_text())  # type: ignore[no-any-return]


KATHER_CLASSES = ["--class", "epithelium=01_TUMOR,06_MUCOSA", "--class", "stroma=02_STROMA"]


def train_small_kather_model(kather: Path, out: Path, *options: str, epochs: int = 2) -> dict[str, Any]:
    """`wsi-pipeline train` of a tiny epithelium/stroma classifier on Kather 2016 (seed 2, 40 % held out) with
    `options`, as a user runs it; its model card."""
    import json

    result = run_cli(
        "train", "epithelium_stroma", str(kather), *KATHER_CLASSES, "--tile-px", "96", "--mpp", "0.495",
        "--arch-arg", "width=4", "--arch-arg", "blocks=2", "--epochs", str(epochs), "--select", "last",
        "--val-fraction", "0.4", "--seed", "2", *options, "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads((out / "model_card.json").read_text())  # type: ignore[no-any-return]


def stitched_and_whole_region(  # type: ignore[no-untyped-def]
    slide, plan, model, store: Path, workers: int = 2, task: str = "mitosis", cls: str = "mitosis"
):
    """A dense model's `cls` map stitched by the engine from `plan`, and the same network run once on the whole
    grid region (what stitching must reproduce), both as float32 arrays."""
    import torch

    from wsi_pipeline.engine import EngineOptions, TaskRequest, predict_slide
    from wsi_pipeline.heatmap import open_heatmap
    from wsi_pipeline.models.predictor import activate

    device = torch.device("cpu")
    request = TaskRequest(task, model, plan, dtype="float32")
    predict_slide(
        slide,
        [request],
        store,
        EngineOptions(device=device, batch_size=16, workers=workers, progress=False, precision="fp32"),
    )
    stitched = open_heatmap(store / cls).channel(cls)
    tile, overlap = plan.spec.tile_px, plan.spec.overlap_px
    n_cols, n_rows = plan.grid
    width, height = (n_cols - 1) * (tile - overlap) + tile, (n_rows - 1) * (tile - overlap) + tile
    rgb = slide.read_region(slide.bounds.x, slide.bounds.y, width, height, plan.spec.mpp)
    norm = model.card.normalisation
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        reference = activate(model.module(x), model.card)[0, model.card.classes.index(cls)].numpy()
    return stitched, reference


def mitosis_options(model: Path) -> list[str]:
    """`run` options for the mitosis task with the hand-set figure detector."""
    return [
        "--tasks",
        "mitosis",
        "--set",
        f"tasks.mitosis.model={model}",
        "--set",
        "tasks.mitosis.smooth_sigma_um=3",
        "--device",
        "cpu",
    ]


def run_outputs(out: Path) -> dict[str, bytes]:
    """The files and the mitosis heatmap of every finished slide of a `run` folder, for comparing two runs."""
    import numpy as np

    from wsi_pipeline.heatmap import open_heatmap

    files = {}
    for slide_dir in sorted(p.parent for p in out.glob("*/run.json")):
        for name in ("summary.json", "mitoses.csv", "qupath.geojson", "tissue.geojson"):
            files[f"{slide_dir.name}/{name}"] = (slide_dir / name).read_bytes()
        heat = open_heatmap(slide_dir / "heatmaps.zarr" / "mitosis")
        files[f"{slide_dir.name}/mitosis"] = np.asarray(heat.levels[0]).tobytes()
    return files


def write_density_model(directory: Path, task: str = "haematoxylin_density", channel: str = "haematoxylin") -> Path:
    """A hand-set dense network that marks dark (haematoxylin-dense) pixels: sigmoid(40 (0.5 - mean3x3) - 6), for
    the plugin tasks of tests/test_task_registry.py and docs/architecture.md."""
    import torch

    from wsi_pipeline.models import ModelCard, save_model
    from wsi_pipeline.models.architectures import build

    card = ModelCard(
        name="hand-set-haematoxylin-density",
        task=task,
        kind="dense",
        architecture="tiny_fcn",
        architecture_args={"width": 1, "depth": 1, "stride": 1},
        mpp=0.5,
        tile_px=256,
        output_stride=1,
        halo_px=1,
        classes=[channel],
        activation="sigmoid",
        normalisation={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        training={"data": "none: weights are set by hand", "purpose": "the plugin-task tests"},
    )
    module = build(card.architecture, 1, **card.architecture_args)
    with torch.no_grad():
        module[0].weight.fill_(-1.0 / 27.0)
        module[0].bias.fill_(0.5)
        module[2].weight.fill_(40.0)
        module[2].bias.fill_(-6.0)
    return save_model(directory, module, card)


def amibr_subset(data: Path, folder: Path, slides: int) -> Path:
    """The AMi-Br crops of the first `slides` source slides as a points.csv folder (links to the images), for quick
    point-detector trainings."""
    from wsi_pipeline.training.data.points import amibr_images

    crops = amibr_images(data / "mitosis" / "amibr_tupac16")
    chosen = sorted({i.group for i in crops})[:slides]
    folder.mkdir()
    rows = ["image,x,y,group"]
    for image in (i for i in crops if i.group in chosen):
        (folder / image.path.name).symlink_to(image.path)
        rows += [f"{image.path.name},{x},{y},{image.group}" for x, y in image.points]
    (folder / "points.csv").write_text("\n".join(rows) + "\n")
    return folder
