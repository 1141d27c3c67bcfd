"""Training the µm/px estimator (models/mpp_estimator.py) on sources of known µm/px, and measuring it on each source
left out of fitting (`wsi-pipeline train-mpp-estimator`, `make models-mpp`).

Training crops are cut from each source at random scales, each averaged down (box) from the source's own px, as
the estimator reads a field averaged 2 x 2. Every source spans a range
of scales, so no source's tissue tells its scale. The held-out measurement reads each left-out source as a user's
field would be read: fields of at least 500 x 500 px (small tiles grouped until they are), halved, cut into crops,
the median of their answers.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.models.mpp_estimator import CARD, WEIGHTS, halve, mpp_network, tissue_crops, to_input

CROP_PX = 48
MAX_MPP = 4.0  # coarsest µm/px a training crop is made at (a 2x-averaged 2 µm/px field)
FIELD_MIN_PX = 250_000  # a held-out field: at least 500 x 500 px of the source


@dataclass(frozen=True)
class ScaleSource:
    """Images (or one slide) of one known µm/px."""

    name: str
    mpp: float
    images: tuple[Path, ...]


def read_sources(config: Path, data: Path) -> list[ScaleSource]:
    """configs/models/mpp_estimator.yaml: `sources: {name: {mpp: X, images: [glob, ...]}}` under `data`."""
    spec = yaml.safe_load(config.read_text())
    sources = []
    for name, entry in (spec.get("sources") or {}).items():
        files = tuple(sorted(p for pattern in entry["images"] for p in data.glob(pattern)))
        if not files:
            raise ConfigError(f"{config}: source {name}: no image matches {entry['images']} under {data}")
        sources.append(ScaleSource(name, float(entry["mpp"]), files))
    if len(sources) < 3:
        raise ConfigError(f"{config}: at least three sources are needed (one is left out at a time)")
    return sources


def _open(path: Path) -> Image.Image:
    """An image file, or a slide's whole level 0 (a small slide: the CMU-1 region)."""
    if path.suffix.lower() in (".svs", ".ndpi", ".mrxs", ".scn", ".bif"):  # slides; a .tif is a tile here
        from wsi_pipeline.slide import Slide

        with Slide(path) as slide:
            b = slide.bounds
            return Image.fromarray(slide.read_region(b.x, b.y, b.width, b.height, slide.mpp.mean))
    return Image.open(path).convert("RGB")


def crop_bank(source: ScaleSource, count: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """`count` crops of CROP_PX at log-uniform µm/px from the source's own to MAX_MPP (as far as its images allow).

    From the source's own scale, not from twice it (what the estimator reads of a field): a source whose crops all
    lay at or above its field's scale taught the network that such tissue is never finer, and every source's fields
    came out 1.1-1.4x too coarse even in fitting (docs/mpp.md)."""
    per_image = max(1, -(-count // len(source.images)))
    crops, scales = [], []
    for path in source.images:
        image = _open(path)
        w, h = image.size
        low, high = source.mpp, min(MAX_MPP, source.mpp * min(w, h) / CROP_PX)
        made = tries = 0
        while made < per_image and tries < 6 * per_image and high >= low:
            tries += 1
            t = float(np.exp(rng.uniform(np.log(low), np.log(high))))
            r = CROP_PX * t / source.mpp
            x, y = rng.uniform(0, w - r), rng.uniform(0, h - r)
            crop = np.asarray(image.resize((CROP_PX, CROP_PX), Image.Resampling.BOX, box=(x, y, x + r, y + r)))
            if (crop.mean(axis=-1) < 210).mean() < 0.5:
                continue
            crops.append(crop)
            scales.append(t)
            made += 1
    if not crops:
        raise ConfigError(f"source {source.name}: no tissue crop could be cut (images too small or blank)")
    return np.stack(crops), np.asarray(scales, np.float32)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of σ px (a 7 px kernel, reflected edges)."""
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma * sigma))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 7, 7).contiguous()
    return nn.functional.conv2d(nn.functional.pad(x, (3, 3, 3, 3), mode="reflect"), kernel, groups=3)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips, 90° turns, colour (per-channel gain, brightness, contrast) and blur: stain, scanner colour and focus
    vary, scale must not be read from them. Blur of up to 1.5 px on half the crops: a blurred scan (a frozen
    section, a soft 20x scanner) otherwise reads as a zoomed-in one (TCGA-CR-7395 came out at 0.26 µm/px for ~1)."""
    n = x.shape[0]
    blurred = torch.rand(n, generator=gen) < 0.5
    if blurred.any():
        sigma = float(0.3 + 1.2 * torch.rand(1, generator=gen).item())
        x = x.clone()
        x[blurred] = _blur(x[blurred], sigma)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    x = torch.rot90(x, int(torch.randint(4, (1,), generator=gen).item()), (2, 3))
    x = x * (1 + 0.12 * torch.randn(n, 3, 1, 1, generator=gen))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + 0.2 * torch.randn(n, 1, 1, 1, generator=gen)) + mean
    return (x + 0.06 * torch.randn(n, 1, 1, 1, generator=gen)).clamp(0, 1)


def train_network(bank: dict[str, tuple[np.ndarray, np.ndarray]], steps: int, seed: int) -> nn.Sequential:
    """Sources drawn equally often; smooth-L1 on log2 µm/px; AdamW with a one-cycle schedule."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = sorted(bank)
    net = mpp_network()
    optimiser = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 2e-3, total_steps=steps)
    net.train()
    for _ in range(steps):
        picks = rng.choice(len(names), 64)
        index = [int(rng.integers(len(bank[names[p]][0]))) for p in picks]
        crops = np.stack([bank[names[p]][0][i] for p, i in zip(picks, index, strict=True)])
        target = torch.tensor([np.log2(bank[names[p]][1][i]) for p, i in zip(picks, index, strict=True)])
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
        x = (_augment(x, gen) - 0.5) / 0.25
        loss = nn.functional.smooth_l1_loss(net(x).squeeze(1), target.float(), beta=0.1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return net.eval()


def held_out_fields(source: ScaleSource, limit: int = 600) -> list[np.ndarray]:
    """The source's fields as a user would give them: each image of ≥ 500 x 500 px cut into such fields, smaller
    tiles grouped (halved crops of several tiles) until they cover as many px; each field as its halved crops."""
    rng = random.Random(1)
    files = list(source.images)
    rng.shuffle(files)
    fields: list[np.ndarray] = []
    group: list[np.ndarray] = []
    px = 0
    for path in files[:limit]:
        rgb = np.asarray(_open(path))
        h, w = rgb.shape[:2]
        if h * w >= 2 * FIELD_MIN_PX:  # large: 500 px fields of it
            for y in range(0, h - 499, 500):
                for x in range(0, w - 499, 500):
                    crops = tissue_crops(halve(rgb[y : y + 500, x : x + 500]), CROP_PX)
                    if len(crops) >= 10:
                        fields.append(crops)
            continue
        group.append(tissue_crops(halve(rgb), CROP_PX))
        px += h * w
        if px >= FIELD_MIN_PX:
            crops = np.concatenate(group)
            if len(crops):
                fields.append(crops)
            group, px = [], 0
    return fields


@torch.inference_mode()
def field_estimates(net: nn.Module, fields: list[np.ndarray]) -> np.ndarray:
    """Each field's µm/px (of its native px): the median over its halved crops, halved back."""
    return np.array([2.0 ** float(np.median(net(to_input(f)).squeeze(1).numpy())) / 2.0 for f in fields])


def source_figures(estimates: np.ndarray, true_mpp: float) -> dict[str, Any]:
    ratio = estimates / true_mpp
    return {
        "mpp": true_mpp,
        "fields": len(ratio),
        "median_estimate": round(float(np.median(estimates)), 4),
        "median_ratio": round(float(np.median(ratio)), 4),
        "ratio_p5_p95": [round(float(v), 4) for v in np.quantile(ratio, [0.05, 0.95])],
        "within_20_percent": round(float(np.mean(np.abs(np.log(ratio)) <= np.log(1.2))), 4),
        "max_abs_log2_error": round(float(np.max(np.abs(np.log2(ratio)))), 4),
    }


def fit_estimator(
    sources: list[ScaleSource],
    out: Path,
    *,
    steps: int = 1500,
    per_source: int = 3000,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Leave each source out in turn (fit on the others, measure it), then fit on all and save the network with a
    card whose interval is the largest held-out error."""
    started = time.perf_counter()
    rng = random.Random(seed)
    bank = {s.name: crop_bank(s, per_source, rng) for s in sources}
    held_out: dict[str, Any] = {}
    for source in sources:
        net = train_network({k: v for k, v in bank.items() if k != source.name}, steps, seed)
        figures = source_figures(field_estimates(net, held_out_fields(source)), source.mpp)
        held_out[source.name] = figures
        log(f"{source.name} ({source.mpp} µm/px) left out: {json.dumps(figures)}")
    net = train_network(bank, steps, seed)
    interval = max(f["max_abs_log2_error"] for f in held_out.values())
    card = {
        "name": "mpp_estimator",
        "crop_px": CROP_PX,
        "input": "fields averaged 2 x 2 (box), cut into crops of crop_px; answer = median over crops, halved back",
        "interval_log2": interval,
        "sources": {s.name: {"mpp": s.mpp, "images": len(s.images), "crops": len(bank[s.name][0])} for s in sources},
        "held_out": held_out,
        "training": {"steps": steps, "batch": 64, "seed": seed, "crops_per_source": per_source},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / WEIGHTS))
    (out / CARD).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    return card
