"""Epithelium/stroma at labelled nuclei, as a user samples it: CRCHistoPhenotypes fields the shipped model held out
(its card's validation fields) written as tiled TIFF slides at 0.55 µm/px, run through `wsi-pipeline run` at several
tile overlaps, the epithelium heatmap read at every epithelial nucleus and fibroblast; ROC AUC of epithelial vs
fibroblast nuclei and the run's wall time per overlap. Writes benchmarks/results/epithelium-nuclei.json.
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
import tifffile
from _report import machine_facts, write_report
from PIL import Image

FIELD_MPP = 0.55


def _fields(data: Path, card: dict) -> list[tuple[Path, list[dict]]]:
    held = {g.split("/", 2)[2] for g in card["training"]["val_groups"] if g.startswith("crchistophenotypes/")}
    split = {g.split("/", 2)[1] for g in card["training"]["val_groups"] if g.startswith("crchistophenotypes/")}
    found = []
    for name in sorted(split):
        folder = data / "epithelium_stroma" / "crchistophenotypes" / name
        rows = list(csv.DictReader((folder / "nuclei.csv").open()))
        for image in sorted(held):
            if (folder / image).is_file():
                found.append((folder / image, [r for r in rows if r["image"] == image]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--overlaps", default="0,32,48")
    parser.add_argument("--out", default="benchmarks/results/epithelium-nuclei.json")
    args = parser.parse_args()
    from wsi_pipeline.heatmap import open_heatmap
    from wsi_pipeline.models import default_model_dir
    from wsi_pipeline.tasks.common import level_transform
    from wsi_pipeline.training.metrics import roc_auc

    card = json.loads((default_model_dir("epithelium_stroma") / "model_card.json").read_text())
    fields = _fields(args.data, card)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        slides = Path(tmp_name) / "slides"
        slides.mkdir()
        for path, _ in fields:
            rgb = np.array(Image.open(path).convert("RGB"))
            tifffile.imwrite(slides / f"{path.stem}.tif", rgb, tile=(256, 256), photometric="rgb", compression="zlib")
        for overlap in (int(v) for v in args.overlaps.split(",")):
            out = Path(tmp_name) / f"out{overlap}"
            command = [sys.executable, "-m", "wsi_pipeline.cli", "run", str(slides), "-o", str(out), "--tasks",
                       "epithelium_stroma", "--default-mpp", str(FIELD_MPP), "--no-progress", "--workers", "1",
                       "--set", f"tasks.epithelium_stroma.overlap_px={overlap}",
                       "--set", "tissue.min_region_um2=1000"]  # fmt: skip
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds = time.perf_counter() - started
            scores, labels, missed = [], [], 0
            for path, nuclei in fields:
                heat = open_heatmap(out / path.stem / "heatmaps.zarr" / "epithelium")
                values = heat.channel("epithelium")
                (tx, ty), (sx, sy) = level_transform(heat, 0)
                for nucleus in nuclei:
                    if nucleus["class"] not in ("epithelial", "fibroblast"):
                        continue
                    row = int((float(nucleus["y"]) - ty) // sy)
                    col = int((float(nucleus["x"]) - tx) // sx)
                    if not (0 <= row < values.shape[0] and 0 <= col < values.shape[1]) or values[row, col] == 0:
                        missed += 1  # outside every planned tile (edge of the field, or too little tissue)
                        continue
                    scores.append(float(values[row, col]))
                    labels.append(nucleus["class"] == "epithelial")
            auc = roc_auc(np.array(labels), np.array(scores))
            rows.append({"overlap_px": overlap, "nuclei": len(scores), "nuclei_outside_tiles": missed,
                         "roc_auc": round(auc, 4), "run_seconds": round(seconds, 1)})  # fmt: skip
            print(rows[-1], flush=True)
    write_report(args.out, {"benchmark": "epithelium-nuclei", "fields": [str(p) for p, _ in fields],
                            "machine": machine_facts(), "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
