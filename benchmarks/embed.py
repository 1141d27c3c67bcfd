"""Embedding throughput on this machine's CPU (or `--device cuda`): `wsi-pipeline embed` with a ViT-S/16 and a
ViT-B/16 (timm, seeded weights saved locally) beside TIAToolbox 1.3.2's feature extractor (DeepFeatureExtractor)
with the same backbone and weights on the same synthetic 8000 x 6000 px slide at 0.5 µm/px: 224 px tiles at
0.5 µm/px, stride 224, batch 64, one reading worker, each tool's own tissue mask. The tools alternate `--repeats`
times in one run; each is a whole process (imports included): wall seconds, tiles per second, peak RSS summed over
its process tree. Ours runs at the default precision (bf16 where the CPU has it natively, else fp32) and in fp32
(TIAToolbox's). `make bench-embed` builds TIAToolbox's venv (build/peers-venv, with timm) first.
Writes benchmarks/results/embed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _report import machine_facts, write_report
from peers import PEERS_PYTHON, measured, median_ratio

ARCHES = ("vit_small_patch16_224", "vit_base_patch16_224")
TIATOOLBOX_SCRIPT = r'''
"""Tile features from a whole-slide image with TIAToolbox 1.3.2's feature-extraction engine and a timm ViT.

Run with TIAToolbox's own venv (build/peers-venv, plus timm):

    build/peers-venv/bin/python build/tia_embed.py SLIDE WEIGHTS OUTDIR ARCH [--no-mask]

SLIDE    a whole-slide image TIAToolbox can open (mode "wsi").
WEIGHTS  torch.save of timm.create_model(ARCH, pretrained=False, num_classes=0).state_dict() (loaded weights_only).
OUTDIR   where DeepFeatureExtractor writes; it must not exist yet (TIAToolbox refuses an existing save_dir), an
         existing *empty* folder is removed first. Outputs: OUTDIR/0.features.0.npy (N x D float32),
         OUTDIR/0.position.npy (N x 4: x0, y0, x1, y1 of each patch, in pixels at 0.5 mpp), OUTDIR/file_map.dat.
ARCH     a timm name, e.g. vit_small_patch16_224 or vit_base_patch16_224.
--no-mask  every patch of the slide (TIAToolbox's engine default, auto_generate_mask=False); without it the engine
         builds its own tissue mask (auto_generate_mask=True: Otsu on a 1.25x thumbnail) and keeps the patches
         whose box touches any tissue pixel.

Patches: 224 x 224 px read at 0.5 mpp, stride 224, output the same; batch 64, 1 loader worker, CPU.
Last stdout line: {"patches": N, "dim": D, "seconds": S}, S = wall seconds from the start of model construction
to the end of DeepFeatureExtractor.predict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from tiatoolbox.models.engine.semantic_segmentor import DeepFeatureExtractor, IOSegmentorConfig
from tiatoolbox.models.models_abc import ModelABC
from tiatoolbox.utils.misc import select_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 224
MPP = 0.5


class TimmViTExtractor(ModelABC):
    """A timm ViT (num_classes=0: class-token features) behind TIAToolbox's model interface."""

    def __init__(self, arch: str, weights: str) -> None:
        super().__init__()
        self.vit = timm.create_model(arch, pretrained=False, num_classes=0)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.vit.load_state_dict(state, strict=True)
        self.vit.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC RGB patches -> (B, D) features."""
        x = imgs.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
        x = (x - self.mean) / self.std
        return self.vit(x.contiguous())

    @staticmethod
    def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, on_gpu: bool) -> list[np.ndarray]:
        """As CNNBackbone.infer_batch in TIAToolbox 1.3.2: a list with one (B, D) numpy array.

        The batch goes in as the loader gives it (uint8 NHWC); the cast, NCHW permute and normalisation happen
        in forward, so forward's contract is the uint8 one.
        """
        batch = batch_data.to(select_device(on_gpu))
        model.eval()
        with torch.inference_mode():
            output = model(batch)
        return [output.cpu().numpy()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide")
    parser.add_argument("weights")
    parser.add_argument("outdir")
    parser.add_argument("arch")
    parser.add_argument("--no-mask", action="store_true", help="process every patch (no tissue mask)")
    args = parser.parse_args(argv)

    outdir = Path(args.outdir)
    if outdir.is_dir() and not any(outdir.iterdir()):
        outdir.rmdir()  # TIAToolbox insists on creating save_dir itself

    ioconfig = IOSegmentorConfig(
        input_resolutions=[{"units": "mpp", "resolution": MPP}],
        output_resolutions=[{"units": "mpp", "resolution": MPP}],
        patch_input_shape=[PATCH, PATCH],
        patch_output_shape=[PATCH, PATCH],
        stride_shape=[PATCH, PATCH],
    )

    start = time.perf_counter()
    model = TimmViTExtractor(args.arch, args.weights)
    extractor = DeepFeatureExtractor(
        model=model,
        batch_size=64,
        num_loader_workers=1,
        auto_generate_mask=not args.no_mask,
    )
    output = extractor.predict(
        [str(args.slide)],
        mode="wsi",
        on_gpu=False,
        ioconfig=ioconfig,
        save_dir=str(outdir),
        crash_on_exception=True,
    )
    seconds = time.perf_counter() - start

    (_, stem), = output  # [(slide path, OUTDIR/0)]
    features = np.load(f"{stem}.features.0.npy")
    positions = np.load(f"{stem}.position.npy")
    if features.ndim != 2 or features.shape[0] != positions.shape[0]:
        raise SystemExit(f"unexpected outputs: features {features.shape}, positions {positions.shape}")
    print(f"features {stem}.features.0.npy {features.shape} {features.dtype}; "
          f"positions {stem}.position.npy {positions.shape}", file=sys.stderr)
    print(json.dumps({"patches": int(features.shape[0]), "dim": int(features.shape[1]), "seconds": round(seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def encoder_folder(tmp: Path, arch: str) -> tuple[Path, Path]:
    """Our encoder folder and a torch state dict file of the same seeded network."""
    import torch

    from wsi_pipeline.models.card import Normalisation
    from wsi_pipeline.models.encoder_card import EncoderCard
    from wsi_pipeline.models.encoders import build_encoder_network, save_encoder

    card = EncoderCard(
        name=arch.split("_patch")[0], architecture=f"timm:{arch}", architecture_args={"img_size": 224}, mpp=0.5,
        tile_px=224, normalisation=Normalisation(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        pooling="cls", dim=384 if "small" in arch else 768,
    )  # fmt: skip
    torch.manual_seed(0)
    network = build_encoder_network(card)
    torch.save(network.state_dict(), tmp / f"{arch}.pt")
    return save_encoder(tmp / arch, network, card), tmp / f"{arch}.pt"


def tiles_written(out: Path, name: str) -> int:
    summary = json.loads(next(out.glob("*/summary.json")).read_text())
    return int(summary["embeddings"][name]["tiles"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/embed.json")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    peers = PEERS_PYTHON.exists()
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slide = write_synthetic_slide(tmp / "slide.svs", default_layout(8000, 6000, 0.5, seed=1))
        (tmp / "tia.py").write_text(TIATOOLBOX_SCRIPT)
        for arch in ARCHES:
            folder, weights = encoder_folder(tmp, arch)
            name = folder.name.split("_patch")[0]
            ours = [sys.executable, "-m", "wsi_pipeline.cli", "embed", str(slide), "--encoder", str(folder),
                    "--workers", "1", "--device", args.device, "--no-progress", "--set", "embed.batch_size=64",
                    "--set", "embed.min_tissue=0.01"]  # fmt: skip
            for repeat in range(args.repeats):
                row: dict[str, object] = {"arch": arch, "repeat": repeat}
                if peers and args.device == "cpu":
                    tia = measured([str(PEERS_PYTHON), str(tmp / "tia.py"), str(slide), str(weights),
                                    str(tmp / f"tia-{arch}-{repeat}"), arch])  # fmt: skip
                    said = json.loads(str(tia.pop("stdout")).strip().splitlines()[-1])
                    row["tiatoolbox"] = {
                        **tia,
                        **{f"engine_{k}": v for k, v in said.items()},
                        "patches_per_s": said["patches"] / float(tia["seconds"]),
                    }  # type: ignore[arg-type]
                for precision in ("auto", "fp32"):
                    out = tmp / f"ours-{arch}-{precision}-{repeat}"
                    mine = measured([*ours, "-o", str(out), "--set", f"engine.precision={precision}"])
                    mine.pop("stdout")
                    tiles = tiles_written(out, name)
                    row[f"wsi_pipeline_{precision}"] = {
                        **mine,
                        "patches": tiles,
                        "patches_per_s": tiles / float(mine["seconds"]),
                    }  # type: ignore[arg-type]
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary: dict[str, object] = {}
    for arch in ARCHES:
        mine = [r for r in rows if r["arch"] == arch]
        figures: dict[str, object] = {
            f"{p}_patches_per_s": statistics.median(r[f"wsi_pipeline_{p}"]["patches_per_s"] for r in mine)  # type: ignore[index]
            for p in ("auto", "fp32")
        }
        if all("tiatoolbox" in r for r in mine):
            tia_rate = [r["tiatoolbox"]["patches_per_s"] for r in mine]  # type: ignore[index]
            figures["tiatoolbox_patches_per_s"] = statistics.median(tia_rate)
            for p in ("auto", "fp32"):
                figures[f"ours_{p}_over_tiatoolbox_patches_per_s"] = median_ratio(
                    mine, f"wsi_pipeline_{p}", "tiatoolbox", "patches_per_s"
                )
            figures["peak_rss_ours_fp32_over_tiatoolbox"] = median_ratio(
                mine, "wsi_pipeline_fp32", "tiatoolbox", "peak_rss_mb"
            )
        summary[arch] = figures
    write_report(
        args.out,
        {
            "benchmark": "embed",
            "machine": machine_facts(),
            "device": args.device,
            "peer": "tiatoolbox 1.3.2 DeepFeatureExtractor (auto_generate_mask=True), same timm backbone and weights"
            if peers
            else "none (build/peers-venv missing: make bench-embed builds it)",
            "rows": rows,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
