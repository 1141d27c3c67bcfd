"""Dense class maps (a U-Net for epithelium / stroma) learnt from the same tiles as a patch classifier.

A tile's label becomes a target map at the network's output stride: a whole-tile label (a Kather texture tile, a
tile of an annotated region) holds at every output px; a labelled point (a nucleus of CRCHistoPhenotypes) holds
within `radius_um` of it, and the rest of that tile gets no loss (its other nuclei are unlabelled, or of classes not
trained). Each tile weighs the same in the loss whatever its labelled area, so a few whole-tile sources do not
outweigh the nucleus fields. The same areas score a tile in validation and `evaluate` (the mean probability over
them), which makes a dense model's tile figures comparable with a classifier's on the same tiles.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsi_pipeline.training.data.augment import AugmentConfig, augment
from wsi_pipeline.training.data.items import TileItem, load_tile
from wsi_pipeline.training.loop import normalise

IGNORE = -1  # output px without a label: no loss


@dataclass(frozen=True)
class ClassMapTargets:
    radius_um: float = 6.0  # a labelled point's class holds this far around it (about one epithelial nucleus)
    output_stride: int = 4
    halo_px: int = 64  # small_unet's receptive radius is about 52 input px (architectures.small_unet)
    run_tile_px: int = 512  # the engine's default tile for this model: 56 % of each tile's map is kept


def check_map_shape(model: nn.Module, name: str, tile_px: int, targets: ClassMapTargets) -> None:
    """Refuse, before training, an architecture that makes no map, or one at another output stride."""
    from wsi_pipeline.core.errors import ConfigError

    model.eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, tile_px, tile_px, device=next(model.parameters()).device))
    side = tile_px // targets.output_stride
    if out.ndim != 4 or tuple(out.shape[-2:]) != (side, side):
        raise ConfigError(
            f"architecture {name} makes {tuple(out.shape[1:])} per {tile_px} px tile; a dense model needs a map of "
            f"{side} x {side} (output stride {targets.output_stride}), e.g. --arch small_unet"
        )
    model.train()


def label_areas(items: list[TileItem], tile_px: int, stride: int, radius_px: float) -> np.ndarray:
    """bool (N, h, w) at the output stride: where each item's label holds (the whole map, or a disc around its
    point; output px j's centre is input px j * stride + stride / 2, point fractions are of the tile's edge)."""
    side = tile_px // stride
    areas = np.ones((len(items), side, side), bool)
    centres = np.arange(side) * stride + stride / 2
    for area, item in zip(areas, items, strict=True):
        if item.point is not None:
            px, py = item.point[0] * tile_px, item.point[1] * tile_px
            area[:] = (centres[:, None] - py) ** 2 + (centres[None, :] - px) ** 2 <= radius_px**2
            if not area.any():  # a radius below one output px: the px under the point
                area[min(side - 1, int(py // stride)), min(side - 1, int(px // stride))] = True
    return areas


def item_scores(maps: torch.Tensor | np.ndarray, areas: np.ndarray) -> np.ndarray:
    """(N, C, h, w) probabilities -> (N, C): each class's mean over the item's labelled area."""
    values = np.asarray(maps, dtype=np.float64)
    weights = areas[:, None].astype(np.float64)
    return (values * weights).sum(axis=(2, 3)) / weights.sum(axis=(2, 3))


class TileMaps(Dataset):
    """(tile uint8, target int64 (h, w), label) per item; training draws seeded crops, flips and 90° turns that
    move tile and target together, then colour augmentation."""

    def __init__(
        self,
        items: list[TileItem],
        tile_px: int,
        targets: ClassMapTargets,
        radius_px: float,
        aug: AugmentConfig | None,
        seed: int,
        stain: str | None = None,
    ) -> None:
        self.items, self.tile_px, self.aug, self.seed, self.epoch = items, tile_px, aug, seed, 0
        # colour only: flips and turns move tile and target together in __getitem__
        self.colour_aug = None if aug is None else replace(aug, flips=False, rotate90=False, scale=0.0)
        self.stain = stain
        self.areas = label_areas(items, tile_px, targets.output_stride, radius_px)

    def __len__(self) -> int:
        return len(self.items)

    def without_augmentation(self) -> TileMaps:
        """The same tiles and targets as the model is run on them (centre crop, no augmentation)."""
        plain = copy.copy(self)
        plain.aug = plain.colour_aug = None
        return plain

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        item = self.items[index]
        target = torch.from_numpy(np.where(self.areas[index], item.label, IGNORE).astype(np.int64))
        if self.colour_aug is None:
            tile = torch.from_numpy(load_tile(item, self.tile_px, stain=self.stain)).permute(2, 0, 1).contiguous()
            return tile, target, item.label
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        offset = (float(rng.random()), float(rng.random()))  # a tile larger than the model's: a seeded part
        tile = torch.from_numpy(load_tile(item, self.tile_px, offset, self.stain)).permute(2, 0, 1)
        if rng.random() < 0.5:
            tile, target = tile.flip(-1), target.flip(-1)
        turns = int(rng.integers(4))
        tile, target = torch.rot90(tile, turns, (-2, -1)), torch.rot90(target, turns, (-2, -1))
        tile = augment(tile.contiguous(), self.colour_aug, self.seed, self.epoch, index)
        return tile, target.contiguous(), item.label


def tile_loss(logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per output px, averaged within each tile's labelled area, then over tiles weighted by class."""
    per_px = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    labelled = (target != IGNORE).float()
    per_tile = (per_px * labelled).sum(dim=(1, 2)) / labelled.sum(dim=(1, 2)).clamp(min=1)
    tile_weight = weight[labels]
    return (per_tile * tile_weight).sum() / tile_weight.sum()


def evaluate_maps(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Tile scores (N, C) and labels of a TileMaps loader."""
    model.eval()
    scores, labels = [], []
    with torch.inference_mode():
        for tiles, target, label in loader:
            probs = torch.softmax(model(normalise(tiles, device)), 1).cpu()
            scores.append(item_scores(probs.numpy(), (target != IGNORE).numpy()))
            labels.append(label.numpy())
    return np.concatenate(scores), np.concatenate(labels)


def card_geometry(targets: ClassMapTargets) -> dict[str, Any]:
    """The dense card's fields (output stride, halo, default run tile)."""
    return {
        "kind": "dense",
        "output_stride": targets.output_stride,
        "halo_px": targets.halo_px,
        "run_tile_px": targets.run_tile_px,
    }


def scoring_radius_px(card_training: dict[str, Any], mpp: float) -> float:
    """The labelled-point radius a dense class-map model was trained with, in its input px."""
    radius_um = card_training.get("targets", {}).get("radius_um", ClassMapTargets().radius_um)
    return float(radius_um) / mpp
