"""What the domain guard costs: tiles/s of each guarded shipped model through the engine's predictor (BatchNorm
folded, the CPU's default precision), with its guard and without it, on the same real tiles of CMU-1-Small-Region
(median of `--repeats` rounds, the two measured alternately). Writes benchmarks/results/domain-guard.json."""

# ruff: noqa: I001  (wsi_pipeline before torch, as in the CLI: it sets OpenMP's wait policy)
from __future__ import annotations

import argparse
import statistics
import time

import wsi_pipeline  # noqa: F401
import torch
from _report import machine_facts, write_report
from cpu_model import tiles_for

from wsi_pipeline.models import default_model_dir, load_model, make_predictor


def rates(predictors: list, x: torch.Tensor, repeats: int) -> list[float]:  # type: ignore[type-arg]
    """Median tiles/s of each predictor, measured in turn (one pass of each per round), so that a machine's drift
    affects all alike."""
    with torch.inference_mode():
        for predictor in predictors:
            predictor(x)  # warm-up
        measured: list[list[float]] = [[] for _ in predictors]
        for _ in range(repeats):
            for predictor, out in zip(predictors, measured, strict=True):
                start = time.perf_counter()
                predictor(x)
                out.append(len(x) / (time.perf_counter() - start))
    return [statistics.median(m) for m in measured]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default="benchmarks/results/domain-guard.json")
    args = parser.parse_args()
    models = {}
    for task in ("metastasis", "epithelium_stroma"):
        guarded = load_model(default_model_dir(task))
        plain = load_model(default_model_dir(task))
        plain.guard = None
        x = tiles_for(guarded.card, args.tiles)
        device = torch.device("cpu")
        with_guard, without = rates([make_predictor(guarded, device), make_predictor(plain, device)], x, args.repeats)
        models[task] = {
            "tiles_per_s_with_guard": round(with_guard, 1),
            "tiles_per_s_without_guard": round(without, 1),
            "ratio_with_to_without": round(with_guard / without, 3),
            "layers": guarded.card.domain_guard.layers if guarded.card.domain_guard else [],
        }
        print(task, models[task], flush=True)
    write_report(args.out, {"machine": machine_facts(), "tiles": args.tiles, "repeats": args.repeats, "models": models})


if __name__ == "__main__":
    main()
