"""`train --from-embeddings`: a linear or small MLP head on a frozen encoder's features of the training tiles,
encoded once and cached (the next training on the same tiles and encoder reads the cache), so that a head trains in
seconds to minutes instead of re-encoding every tile each epoch. The encoder and the head become one model folder
(models/encoder_head.py) scored by `evaluate` and run by `run` like any classifier."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipeline.core.atomic import atomic_path
from wsi_pipeline.engine.embeddings import EncoderPredictor
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.encoder_head import HEAD_FILE, build_head, place_encoder
from wsi_pipeline.models.encoders import LoadedEncoder, load_encoder
from wsi_pipeline.models.folders import CARD_FILE
from wsi_pipeline.models.input_guard import training_stats
from wsi_pipeline.models.loading import save_weights_and_card
from wsi_pipeline.training.classifier.train import STATS_TILES, _metrics, classifier_operating_point, selection_metric
from wsi_pipeline.training.data.items import DataError, TileItem, load_tile, sample_items
from wsi_pipeline.training.loop import TrainConfig, command_line, group_list

ENCODE_BATCH = 64
HEAD_BATCH = 256


def cache_key(items: list[TileItem], encoder: LoadedEncoder, tile_px: int, stain: str | None) -> str:
    """Equal keys mean equal features: the tiles (files, regions, crops), their size, the encoder's card and
    weights, stain normalisation."""
    described = [[str(i.path), repr(i.region), repr(i.crop)] for i in items]
    parts = {"items": described, "tile_px": tile_px, "encoder": encoder.card.model_dump(mode="json"), "stain": stain}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(
    items: list[TileItem],
    encoder: LoadedEncoder,
    tile_px: int,
    cache: Path,
    device: torch.device,
    stain: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, D) float32 features of `items`, read from `cache` when an earlier run encoded the same tiles."""
    path = cache / f"{encoder.card.name}-{cache_key(items, encoder, tile_px, stain)}.npy"
    if path.is_file():
        return np.load(path), {"file": str(path), "hit": True, "seconds": 0.0}
    started = time.perf_counter()
    predictor = EncoderPredictor(encoder, device, "fp32")
    rows = []
    for start in range(0, len(items), ENCODE_BATCH):
        tiles = np.stack([load_tile(i, tile_px, stain=stain) for i in items[start : start + ENCODE_BATCH]])
        batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().to(device)
        rows.append(predictor.features(batch).numpy())
    features = np.concatenate(rows).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, features)
    return features, {"file": str(path), "hit": False, "seconds": round(time.perf_counter() - started, 1)}


def train_head(
    train_items: list[TileItem],
    val_items: list[TileItem],
    cfg: TrainConfig,
    out: Path,
    *,
    device: torch.device,
    encoder_dir: Path,
    cache: Path,
    head_kind: str = "linear",
) -> dict[str, Any]:
    """Encode (or read from the cache) both splits, fit the head with class-weighted cross-entropy, keep the epoch
    with the best validation metric, and write encoder + head as one model folder."""
    if not train_items or not val_items:
        raise DataError("training needs tiles on both sides of the split")
    started = time.perf_counter()
    encoder = load_encoder(encoder_dir)
    stain = cfg.extra.get("stain_normalisation")
    x_train, cached_train = cached_features(train_items, encoder, cfg.tile_px, cache, device, stain)
    x_val, cached_val = cached_features(val_items, encoder, cfg.tile_px, cache, device, stain)
    y_train = np.array([i.label for i in train_items])
    y_val = np.array([i.label for i in val_items])
    torch.manual_seed(cfg.seed)
    head = build_head(encoder.card.dim, len(cfg.classes), head_kind)
    counts = np.bincount(y_train, minlength=len(cfg.classes))
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    )
    optimiser = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
    watched = selection_metric(len(cfg.classes))
    xt, yt, xv = torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_val)
    generator = torch.Generator().manual_seed(cfg.seed)
    best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] = (-1.0, -1, {}, np.zeros(0))
    history = []
    fit_started = time.perf_counter()
    for epoch in range(cfg.epochs):
        head.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(order), HEAD_BATCH):
            picked = order[start : start + HEAD_BATCH]
            loss = loss_fn(head(xt[picked]), yt[picked])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        head.eval()
        with torch.no_grad():
            probs = torch.softmax(head(xv), 1).numpy()
        metrics = _metrics(probs, y_val)
        history.append({"epoch": epoch, "loss": loss.item(), **metrics})
        if metrics[watched] > best[0]:
            best = (metrics[watched], epoch, {k: v.clone() for k, v in head.state_dict().items()}, probs)
    head.load_state_dict(best[2])
    probs = best[3]
    thresholds, point = classifier_operating_point(probs, y_val, cfg.classes)
    card = ModelCard(
        name=f"{cfg.task}-{encoder.card.name}-{head_kind}",
        task=cfg.task,
        kind="classifier",
        format="encoder_head",
        architecture=f"{encoder.card.name} ({encoder.card.architecture}) + {head_kind} head",
        architecture_args={"encoder": encoder.card.name, "head": head_kind, "hidden": 256},
        mpp=cfg.mpp,
        tile_px=cfg.tile_px,
        classes=cfg.classes,
        activation="softmax",
        normalisation=encoder.card.normalisation,
        stain_normalisation=stain,
        training={
            "config": asdict(cfg),
            "from_embeddings": {"train": cached_train, "validation": cached_val, "encoder_mpp": encoder.card.mpp},
            "train_tiles": len(train_items),
            "val_tiles": len(val_items),
            "train_groups": group_list({i.group for i in train_items}),
            "val_groups": group_list({i.group for i in val_items}),
            "best_epoch": best[1],
            "history": history,
            "head_seconds": round(time.perf_counter() - fit_started, 2),
            "command": command_line(),
            "data": cfg.extra.get("data", []),
            "description": cfg.extra.get("description", ""),
        },
        metrics={
            "validation": _metrics(probs, y_val),
            "selected_by": f"validation {watched} (best epoch)",
            "seconds": round(time.perf_counter() - started, 1),
            **({"operating_point": point} if point else {}),
        },
        thresholds=thresholds,
        input_stats=training_stats(load_tile(i, cfg.tile_px) for i in sample_items(train_items, STATS_TILES, cfg.seed)),
    )
    place_encoder(encoder_dir, out)
    card = save_weights_and_card(out, head.state_dict(), HEAD_FILE, CARD_FILE, card)
    return card.model_dump(mode="json")
