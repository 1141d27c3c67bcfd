"""Folder-per-class tile datasets (Kather 2016, NCT-CRC-HE, PCam layouts), grouped by source image so that a
train/validation split never puts tiles of one source image on both sides."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsi_pipeline.core.errors import WsiError
from wsi_pipeline.slide import Slide

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
# Kather 2016 / NCT-CRC-HE file names carry their source image as CRC-Prim-HE-NN.
KATHER_GROUP = r"(CRC-Prim-HE-\d+)"


class DataError(WsiError):
    exit_code = 13
    kind = "bad-training-data"


@dataclass(frozen=True)
class SlideRegion:
    """A tile read from a slide: top-left level-0 px (x, y), at `mpp` µm/px; `slide_mpp`: the slide's own µm/px
    where its file has none (`--default-mpp`)."""

    x: int
    y: int
    mpp: float
    slide_mpp: float | None = None


@dataclass(frozen=True)
class ImageCrop:
    """A square window of an image file (px, fractional), resampled to the model's tile size when read."""

    left: float
    top: float
    size: float


@dataclass(frozen=True)
class TileItem:
    path: Path  # an image file, or the slide a `region` is read from
    label: int
    group: str  # source image (or slide); tiles of one group stay on one side of a split
    region: SlideRegion | None = None
    crop: ImageCrop | None = None
    # where the label holds, as fractions (x, y) of the tile (a labelled nucleus); None: the whole tile. A dense
    # network learns the label around this point only, and is scored there (classifier/class_maps.py).
    point: tuple[float, float] | None = None


def folder_items(
    root: str | Path,
    class_map: Mapping[str, Sequence[str]] | None = None,
    group_pattern: str | None = KATHER_GROUP,
    *,
    strict: bool = True,
) -> tuple[list[TileItem], list[str]]:
    """Tiles under `root/<folder>/`; `class_map` maps output classes to folders (default: one class per folder).
    The group is the first regex group of `group_pattern` in the file name; without a match, the tile alone.
    `strict=False` (several data folders of one `train`): names of the map that are not folders here are left to
    the other data folders, and a class may have no tile here."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"training data folder {root} not found")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    mapping = dict(class_map) if class_map else {f: [f] for f in folders}
    missing = sorted({f for fs in mapping.values() for f in fs} - set(folders))
    if missing and strict:
        raise DataError(f"{root}: class folders {missing} not found (have {folders})")
    mapping = {cls: [f for f in names if f in folders] for cls, names in mapping.items()}
    classes = list(mapping)
    pattern = re.compile(group_pattern) if group_pattern else None
    items = []
    for label, cls in enumerate(classes):
        for folder in mapping[cls]:
            for path in sorted((root / folder).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    match = pattern.search(path.name) if pattern else None
                    items.append(TileItem(path, label, match.group(1) if match else f"tile:{path}"))
    counts = np.bincount([i.label for i in items], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if strict and not classes:
        raise DataError(f"{root}: no class folders (a folder of tiles per class, or --class NAME=FOLDER)")
    if strict and empty:
        raise DataError(f"{root}: no tiles for class(es) {empty}; every class needs tiles")
    if strict and len(classes) < 2:
        raise DataError(f"{root}: only one class ({classes[0]}) has tiles; a model needs at least two")
    return items, classes


class Grouped(Protocol):
    @property
    def label(self) -> int: ...
    @property
    def group(self) -> str: ...


G = TypeVar("G", bound=Grouped)
T = TypeVar("T")


def split_by_group(items: Sequence[G], val_fraction: float = 0.25, seed: int = 0) -> tuple[list[G], list[G]]:
    """Whole groups go to validation (seeded order) until it holds ~val_fraction of the tiles; each class must end
    up on both sides, else the split is refused with the reason."""
    groups = sorted({i.group for i in items})
    if len(groups) < 2:
        raise DataError("all tiles come from one source image: a validation split by source is impossible")
    order = np.random.default_rng(seed).permutation(len(groups))
    target = val_fraction * len(items)
    size = {g: 0 for g in groups}
    for item in items:
        size[item.group] += 1
    val_groups: set[str] = set()
    taken = 0
    for index in order:
        if taken >= target:
            break
        val_groups.add(groups[index])
        taken += size[groups[index]]
    train = [i for i in items if i.group not in val_groups]
    val = [i for i in items if i.group in val_groups]
    labels = {i.label for i in items}
    if {i.label for i in train} != labels or {i.label for i in val} != labels:
        raise DataError(
            "a class has tiles from too few source images to appear in both training and validation; "
            "add data or change --val-fraction / --seed"
        )
    return train, val


def sample_items(items: Sequence[T], count: int, seed: int) -> list[T]:
    """A seeded sample of at most `count` items in their order (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))[:count]
    return [items[i] for i in sorted(order)]


def load_tile(
    item: TileItem, size: int | None = None, offset: tuple[float, float] | None = None, stain: str | None = None
) -> np.ndarray:
    """RGB uint8 of `size` px, stain-normalised when `stain` names a method (models/stain.py). A tile file larger
    than `size` is cropped (at `offset`, fractions of the free room in x and y; the centre by default), which lets a
    model see part of a dataset's tiles; a smaller one is an error naming the file. A crop of an image
    (`item.crop`) is resampled to `size`."""
    rgb = _load_tile(item, size, offset)
    if stain is None:
        return rgb
    from wsi_pipeline.models.stain import normalise_tile

    return normalise_tile(rgb, stain)


def _load_tile(item: TileItem, size: int | None, offset: tuple[float, float] | None) -> np.ndarray:
    if item.region is not None:
        if size is None:
            raise DataError(f"{item.path}: a tile read from a slide needs a tile size")
        slide = _slide(item.path, item.region.slide_mpp)
        return slide.read_region(item.region.x, item.region.y, size, size, item.region.mpp)
    if item.crop is not None:
        box = (item.crop.left, item.crop.top, item.crop.left + item.crop.size, item.crop.top + item.crop.size)
        side = size or round(item.crop.size)
        return np.array(_field(item.path).resize((side, side), Image.Resampling.BILINEAR, box=box))
    try:
        with Image.open(item.path) as image:
            rgb = np.array(image.convert("RGB"))  # writable: torch.from_numpy needs that
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read training tile {item.path}: {exc}") from exc
    if size is None or rgb.shape[:2] == (size, size):
        return rgb
    height, width = rgb.shape[:2]
    if height < size or width < size:
        raise DataError(
            f"{item.path} is {width}x{height} px but the model takes {size}x{size}; "
            "give tiles at least that large or set the tile size to match"
        )
    fx, fy = offset if offset is not None else (0.5, 0.5)
    left, top = round(fx * (width - size)), round(fy * (height - size))
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


@functools.lru_cache(maxsize=128)
def _field(path: Path) -> Image.Image:
    """A decoded image that many crops are cut from (a field with dozens of labelled nuclei), kept per process."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read training image {path}: {exc}") from exc


_SLIDES: dict[tuple[Path, float | None], Slide] = {}


def _slide(path: Path, default_mpp: float | None = None) -> Slide:
    """One handle per slide and process (a Slide opens OpenSlide lazily in each worker process); `default_mpp`
    stands in for a µm/px the file does not have."""
    key = (path, default_mpp)
    if key not in _SLIDES:
        slide = Slide(path)
        _SLIDES[key] = slide.with_mpp(default_mpp) if default_mpp and slide.mpp_or_none is None else slide
    return _SLIDES[key]
