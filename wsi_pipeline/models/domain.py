"""The domain guard: is this tile like the tiles the model was trained on, judged by the model's own features?

A model answers confidently on tissue it never saw (a lymph-node metastasis model on skin). The guard summarises
the activations of a few layers of the same forward pass that makes the prediction (no second pass): per layer, the
channel means and standard deviations over each window of the training tile's size. A Mahalanobis distance with a
shrinkage (Ledoit-Wolf) covariance, fitted on training tiles, scores each layer; each layer's score is divided by
its median over in-domain validation tiles, and the tile's score is the largest over layers (Lee et al. 2018 read
several layers: on the shipped metastasis model the first blocks separate skin and squamous carcinoma from lymph
node at AUROC 0.99, the penultimate layer alone at 0.65-0.73; docs/models.md). A dense model's run tile holds
several windows; its score is their median. The threshold is a quantile of in-domain validation scores, and a
tile's stored value is score / threshold: above 1, out of domain.

Fitting lives in training/domain.py; this module is what `run` needs: the file, the hooks and the score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from wsi_pipeline.core.inventory import file_sha256
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.folders import ModelError

LOG = logging.getLogger("wsi_pipeline.models")
DOMAIN_KEY = "domain"  # the predictor output that holds each tile's guard value
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ReLU6, nn.Mish)


class FeatureTap:
    """Forward hooks on `layers` of `module`: after each forward, `windows()` gives per layer (B, W, 2C) features,
    the channel mean and std of each of W windows of `window_px` input px (a classifier's tile is one window)."""

    def __init__(self, module: nn.Module, layers: list[str], window_px: int) -> None:
        named = dict(module.named_modules())
        missing = [name for name in layers if name not in named]
        if missing:
            raise KeyError(f"the network has no layers {missing}")
        self.window_px = window_px
        self.layers = layers
        self.seen: dict[str, torch.Tensor] = {}
        self.handles = [named[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self.seen[name] = output.detach()

        return keep

    def windows(self, input_px: int) -> list[torch.Tensor]:
        out = [window_stats(self.seen[name].float(), input_px, self.window_px) for name in self.layers]
        self.seen.clear()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def window_stats(activation: torch.Tensor, input_px: int, window_px: int) -> torch.Tensor:
    """(B, W, 2C): mean and std per channel over each window (a (B, C) activation is its own feature, W = 1)."""
    if activation.ndim == 2:
        return activation[:, None, :]
    return stats_over(activation, window_size(activation.shape[-1], input_px, window_px))


def window_size(size: int, input_px: int, window_px: int) -> int:
    """The window of `window_px` input px in an activation `size` px wide for an input `input_px` wide."""
    return max(1, min(size, round(size * window_px / input_px)))


def stats_over(activation: torch.Tensor, window: int) -> torch.Tensor:
    """(B, W, 2C): mean and std per channel of a (B, C, h, w) activation over each `window` x `window` square."""
    mean = F.avg_pool2d(activation, window, window)
    square = F.avg_pool2d(activation * activation, window, window)
    std = (square - mean * mean).clamp_min(0).sqrt()
    stats = torch.cat([mean, std], dim=1)  # (B, 2C, h, w)
    return stats.flatten(2).transpose(1, 2)


class DomainGuard:
    """The fitted density per layer (mean, precision, in-domain median score) and the combined threshold."""

    def __init__(
        self, means: list[torch.Tensor], precisions: list[torch.Tensor], scales: list[float], threshold: float
    ) -> None:
        self.means, self.precisions, self.scales, self.threshold = means, precisions, scales, threshold

    def to(self, device: torch.device) -> DomainGuard:
        """On `device` in float32 (fitted in float64; the scores differ from calibration's in the sixth digit)."""
        return DomainGuard(
            [m.to(device, torch.float32) for m in self.means],
            [p.to(device, torch.float32) for p in self.precisions],
            self.scales,
            self.threshold,
        )

    def layer_scores(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(L, B, W) squared Mahalanobis distances, each divided by its layer's in-domain median."""
        scores = []
        for feats, mean, precision, scale in zip(features, self.means, self.precisions, self.scales, strict=True):
            centred = feats.to(mean.dtype) - mean
            scores.append(torch.einsum("bwi,ij,bwj->bw", centred, precision, centred) / scale)
        return torch.stack(scores)

    def tile_scores(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B,) score / threshold per tile: the largest layer score, median over the tile's windows; > 1 is out."""
        combined = self.layer_scores(features).amax(dim=0)
        return (combined.median(dim=1).values / self.threshold).float().cpu()


def default_layers(module: nn.Module, tile_px: int) -> list[str]:
    """The layers a guard reads when none are named: at each spatial size the network passes through, the last
    activation module called once (a block's output); where activations are shared modules (torchvision's ResNet
    calls one ReLU several times), the last top-level child at each size."""
    calls: dict[str, int] = {}
    sizes: dict[str, int] = {}
    handles = []
    for name, sub in module.named_modules():
        if name and (isinstance(sub, ACTIVATIONS) or "." not in name):

            def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
                sizes[name] = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim == 4 else -1

            handles.append(sub.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module(torch.zeros(1, 3, tile_px, tile_px))
    module.train(was_training)
    for handle in handles:
        handle.remove()
    named = dict(module.named_modules())
    for wanted in (lambda n: isinstance(named[n], ACTIVATIONS), lambda n: "." not in n):
        last: dict[int, str] = {}
        for name in calls:  # in call order
            if calls[name] == 1 and sizes[name] > 0 and wanted(name):
                last[sizes[name]] = name
        if last:
            return list(last.values())
    raise ValueError(f"{type(module).__name__}: no layer with a spatial output found for the domain guard")


def load_guard(directory: Path, card: ModelCard) -> DomainGuard | None:
    """The model folder's guard, checked like its weights (exit 10 naming the file); None when the card has none."""
    meta = card.domain_guard
    if meta is None:
        return None
    path = directory / meta.file
    if not path.is_file():
        raise ModelError(
            f"{path} is missing (the model card names it as its domain guard); restore it or refit it "
            "with `wsi-pipeline calibrate-domain`"
        )
    if file_sha256(path) != meta.sha256:
        raise ModelError(
            f"{path} is not the file its card was written for (sha256 differs): damaged or replaced; "
            "refit it with `wsi-pipeline calibrate-domain`"
        )
    if meta.architecture != card.architecture:
        raise ModelError(
            f"{path} was fitted for architecture {meta.architecture}, not this model's "
            f"{card.architecture}; refit it with `wsi-pipeline calibrate-domain`"
        )
    with safe_open(str(path), framework="pt") as handle:
        info = json.loads((handle.metadata() or {}).get("guard", "{}"))
        if info.get("layers") != meta.layers:
            raise ModelError(f"{path} reads layers {info.get('layers')}, its card says {meta.layers}; refit it")
        n = len(meta.layers)
        means = [handle.get_tensor(f"{i}.mean") for i in range(n)]
        precisions = [handle.get_tensor(f"{i}.precision") for i in range(n)]
    return DomainGuard(means, precisions, [float(s) for s in info["scales"]], float(info["threshold"]))


def attach(
    module: nn.Module, card: ModelCard, guard: DomainGuard, device: torch.device
) -> tuple[FeatureTap, DomainGuard]:
    """Hooks on `module` (the network the predictor runs) for the card's guard layers; a network whose layers
    cannot be found (a rewritten or other network) is refused: its guard would say nothing true."""
    meta = card.domain_guard
    assert meta is not None
    try:
        tap = FeatureTap(module, meta.layers, meta.window_px)
    except KeyError as exc:
        raise ModelError(
            f"{card.name}: its domain guard reads layers the network lacks ({exc.args[0]}); refit it"
        ) from None
    return tap, guard.to(device)
