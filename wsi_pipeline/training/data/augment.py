"""Seeded H&E augmentation: flips, 90° rotations, small scale/crop changes, brightness/contrast/saturation jitter and
HED (stain) jitter. Each sample draws from its own generator seeded by (seed, epoch, index), so results do not
depend on worker scheduling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed

_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)


@dataclass(frozen=True)
class AugmentConfig:
    flips: bool = True
    rotate90: bool = True
    scale: float = 0.1  # zoom in by up to this fraction (crop + resize back)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hed_sigma: float = 0.03  # stain concentration scale ~ 1 + N(0, sigma); shift ~ N(0, sigma)


def hed_jitter(rgb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Perturb stain concentrations: rgb (3, H, W) in [0, 1] -> HED -> h*alpha + beta -> RGB (Tellez et al.)."""
    od = -torch.log(rgb.clamp(min=1e-6))
    hed = torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB)
    hed = hed * alpha.view(3, 1, 1) + beta.view(3, 1, 1)
    od_back = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED)
    return torch.exp(-od_back).clamp(0, 1)


def augment(tile: torch.Tensor, config: AugmentConfig, seed: int, epoch: int, index: int) -> torch.Tensor:
    """tile: uint8 (3, H, W); returns uint8 (3, H, W)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]))
    x = tile.float() / 255.0
    if config.flips and torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    if config.rotate90:
        x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), dims=(-2, -1))
    if config.scale > 0:
        h, w = x.shape[-2:]
        zoom = 1 + float(torch.rand((), generator=g)) * config.scale
        ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        x = F.interpolate(
            x[None, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False
        )[0]
    if config.hed_sigma > 0:
        alpha = 1 + torch.randn(3, generator=g) * config.hed_sigma
        beta = torch.randn(3, generator=g) * config.hed_sigma
        x = hed_jitter(x, alpha, beta)
    if config.brightness > 0:
        x = x * (1 + (torch.rand((), generator=g) * 2 - 1) * config.brightness)
    if config.contrast > 0:
        mean = x.mean()
        x = (x - mean) * (1 + (torch.rand((), generator=g) * 2 - 1) * config.contrast) + mean
    if config.saturation > 0:
        grey = x.mean(0, keepdim=True)
        x = (x - grey) * (1 + (torch.rand((), generator=g) * 2 - 1) * config.saturation) + grey
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
