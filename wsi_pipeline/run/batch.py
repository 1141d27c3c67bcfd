"""A folder of slides: discovery, unique ids, per-slide µm/px overrides, the manifest, the cohort table."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_pipeline.config import Config
from wsi_pipeline.core.atomic import remove_stale_temporaries, write_text
from wsi_pipeline.core.errors import ConfigError, OutputWriteError, UsageError, WsiError
from wsi_pipeline.core.layout import SLIDE_EXTENSIONS, RunLayout
from wsi_pipeline.core.progress import BatchProgress
from wsi_pipeline.export.report import Column, write_report
from wsi_pipeline.models import LoadedModel
from wsi_pipeline.run.inputs import (
    assign_ids,
    discover,
    override_for,
    read_mpp_file,
    read_slide_list,
    shard_paths,
    warn_unmatched_overrides,
)
from wsi_pipeline.run.lock import output_lock
from wsi_pipeline.run.pipeline import SlideOutcome, process_slide
from wsi_pipeline.run.stages import check_task_settings
from wsi_pipeline.tasks import task_model, task_names
from wsi_pipeline.tasks import tasks as registered_tasks

MANIFEST_COLUMNS = ["slide", "slide_id", "status", "error", "seconds", "tiles", "note"]
SLIDE_COLUMNS = ["slide_id", "slide", "mpp", "mpp_source", "tissue_area_mm2"]


def cohort_columns() -> list[str]:
    """The slide's own figures, then each registered task's (`<task>_<key>`), in registration order."""
    return [
        *SLIDE_COLUMNS,
        *(f"{t.name}_{key}" for t in registered_tasks() for key in t.cohort_columns),
        "warnings",  # last, so that the figures' columns keep their places
    ]


def load_task_models(config: Config, names: Sequence[str]) -> dict[str, LoadedModel]:
    """Every task's model (configured, else the task's default), loaded and checked before the first slide."""
    return {t: task_model(t, config.task(t).model) for t in names}


def check_task_requests(config: Config, names: Sequence[str], models: dict[str, LoadedModel]) -> None:
    """Settings a task's model cannot take fail the whole batch before the first slide (exit 7), not each slide."""
    for name in names:
        check_task_settings(name, config.task(name), models[name].card)


@dataclass
class BatchResult:
    outcomes: list[SlideOutcome]

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _csv(columns: list[str], rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def manifest_row(o: SlideOutcome) -> dict[str, str]:
    return {
        "slide": str(o.slide),
        "slide_id": o.slide_id,
        "status": o.status,
        "error": o.error,
        "seconds": f"{o.seconds:.2f}",
        "tiles": str(o.tiles),
        "note": o.note,
    }


def write_manifest(path: Path, outcomes: Sequence[SlideOutcome]) -> None:
    write_text(path, _csv(MANIFEST_COLUMNS, [manifest_row(o) for o in outcomes]))


def cohort_row(summary: dict[str, Any]) -> dict[str, Any]:
    row = {k: summary.get(k) for k in SLIDE_COLUMNS}
    for task in task_names():
        for key, value in (summary.get(task) or {}).items():
            row[f"{task}_{key}"] = value
    # figures a task found implausible: whoever reads only this table must see that they are not to be used
    row["warnings"] = "; ".join(w for t in task_names() for w in (summary.get(t) or {}).get("warnings", []))
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
        Column(None, "tissue_area_mm2", "tissue mm²"),
        *(Column(t.name, key, header) for t in registered_tasks() for key, header in t.report_columns),
        Column(None, "seconds", "seconds"),
    ]


def write_batch_report(out: Path, outcomes: Sequence[SlideOutcome]) -> Path:
    return write_report(out, [manifest_row(o) for o in outcomes], report_columns())


def gather(out: Path) -> tuple[Path, Path, int]:
    """Merge the shards' manifests into OUT/manifest.csv and OUT/cohort_summary.csv; returns them and the number
    of failed slides. Newer shard manifests win; slides of a submitted list with no row at all (their job was
    killed, timed out or lost its node) are recorded as failed. It holds OUT's lock whole, so it is refused (exit
    11) while a shard still runs: those slides would otherwise be written down as failed."""
    with output_lock(out):
        return _gather(RunLayout(out))


def _gather(layout: RunLayout) -> tuple[Path, Path, int]:
    rows: dict[str, dict[str, str]] = {}
    for path in sorted(layout.shard_manifests(), key=lambda p: p.stat().st_mtime_ns):
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rows[row["slide_id"]] = row
    submitted = layout.submitted_list
    if submitted.exists():
        paths = discover(read_slide_list(submitted))
        for path, slide_id in assign_ids(paths).items():
            rows.setdefault(
                slide_id,
                {
                    "slide": str(path),
                    "slide_id": slide_id,
                    "status": "failed",
                    "seconds": "0",
                    "tiles": "0",
                    "error": "no result: its job did not finish (cancelled, timed "
                    "out or its node was lost); submit again to redo the missing slides",
                },
            )
    if not rows:
        raise ConfigError(f"no shard manifests in {layout.shards}; run `wsi-pipeline run --shard I/N` first")
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


@contextlib.contextmanager
def dask_client(address: str | None) -> Iterator[None]:
    """Route dask work (chunked post-processing) to an existing dask scheduler, e.g. one from dask-jobqueue's
    SLURMCluster; without an address dask's local threaded scheduler runs it in this process."""
    if address is None:
        yield
        return
    import dask
    from distributed import Client

    # dask's own setting (30 s by default; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT), as every dask tool reads it
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        client = Client(address, timeout=timeout)
    except OSError as exc:
        raise ConfigError(
            f"--dask-scheduler {address}: cannot connect ({exc}); check the address (tcp://host:port)"
        ) from exc
    with client:
        yield


def run_batch(
    inputs: Sequence[str],
    out: Path,
    config: Config,
    tasks: Sequence[str],
    *,
    device: str = "auto",
    workers: int = 1,
    overwrite: bool = False,
    default_mpp: float | None = None,
    mpp_file: str | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    dask_scheduler: str | None = None,
    on_slide: Callable[[SlideOutcome], None] | None = None,
) -> BatchResult:
    """Process every slide; a failing slide is recorded and the others go on. The manifest is rewritten after each
    slide, so it always tells how far a run got."""
    paths = discover(inputs)
    if not paths:
        raise UsageError(f"no slides found in {', '.join(inputs)} (extensions: {', '.join(SLIDE_EXTENSIONS)})")
    ids = assign_ids(paths)
    overrides = read_mpp_file(mpp_file) if mpp_file else {}
    if mpp_file:
        warn_unmatched_overrides(overrides, ids, mpp_file)
    models = load_task_models(config, tasks)
    check_task_requests(config, tasks, models)
    manifest_path, cohort_path = RunLayout(out).batch_files(shard)
    outcomes: list[SlideOutcome] = []
    todo = shard_paths(paths, shard)
    batch_bar = BatchProgress(len(todo))  # one line per slide in logs, also with --no-progress (tile bars only)
    with output_lock(out, shard), dask_client(dask_scheduler):
        remove_stale_temporaries(out)
        for path in todo:
            slide_id = ids[path]
            try:
                outcome = process_slide(
                    path,
                    slide_id,
                    out,
                    config,
                    list(tasks),
                    models,
                    device=device,
                    workers=workers,
                    mpp=override_for(path, slide_id, overrides),
                    default_mpp=default_mpp,
                    overwrite=overwrite,
                    progress=progress,
                )
            except OutputWriteError as exc:  # the next slides would fail alike: record this one and stop (exit 9)
                outcomes.append(SlideOutcome(path, slide_id, "failed", str(exc)))
                with contextlib.suppress(OSError, WsiError):
                    write_manifest(manifest_path, outcomes)
                raise
            outcomes.append(outcome)
            write_manifest(manifest_path, outcomes)
            if on_slide is not None:
                on_slide(outcome)
            batch_bar.update(failed=outcome.status == "failed")
        batch_bar.close()
        write_cohort(cohort_path, (o.summary for o in outcomes if o.summary is not None))
        if shard is None:  # shards' pages would each show part of the cohort: `gather` writes the whole one
            write_batch_report(out, outcomes)
    return BatchResult(outcomes)


def summary_table(result: BatchResult) -> str:
    lines = [f"{'slide_id':40s} {'status':8s} {'seconds':>8s} {'tiles':>7s}  error / note"]
    for o in result.outcomes:
        lines.append(f"{o.slide_id[:40]:40s} {o.status:8s} {o.seconds:8.1f} {o.tiles:7d}  {(o.error or o.note)[:120]}")
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("done", "skipped", "failed")}
    lines.append(
        f"{len(result.outcomes)} slides: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
    )
    return "\n".join(lines)


def read_manifest_outcomes(out: Path) -> BatchResult:
    """OUT/manifest.csv read back as outcomes (for the table `submit` prints at the end)."""
    layout = RunLayout(out)
    path = layout.manifest
    if not path.exists():
        raise ConfigError(f"{path} does not exist: the gather job did not run; see {layout.logs}")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
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
