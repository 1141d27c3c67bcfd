"""Engine benchmark: (a) read+decode-only tiles/s, (b) model-only tiles/s, (c) end-to-end tiles/s, in one run.

Reports (c) / min(a, b): 1.0 means the pipeline fully hides the slower stage behind the other. Also peak RSS of
end-to-end runs on a 20 000 x 16 000 and a 100 000 x 80 000 px synthetic slide (each in its own process).
Writes benchmarks/results/engine.json. The model is torchvision's resnet18 with seeded weights (a stand-in with
the cost of a real classifier until trained models ship); on a GPU it runs under bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _model(tmp: Path, arch: str, mpp: float, tile: int):
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


def throughput(
    slide_path: Path,
    slide_mpp: float | None,
    tmp: Path,
    device: torch.device,
    workers: int,
    batch: int,
    max_tiles: int,
    arch: str,
) -> dict[str, object]:
    from wsi_pipeline.config import TissueConfig
    from wsi_pipeline.engine import TaskRequest, make_loader, predict_slide
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.tiling import plan_tiles
    from wsi_pipeline.tissue import detect_tissue

    slide = Slide(slide_path, mpp=slide_mpp)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), 0.5, 224, 0, 0.1)
    if len(plan) > max_tiles:  # keep the run short: the first max_tiles tiles in plan order
        for name in ("cols", "rows", "x", "y", "tissue_fraction"):
            setattr(plan, name, getattr(plan, name)[:max_tiles])
    n = len(plan)
    model = _model(tmp, arch, 0.5, 224)
    # (a) read + decode only
    t0 = time.perf_counter()
    for _ in make_loader(slide, plan, batch, workers, device):
        pass
    read_rate = n / (time.perf_counter() - t0)
    # (b) model only, on random uint8 tiles already in memory
    module = model.module.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
    model_rate = done / (time.perf_counter() - t0)
    # (c) end to end
    timings = predict_slide(
        slide,
        [TaskRequest("epithelium_stroma", model, plan)],
        tmp / f"{slide.slide_id}.zarr",
        device=device,
        batch_size=batch,
        workers=workers,
        progress=False,
    )
    e2e_rate = n / timings["reads"][0]["seconds"]
    limit = "read+decode" if read_rate < model_rate else "model"
    return {
        "slide": slide_path.name,
        "tiles": n,
        "tile_px": 224,
        "mpp": 0.5,
        "model": arch,
        "batch": batch,
        "workers": workers,
        "device": str(device),
        "read_tiles_per_s": read_rate,
        "model_tiles_per_s": model_rate,
        "end_to_end_tiles_per_s": e2e_rate,
        "ratio_e2e_over_min": e2e_rate / min(read_rate, model_rate),
        "limiting_stage": limit,
    }


def memory_one(path: Path, tmp: Path) -> dict[str, object]:
    """End-to-end predict (tissue + plan + dense tiny_fcn at 2 µm/px) on a slide written by the parent process;
    the peak RSS of this process is the pipeline's alone."""
    from wsi_pipeline.config import load_config
    from wsi_pipeline.models import ModelCard, save_model
    from wsi_pipeline.models.architectures import build, seeded
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.stages import predict_stage

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
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = predict_stage(
        Slide(path),
        cfg,
        "mitosis",
        tmp / "out",
        model_path=str(tmp / "tiny"),
        device="cpu",
        batch_size=16,
        workers=1,
        progress=False,
    )
    slide = Slide(path)
    return {
        "width": slide.dimensions[0],
        "height": slide.dimensions[1],
        "tiles": result["tiles"],
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mb_before_predict": base / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-tiles", type=int, default=384)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--memory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(memory_one(args.memory, Path(tmp))))
        return
    from wsi_pipeline.engine import default_workers, resolve_device
    from wsi_pipeline.synth import default_layout, write_synthetic_slide

    device = resolve_device(args.device)
    workers = default_workers()
    batch = 64 if device.type == "cuda" else 16
    report: dict[str, object] = {
        "benchmark": "engine",
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        },
        "throughput": [],
        "memory": [],
    }
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        synthetic = write_synthetic_slide(tmp / "synthetic.svs", default_layout(20000, 16000, 0.25, seed=5))
        for slide_path in [p for p in (synthetic, shared) if p.exists()]:
            row = throughput(slide_path, None, tmp, device, workers, batch, args.max_tiles, args.arch)
            report["throughput"].append(row)  # type: ignore[union-attr]
            print(json.dumps(row))
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp_name:
            for width, height in [(20000, 16000), (100000, 80000)]:
                path = write_synthetic_slide(
                    Path(tmp_name) / f"m{width}.svs", default_layout(width, height, 0.25, seed=1)
                )
                done = subprocess.run(
                    [sys.executable, __file__, "--memory", str(path)], check=True, capture_output=True, text=True
                )
                row = json.loads(done.stdout.strip().splitlines()[-1])
                report["memory"].append(row)  # type: ignore[union-attr]
                print(json.dumps(row))
                path.unlink()
        small, large = report["memory"]  # type: ignore[misc]
        report["peak_rss_ratio_large_over_small"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
