"""Dense mitosis training data, targets, architecture halo, training + evaluation on the real AMi-Br / MITOS data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import amibr_subset, run_cli
from wsi_pipeline.models.architectures import build
from wsi_pipeline.training.data.augment import AugmentConfig
from wsi_pipeline.training.data.items import DataError, split_by_group
from wsi_pipeline.training.data.points import amibr_images, csv_images, mitos2012_negatives, point_images, prepare
from wsi_pipeline.training.detector.train import DenseTargets, TrainingWindows, gaussian_target


def test_amibr_crops_mark_the_centre_and_every_other_listed_figure(data_dir: Path) -> None:
    images = amibr_images(data_dir / "mitosis" / "amibr_tupac16")
    assert len(images) == 780 + 214
    assert all(np.array_equal(i.points[i.centre_index], [64.0, 64.0]) for i in images)
    crop = next(i for i in images if i.path.name == "TUPAC16_6765.png")
    # CSV: uid 6765 at (6229, 2098) and uid 19 at (6180, 2153) on 01_stitched1.tif -> (6180-6229+64, 2153-2098+64)
    assert sorted(map(tuple, crop.points.tolist())) == [(15.0, 119.0), (64.0, 64.0)]
    assert crop.group == "slide:01_stitched1.tif"


def test_mitos2012_negatives_stay_64_px_from_every_annotated_figure(data_dir: Path) -> None:
    folder = data_dir / "mitosis" / "mitos2012_scannerA"
    fields = {f.path.stem: f for f in mitos2012_negatives(folder)}
    assert len(fields) == 10 and all(len(f.points) == 0 for f in fields.values())
    field = fields["A00_01"]
    # the CSV (read independently of the yellow paint) lists each figure's pixels as x1,y1,x2,y2,...
    rows, cols = np.nonzero(field.usable)
    usable_xy = np.c_[cols, rows][::97]  # a sample of usable pixels
    for line in (folder / "A00_01.csv").read_text().splitlines():
        xy = np.array([int(v) for v in line.split(",") if v.strip()]).reshape(-1, 2)
        centre = xy.mean(axis=0)
        assert not field.usable[int(centre[1]), int(centre[0])]
        assert np.hypot(*(usable_xy - centre).T).min() > 64
    assert 0.5 < field.usable.mean() < 0.99


def test_points_csv_layout_and_its_errors(data_dir: Path, tmp_path: Path) -> None:
    crop = data_dir / "mitosis" / "amibr_tupac16" / "normal" / "TUPAC16_6765.png"
    (tmp_path / "a.png").symlink_to(crop)
    (tmp_path / "b.png").symlink_to(crop)
    (tmp_path / "points.csv").write_text("image,x,y,group\na.png,64,64,s1\na.png,15,119,s1\nb.png,,,s2\n")
    images = {i.path.name: i for i in point_images(tmp_path, mpp=0.25)}
    assert images["a.png"].points.tolist() == [[64.0, 64.0], [15.0, 119.0]] and images["a.png"].group == "s1"
    assert images["b.png"].label == 0 and images["a.png"].label == 1
    with pytest.raises(DataError, match="--mpp"):
        point_images(tmp_path)
    (tmp_path / "points.csv").write_text("file,x,y\na.png,1,2\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['image'\]"):
        csv_images(tmp_path, 0.25)


def test_gaussian_target_peaks_at_figure_centres() -> None:
    # output px (2, 3) at stride 4 covers input px 8..11 x 12..15: its centre is (13.5, 9.5) in index coordinates
    target = gaussian_target(np.array([[13.5, 9.5]]), (8, 8), 4, sigma_px=8.0)
    assert target[2, 3] == pytest.approx(1.0)
    assert target[2, 5] == pytest.approx(np.exp(-0.5))  # 8 input px (one sigma) to the right
    assert target.max() == target[2, 3] and gaussian_target(np.zeros((0, 2)), (4, 4), 4, 8.0).sum() == 0


def test_dense_fcn_depends_on_no_pixel_beyond_its_declared_halo() -> None:
    model = build("dense_fcn", 1, width=4).eval()
    x = torch.rand(1, 3, 160, 160, requires_grad=True)
    out = model(x)
    assert out.shape[-2:] == (40, 40)
    out[0, 0, 20, 20].backward()
    rows = np.nonzero(x.grad[0].abs().sum(0).sum(1).numpy())[0]
    # output px 20 covers input px 80..83; a halo of 32 px must contain every pixel it depends on
    assert rows.min() >= 80 - 32 and rows.max() <= 83 + 32
    assert rows.min() <= 80 - 24  # and the halo is not grossly larger than the receptive field


@pytest.mark.e2e
def test_train_and_evaluate_mitosis_commands(data_dir: Path, tmp_path: Path) -> None:
    """A small, fast run through the CLI: the card is a dense model with held-out metrics, and `evaluate
    --held-out` on the same sources reproduces them exactly, BatchNorm recomputed after training included."""
    subset = amibr_subset(data_dir, tmp_path / "subset", slides=8)
    out = tmp_path / "model"
    common = ["--device", "cpu", "--workers", "0"]
    result = run_cli(
        "train",
        "mitosis",
        str(subset),
        "-o",
        str(out),
        "--mpp",
        "0.25",
        "--epochs",
        "1",
        "--arch-arg",
        "width=4",
        "--val-fraction",
        "0.4",
        "--recompute-batchnorm",
        *common,
    )
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "model_card.json").read_text())
    # one un-jittered window per training crop (this subset has no figure-free fields)
    assert (
        card["training"]["batchnorm"]["recomputed_on_training_tiles"]
        == card["training"]["train_images"]["with_figures"]
    )
    assert card["training"]["batchnorm"]["validation_before"].keys() == card["metrics"]["validation"].keys()
    assert card["kind"] == "dense" and card["output_stride"] == 4 and card["halo_px"] == 32
    assert card["classes"] == ["mitosis"] and card["activation"] == "sigmoid"
    assert set(card["training"]["train_groups"]).isdisjoint(card["training"]["val_groups"])
    report_dir = tmp_path / "report"
    result = run_cli("evaluate", "mitosis", str(out), str(subset), "--held-out", "-o", str(report_dir), *common[:2])
    assert result.returncode == 0, result.stderr
    report = json.loads((report_dir / "evaluation.json").read_text())
    assert report["at_threshold"] == pytest.approx(card["metrics"]["validation"])
    assert (report_dir / "froc.png").stat().st_size > 1000
    assert report["crops"] == card["training"]["val_images"]["with_figures"]
    assert report["bf16"]["images"] == min(report["crops"] + report["fields"], 64)
    assert 0 < report["bf16"]["max_abs_difference"] < 0.5  # autocast rounds; publish copies it into the card


def test_unjittered_windows_are_the_same_windows_and_targets(data_dir: Path) -> None:
    mitosis = data_dir / "mitosis"
    crops = [prepare(i, 0.25, 96) for i in amibr_images(mitosis / "amibr_tupac16")[:6]]
    fields = [prepare(i, 0.25, 96) for i in mitos2012_negatives(mitosis / "mitos2012_scannerA")[:1]]
    strong = AugmentConfig(hed_sigma=0.08, brightness=0.15, contrast=0.2, saturation=0.25)
    jittered = TrainingWindows(crops, fields, DenseTargets(), 0.25, strong, seed=3)
    jittered.epoch = 2
    plain = jittered.without_augmentation()
    assert len(plain) == len(jittered) == 6 + 3 and plain.epoch == 2 and jittered.aug == strong
    for index in range(len(plain)):
        (x, target, valid), (xj, target_j, valid_j) = plain[index], jittered[index]
        assert torch.equal(target, target_j) and torch.equal(valid, valid_j)
        assert not torch.equal(x, xj)
        # the plain window is pixels of the source image, flipped and turned: the same multiset of colours
        image = crops[index] if index < 6 else None
        if image is not None:
            assert set(map(tuple, x.permute(1, 2, 0).reshape(-1, 3).tolist())) <= set(
                map(tuple, image.rgb.reshape(-1, 3).tolist())
            ) | {(0, 0, 0)}


def test_split_by_slide_keeps_figures_and_fields_on_both_sides(data_dir: Path) -> None:
    mitosis = data_dir / "mitosis"
    images = amibr_images(mitosis / "amibr_tupac16") + mitos2012_negatives(mitosis / "mitos2012_scannerA")
    train, val = split_by_group(images, 0.25, seed=0)
    assert {i.group for i in train}.isdisjoint({i.group for i in val})
    assert {i.label for i in train} == {i.label for i in val} == {0, 1}
    field = prepare(next(i for i in val if i.label == 0), 0.25, 96)
    # MITOS-2012 is 0.2456 µm/px: resampled to 0.25, a 2084 px field becomes 2047 px
    assert field.rgb.shape[:2] == (2047, 2047) and field.usable is not None and field.usable.shape == (2047, 2047)
