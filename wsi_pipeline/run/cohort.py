"""The cohort's files, assembled in one place from the slides' outcomes and summaries: manifest.csv, cohort_summary.csv
(columns from the registered tasks), report.html, and `gather`, which merges the shards' manifests into them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.core.atomic import write_text
from wsi_pipeline.core.errors import ConfigError, UsageError
from wsi_pipeline.core.layout import RunLayout
from wsi_pipeline.export.report import Column, write_report
from wsi_pipeline.run.inputs import assign_ids, discover, read_shard_plan, read_slide_list
from wsi_pipeline.run.lock import output_lock
from wsi_pipeline.run.pipeline import SlideOutcome
from wsi_pipeline.slide.qc_config import QC_CLASSES
from wsi_pipeline.tasks import task_names
from wsi_pipeline.tasks import tasks as registered_tasks

MANIFEST_COLUMNS = ["slide", "slide_id", "status", "error", "seconds", "tiles", "note", "mpp_source"]
SLIDE_COLUMNS = ["slide_id", "slide", "mpp", "mpp_source", "tissue_area_mm2"]
# quality control (run/qc.py): the usable share of analysed tissue, then each class's share
QC_COLUMNS = ["qc_usable_fraction", *(f"qc_{cls}" for cls in QC_CLASSES)]


# a slide-level model's answer (run/slide_model.py), empty without one
SLIDE_MODEL_COLUMNS = [f"slide_classifier_{key}" for key in ("model", "class", "score")]


def cohort_columns() -> list[str]:
    """The slide's own figures, then each registered task's (`<task>_<key>`), in registration order."""
    return [
        *SLIDE_COLUMNS,
        *QC_COLUMNS,
        *SLIDE_MODEL_COLUMNS,
        *(f"{t.name}_{key}" for t in registered_tasks() for key in t.cohort_columns),
        "warnings",  # last, so that the figures' columns keep their places
    ]


@dataclass
class BatchResult:
    outcomes: list[SlideOutcome]  # this run's slides: its exit status
    earlier: list[SlideOutcome] = field(default_factory=list)  # slides of earlier runs the folder's files also list

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet evaluates as a formula (OWASP CSV injection)


def _neutral(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (a slide named `=HYPERLINK(...)`), prefixed with `'` so it
    is shown as text; numbers (-0.5) are left alone. Slide ids themselves are unchanged; `_read_rows` undoes it."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def _csv(columns: list[str], rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _neutral(value) for key, value in row.items()})
    return buffer.getvalue()


def _read_rows(path: Path) -> list[dict[str, str]]:
    """A manifest's rows as they were before `_neutral`."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    quoted = tuple("'" + start for start in FORMULA_STARTS)
    return [{k: v[1:] if isinstance(v, str) and v.startswith(quoted) else v for k, v in r.items()} for r in rows]


def manifest_row(o: SlideOutcome) -> dict[str, str]:
    return {
        "slide": str(o.slide),
        "slide_id": o.slide_id,
        "status": o.status,
        "error": o.error,
        "seconds": f"{o.seconds:.2f}",
        "tiles": str(o.tiles),
        "note": o.note,
        "mpp_source": str((o.summary or {}).get("mpp_source", "")),
    }


def write_manifest(path: Path, outcomes: Sequence[SlideOutcome]) -> None:
    write_text(path, _csv(MANIFEST_COLUMNS, [manifest_row(o) for o in outcomes]))


def cohort_row(summary: dict[str, Any]) -> dict[str, Any]:
    row = {k: summary.get(k) for k in SLIDE_COLUMNS}
    quality = summary.get("qc") or {}
    row["qc_usable_fraction"] = quality.get("usable_fraction")
    for cls, share in (quality.get("fractions") or {}).items():
        row[f"qc_{cls}"] = share
    for task in task_names():
        for key, value in (summary.get(task) or {}).items():
            row[f"{task}_{key}"] = value
    for column in SLIDE_MODEL_COLUMNS:
        row[column] = (summary.get("slide_classifier") or {}).get(column.removeprefix("slide_classifier_"))
    # figures a task found implausible: whoever reads only this table must see that they are not to be used
    slide_lines = summary.get("mpp_warnings", [])  # an estimated or doubtful µm/px: every figure rests on it
    sections = ("qc", "slide_classifier", *task_names())
    task_lines = [w for t in sections for w in (summary.get(t) or {}).get("warnings", [])]
    row["warnings"] = "; ".join([*slide_lines, *task_lines])
    return row


def write_cohort(path: Path, summaries: Iterable[dict[str, Any]]) -> None:
    write_text(path, _csv(cohort_columns(), [cohort_row(s) for s in summaries]))


def report_columns() -> list[Column]:
    """report.html's table: the slide, its status and tissue, each registered task's chosen figures, the time."""
    return [
        Column(None, "slide_id", "slide"),
        Column(None, "status", "status"),
        Column(None, "error", "error"),
        Column(None, "note", "note"),
        Column(None, "mpp", "µm/px"),
        Column(None, "tissue_area_mm2", "tissue mm²"),
        Column("qc", "usable_fraction", "usable (QC)"),
        Column("slide_classifier", "class", "slide class", optional=True),
        Column("slide_classifier", "score", "slide score", optional=True),
        *(Column(t.name, key, header) for t in registered_tasks() for key, header in t.report_columns),
        Column(None, "seconds", "seconds"),
    ]


def write_batch_report(out: Path, outcomes: Sequence[SlideOutcome]) -> Path:
    return write_report(out, [manifest_row(o) for o in outcomes], report_columns())


def gather(out: Path) -> tuple[Path, Path, int]:
    """Merge the shards' manifests into OUT/manifest.csv and OUT/cohort_summary.csv; returns them and the number
    of failed slides. Newer shard manifests win; slides of the shards' plan (or a submitted list) with no row at all
    (their shard never ran, was killed, timed out or lost its node) are recorded as failed. It holds OUT's lock
    whole, so it is refused (exit 11) while a shard still runs: those slides would otherwise be written down as
    failed."""
    layout = RunLayout(out)
    known = layout.shard_manifests() or layout.shard_plan.exists() or layout.submitted_list.exists()
    if not known:  # before the lock: nothing is written into a folder no shard or submission wrote
        raise UsageError(f"no shard manifests in {layout.shards}; run `wsi-pipeline run --shard I/N` first")
    with output_lock(out):
        return _gather(layout)


def _gather(layout: RunLayout) -> tuple[Path, Path, int]:
    rows: dict[str, dict[str, str]] = {}
    for path in sorted(layout.shard_manifests(), key=lambda p: p.stat().st_mtime_ns):
        for row in _read_rows(path):
            rows[row["slide_id"]] = row
    if layout.shard_plan.exists():  # every slide the shards were started with
        paths = [Path(p) for p in read_shard_plan(layout.root)["slides"]]
    elif layout.submitted_list.exists():
        paths = discover(read_slide_list(layout.submitted_list))
    else:
        paths = []
    if paths:
        for path, slide_id in assign_ids(paths).items():
            rows.setdefault(
                slide_id,
                {
                    "slide": str(path),
                    "slide_id": slide_id,
                    "status": "failed",
                    "seconds": "0",
                    "tiles": "0",
                    "error": "no result: its shard did not run or did not finish (cancelled, timed out or its "
                    "node was lost); run the missing shard again, or submit again, to redo the missing slides",
                },
            )
    if not rows:
        raise UsageError(f"no shard manifests in {layout.shards}; run `wsi-pipeline run --shard I/N` first")
    ordered = [rows[k] for k in sorted(rows)]
    write_text(layout.manifest, _csv(MANIFEST_COLUMNS, ordered))
    summaries = []
    for row in ordered:
        summary = layout.slide(row["slide_id"]).summary
        if row["status"] in ("done", "skipped") and summary.is_file():
            with contextlib.suppress(ValueError):  # a damaged summary: the row stays, the cohort line is left out
                summaries.append(json.loads(summary.read_text()))
    write_cohort(layout.cohort, summaries)
    write_report(layout.root, ordered, report_columns())
    return layout.manifest, layout.cohort, sum(r["status"] == "failed" for r in ordered)


EARLIER_NOTE = "from an earlier run of this folder"


def earlier_outcomes(out: Path, current: set[str]) -> list[SlideOutcome]:
    """The slides an earlier run of OUT recorded that this run does not process and whose folder is still there:
    the cohort files list every slide the folder holds, not only the subset run last (their note says so)."""
    layout = RunLayout(out)
    if not layout.manifest.is_file():
        return []
    kept = []
    for row in _read_rows(layout.manifest):
        folder = layout.slide(row["slide_id"])
        failed_still_there = row["status"] == "failed" and Path(row["slide"]).exists()
        if row["slide_id"] in current or not (folder.run_record.is_file() or failed_still_there):
            continue
        summary = None
        if row["status"] in ("done", "skipped") and folder.summary.is_file():
            with contextlib.suppress(ValueError):  # a damaged summary: the row stays, the cohort line is left out
                summary = json.loads(folder.summary.read_text())
        earlier_note = row.get("note", "")
        if not earlier_note.startswith(EARLIER_NOTE):  # said once, however many runs ago
            earlier_note = "; ".join(n for n in (EARLIER_NOTE, earlier_note) if n)
        kept.append(
            SlideOutcome(
                slide=Path(row["slide"]),
                slide_id=row["slide_id"],
                status=row["status"],
                error=row["error"],
                seconds=float(row["seconds"]),
                tiles=int(row["tiles"]),
                summary=summary,
                note=earlier_note,
            )
        )
    return kept


def read_manifest_outcomes(out: Path) -> BatchResult:
    """OUT/manifest.csv read back as outcomes (for the table `submit` prints at the end)."""
    layout = RunLayout(out)
    path = layout.manifest
    if not path.exists():
        raise ConfigError(f"{path} does not exist: the gather job did not run; see {layout.logs}")
    rows = _read_rows(path)
    return BatchResult(
        [
            SlideOutcome(
                Path(r["slide"]),
                r["slide_id"],
                r["status"],
                r["error"],
                float(r["seconds"]),
                int(r["tiles"]),
                note=r.get("note") or "",
            )
            for r in rows
        ]
    )
