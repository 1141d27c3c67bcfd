"""Read benchmark: tiles/s of every reader backend reading the same tile plan through the engine's own loader.

Slides: a synthetic 20 000 x 16 000 px Aperio SVS at 0.25 µm/px and CMU-1-Small-Region (0.499 µm/px). Plans: 224 px
at 0.5 µm/px and 96 px at 0.972 µm/px (PCam's). With 1 and 2 reading workers, as threads (the engine's default) and
as DataLoader worker processes; each configuration runs every backend in turn `--repeats` times, so the ratio
`direct_over_openslide` (median of tifffile / openslide, same plan, same run; the top-level key over the default
loader's rows) is measured side by side. Writes benchmarks/results/read.json.
"""

# ruff: noqa: I001  (wsi_pipeline before torch, as in the CLI: it sets OpenMP's wait policy)
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import wsi_pipeline  # noqa: F401
import torch
from _report import machine_facts, shared_slide, write_report

PLANS = ((0.5, 224), (0.972, 96))


def rate(
    path: Path, backend: str, mpp: float, tile: int, workers: int, loader: str, max_tiles: int
) -> tuple[float, int]:
    from wsi_pipeline.engine import make_loader
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.slide.tiling import plan_tiles
    from wsi_pipeline.slide.tissue import detect_tissue
    from wsi_pipeline.slide.tissue_config import TissueConfig

    slide = Slide(path, backend=backend)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), mpp, tile, 0, 0.1)
    for name in ("cols", "rows", "x", "y", "tissue_fraction"):  # the first max_tiles tiles in plan order
        setattr(plan, name, getattr(plan, name)[:max_tiles])
    started = time.perf_counter()
    for _ in make_loader(slide, plan, 32, workers, torch.device("cpu"), loader):  # type: ignore[arg-type]
        pass
    return len(plan) / (time.perf_counter() - started), len(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/read.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tiles", type=int, default=600)
    parser.add_argument("--loaders", nargs="+", default=["threads", "processes"])
    args = parser.parse_args()
    cmu = shared_slide("CMU-1-Small-Region.svs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

        synthetic = write_synthetic_slide(Path(tmp) / "synthetic.svs", default_layout(20000, 16000, 0.25, seed=5))
        for path in (synthetic, cmu):
            for mpp, tile in PLANS:
                for workers, loader in ((w, kind) for kind in args.loaders for w in (1, 2)):
                    runs: dict[str, list[float]] = {"openslide": [], "tifffile": []}
                    tiles = 0
                    for _ in range(args.repeats):
                        for backend in runs:  # alternating: the machine's drift hits both alike
                            tiles_per_s, tiles = rate(path, backend, mpp, tile, workers, loader, args.max_tiles)
                            runs[backend].append(tiles_per_s)
                    ratios = [d / o for d, o in zip(runs["tifffile"], runs["openslide"], strict=True)]
                    row = {
                        "slide": path.name,
                        "mpp": mpp,
                        "tile_px": tile,
                        "workers": workers,
                        "loader": loader,
                        "tiles": tiles,
                        "openslide_tiles_per_s": statistics.median(runs["openslide"]),
                        "tifffile_tiles_per_s": statistics.median(runs["tifffile"]),
                        "direct_over_openslide": statistics.median(ratios),
                        "repeats": runs,
                    }
                    rows.append(row)
                    print({k: v for k, v in row.items() if k != "repeats"}, flush=True)
    ratios = [r["direct_over_openslide"] for r in rows if r["loader"] == args.loaders[0]]
    report = {
        "benchmark": "read",
        "machine": machine_facts(),
        "rows": rows,
        "direct_over_openslide": statistics.median(ratios),
        "direct_over_openslide_range": [min(ratios), max(ratios)],
        "direct_over_openslide_loader": args.loaders[0],
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
