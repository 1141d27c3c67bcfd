"""`make demo` (`wsi-pipeline demo`): write a synthetic slide with planted figures, run the pipeline on it, and
say where to look.

Epithelium/stroma and metastasis run with the shipped trained models. For mitosis the demo uses the hand-set
dark-figure detector (`wsi_pipeline.models.demo`) because a synthetic slide's planted figures are dark discs, not
mitoses: their true positions are in the slide's .truth.json, so the demo can say how many it found.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from wsi_pipeline.config import load_config
from wsi_pipeline.models.demo import write_figure_detector
from wsi_pipeline.run.batch import run_batch, summary_table
from wsi_pipeline.run.settings import RunSettings
from wsi_pipeline.slide.synth import default_layout, read_truth, write_synthetic_slide
from wsi_pipeline.training.metrics import match_detections


def run_demo(out: Path, overrides: tuple[str, ...] = ()) -> None:
    started = time.perf_counter()
    slide_path = out / "slides" / "demo-synthetic.svs"
    if not slide_path.exists():
        write_synthetic_slide(slide_path, default_layout(12000, 9000, 0.25, seed=7, n_figures=25, pen=True))
    model_dir = write_figure_detector(out / "models" / "demo-figure-detector", 0.25)
    print(f"slide   {slide_path}\n        synthetic, 12000 x 9000 px at 0.25 µm/px, a pen stroke, 25 planted figures")
    print(f"models  mitosis: {model_dir} (hand-set dark-figure detector, not a trained mitosis model)")
    print("        epithelium_stroma, metastasis: the shipped trained models (wsi_pipeline/models/defaults)")
    config = load_config(None, [f"tasks.mitosis.model={model_dir}", "tasks.mitosis.smooth_sigma_um=3", *overrides])
    results = out / "results"
    tasks = ["mitosis", "epithelium_stroma", "metastasis"]
    batch = run_batch([str(slide_path)], results, RunSettings.of(config, tasks, device="auto", workers=1))
    print(summary_table(batch))
    slide_dir = results / "demo-synthetic"
    spec = read_truth(slide_path)
    with (slide_dir / "mitoses.csv").open() as fh:
        found = np.array([[float(r["x"]), float(r["y"])] for r in csv.DictReader(fh)]).reshape(-1, 2)
    score = match_detections(found * spec.mpp, np.array([[f.x, f.y] for f in spec.figures]) * spec.mpp, 7.5)
    print(
        f"\nfigures found: {score.true_positives} of {len(spec.figures)} within 7.5 µm, "
        f"{score.false_positives} false detections"
    )
    print(f"done in {time.perf_counter() - started:.1f} s. Outputs are in {results}:")
    print("  report.html (open it in a browser), manifest.csv, cohort_summary.csv")
    for path in sorted(slide_dir.iterdir()):
        print(f"  demo-synthetic/{path.name}")
    print(
        f"Open {results / 'report.html'} in a browser, or demo-synthetic/overlay-<task>.png;\n"
        "in QuPath open the slide and drag qupath.geojson onto it;\n"
        "heatmaps.zarr opens in napari (ome-zarr plugin)."
    )
