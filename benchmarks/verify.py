"""Verified resume: what checking a finished slide's outputs costs next to computing them.

For each case, `wsi-pipeline run` computes a slide in a subprocess (timed), then the outputs are verified the way a
re-run does before it skips the slide (`run/record.py: resume_decision`: record, fingerprint, sizes, every file's
sha256), in this process, with the page cache dropped first where this runs as root (a cold read, as on a cluster's
next day) and again warm; last, the whole skipping re-run is timed as a user sees it (process start included).
Cases: the 100 000 x 80 000 px slide with the two shipped classifiers, and a 20 000 x 16 000 px slide with the
shipped dense mitosis network (its heatmap is the largest output per mm²). Writes benchmarks/results/verify.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import machine_facts, write_report

CASES = [
    {
        "name": "100k x 80k, epithelium_stroma + metastasis",
        "size": (100_000, 80_000),
        "tasks": "epithelium_stroma,metastasis",
    },
    {"name": "20k x 16k, mitosis (dense)", "size": (20_000, 16_000), "tasks": "mitosis"},
]


def _drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _run(slide: Path, out: Path, tasks: str) -> float:
    command = [sys.executable, "-m", "wsi_pipeline.cli", "run", str(slide), "-o", str(out), "--tasks", tasks]
    started = time.perf_counter()
    done = subprocess.run([*command, "--device", "cpu", "--no-progress"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _verify_seconds(folder: Path, slide: Path) -> tuple[float, bool]:
    from wsi_pipeline.core.layout import SlideLayout
    from wsi_pipeline.run.record import resume_decision, slide_fingerprint

    record = json.loads((folder / "run.json").read_text())
    started = time.perf_counter()
    decision = resume_decision(SlideLayout(folder), record["compatibility"], slide_fingerprint(slide), slide)
    return time.perf_counter() - started, decision.skip


def measure(case: dict, workdir: Path) -> dict:
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    width, height = case["size"]
    slide = write_synthetic_slide(workdir / f"s{width}.svs", default_layout(width, height, 0.25, seed=1, pen=True))
    out = workdir / f"out{width}"
    compute_s = _run(slide, out, case["tasks"])
    folder = out / slide.stem
    record = json.loads((folder / "run.json").read_text())
    cold = _drop_caches()
    verify_cold_s, skip_cold = _verify_seconds(folder, slide)
    verify_warm_s, skip_warm = _verify_seconds(folder, slide)
    assert skip_cold and skip_warm, "the finished outputs did not verify"
    _drop_caches()
    rerun_s = _run(slide, out, case["tasks"])
    with (out / "manifest.csv").open() as fh:
        rerun = next(csv.DictReader(fh))
    outputs = record["outputs"]
    return {
        "case": case["name"],
        "width": width,
        "height": height,
        "tasks": case["tasks"],
        "output_files": len(outputs),
        "output_mb": round(sum(size for size, _ in outputs.values()) / 1e6, 1),
        "compute_s": round(compute_s, 2),
        "verify_s": round(verify_cold_s, 3),
        "verify_cache_dropped": cold,
        "verify_warm_s": round(verify_warm_s, 3),
        "skipping_rerun_s": round(rerun_s, 2),
        "rerun_status": rerun["status"],
        "rerun_note": rerun["note"],
        "verify_over_compute": round(verify_cold_s / compute_s, 5),
        "skipping_rerun_over_compute": round(rerun_s / compute_s, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "verify.json"))
    parser.add_argument("--only", type=int, default=None, help="run only case N (0-based)")
    args = parser.parse_args()
    cases = CASES if args.only is None else [CASES[args.only]]
    with tempfile.TemporaryDirectory(prefix="wsi-verify-") as tmp:
        results = [measure(case, Path(tmp)) for case in cases]
    report = {
        "benchmark": "verify",
        "machine": machine_facts(),
        "target": "verifying a complete 100 000 x 80 000 slide's outputs costs < 5 % of computing them",
        "cases": results,
        "max_verify_over_compute": max(r["verify_over_compute"] for r in results),
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
