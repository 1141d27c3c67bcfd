"""Slide-level models and heads on embeddings: a synthetic cohort whose positive slides carry a planted lesion
(the project's slide generator), embedded by the shipped metastasis network's penultimate features, a gated
attention-MIL model trained and run by the CLI in subprocesses; a head trained on a real dataset's cached features."""

from __future__ import annotations

import csv
import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr

from tests.helpers import run_cli
from wsi_pipeline.engine.embeddings import read_embeddings
from wsi_pipeline.models.folders import default_model_dir
from wsi_pipeline.models.slide_mil import load_slide_model, slide_prediction
from wsi_pipeline.slide.synth import lesion_layout, read_truth, write_synthetic_slide

pytestmark = pytest.mark.e2e  # the CLI in subprocesses / whole runs

SLIDES = 24
LESION_OBJECTS = 40  # lesion_layout's `packed`: the lesion's objects come last


def lesion_of(slide: Path) -> shapely.Geometry:
    figures = read_truth(slide).figures[-LESION_OBJECTS:]
    return shapely.MultiPoint([(f.x, f.y) for f in figures]).convex_hull.buffer(5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """24 slides (every other one with a lesion), their embeddings, labels and a trained slide model."""
    root = tmp_path_factory.mktemp("cohort")
    rows = [
        {"slide_id": f"case{i:02d}", "label": "tumour" if i % 2 else "normal", "patient": f"p{i // 2}"}
        for i in range(SLIDES)
    ]

    def write(i: int) -> Path:
        return write_synthetic_slide(
            root / "slides" / f"case{i:02d}.svs", lesion_layout(1800, 1800, 1.0, 500 + i, i % 2 == 1)
        )

    with ThreadPoolExecutor(2) as pool:  # the encoders release the GIL: two at a time on two cores
        list(pool.map(write, range(SLIDES)))
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["slide_id", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    encoder = str(default_model_dir("metastasis"))
    embedded = run_cli("embed", str(root / "slides"), "-o", str(root / "out"), "--encoder", encoder, "--no-progress")
    assert embedded.returncode == 0, embedded.stderr
    trained = run_cli(
        "train-slide", str(root / "labels.csv"), str(root / "out"), "--encoder", "metastasis-small_cnn",
        "-o", str(root / "model"), "--val-fraction", "0.34", "--positive", "tumour",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "held-out ROC AUC" in trained.stdout
    return {"root": root, "encoder": Path(encoder), "model": root / "model"}


def test_abmil_learns_the_cohort_and_attends_to_the_lesions(cohort: dict[str, Path]) -> None:
    card, module = load_slide_model(cohort["model"])
    assert card.classes == ["normal", "tumour"] and card.metrics["validation"]["roc_auc"] >= 0.95
    held = card.training["val_slides"]
    assert len(held) >= 6 and {int(s[4:]) % 2 for s in held} == {0, 1}  # both classes held out, whole patients
    assert not {s[4:] for s in held} & {s[4:] for s in card.training.get("train_slides", [])}
    for slide_id in held:
        features, coords, attrs = read_embeddings(cohort["root"] / "out" / slide_id / "embeddings" /
                                                  "metastasis-small_cnn.zarr")  # fmt: skip
        _, attention = slide_prediction(module, features)
        if int(slide_id[4:]) % 2 == 0:
            continue
        size = attrs["patch_size_level0"]
        tiles = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size)
        inside = shapely.intersects(tiles, lesion_of(cohort["root"] / "slides" / f"{slide_id}.svs"))
        assert inside[np.argmax(attention)], f"{slide_id}: the most attended tile is outside the lesion"
        # the lesion's tiles draw several times their share of the attention (benchmarks/slide_mil.py: 2.6-fold at
        # least, 3.1-fold in the median on 60 slides)
        assert attention[inside].sum() >= 2 * inside.mean(), (slide_id, attention[inside].sum(), inside.mean())


def test_run_gives_score_class_attention_image_and_tile_objects(cohort: dict[str, Path], tmp_path: Path) -> None:
    card, module = load_slide_model(cohort["model"])

    def score(slide_id: str) -> float:
        path = cohort["root"] / "out" / slide_id / "embeddings" / "metastasis-small_cnn.zarr"
        return slide_prediction(module, read_embeddings(path)[0])[0]

    # the held-out positive the model is surest of, and the negative: their classes do not hang on the threshold
    held = card.training["val_slides"]
    positive = max((s for s in held if int(s[4:]) % 2 == 1), key=score)
    negative = min((s for s in held if int(s[4:]) % 2 == 0), key=score)
    slides = [str(cohort["root"] / "slides" / f"{s}.svs") for s in (positive, negative)]
    result = run_cli(
        "embed", *slides, "-o", str(tmp_path), "--encoder", str(cohort["encoder"]),
        "--slide-model", str(cohort["model"]), "--no-progress", "--set", "export.geojson_gzip=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for slide_id, expected in ((positive, "tumour"), (negative, "normal")):
        folder = tmp_path / slide_id
        answer = json.loads((folder / "summary.json").read_text())["slide_classifier"]
        assert answer["class"] == expected and answer["encoder"] == "metastasis-small_cnn"
        image = zarr.open_group(str(folder / "heatmaps.zarr" / "attention"), mode="r")
        assert "multiscales" in image.attrs["ome"]  # an OME-Zarr image, as every heatmap
        values = np.asarray(image["0"][0], np.float32)
        assert abs(values.max() - 1.0) < 1e-3 and (folder / "overlay-slide_classifier.png").stat().st_size > 10_000
        with gzip.open(folder / "qupath.geojson.gz", "rt") as f:
            tiles = [
                feat for feat in json.load(f)["features"]
                if feat["properties"].get("objectType") == "tile" and feat["properties"].get("name") == "attention"
            ]  # fmt: skip
        assert len(tiles) == 20
        ranks = sorted(t["properties"]["measurements"]["rank"] for t in tiles)
        assert ranks == list(range(1, 21))
        if expected == "tumour":  # the most attended tile lies on the lesion (QuPath coordinates: no offset here)
            top = next(t for t in tiles if t["properties"]["measurements"]["rank"] == 1)
            box = shapely.geometry.shape(top["geometry"])
            assert box.intersects(lesion_of(cohort["root"] / "slides" / f"{slide_id}.svs"))
    cohort_rows = list(csv.DictReader((tmp_path / "cohort_summary.csv").open()))
    assert {r["slide_id"]: r["slide_classifier_class"] for r in cohort_rows} == {positive: "tumour", negative: "normal"}
    assert "slide class" in (tmp_path / "report.html").read_text()


def test_train_slide_names_slides_without_embeddings(cohort: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    text = (cohort["root"] / "labels.csv").read_text() + "ghost01,tumour,p99\nghost02,normal,p98\n"
    labels.write_text(text)
    result = run_cli(
        "train-slide", str(labels), str(cohort["root"] / "out"), "--encoder", "metastasis-small_cnn",
        "-o", str(tmp_path / "m"),
    )  # fmt: skip
    assert result.returncode == 13, result.stderr
    assert "2 of 26 labelled slides: ghost01, ghost02" in result.stderr and not (tmp_path / "m").exists()


def test_a_slide_model_without_its_encoder_is_refused_first(cohort: dict[str, Path], tmp_path: Path) -> None:
    slide = str(cohort["root"] / "slides" / "case00.svs")
    result = run_cli("run", slide, "-o", str(tmp_path), "--tasks", "metastasis", "--slide-model", str(cohort["model"]))
    assert result.returncode == 7 and "reads metastasis-small_cnn embeddings: add that encoder" in result.stderr
    assert not (tmp_path / "case00").exists()


def test_a_head_on_cached_embeddings_trains_evaluates_and_runs(data_dir: Path, tmp_path: Path) -> None:
    """Kather epithelium vs stroma on a ViT-S/16's features (random weights, seeded: colour and texture statistics
    enough for these two classes; 0.952 measured): the head's card figures equal `evaluate`'s on the held-out
    sources (one feature path for both), the second training reads the cache, `run` takes the folder as the task's
    model."""
    import torch

    from wsi_pipeline.models.card import Normalisation
    from wsi_pipeline.models.encoder_card import EncoderCard
    from wsi_pipeline.models.encoders import build_encoder_network, save_encoder

    card = EncoderCard(
        name="vits16", architecture="timm:vit_small_patch16_224", architecture_args={"img_size": 224}, mpp=0.5,
        tile_px=224, normalisation=Normalisation(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        pooling="cls", dim=384,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = save_encoder(tmp_path / "vits16", build_encoder_network(card), card)
    kather = str(data_dir / "epithelium_stroma" / "kather2016")
    args = [
        "train", "epithelium_stroma", kather, "--class", "epithelium=01_TUMOR,06_MUCOSA",
        "--class", "stroma=02_STROMA,03_COMPLEX", "--mpp", "0.495", "--tile-px", "150", "--epochs", "30",
        "--encoder", str(encoder), "--from-embeddings", str(tmp_path / "cache"),
    ]  # fmt: skip
    first = run_cli(*args, "-o", str(tmp_path / "head"))
    assert first.returncode == 0, first.stderr
    second = run_cli(*args, "-o", str(tmp_path / "head2"))
    assert second.returncode == 0, second.stderr
    head = json.loads((tmp_path / "head" / "model_card.json").read_text())
    head2 = json.loads((tmp_path / "head2" / "model_card.json").read_text())
    assert head["format"] == "encoder_head" and not head["training"]["from_embeddings"]["train"]["hit"]
    assert head2["training"]["from_embeddings"]["train"]["hit"]
    assert head2["metrics"]["validation"] == head["metrics"]["validation"]
    auc = head["metrics"]["validation"]["roc_auc"]
    assert auc >= 0.85
    evaluated = run_cli(
        "evaluate", "epithelium_stroma", str(tmp_path / "head"), kather, "--class", "epithelium=01_TUMOR,06_MUCOSA",
        "--class", "stroma=02_STROMA,03_COMPLEX", "--held-out", "-o", str(tmp_path / "eval"), "--device", "cpu",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert abs(report["roc_auc"]["value"] - auc) < 1e-3
    slide = str(data_dir / "slides" / "CMU-1-Small-Region.svs")
    ran = run_cli(
        "run", slide, "-o", str(tmp_path / "run"), "--tasks", "epithelium_stroma", "--no-progress",
        "--set", f"tasks.epithelium_stroma.model={tmp_path / 'head'}", "--set", "tasks.epithelium_stroma.overlap_px=0",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    summary = json.loads((tmp_path / "run" / "CMU-1-Small-Region" / "summary.json").read_text())
    assert 0 <= summary["epithelium_stroma"]["epithelium_fraction"] <= 1
