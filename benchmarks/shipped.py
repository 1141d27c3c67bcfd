"""End-to-end tiles/s of the three shipped models (the read-bound case): `predict_stage` as `predict` runs it, on a
synthetic 20 000 x 16 000 px slide at 0.25 µm/px, "before" (OpenSlide reader, fp32 on the CPU, DataLoader worker
processes, BatchNorm not folded: the engine as it was) and "after" (the defaults: direct tifffile reader, bf16
autocast where the CPU has it, reading threads, BatchNorm folded), alternating, `--repeats` times, medians. Writes
benchmarks/results/shipped.json.
"""

# ruff: noqa: I001  (wsi_pipeline before torch, as in the CLI: it sets OpenMP's wait policy)
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import wsi_pipeline  # noqa: F401
from _report import machine_facts, write_report

SETTINGS = {"before": ("openslide", "fp32", "processes", False), "after": ("auto", "auto", "threads", True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/shipped.json")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="auto", help="the engine's device [auto: CUDA where there is one]")
    args = parser.parse_args()
    from wsi_pipeline.config import load_config
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.run.settings import engine_options
    from wsi_pipeline.run.stages import predict_stage
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = write_synthetic_slide(tmp / "slide.svs", default_layout(20000, 16000, 0.25, seed=5, n_figures=40))
        for task in ("epithelium_stroma", "metastasis", "mitosis"):
            rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
            ran_in: dict[str, str] = {}  # the precision the model ran in (auto: bf16 unless its card says fp32)
            tiles = 0
            for _ in range(args.repeats):
                for name, (backend, precision, loader, fuse) in SETTINGS.items():
                    overrides = [f"slide.backend={backend}", f"engine.precision={precision}", f"engine.loader={loader}"]
                    overrides.append(f"engine.fuse_batchnorm={str(fuse).lower()}")
                    config = load_config(None, overrides)
                    out = tmp / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    with Slide(path, backend=backend) as slide:
                        engine = engine_options(
                            config,
                            device=args.device,
                            workers=args.workers,
                            batch_size=config.task(task).batch_size,
                            progress=False,
                        )
                        result = predict_stage(slide, config, task, out, engine, model_path=None)
                    read = result["timings"]["reads"][0]
                    tiles = result["tiles"]
                    rates[name].append(read["tiles_per_s"])
                    ran_in[name] = result["timings"]["precision"][task]
            row = {
                "task": task,
                "tiles": tiles,
                **{f"{name}_tiles_per_s": statistics.median(values) for name, values in rates.items()},
                "after_over_before": statistics.median(
                    a / b for a, b in zip(rates["after"], rates["before"], strict=True)
                ),
                "precision": ran_in,
                "repeats": rates,
            }
            rows.append(row)
            print({k: v for k, v in row.items() if k != "repeats"}, flush=True)
    write_report(
        args.out,
        {
            "benchmark": "shipped",
            "machine": machine_facts(),
            "workers": args.workers,
            "device": args.device,
            "settings": SETTINGS,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
