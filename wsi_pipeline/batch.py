"""A folder of slides: discovery, unique ids, per-slide µm/px overrides, the manifest, the cohort table."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import remove_stale_temporaries, write_text
from .config import Config
from .errors import ConfigError, OutputWriteError, UsageError, WsiError
from .export.report import Column, write_report
from .layout import SLIDE_EXTENSIONS, RunLayout, slide_id_for
from .lock import output_lock
from .models import LoadedModel
from .pipeline import SlideOutcome, process_slide
from .progress import BatchProgress
from .stages import check_task_settings
from .tasks import parse_task_list, task_model, task_names
from .tasks import tasks as registered_tasks

log = logging.getLogger(__name__)
MANIFEST_COLUMNS = ["slide", "slide_id", "status", "error", "seconds", "tiles", "note"]
SLIDE_COLUMNS = ["slide_id", "slide", "mpp", "mpp_source", "tissue_area_mm2"]


def cohort_columns() -> list[str]:
    """The slide's own figures, then each registered task's (`<task>_<key>`), in registration order."""
    return [*SLIDE_COLUMNS, *(f"{t.name}_{key}" for t in registered_tasks() for key in t.cohort_columns)]


def discover(inputs: Sequence[str]) -> list[Path]:
    """Files as given; folders searched recursively for slide extensions; glob patterns expanded. Sorted, unique
    (one entry per file, however it was named). A folder or pattern that yields no slide is a warning."""
    found: dict[Path, Path] = {}
    for item in inputs:
        path = Path(item)
        matched: list[Path] = []
        if path.is_dir():
            matched = [
                candidate
                for candidate in sorted(path.rglob("*"))
                if candidate.is_file()
                and candidate.name.lower().endswith(SLIDE_EXTENSIONS)
                and not candidate.name.startswith(".")
            ]
            if not matched:
                log.warning("warning: folder %s holds no slide (%s)", item, ", ".join(SLIDE_EXTENSIONS))
        elif any(ch in item for ch in "*?["):
            matched = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
            if not matched:
                log.warning("warning: pattern %s matches no file", item)
        else:
            matched = [path]  # a missing file is reported as a failed slide, not dropped
        for candidate in matched:
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def assign_ids(paths: Sequence[Path]) -> dict[Path, str]:
    """Each slide's id from its file name alone (`layout.slide_id_for`), so that it never depends on the other
    slides of the batch. Two slides whose ids are equal, or differ only in case (one folder on a macOS or Windows
    disk), would share an output folder: the batch is refused before any slide runs."""
    ids = {p: slide_id_for(p) for p in paths}
    groups: dict[str, list[Path]] = {}
    for path, slide_id in ids.items():
        groups.setdefault(slide_id.casefold(), []).append(path)
    clashes = [group for group in groups.values() if len(group) > 1]
    if clashes:
        first = clashes[0]
        more = f" (and {len(clashes) - 1} more such group(s))" if len(clashes) > 1 else ""
        raise UsageError(
            f"{len(first)} slides would share the output folder {ids[first[0]]}/: "
            f"{', '.join(str(p) for p in first)}{more}; rename them so that their file names differ, or run them "
            "into separate -o folders"
        )
    return ids


def read_mpp_file(path: str | os.PathLike[str]) -> dict[str, float]:
    """CSV with columns `slide,mpp`: slide may be a file name, a path, or a slide_id; every mpp positive."""
    table: dict[str, float] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"slide", "mpp"} <= {f.strip() for f in reader.fieldnames}:
                raise ConfigError(
                    f"--mpp-file {path}: expected a CSV whose header has columns slide,mpp "
                    f"(found {', '.join(reader.fieldnames or []) or 'no header'})"
                )
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): v for k, v in row.items() if k is not None}
                try:
                    value = float(row["mpp"])
                except (TypeError, ValueError):
                    raise ConfigError(f"--mpp-file {path} line {line}: mpp {row['mpp']!r} is not a number") from None
                if not (value > 0 and math.isfinite(value)):
                    raise ConfigError(f"--mpp-file {path} line {line}: mpp must be positive, got {value}")
                table[(row["slide"] or "").strip()] = value
    except FileNotFoundError as exc:
        raise ConfigError(f"--mpp-file {path} not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--mpp-file {path} is not a UTF-8 text CSV ({exc.reason})") from exc
    if not table:
        raise ConfigError(f"--mpp-file {path} has no rows; give one line slide,mpp per slide")
    return table


def _override_keys(path: Path, slide_id: str) -> tuple[str, ...]:
    return (str(path), path.name, slide_id, path.stem)


def _override_for(path: Path, slide_id: str, table: dict[str, float]) -> float | None:
    for key in _override_keys(path, slide_id):
        if key in table:
            return table[key]
    return None


def warn_unmatched_overrides(table: dict[str, float], ids: dict[Path, str], source: str) -> None:
    """Rows of --mpp-file that name no slide of the batch are most often a typo: say so."""
    known = {key for path, slide_id in ids.items() for key in _override_keys(path, slide_id)}
    unmatched = [name for name in table if name not in known]
    if len(unmatched) == len(table):
        log.warning("warning: --mpp-file %s names no slide of this batch (rows: %s)", source, ", ".join(unmatched[:5]))
    elif unmatched:
        log.warning(
            "warning: --mpp-file %s: %d row(s) name no slide of this batch: %s",
            source,
            len(unmatched),
            ", ".join(unmatched[:5]),
        )


def load_task_models(config: Config, names: Sequence[str]) -> dict[str, LoadedModel]:
    """Every task's model (configured, else the task's default), loaded and checked before the first slide."""
    return {t: task_model(t, config.task(t).model) for t in names}


def check_task_requests(config: Config, names: Sequence[str], models: dict[str, LoadedModel]) -> None:
    """Settings a task's model cannot take fail the whole batch before the first slide (exit 7), not each slide."""
    for name in names:
        check_task_settings(name, config.task(name), models[name].card)


def select_tasks(config: Config, spec: str | None) -> list[str]:
    """`--tasks a,b` checked against the registry, or every task the configuration enables."""
    if spec is not None:
        return parse_task_list(spec)
    enabled = [t for t in task_names() if config.task(t).enabled]
    if not enabled:
        raise ConfigError("the configuration enables no task; set tasks.<task>.enabled: true or give --tasks")
    return enabled


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
    return row


def write_cohort(path: Path, summaries: Iterable[dict[str, Any]]) -> None:
    write_text(path, _csv(cohort_columns(), [cohort_row(s) for s in summaries]))


def report_columns() -> list[Column]:
    """report.html's table: the slide, its status and tissue, each registered task's chosen figures, the time."""
    return [
        Column(None, "slide_id", "slide"),
        Column(None, "status", "status"),
        Column(None, "error", "error"),
        Column(None, "tissue_area_mm2", "tissue mm²"),
        *(Column(t.name, key, header) for t in registered_tasks() for key, header in t.report_columns),
        Column(None, "seconds", "seconds"),
    ]


def write_batch_report(out: Path, outcomes: Sequence[SlideOutcome]) -> Path:
    return write_report(out, [manifest_row(o) for o in outcomes], report_columns())


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` with 0 <= I < N (pairs with `sbatch --array=0-(N-1)`)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. --shard 0/4") from exc
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def shard_paths(paths: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    """Round-robin over the sorted list: deterministic, disjoint, and balanced to within one slide."""
    return list(paths) if shard is None else list(paths[shard[0] :: shard[1]])


def read_slide_list(path: str | os.PathLike[str]) -> list[str]:
    """One slide path per line (blank lines and # comments ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise UsageError(f"--slide-list {path} not found") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def gather(out: Path) -> tuple[Path, Path, int]:
    """Merge the shards' manifests into OUT/manifest.csv and OUT/cohort_summary.csv; returns them and the number
    of failed slides. Newer shard manifests win; slides of a submitted list with no row at all (their job was
    killed, timed out or lost its node) are recorded as failed."""
    layout = RunLayout(out)
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
    write_report(out, ordered, report_columns())
    return layout.manifest, layout.cohort, sum(r["status"] == "failed" for r in ordered)


@contextlib.contextmanager
def dask_client(address: str | None) -> Iterator[None]:
    """Route dask work (chunked post-processing) to an existing dask scheduler, e.g. one from dask-jobqueue's
    SLURMCluster; without an address dask's local threaded scheduler runs it in this process."""
    if address is None:
        yield
        return
    from distributed import Client

    try:
        client = Client(address, timeout="30s")
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
                    mpp=_override_for(path, slide_id, overrides),
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
