"""What a batch is given, checked before anything heavy is imported: slides found from files, folders and globs,
their ids, per-slide µm/px, the task list, shards and slide lists. A mistake here is refused (exit 2 or 7) or warned
about before the first slide, in half a second rather than after loading torch."""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_pipeline.config import Config
from wsi_pipeline.core.atomic import write_text
from wsi_pipeline.core.errors import ConfigError, UsageError
from wsi_pipeline.core.layout import (
    SLIDE_EXTENSIONS,
    RunLayout,
    is_dicom_series,
    slide_id_for,
    temporary_sibling,
)
from wsi_pipeline.run.lock import running_shards
from wsi_pipeline.tasks import parse_task_list, task_names

log = logging.getLogger(__name__)


def discover(inputs: Sequence[str]) -> list[Path]:
    """Files as given; folders searched recursively for slide extensions; glob patterns expanded. Sorted, unique
    (one entry per file, however it was named). A folder or pattern that yields no slide is a warning."""
    found: dict[Path, Path] = {}
    repeated: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        matched: list[Path] = []
        if is_dicom_series(path):  # a DICOM WSI series given as its folder: one slide
            matched = [path]
        elif path.is_dir():
            slides = [c for c in sorted(path.rglob("*")) if c.is_file() and c.name.lower().endswith(SLIDE_EXTENSIONS)]
            # the instances of a DICOM series folder inside are one slide: the folder
            slides = list(dict.fromkeys(c.parent if is_dicom_series(c.parent) else c for c in slides))
            hidden = [c for c in slides if c.name.startswith(".")]
            matched = [c for c in slides if not c.name.startswith(".")]
            if hidden:  # macOS's ._ files and the like: skipped, but said
                log.warning("warning: skipped %d hidden file(s) in %s (e.g. %s)", len(hidden), item, hidden[0].name)
            if not matched:
                log.warning("warning: folder %s holds no slide (%s)", item, ", ".join(SLIDE_EXTENSIONS))
        elif any(ch in item for ch in "*?["):
            matched = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
            if not matched:
                log.warning("warning: pattern %s matches no file", item)
        else:
            matched = [path]  # a missing file is reported as a failed slide, not dropped
        for candidate in matched:
            first = found.setdefault(candidate.resolve(), candidate)
            if first != candidate:
                repeated.append((candidate, first))
    if repeated:  # links or two spellings of one file: one slide, said once
        log.warning(
            "warning: %d path(s) name a slide already given (the same file): %s is %s; it runs once",
            len(repeated),
            *repeated[0],
        )
    return list(found.values())


def assign_ids(paths: Sequence[Path]) -> dict[Path, str]:
    """Each slide's id from its file name alone (`layout.slide_id_for`), so that it never depends on the other
    slides of the batch. Two slides whose ids are equal, or differ only in case (one folder on a macOS or Windows
    disk), would share an output folder: the batch is refused before any slide runs."""
    ids = {p: slide_id_for(p) for p in paths}
    reserved = [p for p, slide_id in ids.items() if RunLayout.reserved_slide_id(slide_id)]
    if reserved:
        raise UsageError(
            f"{reserved[0]}: its output folder would be {ids[reserved[0]]}/, a name the run's own files use "
            f"({', '.join(RunLayout.OWN_NAMES)}); rename the slide file"
        )
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


def read_mpp_file(path: str | os.PathLike[str]) -> dict[str, float | str]:
    """CSV with columns `slide,mpp`: slide may be a file name, a path, or a slide_id; every mpp positive, or `auto`
    (estimated from the slide's tissue, docs/mpp.md)."""
    table: dict[str, float | str] = {}
    lines: dict[str, int] = {}
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
                value: float | str
                if (row["mpp"] or "").strip().lower() == "auto":
                    value = "auto"
                else:
                    try:
                        value = float(row["mpp"])
                    except (TypeError, ValueError):
                        raise ConfigError(
                            f"--mpp-file {path} line {line}: mpp {row['mpp']!r} is not a number (nor auto)"
                        ) from None
                    if not (value > 0 and math.isfinite(value)):
                        raise ConfigError(f"--mpp-file {path} line {line}: mpp must be positive, got {value}")
                key = (row["slide"] or "").strip()
                if key in lines:  # the last row would win without a word
                    raise ConfigError(
                        f"--mpp-file {path} lines {lines[key]} and {line} both name {key!r}; keep one row per slide"
                    )
                table[key], lines[key] = value, line
    except FileNotFoundError as exc:
        raise ConfigError(f"--mpp-file {path} not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--mpp-file {path} is not a UTF-8 text CSV ({exc.reason})") from exc
    if not table:
        raise ConfigError(f"--mpp-file {path} has no rows; give one line slide,mpp per slide")
    return table


def _override_keys(path: Path, slide_id: str) -> tuple[str, ...]:
    return (str(path), path.name, slide_id, path.stem)


def override_for(path: Path, slide_id: str, table: dict[str, float | str]) -> float | str | None:
    """The row for this slide (by path, file name, id or stem); rows naming it two ways must agree."""
    values = {key: table[key] for key in _override_keys(path, slide_id) if key in table}
    if len(set(values.values())) > 1:
        raise ConfigError(f"--mpp-file: rows {', '.join(repr(k) for k in values)} all name {path} with different µm/px")
    return next(iter(values.values()), None)


def check_overrides(table: dict[str, float | str], ids: dict[Path, str], source: str) -> None:
    """Before any slide: rows that name one slide two ways with different µm/px are refused; rows of --mpp-file that
    name no slide of the batch are most often a typo: say so."""
    for path, slide_id in ids.items():
        override_for(path, slide_id, table)
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


def select_tasks(config: Config, spec: str | None) -> list[str]:
    """`--tasks a,b` checked against the registry, or every task the configuration enables."""
    if spec is not None:
        return parse_task_list(spec)
    enabled = [t for t in task_names() if config.task(t).enabled]
    if not enabled:
        raise ConfigError("the configuration enables no task; set tasks.<task>.enabled: true or give --tasks")
    return enabled


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` with 0 <= I < N (pairs with `sbatch --array=0-(N-1)`)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. --shard 0/4") from exc
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def record_shard_plan(out: Path, paths: Sequence[Path], shard: tuple[int, int]) -> None:
    """Record the folder's slides and shard count (OUT/shards/plan.json) for `gather`, which lists every slide no
    shard finished. The first shard of a cut creates it (only if absent: shards starting at once agree on one);
    a shard whose count or slides differ is refused while a shard of the recorded cut still runs (0/3 beside 0/2
    would skip or double slides), and replaces the plan when none does (a new cut: a workflow re-run with more
    slides, say)."""
    layout = RunLayout(out)
    plan: dict[str, Any] = {"shards": shard[1], "slides": [str(p.resolve()) for p in paths]}
    layout.shards.mkdir(parents=True, exist_ok=True)
    if _create_once(layout.shard_plan, plan):
        return
    recorded = read_shard_plan(out)
    if recorded == plan:
        return
    mine = f"shard {shard[0]}-of-{shard[1]}:"
    running = [s for s in running_shards(out) if not s.startswith(mine)]
    if not running:
        write_text(layout.shard_plan, json.dumps(plan, indent=1) + "\n")
        log.info("%s: a new cut into %d shards (the recorded one's shards have all ended)", layout.shard_plan, shard[1])
        return
    if recorded["shards"] != shard[1]:
        why = f"it is being run as {recorded['shards']} shards"
        fix = f"use --shard I/{recorded['shards']}"
    else:
        differing = sorted(set(recorded["slides"]) ^ set(plan["slides"]))
        why = f"its shards were given other slides (e.g. {differing[0] if differing else 'in another order'})"
        fix = "give every shard the same slides (--slide-list)"
    raise UsageError(
        f"--shard {shard[0]}/{shard[1]}: {why} ({layout.shard_plan}; running: {', '.join(running)}); {fix}, "
        "or another -o folder"
    )


def _create_once(path: Path, content: dict[str, Any]) -> bool:
    """Write `path` whole only if it does not exist; False if it did. A hard link of a finished file makes it
    appear complete; on a file system without hard links, an exclusive create (readers may then briefly see it
    empty: `read_shard_plan` waits for it)."""
    text = json.dumps(content, indent=1) + "\n"
    draft = temporary_sibling(path)
    draft.write_text(text)
    try:
        os.link(draft, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE or SMB mounts)
        try:
            with open(path, "x", encoding="utf-8") as fh:
                fh.write(text)
            return True
        except FileExistsError:
            return False
    finally:
        draft.unlink()


def read_shard_plan(out: Path) -> dict[str, Any]:
    path = RunLayout(out).shard_plan
    for _ in range(50):  # an exclusive create (no hard links) may be seen before its text is written
        text = path.read_text(encoding="utf-8")
        if text.endswith("\n"):
            break
        time.sleep(0.1)
    plan: dict[str, Any] = json.loads(text)
    return plan


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
