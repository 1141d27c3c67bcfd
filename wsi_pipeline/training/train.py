"""Train a patch classifier from folder-per-class tiles: seeded, resumable, early-stopped on validation.

Checkpoints (`checkpoint.pt`, written atomically after every epoch) hold only tensors and numbers and are read
back with `torch.load(weights_only=True)`; a killed run resumes from its last finished epoch. The best epoch's
weights are saved as a model folder (weights.safetensors + model_card.json with the measured validation metrics).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_path
from ..evaluate import balanced_accuracy, roc_auc
from ..models import ModelCard, save_model
from ..models.architectures import build
from ..progress import Progress
from .augment import AugmentConfig, augment
from .data import DataError, TileItem, load_tile

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    task: str
    classes: list[str]
    architecture: str = "small_cnn"
    architecture_args: dict[str, Any] | None = None
    mpp: float = 0.5
    tile_px: int = 150
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    seed: int = 0
    workers: int = 1
    freeze_backbone: bool = False
    init_checkpoint: str | None = None


class _Tiles(Dataset):
    def __init__(self, items: list[TileItem], tile_px: int, aug: AugmentConfig | None, seed: int) -> None:
        self.items, self.tile_px, self.aug, self.seed, self.epoch = items, tile_px, aug, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        tile = torch.from_numpy(load_tile(item, self.tile_px)).permute(2, 0, 1).contiguous()
        if self.aug is not None:
            tile = augment(tile, self.aug, self.seed, self.epoch, index)
        return tile, item.label


def _normalise(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return (batch.to(device).float() / 255.0 - 0.5) / 0.5


def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for batch, y in loader:
            probs.append(torch.softmax(model(_normalise(batch, device)), 1).cpu().numpy())
            labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    metrics = {"balanced_accuracy": balanced_accuracy(labels, probs.argmax(1))}
    if probs.shape[1] == 2:
        metrics["roc_auc"] = roc_auc(labels == 1, probs[:, 1])
    return metrics


def train_classifier(
    train_items: list[TileItem],
    val_items: list[TileItem],
    cfg: TrainConfig,
    out: Path,
    *,
    device: torch.device,
    augmentation: AugmentConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, keep the best epoch by validation balanced accuracy, write the model folder; returns the summary."""
    if not train_items or not val_items:
        raise DataError("training needs tiles on both sides of the split")
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    model = build(cfg.architecture, len(cfg.classes), **(cfg.architecture_args or {})).to(device)
    if cfg.init_checkpoint:
        _init_from(model, Path(cfg.init_checkpoint))
    params = [p for name, p in model.named_parameters() if not (cfg.freeze_backbone and not _is_head(name, model))]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    aug = augmentation or AugmentConfig()
    train_set = _Tiles(train_items, cfg.tile_px, aug, cfg.seed)
    val_loader = DataLoader(
        _Tiles(val_items, cfg.tile_px, None, cfg.seed), batch_size=cfg.batch_size, num_workers=cfg.workers
    )
    counts = np.bincount([i.label for i in train_items], minlength=len(cfg.classes))
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    )
    state = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "stale": 0, "history": []}
    ckpt_path = out / CHECKPOINT
    best_state: dict[str, torch.Tensor] | None = None
    fingerprint = json.dumps(
        {k: v for k, v in asdict(cfg).items() if k not in ("epochs", "patience", "workers")}, sort_keys=True
    )
    if ckpt_path.exists():  # resume
        ckpt = torch.load(ckpt_path, weights_only=True, map_location=device)
        if ckpt.get("config") != fingerprint:
            raise DataError(
                f"{out} holds a checkpoint of another training configuration; give another -o folder "
                f"or delete {ckpt_path} to start afresh"
            )
        model.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
        best_state = ckpt["best_model"]
        state = {k: ckpt[k] for k in state}
        state["history"] = [dict(zip(ckpt["history_keys"], row, strict=True)) for row in ckpt["history"]]
    started = time.perf_counter()
    while state["epoch"] < cfg.epochs and state["stale"] < cfg.patience:
        train_set.epoch = state["epoch"]
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(cfg.seed + state["epoch"]),
            shuffle=True,
        )
        model.train()
        bar = Progress(len(train_set), f"epoch {state['epoch'] + 1}/{cfg.epochs}", enabled=progress)
        total = 0.0
        for batch, y in loader:
            optimiser.zero_grad()
            loss = loss_fn(model(_normalise(batch, device)), y.to(device))
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
            bar.update(len(y))
        bar.close()
        metrics = _metrics(*_evaluate(model, val_loader, device))
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "loss": total / len(train_set), **metrics})
        if metrics["balanced_accuracy"] > state["best_score"]:
            state.update(best_score=metrics["balanced_accuracy"], best_epoch=state["epoch"], stale=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["stale"] += 1
        _save_checkpoint(ckpt_path, model, optimiser, best_state, state, fingerprint)
    assert best_state is not None
    model.load_state_dict(best_state)
    final = _metrics(*_evaluate(model, val_loader, device))
    card = ModelCard(
        name=f"{cfg.task}-{cfg.architecture}",
        task=cfg.task,
        kind="classifier",
        architecture=cfg.architecture,
        architecture_args=cfg.architecture_args or {},
        mpp=cfg.mpp,
        tile_px=cfg.tile_px,
        classes=cfg.classes,
        activation="softmax",
        normalisation={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        training={
            "config": asdict(cfg),
            "augmentation": asdict(aug),
            "train_tiles": len(train_items),
            "val_tiles": len(val_items),
            "train_groups": sorted({i.group for i in train_items}),
            "val_groups": sorted({i.group for i in val_items}),
            "best_epoch": state["best_epoch"],
            "history": state["history"],
            "command": " ".join(shlex.quote(a) for a in sys.argv),
        },
        metrics={"validation": final, "seconds": round(time.perf_counter() - started, 1)},
    )
    save_model(out, model.cpu(), card)
    return card.model_dump(mode="json")


def _is_head(name: str, model: nn.Module) -> bool:
    """The last parameterised module is the head (kept trainable when the backbone is frozen)."""
    last = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))][-1]
    return name.startswith(last + ".")


def _init_from(model: nn.Module, path: Path) -> None:
    """Start from a local checkpoint (e.g. an ImageNet or pathology backbone); the head is left as built."""
    from safetensors.torch import load_file

    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise DataError(f"{path} shares no weights with the architecture (names or shapes differ)")
    model.load_state_dict(usable, strict=False)


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    config: str,
) -> None:
    keys = sorted({k for row in state["history"] for k in row})
    payload = {
        "config": config,
        "model": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "best_model": best,
        **{k: state[k] for k in ("epoch", "best_score", "best_epoch", "stale")},
        "history_keys": keys,
        "history": [[row.get(k, float("nan")) for k in keys] for row in state["history"]],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
