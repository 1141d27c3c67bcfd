"""Every output file of a finished slide with its size and sha256, and the check a re-run makes before it trusts
them: a slide is skipped only when each recorded file is still there with the same bytes and no chunk was added to
a heatmap (an added chunk changes what the array reads; zarr writes no chunk for an all-zero block)."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

RECORD_NAME = "run.json"  # the record itself is written after the inventory and is not in it
STORE_SUFFIX = ".zarr"


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def take_inventory(root: Path) -> dict[str, list[int | str]]:
    """`{relative path: [size, sha256]}` of every file under `root` but the run record (JSON-ready, sorted)."""
    entries: dict[str, list[int | str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.relative_to(root).as_posix() != RECORD_NAME:
            entries[path.relative_to(root).as_posix()] = [path.stat().st_size, file_sha256(path)]
    return entries


def first_problem(root: Path, recorded: dict[str, list[int | str]]) -> str | None:
    """What no longer matches the inventory (the first difference found, cheapest checks first), or None.

    Sizes and presence of every file are checked before any hash, so a missing chunk is found without reading
    the rest."""
    for rel, (size, _) in recorded.items():
        path = root / rel
        if not path.is_file():
            return f"{describe(rel)} missing"
        if path.stat().st_size != size:
            return f"{describe(rel)} changed ({path.stat().st_size} bytes, recorded {size})"
    for store in {PurePosixPath(rel).parts[0] for rel in recorded if rel.split("/", 1)[0].endswith(STORE_SUFFIX)}:
        for path in sorted((root / store).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in recorded and ".tmp-" not in rel:
                return f"{describe(rel)} was not written by the run"
    for rel, (_, digest) in recorded.items():
        if file_sha256(root / rel) != digest:
            return f"{describe(rel)} changed (its sha256 differs from the run record's)"
    return None


def describe(rel: str) -> str:
    """A recorded path as a user reads it: `heatmaps.zarr/mitosis/0/c/0/1/1` -> `mitosis heatmap chunk 0/1/1`."""
    parts = PurePosixPath(rel).parts
    if len(parts) >= 2 and parts[0].endswith(STORE_SUFFIX):
        image = parts[1]
        if len(parts) >= 4 and parts[3] == "c":
            level = "" if parts[2] == "0" else f" level {parts[2]}"
            return f"{image} heatmap{level} chunk {'/'.join(parts[4:])}"
        if parts[-1] == "zarr.json":
            return f"{image} heatmap metadata ({rel})" if len(parts) > 2 else f"heatmap store metadata ({rel})"
        return f"{image} heatmap file {rel}"
    return rel


def invalidate(record: Path) -> bool:
    """Remove a finished run's record before another command (predict, tissue) changes the folder's outputs, so
    that the next `run` redoes the slide rather than trusting them. Returns whether there was one."""
    try:
        record.unlink()
    except FileNotFoundError:
        return False
    return True
