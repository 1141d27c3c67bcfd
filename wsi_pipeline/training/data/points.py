"""Point-annotated images for the dense mitosis model: figure centres (positives) and fields with regions that must
not be sampled (negatives far from any figure).

Three layouts are read:
- AMi-Br (`AMI-BR-TUPAC16.csv` + `normal/`, `atypical/` crops named `TUPAC16_<uid>.png`): each crop is centred on a
  figure; every other figure of the same source image that falls inside the crop (the CSV lists them all) is marked
  too. The group (for the split) is the source slide.
- A points CSV (`points.csv` beside the images: `image,x,y[,group]`, x = column in px): any images with figure
  centres; an image listed with empty x/y has no figure (a negative field).
- MITOS-2012 fields whose figures are painted solid yellow: negatives only, sampled farther than a margin from every
  yellow pixel (the painted pixels themselves are never used).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from wsi_pipeline.training.data.items import IMAGE_SUFFIXES, DataError

AMIBR_CSV = "AMI-BR-TUPAC16.csv"
POINTS_CSV = "points.csv"
AMIBR_MPP = 0.25
MITOS2012_MPP = 0.2456


@dataclass
class PointImage:
    """An image with its figure centres (x, y in px) and the pixels that may be sampled (None: all)."""

    path: Path
    points: np.ndarray  # (N, 2) float, x then y
    group: str
    mpp: float
    centre_index: int | None = None  # the figure the crop is centred on (AMi-Br), scored for "figure-centre recall"
    usable: np.ndarray | None = field(default=None, repr=False)  # bool (H, W): where windows may lie

    @property
    def label(self) -> int:
        """1 for an image with figures, 0 for a figure-free field (both must be on each side of a split)."""
        return int(len(self.points) > 0)

    def load(self) -> np.ndarray:
        return read_rgb(self.path)


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read training image {path}: {exc}") from exc


def amibr_images(root: str | Path) -> list[PointImage]:
    """AMi-Br crops with every figure inside them; crops absent from the folders are skipped."""
    root = Path(root)
    table = root / AMIBR_CSV
    if not table.is_file():
        raise DataError(f"{root}: no {AMIBR_CSV}; an AMi-Br folder has it beside normal/ and atypical/")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_slide: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        by_slide[row["slide"]].append((float(row["x"]), float(row["y"])))
    crops = {
        p.stem.split("_", 1)[1]: p for d in ("normal", "atypical") for p in sorted((root / d).glob("TUPAC16_*.png"))
    }
    images = []
    for row in rows:
        path = crops.get(row["uid"])
        if path is None:
            continue
        size = _image_size(path)
        cx, cy = float(row["x"]), float(row["y"])
        others = np.array(by_slide[row["slide"]], dtype=float)
        # crop pixel = source pixel - (centre - size/2); the centre figure lands at size/2
        local = others - np.array([cx - size[0] / 2, cy - size[1] / 2])
        inside = (local[:, 0] >= 0) & (local[:, 0] < size[0]) & (local[:, 1] >= 0) & (local[:, 1] < size[1])
        local = local[inside]
        centre = int(np.argmin(np.hypot(local[:, 0] - size[0] / 2, local[:, 1] - size[1] / 2)))
        images.append(PointImage(path, local, f"slide:{row['slide']}", AMIBR_MPP, centre_index=centre))
    if not images:
        raise DataError(f"{root}: none of the crops listed in {AMIBR_CSV} is in normal/ or atypical/")
    return images


def csv_images(root: str | Path, mpp: float) -> list[PointImage]:
    """Images listed in ROOT/points.csv (`image,x,y[,group]`); rows with empty x and y mark figure-free images."""
    root = Path(root)
    table = root / POINTS_CSV
    if not table.is_file():
        raise DataError(f"{root}: no {POINTS_CSV} (columns image,x,y[,group]; x = column, y = row, in px)")
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    groups: dict[str, str] = {}
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "x", "y"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{table}: missing column(s) {sorted(missing)}; expected image,x,y[,group]")
        for line, row in enumerate(reader, start=2):
            name = row["image"]
            groups.setdefault(name, row.get("group") or name)
            if (row["x"] or "").strip() == "" and (row["y"] or "").strip() == "":
                points.setdefault(name, [])
                continue
            try:
                points[name].append((float(row["x"]), float(row["y"])))
            except ValueError as exc:
                raise DataError(f"{table}:{line}: x and y must be numbers ({exc})") from exc
    images = []
    for name, pts in points.items():
        path = root / name
        if not path.is_file():
            raise DataError(f"{table}: image {name} not found in {root}")
        images.append(PointImage(path, np.array(pts, dtype=float).reshape(-1, 2), groups[name], mpp))
    return images


def mitos2012_negatives(root: str | Path, margin_px: int = 64) -> list[PointImage]:
    """MITOS-2012 fields (JPEG with figures painted yellow): usable = farther than `margin_px` from yellow."""
    root = Path(root)
    paths = sorted(p for p in root.glob("*.jpg"))
    if not paths:
        raise DataError(f"{root}: no MITOS-2012 .jpg fields")
    images = []
    for path in paths:
        rgb = read_rgb(path).astype(np.int16)
        yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 80)
        usable = ndimage.distance_transform_edt(~yellow) > margin_px if yellow.any() else np.ones(yellow.shape, bool)
        images.append(PointImage(path, np.zeros((0, 2)), f"field:{path.stem}", MITOS2012_MPP, usable=usable))
    return images


def point_images(root: str | Path, mpp: float | None = None) -> list[PointImage]:
    """Whichever layout `root` holds (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"mitosis data folder {root} not found")
    if (root / AMIBR_CSV).is_file():
        return amibr_images(root)
    if (root / POINTS_CSV).is_file():
        if mpp is None:
            raise DataError(f"{root}/{POINTS_CSV}: give the images' µm/px with --mpp")
        return csv_images(root, mpp)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.glob("*.jpg")) and any(root.glob("*.csv")):
        return mitos2012_negatives(root)
    raise DataError(
        f"{root}: not a mitosis data folder; expected {AMIBR_CSV} (AMi-Br), {POINTS_CSV} (image,x,y[,group]) "
        "or MITOS-2012 fields (*.jpg with figures painted yellow)"
    )


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read training image {path}: {exc}") from exc


@dataclass
class Prepared:
    """An image resampled to the model's µm/px, with its points, what may be sampled, and its group."""

    rgb: np.ndarray
    points: np.ndarray
    group: str
    centre_index: int | None
    usable: np.ndarray | None  # bool (H, W): pixels that may be sampled (None: all)
    usable_windows: np.ndarray | None  # bool (H - w + 1, W - w + 1): top-left corners of all-usable windows


def prepare(image: PointImage, mpp: float, window: int) -> Prepared:
    """Load and resample (when the image's µm/px differs by more than 1 %) an image and its annotations."""
    rgb = image.load()
    points = image.points.copy()
    usable = image.usable
    factor = image.mpp / mpp
    if abs(factor - 1) > 0.01:
        h, w = rgb.shape[:2]
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
        points = (points + 0.5) * factor - 0.5
        if usable is not None:
            usable = np.asarray(Image.fromarray(usable).resize(size, Image.Resampling.NEAREST))
    windows = None
    if usable is not None:
        windows = _all_true_windows(usable, window)
    return Prepared(rgb, points, image.group, image.centre_index, usable, windows)


def _all_true_windows(mask: np.ndarray, window: int) -> np.ndarray:
    """Top-left corners whose window x window block is all True (summed-area table of the False pixels)."""
    bad = np.pad((~mask).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    w = window
    count = bad[w:, w:] - bad[:-w, w:] - bad[w:, :-w] + bad[:-w, :-w]
    return count == 0
