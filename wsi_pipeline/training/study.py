"""Cross-source validation: which training recipe holds up on data from a source it never saw.

A study (YAML, e.g. `configs/models/epithelium_study.yaml`) names data sources (folders and their class map), a
base recipe and variants of it (augmentation, transfer from another model, ...). For every variant and every
ordered pair of sources it trains on one source and measures ROC AUC and balanced accuracy on all of the other,
once per seed where the study (or a source) lists `seeds` (a small source's figures move a lot from seed to seed).
The variant with the best mean cross-source score is chosen if it beats the base variant (`base`, else the first)
by more than `margin_standard_errors` (2) standard errors of the seed-paired gain; else the base is kept. A figure
measured on tiles of the training source says little about a user's slides; this one says how far a model carries
to another centre.

    wsi-pipeline study configs/models/epithelium_study.yaml --data ../shared/data -o OUT

writes OUT/study.json (every figure, the choice) and keeps each model under OUT/<variant>/<source>/ (/seed<N>/); with
`--final MODEL` it then trains the chosen variant on all sources into MODEL, whose card gets the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from wsi_pipeline.core.atomic import write_json
from wsi_pipeline.models.folders import CARD_FILE, WEIGHTS_FILE
from wsi_pipeline.training.commands import evaluate_model, train_model
from wsi_pipeline.training.data.items import KATHER_GROUP, DataError
from wsi_pipeline.training.settings import load_train_settings, parse_class_map

STUDY_SETTINGS = "study_settings.json"  # the resolved settings and data a study folder's model was trained with


def _train(
    task: str, recipe: str, given: dict[str, Any], data: list[str], out: Path, overrides: tuple[str, ...]
) -> Path:
    """One model in `out`; a variant with `stages` trains them in turn, each starting from the one before (with
    its head), the earlier ones in `out/stage<N>`. `overrides` (`--set KEY=VALUE` of the study command) apply to
    every training."""
    stages = given.pop("stages", None) or [{}]
    for number, stage in enumerate(stages):
        settings = {**given, **stage}
        if number:
            settings |= {"init": str(out / f"stage{number - 1}" / WEIGHTS_FILE), "init_head": True}
        folder = out if number == len(stages) - 1 else out / f"stage{number}"
        resolved = load_train_settings(task, recipe, overrides, settings)
        # settings left at their defaults are not compared: a setting added later does not disown finished models
        wanted = {"settings": resolved.model_dump(mode="json", exclude_defaults=True), "data": list(data)}
        marker = folder / STUDY_SETTINGS
        if (folder / CARD_FILE).is_file():  # a finished stage is kept: a killed study resumes
            if marker.is_file() and json.loads(marker.read_text()) == wanted:
                continue
            raise DataError(
                f"{folder} holds a model trained with other settings or data than this study asks for (another "
                f"chosen variant, an edited recipe); delete {folder} or give another -o"
            )
        train_model(resolved, tuple(data), folder)
        write_json(marker, wanted)
    return out


def load_study(path: Path) -> dict[str, Any]:
    """A study file; one with `extends: OTHER.yaml` takes the other's task, recipe, sources and settings and
    replaces only what it names (its own `variants`): ablations measured once sit beside the study that
    `make models` runs, on the same sources, without making every `make models` train them again."""
    study = yaml.safe_load(path.read_text())
    if "extends" in study:
        base = load_study(Path(study.pop("extends")))
        study = {**base, **study}
    return study


def _variant_settings(study: dict[str, Any], variant: str) -> dict[str, Any]:
    """A fresh copy of a variant's settings (`_train` consumes its stages), `{models}` resolved in `init`."""
    given = json.loads(json.dumps(study["variants"][variant] or {}))
    if "init" in given:
        given["init"] = given["init"].replace("{models}", str(study.get("models_dir", "build/models")))
    return given


def _training_seconds(model: Path) -> float:
    """What training took, from the cards (so a resumed study reports the real figure, not 0): every stage's."""
    cards = [*sorted(model.glob(f"stage*/{CARD_FILE}")), model / CARD_FILE]
    return round(sum(json.loads(c.read_text())["metrics"]["seconds"] for c in cards), 1)


def _measure(task: str, model: Path, source: dict[str, Any], data_root: Path, out: Path) -> dict[str, float]:
    """Classifiers: ROC AUC and balanced accuracy (argmax and at the card's threshold); mitosis: recall,
    precision and F1 at the card's threshold (figure-free fields counted), and the best F1 of any threshold."""
    report = evaluate_model(
        task,
        str(model),
        tuple(str(data_root / d) for d in source["data"]),
        out,
        class_map=parse_class_map(source.get("class") or []),
        groups=source.get("groups"),
        positive=source.get("positive"),
        held_out=bool(source.get("held_out")),
        group_pattern=source.get("group_pattern", KATHER_GROUP),
        mpp=None,
        threshold=None,
        radius_um=7.5,
        device="auto",
    )
    if "at_threshold" in report:
        at = report["at_threshold"]

        def by_threshold(key: str) -> dict[str, float]:
            return {str(row["threshold"]): round(row[key], 4) for row in report["curve"]}

        best = max(report["curve"], key=lambda row: row["f1_with_fields"])
        return {
            "threshold": at["threshold"],
            "recall": round(at["recall"], 4),
            "precision": round(at["precision_with_fields"], 4),
            "f1": round(at["f1_with_fields"], 4),
            "best_f1": round(best["f1_with_fields"], 4),
            "best_f1_threshold": best["threshold"],
            "f1_by_threshold": by_threshold("f1_with_fields"),
            "recall_by_threshold": by_threshold("recall"),
            "precision_by_threshold": by_threshold("precision_with_fields"),
        }
    return {
        "roc_auc": round(report["roc_auc"]["value"], 4),
        "balanced_accuracy": round(report["balanced_accuracy"], 4),
        "balanced_accuracy_at_threshold": round(report["at_operating_point"]["balanced_accuracy"], 4),
        "threshold": report["at_operating_point"]["threshold"],
    }


def _seeds(study: dict[str, Any], source: dict[str, Any]) -> list[int | None]:
    """The seeds to train on a source with: its own `seeds`, else the study's, else the recipe's one (None)."""
    seeds = source.get("seeds", study.get("seeds"))
    return [None] if seeds is None else [int(seed) for seed in seeds]


def _mean_figures(by_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each figure (and of each entry of a figure per threshold) over seeds; seconds are summed."""
    first = by_seed[0]
    mean: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            mean[key] = _mean_figures([figures[key] for figures in by_seed])
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values = [figures[key] for figures in by_seed]
            mean[key] = round(sum(values) if key == "train_seconds" else sum(values) / len(values), 4)
    return mean


def gain_over_base(rows: dict[str, Any], base_rows: dict[str, Any], score: str) -> tuple[float, float]:
    """A variant's mean gain over the base variant and the standard error of that gain. Each direction's gain is
    the mean of the seed-paired differences (same seed: same split, initial weights and augmentation draws), its
    variance that mean's squared standard error; a direction trained with one seed adds no variance (none is
    measured): give a noisy direction several seeds. The mean over directions has the directions' variances
    summed over the square of their number."""

    def by_seed(row: dict[str, Any]) -> dict[str, float]:  # a row trained once is its own only seed
        return {seed: figures[score] for seed, figures in row.get("seeds", {"-": row}).items()}

    gains, variances = [], []
    for direction, row in rows.items():
        mine, theirs = by_seed(row), by_seed(base_rows[direction])
        differences = [mine[seed] - theirs[seed] for seed in mine if seed in theirs]
        if not differences:
            raise DataError(f"study: {direction} has no seed in common with the base variant; give both the same seeds")
        count = len(differences)
        mean = sum(differences) / count
        gains.append(mean)
        spread = sum((d - mean) ** 2 for d in differences) / (count - 1) if count > 1 else 0.0
        variances.append(spread / count)
    return sum(gains) / len(gains), sum(variances) ** 0.5 / len(gains)


def choose_variant(results: dict[str, Any], key: str, base: str, margin: float) -> dict[str, Any]:
    """The best mean wins only if its gain over the base variant exceeds `margin` standard errors of that gain
    (`gain_over_base`, `standard_error_of_gain` of each result); otherwise the base is kept: a recipe is not
    changed on a difference that the seeds' spread explains."""
    best = max(results, key=lambda variant: results[variant][key])
    gain = results[best].get("gain_over_base", 0.0)
    error = results[best].get("standard_error_of_gain", 0.0)
    return {
        "chosen": best if best == base or gain > margin * error else base,
        "best_mean": best,
        "base": base,
        "gain_over_base": gain,
        "standard_error": error,
        "margin_standard_errors": margin,
        "rule": "the variant of the best mean cross-source score, if its seed-paired mean gain over the base "
        "variant exceeds the margin in standard errors of that gain; else the base",
    }


def run_study(study_path: Path, data_root: Path, out: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    study = load_study(study_path)
    task, recipe, sources = study["task"], study["recipe"], study["sources"]
    score = study.get("score", "roc_auc")
    key = f"mean_cross_source_{score}"
    base = study.get("base", next(iter(study["variants"])))
    if base not in study["variants"]:
        raise DataError(f"study {study_path}: base variant {base!r} is not one of its variants")
    results: dict[str, Any] = {}
    for variant in study["variants"]:
        rows = {}
        for train_name, train_source in sources.items():
            by_seed: dict[str, dict[str, dict[str, Any]]] = {}
            folders = [str(data_root / d) for d in train_source["data"]]
            for seed in _seeds(study, train_source):
                given = _variant_settings(study, variant)  # a fresh copy each time: `_train` consumes its stages
                given |= {"classes": train_source["class"]} if train_source.get("class") else {}
                given |= {"groups": train_source["groups"]} if train_source.get("groups") else {}
                given |= {} if seed is None else {"seed": seed}
                where = out / variant / train_name / ("" if seed is None else f"seed{seed}")
                model = _train(task, recipe, given, folders, where, overrides)
                trained = {
                    "same_source_validation": json.loads((model / CARD_FILE).read_text())["metrics"]["validation"],
                    "train_seconds": _training_seconds(model),
                }
                for test_name, test_source in sources.items():
                    if test_name != train_name:
                        figures = _measure(task, model, test_source, data_root, model / f"on-{test_name}")
                        by_seed.setdefault(f"{train_name} -> {test_name}", {})[str(seed)] = {**figures, **trained}
            for direction, figures_by_seed in by_seed.items():
                if list(figures_by_seed) == ["None"]:  # one run with the recipe's seed: the figures as they are
                    rows[direction] = figures_by_seed["None"]
                else:
                    rows[direction] = {**_mean_figures(list(figures_by_seed.values())), "seeds": figures_by_seed}
        mean = sum(r[score] for r in rows.values()) / len(rows)
        results[variant] = {"settings": study["variants"][variant] or {}, "cross_source": rows, key: round(mean, 4)}
        print(f"{variant}: mean cross-source {score} {mean:.4f}", flush=True)
    for variant, result in results.items():
        if variant != base:
            gain, error = gain_over_base(result["cross_source"], results[base]["cross_source"], score)
            result |= {"gain_over_base": round(gain, 4), "standard_error_of_gain": round(error, 4)}
    choice = choose_variant(results, key, base, float(study.get("margin_standard_errors", 2.0)))
    report = {
        "study": str(study_path),
        "task": task,
        "score": key,
        "variants": results,
        "chosen": choice["chosen"],
        "choice": choice,
    }
    write_json(out / "study.json", report)
    return report


def train_final(
    study_path: Path, report: dict[str, Any], data_root: Path, out: Path, overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The chosen variant trained on every source (a split by source image / field of all of them), measured on
    each source's held-out part; the card gets the study's cross-source figures and these."""
    study = load_study(study_path)
    task, recipe, sources = study["task"], study["recipe"], study["sources"]
    given = _variant_settings(study, report["chosen"])
    classes: dict[str, list[str]] = {}
    for source in sources.values():
        for name, folders in (parse_class_map(source.get("class") or []) or {}).items():
            classes.setdefault(name, []).extend(f for f in folders if f not in classes.get(name, []))
    if classes:
        given["classes"] = [f"{name}={','.join(folders)}" for name, folders in classes.items()]
    data = list(dict.fromkeys(str(data_root / d) for source in sources.values() for d in source["data"]))
    model = _train(task, recipe, given, data, out, overrides)
    if study.get("operating_point") == "cross_source":
        target = study.get("target")
        cross_source_operating_point(model, report["variants"][report["chosen"]]["cross_source"], target)
    held_out = {}
    for name, source in sources.items():
        held_out[name] = _measure(task, model, {**source, "held_out": True}, data_root, out / "evaluation" / name)
    card_path = model / CARD_FILE
    card = json.loads(card_path.read_text())
    card["metrics"]["held_out_by_source"] = held_out
    card["metrics"]["cross_source"] = {
        "study": str(study_path),
        "chosen": report["chosen"],
        "figures": report["variants"][report["chosen"]]["cross_source"],
        "variants": {v: r[report["score"]] for v, r in report["variants"].items()},
        "choice": report.get("choice"),
    }
    write_json(card_path, card)  # the card only: the weights and their sha256 are unchanged
    print(f"final model in {model}: held out by source {json.dumps(held_out)}", flush=True)
    return card


def cross_source_operating_point(model: Path, rows: dict[str, Any], target: dict[str, float] | None = None) -> None:
    """Mitosis: the threshold of best mean F1 over the study's cross-source measurements (each model measured on the
    centre it never saw) replaces the one chosen on the final model's own validation split, whose figures come
    from the same centres as its training and set the threshold too high for another scanner (peaks are lower
    there). With a `target` (recall, precision), the best mean F1 among the thresholds where every held-out
    centre meets it, when any does. The card's validation figures are re-read at it from its validation curve."""
    curves = [row["f1_by_threshold"] for row in rows.values()]
    thresholds = sorted(set.intersection(*(set(c) for c in curves)), key=float)

    def meets(t: str) -> bool:
        return target is not None and all(
            row["recall_by_threshold"][t] >= target["recall"]
            and row["precision_by_threshold"][t] >= target["precision"]
            for row in rows.values()
        )

    meeting = [t for t in thresholds if meets(t)]
    best = max(meeting or thresholds, key=lambda t: (round(sum(c[t] for c in curves) / len(curves), 9), -float(t)))
    card_path = model / CARD_FILE
    card = json.loads(card_path.read_text())
    chosen = float(best)
    card["thresholds"] = {name: chosen for name in card["classes"]}
    card["metrics"]["operating_point"] = {
        "criterion": "best mean F1 within the match radius over the study's cross-source measurements (a model "
        "trained on one centre measured on the other, both ways), figure-free fields counted; among the thresholds "
        "where every held-out centre meets the target recall and precision, when any does",
        "threshold": chosen,
        "mean_cross_source_f1": round(sum(c[best] for c in curves) / len(curves), 4),
        "target": target,
        "target_met": bool(meeting),
        # what a user of another centre can expect at this threshold: each direction's figures at it
        "cross_source_at_threshold": {
            direction: {
                "recall": row["recall_by_threshold"][best],
                "precision": row["precision_by_threshold"][best],
                "f1": row["f1_by_threshold"][best],
            }
            for direction, row in rows.items()
        },
    }
    curve = card["metrics"].get("validation_curve", [])
    card["metrics"]["validation"] = next((r for r in curve if r["threshold"] == chosen), card["metrics"]["validation"])
    write_json(card_path, card)
