"""Slide-level attention-MIL, measured on what real and synthetic data allow (docs/embeddings.md):

1. A synthetic cohort: slides from the project's generator, every other one with a planted lesion of packed
   nuclei-sized objects among the same scattered ones; embedded by `wsi-pipeline embed` with the shipped metastasis
   network's penultimate features; `train-slide` with a held-out third of the patients. Figures: held-out AUC, and
   where the attention goes on held-out positive slides (the most attended tile on the lesion; the lesion's share of
   the attention against its share of the tiles).
2. PatchCamelyon bags: bags of 64 PCam tiles, positive when they hold 1-6 tumour tiles (a witness rate of 2-9 %),
   training bags drawn from PCam's train split and test bags from its valid split (other slides), written in the
   TRIDENT / CLAM h5 layout and read by `train-slide --held-out`. The encoder is the same network; it was trained on
   PCam's train split, so the test bags are held out from it too.

Writes benchmarks/results/slide_mil.json. Run: .venv/bin/python benchmarks/slide_mil.py [--slides 60] [--bags 300]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import machine_facts, write_report

ROOT = Path(__file__).resolve().parents[1]
ENCODER = "metastasis-small_cnn"
BAG = 64


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"wsi-pipeline {args[0]} failed: {result.stderr}")
    return result.stdout


def write_labels(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "patient"])
        writer.writerows(rows)
    return path


def synthetic_cohort(work: Path, slides: int) -> dict[str, object]:
    import shapely

    from wsi_pipeline.engine.embeddings import read_embeddings
    from wsi_pipeline.models.folders import default_model_dir
    from wsi_pipeline.models.slide_mil import load_slide_model, slide_prediction
    from wsi_pipeline.slide.synth import lesion_layout, read_truth, write_synthetic_slide

    started = time.perf_counter()
    rows = []
    for i in range(slides):
        write_synthetic_slide(work / "slides" / f"case{i:03d}.svs", lesion_layout(1800, 1800, 1.0, 900 + i, i % 2 == 1))
        rows.append((f"case{i:03d}", "tumour" if i % 2 else "normal", f"p{i // 2}"))
    labels = write_labels(work / "labels.csv", rows)
    written = time.perf_counter()
    cli("embed", str(work / "slides"), "-o", str(work / "out"), "--encoder", str(default_model_dir("metastasis")))
    embedded = time.perf_counter()
    line = cli(
        "train-slide", str(labels), str(work / "out"), "--encoder", ENCODER, "-o", str(work / "model"),
        "--val-fraction", "0.34", "--positive", "tumour",
    ).strip()  # fmt: skip
    trained = time.perf_counter()
    card, module = load_slide_model(work / "model")
    on_lesion, enrichment, mass = [], [], []
    for slide_id in card.training["val_slides"]:
        if int(slide_id[4:]) % 2 == 0:
            continue
        features, coords, attrs = read_embeddings(work / "out" / slide_id / "embeddings" / f"{ENCODER}.zarr")
        _, attention = slide_prediction(module, features)
        figures = read_truth(work / "slides" / f"{slide_id}.svs").figures[-40:]
        lesion = shapely.MultiPoint([(f.x, f.y) for f in figures]).convex_hull.buffer(5)
        size = attrs["patch_size_level0"]
        inside = shapely.intersects(
            shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size), lesion
        )
        on_lesion.append(bool(inside[np.argmax(attention)]))
        mass.append(float(attention[inside].sum()))
        enrichment.append(float(attention[inside].sum() / inside.mean()))
    validation = card.metrics["validation"]
    return {
        "slides": slides,
        "slide": "1800 x 1800 px at 1.0 µm/px, 30 scattered objects; positives 40 more packed in a 200 µm lesion",
        "encoder": f"{ENCODER} (the shipped metastasis network's penultimate features, 96 px at 0.972 µm/px)",
        "held_out_slides": card.metrics["slides"]["validation"],
        "held_out_auc": validation["roc_auc"],
        "held_out_auc_ci95": validation["roc_auc_ci95"],
        "sensitivity": validation["sensitivity"],
        "specificity": validation["specificity"],
        "positives_with_top_tile_on_lesion": f"{sum(on_lesion)}/{len(on_lesion)}",
        "attention_on_lesion_mean": round(float(np.mean(mass)), 3),
        "attention_on_lesion_min": round(float(np.min(mass)), 3),
        "enrichment_over_lesion_tile_share_min": round(float(np.min(enrichment)), 2),
        "enrichment_over_lesion_tile_share_median": round(float(np.median(enrichment)), 2),
        "seconds": {
            "write": round(written - started, 1),
            "embed": round(embedded - written, 1),
            "train": round(trained - embedded, 1),
        },
        "train_slide_said": line,
    }


def pcam_bags(work: Path, data: Path, bags: int, seed: int = 0) -> dict[str, object]:
    import h5py
    import torch

    from wsi_pipeline.engine.embeddings import EncoderPredictor
    from wsi_pipeline.models.encoders import load_encoder
    from wsi_pipeline.models.folders import default_model_dir
    from wsi_pipeline.models.slide_mil import load_slide_model, slide_prediction
    from wsi_pipeline.training.data.items import folder_items, load_tile

    encoder = load_encoder(default_model_dir("metastasis"))
    predictor = EncoderPredictor(encoder, torch.device("cpu"), "fp32")
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    split_features = {}
    for split in ("train", "valid"):
        items, _ = folder_items(data / "metastasis" / "pcam" / split, None, None)
        rows = []
        for start in range(0, len(items), 256):
            tiles = np.stack([load_tile(i, 96) for i in items[start : start + 256]])
            rows.append(predictor.features(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()).numpy())
        labels = np.array([i.label for i in items])
        split_features[split] = (np.concatenate(rows), labels)
    encoded = time.perf_counter()
    label_rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "valid": []}
    witnesses: dict[str, np.ndarray] = {}
    for split, count in (("train", bags), ("valid", bags * 2 // 3)):
        features, labels = split_features[split]
        tumour, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        for b in range(count):
            positive = b % 2 == 1
            k = int(rng.integers(1, 7)) if positive else 0
            chosen = np.r_[rng.choice(tumour, k, replace=False), rng.choice(normal, BAG - k, replace=False)]
            rng.shuffle(chosen)
            bag_id = f"{split}-bag{b:04d}"
            with h5py.File(work / "bags" / f"{bag_id}.h5", "w") as f:  # the TRIDENT / CLAM layout
                f.create_dataset("features", data=features[chosen])
                coords = f.create_dataset("coords", data=np.c_[np.arange(BAG) * 96, np.zeros(BAG)].astype(np.int64))
                coords.attrs["patch_size"] = 96
                coords.attrs["patch_level"] = 0
                f.attrs["mpp"] = 0.972
            witnesses[bag_id] = labels[chosen] == 1
            label_rows[split].append((bag_id, str(int(positive)), bag_id))
    train_csv = write_labels(work / "train.csv", label_rows["train"])
    test_csv = write_labels(work / "test.csv", label_rows["valid"])
    line = cli(
        "train-slide", str(train_csv), str(work / "bags"), "--encoder", ENCODER, "-o", str(work / "pcam-model"),
        "--held-out", str(test_csv),
    ).strip()  # fmt: skip
    trained = time.perf_counter()
    card, module = load_slide_model(work / "pcam-model")
    top_is_tumour, mass = [], []
    for bag_id, _, _ in label_rows["valid"]:
        if not witnesses[bag_id].any():
            continue
        with h5py.File(work / "bags" / f"{bag_id}.h5", "r") as f:
            _, attention = slide_prediction(module, f["features"][:])
        top_is_tumour.append(bool(witnesses[bag_id][np.argmax(attention)]))
        mass.append(float(attention[witnesses[bag_id]].sum()))
    validation = card.metrics["validation"]
    return {
        "bag_tiles": BAG,
        "witnesses_per_positive_bag": "1-6 (uniform)",
        "train_bags": len(label_rows["train"]),
        "test_bags": len(label_rows["valid"]),
        "split": "training bags from PCam train, test bags from PCam valid (other slides)",
        "encoder": f"{ENCODER} (trained on PCam train: the test bags' tiles are held out from it as well)",
        "test_auc": validation["roc_auc"],
        "test_auc_ci95": validation["roc_auc_ci95"],
        "sensitivity": validation["sensitivity"],
        "specificity": validation["specificity"],
        "positive_test_bags_top_tile_tumour": f"{sum(top_is_tumour)}/{len(top_is_tumour)}",
        "attention_on_tumour_tiles_mean": round(float(np.mean(mass)), 3),
        "seconds": {"encode_tiles": round(encoded - started, 1), "bags_and_train": round(trained - encoded, 1)},
        "train_slide_said": line,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--bags", type=int, default=300)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "slide_mil.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "synthetic").mkdir()
        (work / "pcam" / "bags").mkdir(parents=True)
        report = {
            "machine": machine_facts(),
            "command": f".venv/bin/python benchmarks/slide_mil.py --slides {args.slides} --bags {args.bags}",
            "synthetic_cohort": synthetic_cohort(work / "synthetic", args.slides),
            "pcam_bags": pcam_bags(work / "pcam", args.data, args.bags),
        }
    write_report(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
