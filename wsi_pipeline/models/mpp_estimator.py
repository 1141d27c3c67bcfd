"""µm/px from the tissue itself, for a slide whose file records none (`--default-mpp auto`) and as a check of one
that does.

A small CNN reads crops of tissue and regresses log2 µm/px. It never sees a scanner's own pixels: every field is
first averaged 2 x 2 (box), and the network was trained on crops box-averaged down from sources of known µm/px
(training/mpp_estimator.py). Averaging erases much of what differs between scanners at the pixel level (optical
blur, sensor noise, JPEG), which otherwise told the network more about the scanner than about the scale: trained on
resampled crops and asked about native ones, it was off by 1.1-2x even on its own sources. The slide's answer is
the median over its crops; the interval is the estimate times and divided by the card's held-out error (the
largest |log2| error over the fields of every source left out of fitting, docs/mpp.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from wsi_pipeline.core.errors import ConfigError, MissingMppError
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tissue import TissueMask

DEFAULT_ESTIMATOR = Path(__file__).parent / "defaults" / "mpp_estimator"
CARD = "estimator.json"
WEIGHTS = "weights.safetensors"
PROBE_MPP = 0.5  # µm/px assumed to find tissue and fields on a slide whose µm/px is unknown
FIELD_PX = 256  # native px per field read from a slide
MAX_FIELDS = 48
MIN_CROPS = 24  # fewer tissue crops than this and no estimate is given


def mpp_network() -> nn.Sequential:
    """The estimator's network: six 3x3 conv blocks (three with stride 2), global mean, one linear output."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 24, 2),
        *block(24, 32, 1),
        *block(32, 48, 2),
        *block(48, 64, 1),
        *block(64, 96, 2),
        *block(96, 96, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 1),
    )


def to_input(crops: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → the network's float input."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25


def halve(rgb: np.ndarray) -> np.ndarray:
    """2 x 2 box average (uint8), the estimator's first step on any field."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    small = rgb[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    return np.rint(small).astype(np.uint8)


def tissue_crops(rgb: np.ndarray, crop: int) -> np.ndarray:
    """Non-overlapping crop x crop squares of a halved field with tissue on at least half their px."""
    h, w = rgb.shape[:2]
    found = [
        rgb[y : y + crop, x : x + crop]
        for y in range(0, h - crop + 1, crop)
        for x in range(0, w - crop + 1, crop)
        if (rgb[y : y + crop, x : x + crop].mean(axis=-1) < 210).mean() >= 0.5
    ]
    return np.stack(found) if found else np.zeros((0, crop, crop, 3), np.uint8)


@dataclass(frozen=True)
class MppEstimate:
    """An estimated µm/px with its interval, and how many tissue crops it rests on."""

    mpp: float
    low: float
    high: float
    crops: int

    def line(self) -> str:
        return f"{self.mpp:.3g} µm/px (interval {self.low:.3g}-{self.high:.3g}, from {self.crops} tissue crops)"

    def to_json(self) -> dict[str, Any]:
        return {"mpp_estimate": round(self.mpp, 4), "mpp_estimate_interval": [round(self.low, 4), round(self.high, 4)]}


class MppEstimator:
    """The network and its card (crop px, held-out error); loaded once per process (`default_estimator`)."""

    def __init__(self, folder: Path = DEFAULT_ESTIMATOR) -> None:
        try:
            self.card: dict[str, Any] = json.loads((folder / CARD).read_text())
            state = load_file(str(folder / WEIGHTS))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"µm/px estimator {folder}: cannot be read ({exc}); reinstall, or run make models-mpp"
            ) from exc
        self.net = mpp_network()
        self.net.load_state_dict(state)
        self.net.eval()
        self.crop = int(self.card["crop_px"])
        self.interval_log2 = float(self.card["interval_log2"])

    @torch.inference_mode()
    def predict_log2(self, crops: np.ndarray) -> np.ndarray:
        """log2 µm/px of each halved crop's px."""
        out = [self.net(to_input(crops[i : i + 256])).squeeze(1).numpy() for i in range(0, len(crops), 256)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def estimate_fields(self, fields: list[np.ndarray], what: str) -> MppEstimate:
        """The µm/px of the native px of `fields` (RGB uint8, each at least 2 crops wide)."""
        crops = [tissue_crops(halve(f), self.crop) for f in fields]
        stacked = np.concatenate(crops) if crops else np.zeros((0, self.crop, self.crop, 3), np.uint8)
        if len(stacked) < MIN_CROPS:
            raise MissingMppError(
                f"{what}: cannot estimate its µm/px from the tissue: {len(stacked)} crops of tissue found, at least "
                f"{MIN_CROPS} needed; give it with --default-mpp X (e.g. 0.25 for 40x, 0.5 for 20x)"
            )
        value = float(2.0 ** np.median(self.predict_log2(stacked))) / 2.0  # the halved px are twice the native
        spread = 2.0**self.interval_log2
        return MppEstimate(value, value / spread, value * spread, len(stacked))

    def estimate_slide(self, slide: Slide, tissue: TissueMask | None = None) -> MppEstimate:
        """Up to MAX_FIELDS fields of FIELD_PX native px, evenly spread over the slide's tissue (`tissue`: the run's
        own mask, else found here, at an assumed PROBE_MPP when the slide records none)."""
        from wsi_pipeline.slide.tiling import plan_tiles
        from wsi_pipeline.slide.tissue import detect_tissue
        from wsi_pipeline.slide.tissue_config import TissueConfig

        probe = slide.with_mpp(PROBE_MPP, "probe") if slide.mpp_or_none is None else slide
        level0 = probe.mpp.mean
        if tissue is None:
            tissue = detect_tissue(probe, TissueConfig())
        if tissue.background != "light":
            raise MissingMppError(
                f"{slide.path}: cannot estimate its µm/px: the estimator reads brightfield (H&E) tissue and this "
                "slide has a dark background (fluorescence); give it with --default-mpp X"
            )
        plan = plan_tiles(probe, tissue, level0, FIELD_PX, 0, 0.5)
        if len(plan) == 0:
            return self.estimate_fields([], str(slide.path))
        chosen = np.unique(np.linspace(0, len(plan) - 1, min(MAX_FIELDS, len(plan))).round().astype(int))
        fields = [probe.read_region(float(plan.x[i]), float(plan.y[i]), FIELD_PX, FIELD_PX, level0) for i in chosen]
        return self.estimate_fields(fields, str(slide.path))


@cache
def default_estimator() -> MppEstimator:
    return MppEstimator()


# a recorded µm/px and the estimate that differ by more than this factor get a warning (or more than the estimate's
# own interval when that is wider: a correct 40x slide must not be flagged by the estimator's error)
MISMATCH_FACTOR = 2.0


def mismatch_warning(recorded: float, source: str, estimate: MppEstimate) -> str | None:
    """A recorded µm/px more than 2x away from the tissue's estimate, and outside its interval: scanner metadata can
    be wrong (a 20x slide labelled 40x halves every area)."""
    ratio = recorded / estimate.mpp
    if 1 / MISMATCH_FACTOR <= ratio <= MISMATCH_FACTOR or estimate.low <= recorded <= estimate.high:
        return None
    return (
        f"µm/px check: the slide's {recorded:g} µm/px ({source}) is {max(ratio, 1 / ratio):.1f}x "
        f"{'above' if ratio > 1 else 'below'} the tissue's estimate, {estimate.line()}: check the scanner's "
        "metadata (every area and rate rests on it)"
    )
