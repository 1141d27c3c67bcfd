"""Training data: folder-per-class tiles split by source image; seeded H&E augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_pipeline.training.data.augment import AugmentConfig, augment, hed_jitter
from wsi_pipeline.training.data.items import DataError, ImageCrop, folder_items, load_tile, split_by_group

EPI_STROMA = {"epithelium": ["01_TUMOR", "06_MUCOSA"], "stroma": ["02_STROMA"]}


def test_kather_epithelium_vs_stroma_split_by_source(data_dir: Path) -> None:
    items, classes = folder_items(data_dir / "epithelium_stroma" / "kather2016", EPI_STROMA)
    assert classes == ["epithelium", "stroma"]
    assert np.bincount([i.label for i in items]).tolist() == [66, 33]
    assert all(i.group.startswith("CRC-Prim-HE-") for i in items)
    train, val = split_by_group(items, val_fraction=0.3, seed=1)
    assert {i.group for i in train}.isdisjoint({i.group for i in val})
    assert len(train) + len(val) == len(items) and 0.2 < len(val) / len(items) < 0.5
    assert split_by_group(items, 0.3, seed=1) == (train, val)  # deterministic
    assert load_tile(val[0], 150).shape == (150, 150, 3)


def test_bad_training_data(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"no class folders \(a folder of tiles per class"):
        folder_items(tmp_path)  # nothing in it yet
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "a" / "x_CRC-Prim-HE-01_1.png")
    with pytest.raises(DataError, match=r"no tiles for class\(es\) \[.b.\]; every class needs tiles"):
        folder_items(tmp_path)  # b is empty
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "b" / "y_CRC-Prim-HE-01_2.png")
    items, _ = folder_items(tmp_path)
    with pytest.raises(DataError, match="one source image"):
        split_by_group(items)
    with pytest.raises(DataError, match="32x32 px but the model takes 40x40"):
        load_tile(items[0], 40)
    whole = load_tile(items[1])
    assert whole.shape == (40, 40, 3)
    assert np.array_equal(load_tile(items[1], 32), whole[4:36, 4:36])  # a larger tile: its centre
    assert np.array_equal(load_tile(items[1], 32, offset=(1.0, 0.0)), whole[0:32, 8:40])
    (tmp_path / "b" / "z_CRC-Prim-HE-02_3.png").write_bytes(b"not an image")
    items, _ = folder_items(tmp_path)
    with pytest.raises(DataError, match="cannot read training tile"):
        load_tile(items[-1])
    with pytest.raises(DataError, match="not found"):
        folder_items(data_dir / "epithelium_stroma" / "kather2016", {"epithelium": ["99_NOPE"], "x": ["02_STROMA"]})


def test_augmentation_is_seeded_and_hed_round_trips(data_dir: Path) -> None:
    items, _ = folder_items(data_dir / "epithelium_stroma" / "kather2016", EPI_STROMA)
    tile = torch.from_numpy(load_tile(items[0])).permute(2, 0, 1).contiguous()
    cfg = AugmentConfig()
    a, b = augment(tile, cfg, 7, 0, 3), augment(tile, cfg, 7, 0, 3)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == tile.shape
    assert not torch.equal(augment(tile, cfg, 7, 1, 3), a)  # another epoch, another draw
    # HED jitter with no change reproduces the image (up to float round-off)
    x = tile.float() / 255
    same = hed_jitter(x.clamp(min=1 / 255), torch.ones(3), torch.zeros(3))
    assert (same - x.clamp(min=1 / 255)).abs().max() < 1e-4
    # more haematoxylin darkens nuclei-rich pixels: mean optical density goes up
    more_h = hed_jitter(x.clamp(min=1 / 255), torch.tensor([1.5, 1.0, 1.0]), torch.zeros(3))
    assert (-torch.log(more_h.clamp(min=1e-6))).mean() > (-torch.log(x.clamp(min=1 / 255))).mean()
    nothing = AugmentConfig(flips=False, rotate90=False, scale=0, brightness=0, contrast=0, saturation=0, hed_sigma=0)
    assert torch.equal(augment(tile, nothing, 0, 0, 0), tile)


@pytest.mark.e2e
def test_train_classifier_resumes_and_writes_a_loadable_model(data_dir: Path, tmp_path: Path) -> None:
    from wsi_pipeline.models import load_model
    from wsi_pipeline.training.classifier.train import CHECKPOINT, TrainConfig, train_classifier

    items, classes = folder_items(data_dir / "epithelium_stroma" / "kather2016", EPI_STROMA)
    train, val = split_by_group(items, 0.3, seed=1)
    cfg = TrainConfig(
        task="epithelium_stroma",
        classes=classes,
        architecture="small_cnn",
        architecture_args={"width": 8},
        mpp=0.495,
        tile_px=150,
        epochs=2,
        patience=10,
        batch_size=16,
        workers=0,
        schedule="constant",  # a constant rate may be given more epochs on resume; a cosine schedule may not
    )
    out = tmp_path / "model"
    first = train_classifier(train, val, cfg, out, device=torch.device("cpu"), progress=False)
    assert [h["epoch"] for h in first["training"]["history"]] == [1, 2]
    assert (out / CHECKPOINT).exists()
    cfg.epochs = 3  # an interrupted run picks up from its checkpoint: epochs 1-2 are not trained again
    resumed = train_classifier(train, val, cfg, out, device=torch.device("cpu"), progress=False)
    history = resumed["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[:2] == first["training"]["history"]
    model = load_model(out, task="epithelium_stroma")
    best = history[model.card.training["best_epoch"] - 1]
    assert model.card.metrics["validation"]["roc_auc"] == max(h["roc_auc"] for h in history) == best["roc_auc"]
    assert model.card.metrics["validation"]["balanced_accuracy"] == best["balanced_accuracy"]
    cfg.architecture_args = {"width": 12}
    with pytest.raises(DataError, match="another training configuration"):
        train_classifier(train, val, cfg, out, device=torch.device("cpu"), progress=False)
    assert set(model.card.training["train_groups"]).isdisjoint(model.card.training["val_groups"])


@pytest.mark.e2e
def test_train_command(data_dir: Path, tmp_path: Path) -> None:
    from tests.helpers import run_cli

    kather = str(data_dir / "epithelium_stroma" / "kather2016")
    common = ["--tile-px", "150", "--mpp", "0.495", "--epochs", "1", "--device", "cpu"]
    result = run_cli(
        "train",
        "epithelium_stroma",
        kather,
        "-o",
        str(tmp_path / "m"),
        "--class",
        "epithelium=01_TUMOR,06_MUCOSA",
        "--class",
        "stroma=02_STROMA",
        *common,
    )
    assert result.returncode == 0, result.stderr
    assert "split by source" in result.stdout and (tmp_path / "m" / "weights.safetensors").exists()
    bad = run_cli(
        "train",
        "epithelium_stroma",
        kather,
        "-o",
        str(tmp_path / "b"),
        "--class",
        "x=99_NOPE",
        "--class",
        "stroma=02_STROMA",
        *common,
    )
    assert bad.returncode == 13 and "99_NOPE" in bad.stderr
    separate = run_cli(
        "train",
        "epithelium_stroma",
        kather,
        "-o",
        str(tmp_path / "v"),
        "--val-data",
        kather,
        "--class",
        "epithelium=01_TUMOR,06_MUCOSA",
        "--class",
        "stroma=02_STROMA",
        *common,
    )
    assert separate.returncode == 0 and "99 train / 99 validation images, validation folder" in separate.stdout


@pytest.mark.e2e
def test_evaluate_command_report_is_consistent(data_dir: Path, tmp_path: Path) -> None:
    import json

    from tests.helpers import run_cli
    from wsi_pipeline.training.classifier.evaluate import roc_points
    from wsi_pipeline.training.classifier.train import TrainConfig, train_classifier

    items, classes = folder_items(data_dir / "epithelium_stroma" / "kather2016", EPI_STROMA)
    train, val = split_by_group(items, 0.3, seed=1)
    cfg = TrainConfig(
        task="epithelium_stroma",
        classes=classes,
        architecture_args={"width": 8},
        mpp=0.495,
        tile_px=150,
        epochs=1,
        workers=0,
    )
    train_classifier(train, val, cfg, tmp_path / "m", device=torch.device("cpu"), progress=False)
    result = run_cli(
        "evaluate",
        "epithelium_stroma",
        str(tmp_path / "m"),
        str(data_dir / "epithelium_stroma" / "kather2016"),
        "-o",
        str(tmp_path / "r"),
        "--class",
        "epithelium=01_TUMOR,06_MUCOSA",
        "--class",
        "stroma=02_STROMA",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "evaluation.json").read_text())
    confusion = report["confusion"]
    assert sum(sum(row.values()) for row in confusion.values()) == report["tiles"] == 99
    recalls = [confusion[c][c] / sum(confusion[c].values()) for c in confusion]
    assert report["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    low, high = report["roc_auc"]["ci95"]
    assert low <= report["roc_auc"]["value"] <= high
    assert (tmp_path / "r" / "roc.png").stat().st_size > 1000
    fpr, tpr = roc_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


@pytest.mark.e2e
def test_training_recipe_values_apply_and_unknown_keys_are_refused(data_dir: Path, tmp_path: Path) -> None:
    from tests.helpers import run_cli

    kather = str(data_dir / "epithelium_stroma" / "kather2016")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "class: ['epithelium=01_TUMOR,06_MUCOSA', stroma=02_STROMA]\ntile_px: 150\nmpp: 0.495\nepochs: 1\n"
        "arch_arg: [width=4]\nschedule: constant\ndescribe: Kather test tiles\n"
    )
    out = tmp_path / "m"
    result = run_cli("train", "epithelium_stroma", kather, "-o", str(out), "-c", str(recipe), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert card["classes"] == ["epithelium", "stroma"] and card["architecture_args"] == {"width": 4}
    assert (
        card["training"]["config"]["schedule"] == "constant" and card["training"]["description"] == "Kather test tiles"
    )
    recipe.write_text("epoch: 3\n")
    result = run_cli("train", "epithelium_stroma", kather, "-o", str(tmp_path / "n"), "-c", str(recipe))
    assert result.returncode == 7 and "unknown option(s) ['epoch']" in result.stderr
    bare = run_cli("train", "epithelium_stroma", kather, "-o", str(tmp_path / "n"))  # the README's first try
    assert bare.returncode == 7 and bare.stderr.strip() == (
        "error: invalid configuration in the options of train: epithelium_stroma models learn from tiles of a known "
        "size and µm/px: give --tile-px and --mpp (the data's tile size and µm/px, e.g. --tile-px 224 --mpp 0.5), or "
        "tile_px and mpp in the recipe"
    )


CRC = ("epithelium_stroma", "crchistophenotypes")


def test_tiles_around_labelled_nuclei_hold_their_nucleus(data_dir: Path, tmp_path: Path) -> None:
    """CRCHistoPhenotypes: a tile per epithelial nucleus / fibroblast (at most 25 per class and field), resampled
    from the fields' 0.55 µm/px to the model's, shifted inwards at the field's edge, grouped by field."""
    import csv

    from wsi_pipeline.training.data.nuclei import nucleus_items

    folder = data_dir.joinpath(*CRC, "validation")
    classes = {"epithelium": ["epithelial"], "stroma": ["fibroblast"]}
    items, names = nucleus_items(folder, classes, model_mpp=0.495, tile_px=96)
    assert names == ["epithelium", "stroma"]
    rows = list(csv.DictReader((folder / "nuclei.csv").open()))
    for label, source in ((0, "epithelial"), (1, "fibroblast")):
        per_field: dict[str, int] = {}
        for row in rows:
            if row["class"] == source:
                per_field[row["image"]] = per_field.get(row["image"], 0) + 1
        expected = sum(min(n, 25) for n in per_field.values())
        assert sum(1 for i in items if i.label == label) == expected
    assert {i.group for i in items} == {
        f"crchistophenotypes/validation/{r['image']}" for r in rows if r["class"] in ("epithelial", "fibroblast")
    }
    window = 96 * 0.495 / 0.55
    for item in items:
        assert item.crop is not None and item.crop.size == pytest.approx(window)
        assert 0 <= item.crop.left <= 500 - window and 0 <= item.crop.top <= 500 - window
    tile = load_tile(items[0], 96)
    assert tile.shape == (96, 96, 3)
    with Image.open(items[0].path) as image:  # the tile is the window, resampled
        box = (items[0].crop.left, items[0].crop.top, items[0].crop.left + window, items[0].crop.top + window)
        expected_tile = np.array(image.convert("RGB").resize((96, 96), Image.Resampling.BILINEAR, box=box))
    assert np.array_equal(tile, expected_tile)
    # an mpp.txt beside nuclei.csv sets the fields' resolution
    (tmp_path / "nuclei.csv").write_text("image,x,y,class\nimg.png,10,10,epithelial\nimg.png,60,60,fibroblast\n")
    Image.new("RGB", (100, 100)).save(tmp_path / "img.png")
    (tmp_path / "mpp.txt").write_text("0.25\n")
    near_edge, _ = nucleus_items(tmp_path, classes, model_mpp=0.5, tile_px=40)
    assert near_edge[0].crop == ImageCrop(0.0, 0.0, 80.0)  # 40 px at 0.5 = 80 px at 0.25, shifted inwards
    (tmp_path / "mpp.txt").write_text("fast")
    with pytest.raises(DataError, match="expected one number"):
        nucleus_items(tmp_path, classes, model_mpp=0.5, tile_px=40)


def test_one_class_map_across_sources_of_different_layouts(data_dir: Path) -> None:
    """Kather folders and CRCHistoPhenotypes nuclei in one `train`: each name of the map is taken where it exists;
    a name that exists nowhere is an error."""
    from wsi_pipeline.training.data.sources import training_items

    folders = [str(data_dir / "epithelium_stroma" / "kather2016"), str(data_dir.joinpath(*CRC, "validation"))]
    mapping = {"epithelium": ["01_TUMOR", "06_MUCOSA", "epithelial"], "stroma": ["02_STROMA", "fibroblast"]}
    items, classes = training_items("epithelium_stroma", folders, mapping, r"(CRC-Prim-HE-\d+)", 0.495, 96)
    kather = [i for i in items if i.crop is None]
    assert classes == ["epithelium", "stroma"]
    assert (sum(i.label == 0 for i in kather), sum(i.label == 1 for i in kather)) == (66, 33)
    assert {i.label for i in items if i.crop is not None} == {0, 1}
    with pytest.raises(DataError, match=r"no tiles for class\(es\) \['lympho'\]"):
        training_items("epithelium_stroma", folders, {**mapping, "lympho": ["nowhere"]}, "", 0.495, 96)
    # one class with tiles: named as the one found (it named it as "empty" before)
    with pytest.raises(DataError, match=r"only one class \(epithelium\) has tiles; a model needs at least two"):
        training_items("epithelium_stroma", folders[:1], {"epithelium": ["01_TUMOR"]}, "", 0.495, 96)
    # a class name the card would refuse at the end of training is refused before it starts
    for bad in ("tissue", "../up", "two words"):
        with pytest.raises(DataError, match="cannot name a heatmap"):
            training_items("epithelium_stroma", folders, {bad: mapping["epithelium"], "stroma": mapping["stroma"]},
                           "", 0.495, 96)  # fmt: skip


def test_a_checkpoint_with_numpy_figures_in_its_history_still_resumes(tmp_path: Path) -> None:
    """Validation figures computed with numpy (mitosis thresholds, counts) are stored as plain floats: a numpy
    scalar would make the checkpoint unreadable with torch.load(weights_only=True), and a killed run unresumable."""
    from wsi_pipeline.training.loop import LoopState, _resume, _save

    model = torch.nn.Linear(2, 1)
    optimiser = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda e: 1.0)
    row = {"epoch": 1, "loss": np.float32(0.5), "threshold": np.float64(0.55), "f1": np.float64(0.8), "centre": None}
    state = LoopState(1, np.float64(0.8), 1, 0, [row])
    _save(tmp_path / "checkpoint.pt", model, optimiser, schedule, model.state_dict(), None, state, "config")
    best, average, resumed = _resume(
        tmp_path / "checkpoint.pt", "config", model, optimiser, schedule, torch.device("cpu")
    )
    assert average is None  # no weight averaging in this run
    expected = {"epoch": 1.0, "loss": 0.5, "threshold": 0.55, "f1": 0.8, "centre": None}  # None: not measurable
    assert best is not None and resumed.history == [expected]
