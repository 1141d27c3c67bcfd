"""Quality control measured on real tissue from several sources with controlled degradations (docs/qc.md).

Per source: clean tiles (what a run reads there) and the same tiles degraded at their own resolution: Gaussian blur
of σ = 1, 2, 4 µm, motion blur over 10 µm, JPEG quality 10, darkening (optical density doubled: tissue lying twice
over) and fading (density × 0.35). Each degraded tile is judged as a small artefact of a slide whose other tissue is
the clean set (a fold is judged against the slide's own tissue: the clean tiles' median). Reports the share of clean
tiles flagged (any class) and, per degradation, the share flagged by the class meant to catch it and by any class.

    .venv/bin/python benchmarks/qc.py [--data ../shared/data] [-o benchmarks/results/qc.json]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.qc import QC_CLASSES, QcConfig, classify, tile_features

Degrade = Callable[[np.ndarray, float], np.ndarray]


def _tiles(images: list[np.ndarray], px: int) -> list[np.ndarray]:
    """Non-overlapping px-square tiles of each image (an image smaller than px is one tile) with tissue on half."""
    out = []
    for a in images:
        h, w = a.shape[:2]
        if h < px or w < px:
            out.append(a)
            continue
        for y in range(0, h - px + 1, px):
            for x in range(0, w - px + 1, px):
                t = a[y : y + px, x : x + px]
                grey = t.mean(axis=-1)
                if (grey < 215).mean() >= 0.5:
                    out.append(t)
    return out


def sources(data: Path, per_source: int) -> dict[str, tuple[float, list[np.ndarray]]]:
    """Each source's µm/px and its tiles as a run would read them there (the run's tile at about that scale)."""
    rng = random.Random(0)

    def images(pattern: str, limit: int) -> list[np.ndarray]:
        files = sorted(data.glob(pattern))
        rng.shuffle(files)
        return [np.asarray(Image.open(f).convert("RGB")) for f in files[:limit]]

    cmu = Slide(data / "slides" / "CMU-1-Small-Region.svs")
    b = cmu.bounds
    whole = cmu.read_region(b.x, b.y, b.width, b.height, cmu.mpp.mean)
    kather = images("epithelium_stroma/kather2016/0[1-7]_*/*.tif", 400)
    found = {
        "PCam lymph node (0.972)": (0.972, images("metastasis/pcam/valid/*/*.jpg", per_source)),
        "Kather colorectal (0.495)": (0.495, _tiles(kather, 150)),
        "CRCHistoPhenotypes colorectal (0.55)": (
            0.55,
            _tiles(images("epithelium_stroma/crchistophenotypes/*/*.png", 80), 224),
        ),
        "MITOS breast, scanner A (0.2456)": (0.2456, _tiles(images("mitosis/mitos2012_scannerA/*.jpg", 10), 512)),
        "CMU-1 skin (0.499)": (0.499, _tiles([whole], 224)),
    }
    return {name: (mpp, tiles[:per_source]) for name, (mpp, tiles) in found.items()}


def gaussian(sigma_um: float) -> Degrade:
    def apply(a: np.ndarray, mpp: float) -> np.ndarray:
        s = sigma_um / mpp
        return ndimage.gaussian_filter(a.astype(np.float32), (s, s, 0), mode="reflect").clip(0, 255).astype(np.uint8)

    return apply


def motion(length_um: float) -> Degrade:
    def apply(a: np.ndarray, mpp: float) -> np.ndarray:
        n = max(2, round(length_um / mpp))
        return ndimage.uniform_filter1d(a.astype(np.float32), n, axis=1, mode="reflect").clip(0, 255).astype(np.uint8)

    return apply


def jpeg(quality: int) -> Degrade:
    def apply(a: np.ndarray, mpp: float) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(buffer).convert("RGB"))

    return apply


def density(factor: float) -> Degrade:
    """Optical density times `factor`: 2 is tissue lying twice over (a fold) or overstaining; under 1, fading."""

    def apply(a: np.ndarray, mpp: float) -> np.ndarray:
        od = -np.log((a.astype(np.float32) + 1.0) / 256.0)
        return (256.0 * np.exp(-od * factor) - 1.0).clip(0, 255).astype(np.uint8)

    return apply


DEGRADATIONS: dict[str, tuple[Degrade, tuple[str, ...]]] = {
    "gaussian blur σ 1 µm": (gaussian(1.0), ("out_of_focus",)),
    "gaussian blur σ 2 µm": (gaussian(2.0), ("out_of_focus",)),
    "gaussian blur σ 4 µm": (gaussian(4.0), ("out_of_focus",)),
    "motion blur 10 µm": (motion(10.0), ("out_of_focus",)),
    "JPEG quality 10": (jpeg(10), ("out_of_focus",)),
    "darkened (OD x 2)": (density(2.0), ("fold", "too_dark")),
    "faded (OD x 0.35)": (density(0.35), ("too_faint",)),
}


def features_of(tiles: list[np.ndarray], mpp: float) -> np.ndarray:
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tiles):
        by_shape.setdefault(t.shape, []).append(i)
    out = np.zeros((len(tiles), 7), np.float32)
    for idx in by_shape.values():
        out[idx] = tile_features(np.stack([tiles[i] for i in idx]), mpp)
    return out


def measure(data: Path, per_source: int, thresholds: QcConfig) -> dict[str, object]:
    results: dict[str, object] = {}
    for name, (mpp, tiles) in sources(data, per_source).items():
        clean = features_of(tiles, mpp)
        flags = classify(clean, thresholds)
        entry: dict[str, object] = {
            "mpp": mpp,
            "tiles": len(tiles),
            "clean_flagged_any": round(float(flags.any(axis=1).mean()), 4),
            "clean_flagged_by_class": {c: round(float(flags[:, i].mean()), 4) for i, c in enumerate(QC_CLASSES)},
            "focus_clean_p5_p50": [round(float(v), 3) for v in np.percentile(clean[:, 1], [5, 50])],
        }
        for label, (degrade, meant) in DEGRADATIONS.items():
            degraded = features_of([degrade(t, mpp) for t in tiles], mpp)
            both = classify(degraded, thresholds, reference=clean)
            cols = [QC_CLASSES.index(c) for c in meant]
            entry[label] = {
                "detected_by": "/".join(meant),
                "detection_rate": round(float(both[:, cols].any(axis=1).mean()), 4),
                "flagged_any": round(float(both.any(axis=1).mean()), 4),
            }
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--per-source", type=int, default=300)
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/qc.json"))
    args = parser.parse_args()
    started = time.time()
    thresholds = QcConfig()
    results = measure(args.data, args.per_source, thresholds)
    report = {
        "command": "python benchmarks/qc.py",
        "thresholds": thresholds.model_dump(mode="json"),
        "sources": results,
        "seconds": round(time.time() - started, 1),
    }
    args.output.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
