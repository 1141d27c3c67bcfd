"""The name of every output file and folder of a run and of a slide. No other module builds an output path by hand.

A run folder `OUT/` holds the batch files, the shard files of cluster runs, the locks and one folder per slide;
see docs/outputs.md for what each file contains.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path

# File suffixes of slides: folders are searched for them, and a slide's id is its file name without one.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
TEMPORARY_MARK = ".tmp-"
DICOM_SUFFIX = ".dcm"


def is_dicom_series(folder: Path) -> bool:
    """A folder that is one DICOM WSI slide: two or more `.dcm` instances (its pyramid levels, label, overview) and
    no other slide file. A lone `.dcm` beside other slides is a slide file of its own."""
    if not folder.is_dir():
        return False
    slides = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_EXTENSIONS)]
    return len(slides) >= 2 and all(p.suffix.lower() == DICOM_SUFFIX for p in slides)


def dicom_series_file(folder: Path) -> Path:
    """The instance a reader opens for a series folder (OpenSlide finds the series' other instances beside it): the
    largest, its full-resolution level."""
    instances = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == DICOM_SUFFIX]
    return max(instances, key=lambda p: (p.stat().st_size, p.name))


def slide_files(path: Path) -> list[Path]:
    """The files a slide is made of: the file itself, or a DICOM series folder's instances (sorted)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == DICOM_SUFFIX)
    return [path]


def slide_id_for(path: str | os.PathLike[str]) -> str:
    """A slide's id, the name of its output folder, from its file name alone (so a batch, a shard, a later run and
    QuPath's import script all name it the same): the name NFC-normalised, the slide extension removed, every run
    of characters other than letters (any script), decimal digits, '.', '_' and '-' replaced by '_', leading and
    trailing '.' and '_' stripped. Two slides of one batch with the same id are refused (`run.inputs.assign_ids`)."""
    stem = unicodedata.normalize("NFC", Path(path).name)
    for ext in SLIDE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    kept = "".join(ch if _safe_character(ch) else "\0" for ch in stem)
    safe = re.sub("\0+", "_", kept).strip("._")
    return safe or "slide"


def _safe_character(ch: str) -> bool:
    # unicodedata rather than a regex: Python's re has no \p{L}; the QuPath script's [\p{L}\p{Nd}._-] is this set
    category = unicodedata.category(ch)
    return category[0] == "L" or category == "Nd" or ch in "._-"


def temporary_sibling(path: Path, tag: str = "") -> Path:
    """A hidden name beside `path` for building it; `remove_stale_temporaries` recognises it by the pid and the host
    in it (`.name.tmp-<pid>-<host>-<random>`: a pid means nothing on another node of a cluster sharing OUT)."""
    return path.with_name(f".{path.name}{tag}{TEMPORARY_MARK}{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}")


def _host_tag() -> str:
    # a short digest: host names can hold characters a file name should not, and two hosts must differ
    return "h" + hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


HOST_TAG = _host_tag()


@dataclass(frozen=True)
class SlideLayout:
    """The files of one slide's folder (final or the temporary one it is built in)."""

    root: Path

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def heatmaps(self) -> Path:
        return self.root / "heatmaps.zarr"

    def heatmap(self, name: str) -> Path:
        return self.heatmaps / name

    @property
    def embeddings(self) -> Path:
        """`embeddings/<encoder>.zarr` (or .h5): the tile vectors of each encoder (docs/embeddings.md)."""
        return self.root / "embeddings"

    @property
    def qupath(self) -> Path:
        return self.root / "qupath.geojson"

    @property
    def qupath_gz(self) -> Path:
        return self.root / "qupath.geojson.gz"

    @property
    def overview(self) -> Path:
        return self.root / "overview.png"

    def overlay(self, task: str) -> Path:
        """`overlay-<task>.png`: the slide with the task's heatmap, objects, colour bar, legend and scale bar."""
        return self.root / f"overlay-{task}.png"

    @property
    def tissue_geojson(self) -> Path:
        return self.root / "tissue.geojson"

    @property
    def tissue_mask(self) -> Path:
        return self.root / "tissue_mask.png"

    @property
    def tissue_summary(self) -> Path:
        return self.root / "tissue.json"

    def tiles(self, name: str, kind: str) -> Path:
        """`tiles-<name>.json` (the plan), `.geojson` (QuPath tiles) or `.png` (overview)."""
        return self.root / f"tiles-{name}.{kind}"

    def table(self, file_name: str) -> Path:
        """A task's own table of objects (e.g. the mitosis task's `mitoses.csv`)."""
        return self.root / file_name


def heatmap_temporary(store: Path, name: str) -> Path:
    """Where heatmap `name` of `store` is built before it is renamed into the store."""
    return temporary_sibling(store, f".{name}")


@dataclass(frozen=True)
class RunLayout:
    """The files of a run folder `OUT/`."""

    root: Path

    # names of OUT/ that are the run's own: no slide's folder may take one (`reserved_slide_id`)
    OWN_NAMES = ("manifest.csv", "cohort_summary.csv", "report.html", "shards")

    @classmethod
    def reserved_slide_id(cls, slide_id: str) -> bool:
        """Whether a slide with this id would have its folder where one of the run's own files goes (case-blind, as
        on a macOS or Windows disk). Ids never start with '.', so the locks and temporaries are out of reach."""
        return slide_id.casefold() in {name.casefold() for name in cls.OWN_NAMES}

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def cohort(self) -> Path:
        return self.root / "cohort_summary.csv"

    @property
    def report(self) -> Path:
        """`report.html`: the cohort page (table, pictures, run record)."""
        return self.root / "report.html"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def shard_lock(self, shard: tuple[int, int]) -> Path:
        return self.root / f".lock-shard-{shard[0]}-of-{shard[1]}"

    @property
    def slide_locks(self) -> Path:
        return self.root / ".locks"

    def slide_lock(self, slide_id: str) -> Path:
        """Held while a slide's folder is written (`run.lock.slide_lock`)."""
        return self.slide_locks / slide_id

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def shard_plan(self) -> Path:
        """How the folder's slides are cut into shards (`--shard I/N`): recorded by the first shard that runs."""
        return self.shards / "plan.json"

    @property
    def submitted_list(self) -> Path:
        """The slide list a `submit` sharded (fixed at submission)."""
        return self.shards / "slides.txt"

    @property
    def logs(self) -> Path:
        return self.shards / "logs"

    def submit_folder(self, stamp: str) -> Path:
        return self.shards / f"submit-{stamp}"

    def shard_manifests(self) -> list[Path]:
        return sorted(self.shards.glob("manifest-*.csv"))

    def batch_files(self, shard: tuple[int, int] | None) -> tuple[Path, Path]:
        """(manifest, cohort table) a run writes: OUT's own, or its shard's under OUT/shards/."""
        if shard is None:
            return self.manifest, self.cohort
        tag = f"{shard[0]}-of-{shard[1]}"
        return self.shards / f"manifest-{tag}.csv", self.shards / f"cohort_summary-{tag}.csv"

    def slide(self, slide_id: str) -> SlideLayout:
        return SlideLayout(self.root / slide_id)

    def slide_temporary(self, slide_id: str) -> SlideLayout:
        """A hidden folder a slide is built in; renamed to `slide(slide_id)` when complete."""
        return SlideLayout(temporary_sibling(self.root / slide_id))
