"""Foundation benchmark: synthetic-slide writing, tissue detection and tile planning at two slide sizes.

Each size runs in its own process so that its peak RSS is its own. Writes JSON (default benchmarks/results/
foundation.json). Run with `make bench`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _report import in_fresh_process, machine_facts, peak_rss_mb, write_report

SIZES = [(20_000, 16_000), (100_000, 80_000)]


def measure_one(width: int, height: int, workdir: Path) -> dict[str, float | int]:
    from wsi_pipeline.config import TissueConfig
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide
    from wsi_pipeline.slide.tiling import plan_tiles
    from wsi_pipeline.slide.tissue import detect_tissue

    figures: dict[str, float | int] = {"width": width, "height": height}
    t0 = time.perf_counter()
    path = write_synthetic_slide(workdir / f"s{width}.svs", default_layout(width, height, 0.25, seed=1, pen=True))
    figures["write_s"] = time.perf_counter() - t0
    rss_after_write = peak_rss_mb()
    t0 = time.perf_counter()
    slide = Slide(path)
    figures["open_and_check_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tissue = detect_tissue(slide, TissueConfig())
    figures["tissue_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_tiles(slide, tissue, 0.25, 256, 0, 0.5)
    figures["plan_s"] = time.perf_counter() - t0
    figures["tiles_kept"] = len(plan)
    figures["grid_tiles"] = plan.grid[0] * plan.grid[1]
    figures["file_mb"] = path.stat().st_size / 1e6
    figures["peak_rss_mb_write"] = rss_after_write
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/foundation.json")
    parser.add_argument("--one", nargs=2, type=int, metavar=("WIDTH", "HEIGHT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure_one(*args.one, Path(tmp))))
        return
    runs = []
    for width, height in SIZES:
        runs.append(in_fresh_process(__file__, "--one", str(width), str(height)))
        print(json.dumps(runs[-1]))
    small, large = runs
    report = {
        "benchmark": "foundation",
        "machine": machine_facts(),
        "runs": runs,
        "area_ratio": (large["width"] * large["height"]) / (small["width"] * small["height"]),
        "peak_rss_ratio_large_over_small": large["peak_rss_mb"] / small["peak_rss_mb"],
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
