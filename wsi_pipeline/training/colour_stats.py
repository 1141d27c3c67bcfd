"""`python -m wsi_pipeline.training.colour_stats TASK MODEL_DIR DATA... -c RECIPE`: write into a model's card the
colour statistics `train` records for the input guard, measured on exactly the training tiles `train` would use
(same recipe, same data, same seeded split), for models trained before the card had them. Weights are untouched, so
the card's weights_sha256 stays valid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_pipeline.models.folders import CARD_FILE, load_card
from wsi_pipeline.models.input_guard import training_stats
from wsi_pipeline.training.classifier.train import STATS_TILES
from wsi_pipeline.training.data.items import load_tile, sample_items, split_by_group
from wsi_pipeline.training.data.sources import training_items
from wsi_pipeline.training.settings import load_train_settings


def measure(task: str, recipe: str, data: list[str], val_data: str | None = None) -> dict:
    s = load_train_settings(task, recipe, (), {"val_data": val_data} if val_data else {})
    items, _ = training_items(s.task, data, s.class_map(), s.group_pattern, s.mpp, s.tile_px)
    train_items = items if s.val_data else split_by_group(items, s.val_fraction, s.seed)[0]
    if s.detector:
        from wsi_pipeline.training.data.points import prepare

        tiles = (prepare(i, s.model_mpp, 1).rgb for i in train_items)
    else:
        tiles = (load_tile(i, s.model_tile_px) for i in sample_items(train_items, STATS_TILES, s.seed))
    stats = training_stats(tiles)
    if stats is None:
        raise SystemExit(f"no training tile of {data} has enough tissue to measure")
    return stats.model_dump(mode="json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("task")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("data", nargs="+")
    parser.add_argument("-c", "--recipe", required=True)
    parser.add_argument("--val-data", default=None, help="as given to train (then every DATA tile is training)")
    args = parser.parse_args()
    load_card(args.model_dir)  # a valid card first
    path = args.model_dir / CARD_FILE
    card = json.loads(path.read_text())
    card["input_stats"] = measure(args.task, args.recipe, args.data, args.val_data)
    path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"{path}: input_stats {card['input_stats']}")


if __name__ == "__main__":
    main()
