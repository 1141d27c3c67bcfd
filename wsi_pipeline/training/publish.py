"""`wsi-pipeline publish WORK DEFAULTS`: the last step of `make models`.

For each task trained in WORK/<task> (other folders are left alone), the weights, the card and the held-out
evaluation (WORK/<task>/evaluation) replace DEFAULTS/<task>; the evaluation's figures go into the card
(`metrics.evaluation`, and `bf16_max_difference`, which decides the engine's precision) so the card says what the
shipped weights measured. Each folder is assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from wsi_pipeline.models.loading import CARD_FILE, WEIGHTS_FILE, load_model
from wsi_pipeline.training.data.items import DataError
from wsi_pipeline.training.loop import group_list

EVALUATION_FILES = ("evaluation.json", "roc.png", "froc.png")


def publish(work: Path, defaults: Path, task: str) -> Path:
    source = work / task
    load_model(source, task=task)  # refuses a damaged or mismatched model before anything is replaced
    report_dir = source / "evaluation"
    report_file = report_dir / "evaluation.json"
    if not report_file.is_file():
        raise DataError(f"{report_file} is missing: run `wsi-pipeline evaluate {task} ...` first (see the Makefile)")
    card = json.loads((source / CARD_FILE).read_text())
    report = json.loads(report_file.read_text())
    for key in ("train_groups", "val_groups"):
        if key in card.get("training", {}):
            card["training"][key] = group_list(card["training"][key])
    card["metrics"]["evaluation"] = {"report": f"evaluation/{report_file.name}", **_headline(report)}
    if "bf16" in report:  # `engine.precision: auto` runs the model in fp32 where this is over BF16_CARD_LIMIT
        card["bf16_max_difference"] = report["bf16"]["max_abs_difference"]
    tmp = defaults / f".{task}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "evaluation").mkdir(parents=True)
    shutil.copy2(source / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
    (tmp / WEIGHTS_FILE).chmod(0o644)  # installed with the package: readable by every user
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    for name in EVALUATION_FILES:
        if (report_dir / name).is_file():
            shutil.copy2(report_dir / name, tmp / "evaluation" / name)
    target = defaults / task
    old = defaults / f".{task}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    load_model(target, task=task)
    return target


def _headline(report: dict) -> dict:
    """The figures a reader of the card wants first; the whole report stays beside it."""
    if "at_threshold" in report:
        return {"crops": report["crops"], "figure_free_fields": report["fields"], **report["at_threshold"]}
    return {
        "tiles": report["tiles"],
        "balanced_accuracy": report["balanced_accuracy"],
        "roc_auc": report["roc_auc"],
        **({"at_operating_point": report["at_operating_point"]} if "at_operating_point" in report else {}),
    }


def publish_all(work: Path, defaults: Path) -> Iterator[str]:
    """Publish every WORK/<task> that holds a card, saying each folder published or skipped as it goes (a failure
    of a later task leaves the earlier ones' lines said)."""
    from wsi_pipeline.tasks import task_names

    tasks = task_names()
    with_card = sorted(p.name for p in work.iterdir() if (p / CARD_FILE).is_file())
    # only WORK/<task>: a backup or experiment folder beside them (WORK/mitosis.old) is never shipped
    trained = [name for name in with_card if name in tasks]
    for name in with_card:
        if name not in tasks:
            yield f"skipped {work / name}: not named after a task ({', '.join(tasks)})"
    if not trained:
        raise DataError(f"no trained model folders (WORK/<task> with {CARD_FILE}) in {work}")
    for task in trained:
        yield f"published {publish(work, defaults, task)}"
