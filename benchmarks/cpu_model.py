"""CPU model path: tiles/s of each shipped model and of resnet18 in eager fp32, bf16 autocast, with BatchNorm folded
into the convolutions (what the engine runs: `conv_bn_fused`) in fp32 and bf16, torch.compile fp32, torch.compile +
bf16 and the folded network in ONNX Runtime (fp32), measured in turn in one run, with the largest probability
difference to eager fp32 on the same real tiles (the engine's bf16 tolerance is 0.02, as on CUDA); and, for the
shipped models, the whole predictor (with its domain guard) in torch fp32, torch bf16 and ONNX Runtime fp32.
Writes benchmarks/results/cpu-model.json; the engine's CPU default follows what wins here (docs/benchmarks.md).
"""

# ruff: noqa: I001  (wsi_pipeline before torch, as in the CLI: it sets OpenMP's wait policy)
from __future__ import annotations

import argparse
import statistics
import time

import wsi_pipeline  # noqa: F401
import torch
from _report import machine_facts, shared_slide, write_report

TOLERANCE = 0.02


def tiles_for(card, n: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`n` real tiles of CMU-1-Small-Region at the model's µm/px and tile size, as the engine feeds them."""
    from wsi_pipeline.slide import Slide

    slide = Slide(shared_slide("CMU-1-Small-Region.svs"))
    size = card.tile_px
    step = size * card.mpp / slide.mpp.x
    tiles = [slide.read_region(300 + (i % 6) * step, 600 + (i // 6) * step, size, size, card.mpp) for i in range(n)]
    return torch.stack([torch.from_numpy(t).permute(2, 0, 1) for t in tiles])


def run(module: torch.nn.Module, x: torch.Tensor, card, bf16: bool, repeats: int) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    mean = torch.tensor(card.normalisation.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.normalisation.std).view(1, 3, 1, 1)
    unit = ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = module(unit)  # warm-up (and compilation)
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            out = module(unit)
            rates.append(len(x) / (time.perf_counter() - started))
    out = out.float()
    probs = torch.softmax(out, 1) if card.activation == "softmax" else torch.sigmoid(out)
    return statistics.median(rates), probs


def predictor_ms(model, x: torch.Tensor, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """ms per tile of the whole predictor in torch fp32, torch bf16 and ONNX Runtime fp32 (`engine.runtime`)."""
    from wsi_pipeline.models import PredictorOptions, make_predictor

    found = {}
    for label, precision, runtime in (("torch_fp32", "fp32", "torch"), ("torch_bf16", "bf16", "torch"),
                                      ("onnxruntime_fp32", "fp32", "onnxruntime")):  # fmt: skip
        predictor = make_predictor(model, torch.device("cpu"), PredictorOptions(precision, runtime=runtime))
        with torch.inference_mode():
            predictor(x)  # warm-up (and the export)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                predictor(x)
                times.append(time.perf_counter() - started)
        found[label] = 1000 * statistics.median(times) / len(x)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/cpu-model.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from wsi_pipeline.models import ModelCard
    from wsi_pipeline.models.architectures import build, seeded
    from wsi_pipeline.models.cpu_runtime import OnnxForward
    from wsi_pipeline.models.predictor import conv_bn_fused, use_bf16
    from wsi_pipeline.tasks import task_model

    models = {name: task_model(name, None) for name in ("epithelium_stroma", "metastasis", "mitosis")}
    resnet_card = ModelCard(
        name="resnet18", task="epithelium_stroma", kind="classifier", architecture="resnet18", mpp=0.5, tile_px=224,
        classes=["a", "b"],
    )  # fmt: skip
    rows = []
    for name, (module, card, batch) in {
        **{n: (m.module, m.card, 16 if m.card.kind == "dense" else 64) for n, m in models.items()},
        "resnet18": (seeded(build("resnet18", 2), 0), resnet_card, 16),
    }.items():
        if card.kind == "dense":
            card = card.model_copy(update={"tile_px": 256})
        module = module.eval().to(memory_format=torch.channels_last)
        x = tiles_for(card, batch)
        fused = conv_bn_fused(module)
        compiled = torch.compile(module)
        in_onnx = OnnxForward({}, ("folded",), fused, ([], 1), name)  # the engine's fp32 CPU default
        row: dict[str, object] = {"model": name, "tile_px": card.tile_px, "batch": batch}
        reference = None
        for mode, (net, bf16) in {
            "eager_fp32": (module, False),
            "eager_bf16": (module, True),
            "fused_fp32": (fused, False),
            "fused_bf16": (fused, True),
            "compiled_fp32": (compiled, False),
            "compiled_bf16": (compiled, True),
            "onnxruntime_fp32": (lambda t, forward=in_onnx: forward(t)[0], False),  # type: ignore[index]
        }.items():
            started = time.perf_counter()
            tiles_per_s, probs = run(net, x, card, bf16, args.repeats)
            reference = probs if reference is None else reference
            row[mode] = {
                "tiles_per_s": tiles_per_s,
                "max_abs_diff": float((probs - reference).abs().max()),
                "first_call_s": time.perf_counter() - started,
            }
        best = max(
            (m for m in row if isinstance(row[m], dict) and row[m]["max_abs_diff"] <= TOLERANCE),  # type: ignore[index]
            key=lambda m: row[m]["tiles_per_s"],  # type: ignore[index]
        )
        row["fastest_within_tolerance"] = best
        # what the engine's `auto` runs on this CPU (and with engine.runtime: torch): a card that measured bf16 past
        # its limit keeps the model in fp32
        row["engine_auto"] = "bf16" if use_bf16(torch.device("cpu"), "auto", card, "auto") else "fp32"
        row["torch_auto"] = "bf16" if use_bf16(torch.device("cpu"), "auto", card, "torch") else "fp32"
        if name in models:  # the whole predictor `run` uses: normalisation, forward pass, domain guard
            row["predictor_ms_per_tile"] = predictor_ms(models[name], x, args.repeats)
        rows.append(row)
        print(row, flush=True)
    write_report(args.out, {"benchmark": "cpu-model", "machine": machine_facts(), "tolerance": TOLERANCE, "rows": rows})


if __name__ == "__main__":
    main()
