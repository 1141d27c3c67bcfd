"""Optional stain normalisation of every tile a model sees (training, `evaluate` and `run` alike): Macenko et al.
(ISBI 2009) as torchstain implements it, to torchstain's reference H&E matrix and maximum concentrations.

Per tile, not per slide: a tile is normalised from its own pixels, so a model sees the same input whichever slide,
batch or process a tile comes from, and no slide-level state has to be estimated first. A tile with too little
stained tissue to estimate two stain vectors (glass, fat, a torn edge) is passed through unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("macenko",)
_IO = 240  # transmitted light intensity, torchstain's default
_BETA = 0.15  # pixels with optical density below this in any channel are transparent (torchstain's default)
MIN_STAINED_FRACTION = 0.05  # fewer stained pixels than this: the tile is left as it is
MIN_STAINED_PIXELS = 64


# torchstain's reference H&E vectors (OD, columns H and E) and 99th-percentile concentrations
HE_REFERENCE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAX_CONCENTRATION_REFERENCE = np.array([1.9705, 1.0308])
_ALPHA = 1.0  # percentile of the stain-vector angles taken as the extremes


def normalise_tile(rgb: np.ndarray, method: str = "macenko") -> np.ndarray:
    """uint8 (H, W, 3) -> the same tile with the reference stain; unchanged where it cannot be estimated.

    torchstain's NumpyMacenkoNormalizer step for step (tests/test_stain.py checks that it agrees within one grey
    level), written out here because its least-squares solve and separate percentile calls cost ~10 ms per 96 px
    tile on this CPU, several times the training step of the tile itself; the pseudo-inverse of the 3 x 2 stain
    matrix gives the same least-squares concentrations."""
    if method not in METHODS:
        raise ValueError(f"unknown stain normalisation {method!r}; known: {', '.join(METHODS)}")
    h, w, _ = rgb.shape
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / _IO)
    stained = od[~np.any(od < _BETA, axis=1)]
    if len(stained) < max(MIN_STAINED_PIXELS, MIN_STAINED_FRACTION * len(od)):
        return rgb
    with np.errstate(all="ignore"):
        _, vectors = np.linalg.eigh(np.cov(stained.T))
        plane = vectors[:, 1:3]
        projected = stained @ plane
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        low, high = np.percentile(angles, [_ALPHA, 100 - _ALPHA])
        v_min = plane @ np.array([np.cos(low), np.sin(low)])
        v_max = plane @ np.array([np.cos(high), np.sin(high)])
        he = np.stack([v_min, v_max], 1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], 1)  # H first
        concentrations = np.linalg.pinv(he) @ od.T
        scale = np.percentile(concentrations, 99, axis=1) / MAX_CONCENTRATION_REFERENCE
        out = _IO * np.exp(-HE_REFERENCE @ (concentrations / scale[:, None]))
    if not np.isfinite(out).all():  # a degenerate estimate (one stain only, a flat tile)
        return rgb
    return np.minimum(out, 255).T.reshape(h, w, 3).astype(np.uint8)


def normalise_batch(batch: torch.Tensor, method: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> the same, each tile normalised on the CPU."""
    tiles = batch.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([normalise_tile(tile, method) for tile in tiles])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(batch.device)
