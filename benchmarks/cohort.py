"""Cohort throughput: `wsi-pipeline run` over a folder of small slides, and where its time goes.

The cohort: 12 copies of CMU-1-Small-Region and synthetic slides of three sizes. Each configuration (the
epithelium task alone, then every default task; each with slides overlapped, the default, and one slide at a time,
`engine.slides_in_flight=1`) is one whole `run` process: wall seconds, peak RSS over its process tree, slides per
hour; from each slide's run.json, each stage's seconds per slide and the models' forward passes (`model_s` of the
engine's reads). `model_busy_fraction` = the models' seconds / the batch's wall time: how much of the run the model
is working (on a GPU the rest would leave it idle). `beyond_model_s_per_slide` = (wall - model seconds) / slides.
On this 2-core CPU the overlapped stages share the cores with the model's threads, so the forward passes slow down
(`model_ms_per_tile`): the wall-time ratio is the figure that says what overlapping gains here. Writes
benchmarks/results/cohort.json (the run labelled with --label).
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

from wsi_pipeline.run.pipeline import STAGE_TIMINGS

COPIES = 12
SYNTHETIC = ((4000, 3000, 0.5), (8000, 6000, 0.5), (6000, 4000, 0.25))
ONE_AT_A_TIME = ["--set", "engine.slides_in_flight=1"]
CONFIGURATIONS = {
    "epithelium": ["--tasks", "epithelium_stroma"],
    "epithelium_one_at_a_time": ["--tasks", "epithelium_stroma", *ONE_AT_A_TIME],
    "default_tasks": [],
    "default_tasks_one_at_a_time": ONE_AT_A_TIME,
}


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
    """The batch's figures from each slide's run.json. With slides overlapped, a slide's stages run beside the
    model's turn of another: stage seconds are each stage's own, not parts of the wall time."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
    model = sum(sum(r.get("model_s", 0.0) for r in rec["inference"]["reads"]) for rec in records)
    turns = sum(rec["timings"]["inference_s"] for rec in records)  # the models' turn: every batch read and run
    per_stage = {s: round(statistics.mean(rec["timings"].get(s, 0.0) for rec in records), 3) for s in STAGE_TIMINGS}
    n, tiles = len(records), sum(rec["tiles"] for rec in records)
    return {
        "slides": n,
        "tiles": tiles,
        "wall_s": round(wall, 1),
        "slides_per_hour": round(n / wall * 3600, 1),
        "model_s_total": round(model, 2),
        "model_busy_fraction": round(model / wall, 3),
        "beyond_model_s_per_slide": round((wall - model) / n, 3),
        # the models' turns end to end / wall: the rest is start-up, the first slide's preparation, the last one's
        # exports and the batch's own files, when the models have nothing to do
        "model_turn_fraction": round(turns / wall, 3),
        # the forward passes' ms per tile: it grows where the other stages share the CPU with the model
        "model_ms_per_tile": round(1000 * model / tiles, 3),
        "slide_s_mean": round(statistics.mean(rec["seconds"] for rec in records), 3),
        "stage_s_per_slide_mean": per_stage,
    }


def inventories(out: Path) -> dict[str, object]:
    """Every slide's output files with their sha256 (its run.json's inventory; run.json itself holds timings)."""
    return {p.parent.name: json.loads(p.read_text())["outputs"] for p in sorted(out.glob("*/run.json"))}


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
            # one process, threads only: its VmHWM is exact at any interval; a look every 0.1 s (peers.py's, for
            # PSS and short-lived workers) took ~2 % of a core from the 2 cores this run is measured on
            run = measured(command, {**os.environ}, interval=1.0)
            results[name] = {**figures(out, float(run["seconds"])), "peak_rss_mb": round(float(run["peak_rss_mb"]))}  # type: ignore[arg-type]
            print(name, json.dumps(results[name]), flush=True)
        for name in CONFIGURATIONS:  # overlapped vs one slide at a time, measured in this same run
            serial = f"{name}_one_at_a_time"
            if name in results and serial in results:
                results[f"{name}_vs_one_at_a_time"] = {
                    "wall_ratio": round(results[serial]["wall_s"] / results[name]["wall_s"], 3),  # type: ignore[index]
                    "outputs_equal": inventories(tmp / f"out-{name}") == inventories(tmp / f"out-{serial}"),
                }
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.exists() else {"benchmark": "cohort", "runs": {}}
    report["machine"] = machine_facts()
    report["cohort"] = f"{COPIES} copies of CMU-1-Small-Region + synthetic {SYNTHETIC} (width, height, µm/px)"
    report["command"] = f".venv/bin/python benchmarks/cohort.py --label {args.label} --device {args.device}"
    report["runs"][args.label] = {"revision": revision, "device": args.device, "slides": slides, **results}
    write_report(path, report)


if __name__ == "__main__":
    main()
