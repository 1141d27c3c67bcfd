"""Engine benchmark: (a) read+decode-only tiles/s, (b) model-only tiles/s, (c) end-to-end tiles/s, in one run.

Reports (c) / min(a, b): 1.0 means the pipeline fully hides the faster stage behind the slower one. (a), (b) and (c)
run in turn `--repeats` times on the same machine and the JSON gives each repeat and the medians. Also peak RSS of
end-to-end runs on a 20 000 x 16 000 and a 100 000 x 80 000 px synthetic slide (each in its own process).
Writes benchmarks/results/engine.json (engine-cuda.json with `--device cuda`, or `--out`). The model is
torchvision's resnet18 with seeded weights: the cost of a production-size tile classifier (the shipped ones are far
smaller); on a GPU it runs under bf16 autocast. On a GPU the JSON's `limiting_stage` and `end_to_end_wait_fraction`
say whether decoding or the model is the limit.
"""

# ruff: noqa: I001  (import order matters here: see below)
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

# wsi_pipeline before torch, as in `wsi-pipeline` itself: the package sets OpenMP's wait policy, read when torch loads
import wsi_pipeline  # noqa: F401
import torch
from _report import in_fresh_process, machine_facts, peak_rss_mb, shared_slide, write_report

if TYPE_CHECKING:
    from wsi_pipeline.models import LoadedModel
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.slide.tiling import TilePlan


def _model(tmp: Path, arch: str, mpp: float, tile: int) -> LoadedModel:
    from wsi_pipeline.models import ModelCard, load_model, save_model
    from wsi_pipeline.models.architectures import build, seeded

    card = ModelCard(
        name=f"bench-{arch}",
        task="epithelium_stroma",
        kind="classifier",
        architecture=arch,
        mpp=mpp,
        tile_px=tile,
        classes=["epithelium", "stroma"],
    )
    save_model(tmp / card.name, seeded(build(arch, 2), 0), card)
    return load_model(tmp / card.name)


def read_rate(slide: Slide, plan: TilePlan, batch: int, workers: int, device: torch.device, decode: str) -> float:
    """(a) tiles/s of the engine's own loader (reading and decoding, on the CPU or on the device), nothing else."""
    from wsi_pipeline.engine import make_loader

    t0 = time.perf_counter()
    for _ in make_loader(slide, plan, batch, workers, device, decode=decode):  # type: ignore[arg-type]
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(plan) / (time.perf_counter() - t0)


def model_rate(model: LoadedModel, n: int, batch: int, device: torch.device, precision: str) -> float:
    """(b) tiles/s of the model alone on random uint8 tiles already on the device, with the engine's arithmetic
    (to float, normalise, channels_last, bf16 autocast where the engine uses it, back to the host)."""
    from wsi_pipeline.models.predictor import use_bf16

    module = model.module.to(device).eval().to(memory_format=torch.channels_last)
    tile = model.card.tile_px
    x = torch.randint(0, 256, (batch, 3, tile, tile), dtype=torch.uint8).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, precision)):
        module((x.float() / 255).contiguous(memory_format=torch.channels_last))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            module(((x.float() / 255 - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)).float().cpu()
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def end_to_end(
    slide: Slide,
    plan: TilePlan,
    model: LoadedModel,
    store: Path,
    batch: int,
    workers: int,
    device: torch.device,
    precision: str,
    decode: str = "cpu",
) -> dict[str, float]:
    """(c) `predict_slide` as `run` calls it: loader, model, stitching and zarr writing, start-up included."""
    from wsi_pipeline.engine import EngineOptions, TaskRequest, predict_slide

    shutil.rmtree(store, ignore_errors=True)
    timing = predict_slide(
        slide,
        [TaskRequest("epithelium_stroma", model, plan)],
        store,
        EngineOptions(
            device=device, batch_size=batch, workers=workers, progress=False, precision=precision, decode=decode
        ),  # type: ignore[arg-type]
    )["reads"][0]
    return {
        "tiles_per_s": len(plan) / timing["seconds"],
        # the share of the run spent waiting for tiles: near 0 when the model is the limit, large when reading is
        "wait_fraction": timing["wait_for_tiles_s"] / timing["seconds"],
    }


def throughput(
    slide_path: Path,
    tmp: Path,
    device: torch.device,
    workers: int,
    batch: int,
    max_tiles: int,
    arch: str,
    repeats: int,
    precision: str,
    decode: str = "cpu",
) -> dict[str, object]:
    """(a), (b) and (c) side by side, at least `repeats` times in turn; figures are medians over the repeats (this
    2-core virtual machine's rates vary by +-15 % from one second to the next)."""
    from wsi_pipeline.config import TissueConfig
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.slide.tiling import plan_tiles
    from wsi_pipeline.slide.tissue import detect_tissue

    slide = Slide(slide_path)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), 0.5, 224, 0, 0.1)
    if len(plan) > max_tiles:  # keep the run short: the first max_tiles tiles in plan order
        for name in ("cols", "rows", "x", "y", "tissue_fraction"):
            setattr(plan, name, getattr(plan, name)[:max_tiles])
    n = len(plan)
    model = _model(tmp, arch, 0.5, 224)
    repeat_rows = []
    # a small slide (CMU: 71 tiles, ~2 s) gets more repeats, so that every slide's median rests on ~800 tiles
    for _ in range(max(repeats, math.ceil(800 / n))):
        a = read_rate(slide, plan, batch, workers, device, decode)
        b = model_rate(model, n, batch, device, precision)
        c = end_to_end(slide, plan, model, tmp / f"{slide.slide_id}.zarr", batch, workers, device, precision, decode)
        repeat_rows.append(
            {
                "read_tiles_per_s": a,
                "model_tiles_per_s": b,
                "end_to_end_tiles_per_s": c["tiles_per_s"],
                "end_to_end_wait_fraction": c["wait_fraction"],
                "ratio_e2e_over_min": c["tiles_per_s"] / min(a, b),
            }
        )
    median = {key: statistics.median(r[key] for r in repeat_rows) for key in repeat_rows[0]}
    return {
        "slide": slide_path.name,
        "tiles": n,
        "tile_px": 224,
        "mpp": 0.5,
        "model": arch,
        "batch": batch,
        "workers": workers,
        "device": str(device),
        "precision": precision,
        "decode": decode,
        **median,
        "ratio_min_max": [
            min(r["ratio_e2e_over_min"] for r in repeat_rows),
            max(r["ratio_e2e_over_min"] for r in repeat_rows),
        ],
        "limiting_stage": "read+decode" if median["read_tiles_per_s"] < median["model_tiles_per_s"] else "model",
        "repeats": repeat_rows,
    }


def memory_one(path: Path, tmp: Path) -> dict[str, object]:
    """End-to-end predict (tissue + plan + dense tiny_fcn at 2 µm/px) on a slide written by the parent process;
    the peak RSS of this process is the pipeline's alone."""
    from wsi_pipeline.config import load_config
    from wsi_pipeline.models import ModelCard, save_model
    from wsi_pipeline.models.architectures import build, seeded
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.run.settings import engine_options
    from wsi_pipeline.run.stages import predict_stage

    card = ModelCard(
        name="tiny",
        task="mitosis",
        kind="dense",
        architecture="tiny_fcn",
        architecture_args={"width": 8, "stride": 2},
        mpp=2.0,
        tile_px=256,
        output_stride=2,
        halo_px=8,
        classes=["mitosis"],
        activation="sigmoid",
    )
    save_model(tmp / "tiny", seeded(build("tiny_fcn", 1, width=8, stride=2), 0), card)
    cfg = load_config(None, ["tasks.mitosis.tile_px=256", "tasks.mitosis.overlap_px=32"])
    base = peak_rss_mb()
    t0 = time.perf_counter()
    engine = engine_options(cfg, device="cpu", workers=1, batch_size=16, progress=False)
    result = predict_stage(Slide(path), cfg, "mitosis", tmp / "out", engine, model_path=str(tmp / "tiny"))
    slide = Slide(path)
    return {
        "width": slide.dimensions[0],
        "height": slide.dimensions[1],
        "tiles": result["tiles"],
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_before_predict": base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="JSON report [benchmarks/results/engine.json; engine-cuda.json on a GPU]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-tiles", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, help="tiles per batch [16 on the CPU, 128 on a GPU]")
    parser.add_argument("--workers", type=int, help="reading worker processes [every core but one]")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--memory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the engine's [auto]")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "device"], help="engine.decode [cpu]")
    args = parser.parse_args()
    if args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(memory_one(args.memory, Path(tmp))))
        return
    from wsi_pipeline.engine import default_workers, resolve_device
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    device = resolve_device(args.device)
    workers = default_workers() if args.workers is None else args.workers
    batch = args.batch or (128 if device.type == "cuda" else 16)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report: dict[str, object] = {"benchmark": "engine", "machine": machine_facts(gpu), "throughput": [], "memory": []}
    shared = shared_slide("CMU-1-Small-Region.svs")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # 30 000 x 24 000 px at 0.25 µm/px: about 1 300 tissue tiles of 224 px at 0.5 µm/px, more than --max-tiles
        synthetic = write_synthetic_slide(tmp / "synthetic.svs", default_layout(30000, 24000, 0.25, seed=5))
        for slide_path in [p for p in (synthetic, shared) if p.exists()]:
            row = throughput(
                slide_path,
                tmp,
                device,
                workers,
                batch,
                args.max_tiles,
                args.arch,
                args.repeats,
                args.precision,
                args.decode,
            )
            report["throughput"].append(row)  # type: ignore[union-attr]
            print(json.dumps({k: v for k, v in row.items() if k != "repeats"}))
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp_name:
            for width, height in [(20000, 16000), (100000, 80000)]:
                path = write_synthetic_slide(
                    Path(tmp_name) / f"m{width}.svs", default_layout(width, height, 0.25, seed=1)
                )
                row = in_fresh_process(__file__, "--memory", str(path))
                report["memory"].append(row)  # type: ignore[union-attr]
                print(json.dumps(row))
                path.unlink()
        small, large = report["memory"]  # type: ignore[misc]
        report["peak_rss_ratio_large_over_small"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    write_report(args.out or f"benchmarks/results/engine{'-cuda' if device.type == 'cuda' else ''}.json", report)


if __name__ == "__main__":
    main()
