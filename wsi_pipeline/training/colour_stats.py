"""`wsi-pipeline colour-stats TASK MODEL_DIR DATA... -c RECIPE`: write into a model's card the
colour statistics `train` records for the input guard, measured on exactly the training tiles `train` would use
(same recipe, same data, same seeded split), for models trained before the card had them. Weights are untouched, so
the card's weights_sha256 stays valid."""

from __future__ import annotations

from wsi_pipeline.models.input_guard import training_stats
from wsi_pipeline.training.classifier.train import STATS_TILES
from wsi_pipeline.training.data.items import DataError, load_tile, sample_items, split_by_group
from wsi_pipeline.training.data.sources import training_items
from wsi_pipeline.training.settings import load_train_settings


def measure(task: str, recipe: str, data: list[str], val_data: str | None = None) -> dict:
    s = load_train_settings(task, recipe, (), {"val_data": val_data} if val_data else {})
    items, _ = training_items(s.task, data, s.class_map(), s.group_pattern, s.mpp, s.tile_px)
    train_items = items if s.val_data else split_by_group(items, s.val_fraction, s.seed)[0]
    if s.point_detector:
        from wsi_pipeline.training.data.points import prepare

        tiles = (prepare(i, s.model_mpp, 1).rgb for i in train_items)
    else:
        tiles = (load_tile(i, s.model_tile_px) for i in sample_items(train_items, STATS_TILES, s.seed))
    stats = training_stats(tiles)
    if stats is None:
        raise DataError(f"no training tile of {data} has enough tissue to measure")
    return stats.model_dump(mode="json")
