"""Cohort throughput: `wsi-pipeline run` over a folder of small slides, and where its time goes.

The cohort: 12 copies of CMU-1-Small-Region and synthetic slides of three sizes. Each configuration (the
epithelium task alone, then every default task) is one whole `run` process: wall seconds, peak RSS over its process
tree, slides per hour; from each slide's run.json, each stage's seconds per slide and the models' forward passes
(`model_s` of the engine's reads). `model_busy_fraction` = the models' seconds / the batch's wall time: how much of
the run the model is working (on a GPU the rest would leave it idle). `beyond_model_s_per_slide` = (wall - model
seconds) / slides. Writes benchmarks/results/cohort.json (the run labelled with --label, e.g. before / after).
Run: .venv/bin/python benchmarks/cohort.py [--label NAME] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import machine_facts, shared_slide, write_report
from peers import measured

COPIES = 12
SYNTHETIC = ((4000, 3000, 0.5), (8000, 6000, 0.5), (6000, 4000, 0.25))
CONFIGURATIONS = {"epithelium": ["--tasks", "epithelium_stroma"], "default_tasks": []}
STAGES = ("tissue_s", "mpp_estimate_s", "tiling_s", "inference_s", "postprocess_s", "export_s")


def make_cohort(folder: Path) -> int:
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    folder.mkdir()
    cmu = shared_slide("CMU-1-Small-Region.svs")
    for i in range(COPIES):
        shutil.copyfile(cmu, folder / f"cmu{i + 1:02d}.svs")  # copies: links to one file are one slide to `run`
    for i, (width, height, mpp) in enumerate(SYNTHETIC):
        write_synthetic_slide(folder / f"synth{i + 1}.svs", default_layout(width, height, mpp, seed=40 + i))
    return COPIES + len(SYNTHETIC)


def figures(out: Path, wall: float) -> dict[str, object]:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
    model = [sum(r.get("model_s", 0.0) for r in rec["inference"]["reads"]) for rec in records]
    per_stage = {s: round(statistics.mean(rec["timings"].get(s, 0.0) for rec in records), 3) for s in STAGES}
    slide_seconds = [rec["seconds"] for rec in records]
    n = len(records)
    return {
        "slides": n,
        "tiles": sum(rec["tiles"] for rec in records),
        "wall_s": round(wall, 1),
        "slides_per_hour": round(n / wall * 3600, 1),
        "model_s_total": round(sum(model), 2),
        "model_busy_fraction": round(sum(model) / wall, 3),
        "beyond_model_s_per_slide": round((wall - sum(model)) / n, 3),
        "slide_s_mean": round(statistics.mean(slide_seconds), 3),
        "slide_beyond_model_s_mean": round(
            statistics.mean(s - m for s, m in zip(slide_seconds, model, strict=True)), 3
        ),
        "outside_slides_s": round(wall - sum(slide_seconds), 2),
        "stage_s_per_slide_mean": per_stage,
        "cmu_copy_beyond_model_s_mean": round(
            statistics.mean(
                rec["seconds"] - m for rec, m in zip(records, model, strict=True) if rec["slide_id"].startswith("cmu")
            ),
            3,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="current")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/cohort.json")
    parser.add_argument("--configs", default=",".join(CONFIGURATIONS), help="which of: " + ", ".join(CONFIGURATIONS))
    args = parser.parse_args()
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slides = make_cohort(tmp / "cohort")
        for name in args.configs.split(","):
            options = CONFIGURATIONS[name]
            out = tmp / f"out-{name}"
            command = [sys.executable, "-m", "wsi_pipeline.cli", "run", str(tmp / "cohort"), "-o", str(out),
                       "--device", args.device, "--no-progress", *options]  # fmt: skip
            run = measured(command, {**os.environ})
            results[name] = {**figures(out, float(run["seconds"])), "peak_rss_mb": round(float(run["peak_rss_mb"]))}  # type: ignore[arg-type]
            print(name, json.dumps(results[name]), flush=True)
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.exists() else {"benchmark": "cohort", "runs": {}}
    report["machine"] = machine_facts()
    report["cohort"] = f"{COPIES} copies of CMU-1-Small-Region + synthetic {SYNTHETIC} (width, height, µm/px)"
    report["command"] = f".venv/bin/python benchmarks/cohort.py --label {args.label} --device {args.device}"
    report["runs"][args.label] = {"revision": revision, "device": args.device, "slides": slides, **results}
    write_report(path, report)


if __name__ == "__main__":
    main()
