"""Cross-source studies: every variant trains on one source and is measured on the other; the best mean is chosen
and trained on all sources, whose card carries the figures. Two halves of Kather 2016 (by source image) stand in
for two centres so that the test runs in seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli
from wsi_pipeline.models.folders import CARD_FILE
from wsi_pipeline.training.data.items import DataError
from wsi_pipeline.training.study import (
    choose_variant,
    cross_source_operating_point,
    gain_over_base,
    load_study,
    run_study,
    train_final,
)

CLASSES = ["epithelium=01_TUMOR,06_MUCOSA", "stroma=02_STROMA"]


@pytest.mark.e2e  # the CLI in a subprocess, training or whole-slide inference
def test_a_study_measures_each_variant_across_sources_and_trains_the_best(data_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "class": CLASSES,
                "arch": "small_cnn",
                "arch_arg": ["width=4", "blocks=2"],
                "tile_px": 64,
                "mpp": 0.495,
                "epochs": 2,
                "batch_size": 16,
                "val_fraction": 0.4,
                "seed": 2,
                "select": "last",
            }
        )
    )
    source = {"data": ["epithelium_stroma/kather2016"], "class": CLASSES, "positive": "epithelium"}
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "task": "epithelium_stroma",
                "recipe": str(recipe),
                "sources": {  # the first half trains twice (seeds 2 and 3), the second once, with the recipe's seed
                    "first_half": {**source, "groups": "CRC-Prim-HE-0[1-5]$", "seeds": [2, 3]},
                    "second_half": {**source, "groups": "CRC-Prim-HE-(0[6-9]|10)$"},
                },
                "variants": {"plain": {}, "no_stain_jitter": {"augment": {"hed_sigma": 0.0}}},
                "base": "plain",
            }
        )
    )
    report = run_study(study, data_dir, tmp_path / "study")
    assert json.loads((tmp_path / "study" / "study.json").read_text()) == report
    means = {v: r["mean_cross_source_roc_auc"] for v, r in report["variants"].items()}
    choice = report["choice"]
    assert choice["base"] == "plain" and choice["best_mean"] == max(means, key=means.get)
    other = report["variants"]["no_stain_jitter"]
    clear = other["gain_over_base"] > 2 * other["standard_error_of_gain"]
    assert report["chosen"] == ("no_stain_jitter" if choice["best_mean"] == "no_stain_jitter" and clear else "plain")
    for variant, result in report["variants"].items():
        rows = result["cross_source"]
        assert set(rows) == {"first_half -> second_half", "second_half -> first_half"}
        assert means[variant] == pytest.approx(sum(r["roc_auc"] for r in rows.values()) / 2, abs=1e-4)
        # a direction trained with several seeds reports each and their mean; one trained once, its figures
        by_seed = rows["first_half -> second_half"]["seeds"]
        assert set(by_seed) == {"2", "3"} and "seeds" not in rows["second_half -> first_half"]
        mean_auc = (by_seed["2"]["roc_auc"] + by_seed["3"]["roc_auc"]) / 2
        assert rows["first_half -> second_half"]["roc_auc"] == pytest.approx(mean_auc, abs=1e-4)
        for seed in (2, 3):
            card = json.loads((tmp_path / "study" / variant / "first_half" / f"seed{seed}" / CARD_FILE).read_text())
            assert card["training"]["config"]["seed"] == seed
    # the same split for both seeds of a variant would make the seeds' spread too small: the seed moves it too
    cards = [json.loads((tmp_path / "study/plain/first_half" / f"seed{s}" / CARD_FILE).read_text()) for s in (2, 3)]
    assert cards[0]["training"]["history"] != cards[1]["training"]["history"]
    # the figure is what `evaluate` says of that model on the other source, and nothing of it was trained on
    model = tmp_path / "study" / "plain" / "first_half" / "seed2"
    card = json.loads((model / "model_card.json").read_text())
    assert all(g.endswith(("01", "02", "03", "04", "05")) for g in card["training"]["train_groups"])
    result = run_cli(
        "evaluate", "epithelium_stroma", str(model), str(data_dir / "epithelium_stroma" / "kather2016"),
        "--class", CLASSES[0], "--class", CLASSES[1], "--groups", "CRC-Prim-HE-(0[6-9]|10)$",
        "-o", str(tmp_path / "again"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    kather = data_dir / "epithelium_stroma" / "kather2016"
    second = [p for d in ("01_TUMOR", "06_MUCOSA", "02_STROMA") for p in (kather / d).iterdir()]
    groups = [re.search(r"(CRC-Prim-HE-\d+)", p.name) for p in second]
    assert again["tiles"] == sum(1 for g in groups if g and re.search("(0[6-9]|10)$", g.group(1))) > 20
    assert (
        round(again["roc_auc"]["value"], 4)
        == report["variants"]["plain"]["cross_source"]["first_half -> second_half"]["seeds"]["2"]["roc_auc"]
    )
    final = train_final(study, report, data_dir, tmp_path / "final")
    assert final["metrics"]["cross_source"]["chosen"] == report["chosen"]
    assert final["metrics"]["cross_source"]["choice"] == choice
    assert set(final["metrics"]["held_out_by_source"]) == {"first_half", "second_half"}
    assert final["training"]["train_tiles"] + final["training"]["val_tiles"] == 99  # every tile of both halves
    # run again: every finished model is kept (nothing retrained, same figures) ...
    assert run_study(study, data_dir, tmp_path / "study")["variants"] == report["variants"]
    # ... but a folder whose model was trained with other settings is refused, never reused as if it were new
    edited = yaml.safe_load(recipe.read_text()) | {"epochs": 3}
    recipe.write_text(yaml.safe_dump(edited))

    with pytest.raises(DataError, match="trained with other settings"):
        run_study(study, data_dir, tmp_path / "study")


def _row(by_seed: dict[str, float]) -> dict:
    return {"roc_auc": sum(by_seed.values()) / len(by_seed), "seeds": {s: {"roc_auc": v} for s, v in by_seed.items()}}


def test_a_gain_over_the_base_counts_only_beyond_the_seeds_spread() -> None:
    base = {"a -> b": _row({"1": 0.60, "2": 0.50, "3": 0.70}), "b -> a": {"roc_auc": 0.90}}
    # seed-paired differences 0.10, 0.30, 0.20 (mean 0.2, sd 0.1, standard error 0.1 / sqrt 3) and, once, 0.04
    noisy = {"a -> b": _row({"1": 0.70, "2": 0.80, "3": 0.90}), "b -> a": {"roc_auc": 0.94}}
    gain, error = gain_over_base(noisy, base, "roc_auc")
    assert gain == pytest.approx((0.2 + 0.04) / 2)
    assert error == pytest.approx(0.1 / 3**0.5 / 2)  # the single-seed direction adds no variance
    # the same mean gain from differences that disagree in sign: -0.4, 0.3, 0.7 (sd 0.557)
    spread = {"a -> b": _row({"1": 0.20, "2": 0.80, "3": 1.40}), "b -> a": {"roc_auc": 0.94}}
    gain_spread, error_spread = gain_over_base(spread, base, "roc_auc")
    assert gain_spread == pytest.approx(gain) and error_spread == pytest.approx(0.5568 / 3**0.5 / 2, abs=1e-4)
    key = "mean_cross_source_roc_auc"

    def results(variant_rows: dict) -> dict:
        g, e = gain_over_base(variant_rows, base, "roc_auc")
        mean = sum(r["roc_auc"] for r in variant_rows.values()) / 2
        return {"base": {key: 0.7}, "new": {key: mean, "gain_over_base": g, "standard_error_of_gain": e}}

    assert choose_variant(results(noisy), key, "base", 2.0)["chosen"] == "new"  # 0.12 > 2 x 0.029
    kept = choose_variant(results(spread), key, "base", 2.0)  # 0.12 < 2 x 0.161
    assert kept["chosen"] == "base" and kept["best_mean"] == "new"
    with pytest.raises(DataError, match="no seed in common"):
        gain_over_base({"a -> b": _row({"7": 0.9}), "b -> a": {"roc_auc": 0.9}}, base, "roc_auc")


def test_the_cross_source_operating_point_is_the_best_mean_f1_and_records_each_direction(tmp_path: Path) -> None:
    curve = [{"threshold": t, "recall": 1 - t, "f1": 0.5} for t in (0.5, 0.55, 0.6)]
    card = {
        "classes": ["mitosis"],
        "thresholds": {"mitosis": 0.6},
        "metrics": {"validation": {}, "validation_curve": curve},
    }
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    rows = {  # mean F1: 0.5 -> 0.80, 0.55 -> 0.85, 0.6 -> 0.85 (a tie: the lower threshold wins)
        "a -> b": {"f1_by_threshold": {"0.5": 0.9, "0.55": 0.8, "0.6": 0.9},
                   "recall_by_threshold": {"0.5": 0.95, "0.55": 0.81, "0.6": 0.7},
                   "precision_by_threshold": {"0.5": 0.86, "0.55": 0.79, "0.6": 0.99}},
        "b -> a": {"f1_by_threshold": {"0.5": 0.7, "0.55": 0.9, "0.6": 0.8},
                   "recall_by_threshold": {"0.5": 0.93, "0.55": 0.92, "0.6": 0.8},
                   "precision_by_threshold": {"0.5": 0.58, "0.55": 0.88, "0.6": 0.8}},
    }  # fmt: skip
    cross_source_operating_point(tmp_path, rows)
    written = json.loads((tmp_path / "model_card.json").read_text())
    assert written["thresholds"] == {"mitosis": 0.55}
    point = written["metrics"]["operating_point"]
    assert point["threshold"] == 0.55 and point["mean_cross_source_f1"] == 0.85
    assert point["cross_source_at_threshold"] == {
        "a -> b": {"recall": 0.81, "precision": 0.79, "f1": 0.8},
        "b -> a": {"recall": 0.92, "precision": 0.88, "f1": 0.9},
    }
    assert written["metrics"]["validation"] == curve[1]  # re-read at the new threshold from the validation curve
    assert point["target"] is None and point["target_met"] is False
    # with a target, only 0.6 meets recall >= 0.7 and precision >= 0.8 in both directions (0.55: precision 0.79),
    # chosen whatever its mean F1; where no threshold meets it, the best mean F1 stays
    cross_source_operating_point(tmp_path, rows, {"recall": 0.7, "precision": 0.8})
    point = json.loads((tmp_path / "model_card.json").read_text())["metrics"]["operating_point"]
    assert (point["threshold"], point["target_met"]) == (0.6, True)
    rows["a -> b"]["f1_by_threshold"]["0.6"] = 0.5  # 0.6 now has the lowest mean F1 (0.65) but still meets it
    cross_source_operating_point(tmp_path, rows, {"recall": 0.7, "precision": 0.8})
    assert json.loads((tmp_path / "model_card.json").read_text())["thresholds"] == {"mitosis": 0.6}
    cross_source_operating_point(tmp_path, rows, {"recall": 0.99, "precision": 0.99})
    point = json.loads((tmp_path / "model_card.json").read_text())["metrics"]["operating_point"]
    assert (point["threshold"], point["target_met"]) == (0.55, False)


def test_a_study_that_extends_another_keeps_its_sources_and_replaces_its_variants(tmp_path: Path) -> None:
    base = tmp_path / "study.yaml"
    common = {
        "task": "mitosis",
        "recipe": "r.yaml",
        "sources": {"a": {"data": ["x"]}},
        "operating_point": "cross_source",
    }
    base.write_text(yaml.safe_dump({**common, "variants": {"chosen": {}, "other": {}}}))
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(
        yaml.safe_dump({"extends": str(base), "variants": {"chosen": {}, "more_epochs": {"epochs": 12}}})
    )
    study = load_study(ablation)
    assert study == {**common, "variants": {"chosen": {}, "more_epochs": {"epochs": 12}}}
    shipped = load_study(Path("configs/models/ablations/mitosis.yaml"))
    assert shipped["sources"] == load_study(Path("configs/models/mitosis_study.yaml"))["sources"]


def _shipped_recipe_study(folder: Path, sources: dict, **more: object) -> Path:
    """A study of the shipped epithelium/stroma recipe with one variant, `scratch`, on `sources`."""
    study = folder / "study.yaml"
    recipe = "configs/models/epithelium_stroma.yaml"
    fields = {"task": "epithelium_stroma", "recipe": recipe, "sources": sources, "variants": {"scratch": {}}}
    study.write_text(yaml.safe_dump({**fields, **more}))
    return study


@pytest.mark.e2e  # the CLI in a subprocess, training or whole-slide inference
def test_a_study_of_missing_data_stops_with_one_line_and_the_data_exit_status(tmp_path: Path) -> None:
    missing = {"a": {"data": ["no_such_folder"]}, "b": {"data": ["no_such_folder_either"]}}
    study = _shipped_recipe_study(tmp_path, missing)
    done = run_cli("study", str(study), "--data", str(tmp_path), "-o", str(tmp_path / "out"))
    assert done.returncode == DataError.exit_code == 13, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: training data folder {tmp_path / 'no_such_folder'} not found"]


def test_a_study_whose_base_is_not_one_of_its_variants_is_refused_before_training(tmp_path: Path) -> None:
    study = _shipped_recipe_study(tmp_path, {"a": {"data": ["x"]}, "b": {"data": ["y"]}}, base="strong_stain")
    with pytest.raises(DataError, match="base variant 'strong_stain' is not one of its variants"):
        run_study(study, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
