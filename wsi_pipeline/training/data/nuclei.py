"""Fields with labelled nucleus centres as classifier tiles: one tile centred on each labelled nucleus.

Layout (CRCHistoPhenotypes, Sirinukunwattana et al. 2016): images beside `nuclei.csv` (`image,x,y,class`; x = column
in px), optionally `mpp.txt` with the images' µm/px (default 0.55, the resolution that paper states for its 20x
fields). `--class epithelium=epithelial --class stroma=fibroblast` makes a tile around each epithelial nucleus an
epithelium tile and one around each fibroblast a stroma tile; nuclei of unnamed classes are not used.

Why nucleus-centred tiles rather than tiles labelled by a majority of nuclei: the labels are sparse (not every nucleus
of a field is classified), so a window's majority often rests on two or three nuclei, while the class of the nucleus
at a tile's centre is what a user samples a heatmap for. Tiles are cut at the model's µm/px (a window of
tile_px * model_mpp / data_mpp image px, resized) and shifted inwards at the field's edges, so the labelled nucleus
is always inside its tile, if not always at its centre.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from wsi_pipeline.training.data.items import DataError, ImageCrop, TileItem, sample_items

NUCLEI_CSV = "nuclei.csv"
MPP_FILE = "mpp.txt"
DEFAULT_MPP = 0.55  # CRCHistoPhenotypes: 500 x 500 px fields at 20x, ≈0.55 µm/px as stated by its paper
# At most this many nuclei of one class per field (a seeded choice): neighbouring nuclei give nearly the same tile,
# and a few crowded fields would otherwise outweigh the rest and any other data folder of the same `train`.
PER_FIELD = 25


def is_nuclei_folder(folder: str | Path) -> bool:
    return (Path(folder) / NUCLEI_CSV).is_file()


def _folder_mpp(root: Path) -> float:
    path = root / MPP_FILE
    if not path.is_file():
        return DEFAULT_MPP
    try:
        value = float(path.read_text().strip())
    except ValueError:
        raise DataError(f"{path}: expected one number (the images' µm/px)") from None
    if value <= 0:
        raise DataError(f"{path}: µm/px must be positive, not {value}")
    return value


def nucleus_items(
    root: str | Path,
    class_map: Mapping[str, Sequence[str]] | None,
    *,
    model_mpp: float,
    tile_px: int,
    per_field: int = PER_FIELD,
) -> tuple[list[TileItem], list[str]]:
    """A tile per labelled nucleus whose class `class_map` names; the group is the field (image), so a split never
    puts tiles of one field on both sides. Classes without a single nucleus here are allowed (another data folder
    of the same `train` may supply them); `training_items` checks the union."""
    root = Path(root)
    table = root / NUCLEI_CSV
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"image", "x", "y", "class"} <= set(rows[0]):
        raise DataError(f"{table}: expected the columns image,x,y,class and at least one row")
    present = sorted({row["class"] for row in rows})
    mapping = dict(class_map) if class_map else {name: [name] for name in present}
    label_of = {source: label for label, cls in enumerate(mapping) for source in mapping[cls]}
    window = tile_px * model_mpp / _folder_mpp(root)
    items: list[TileItem] = []
    sizes: dict[str, tuple[int, int]] = {}
    for number, row in enumerate(rows, start=2):
        label = label_of.get(row["class"])
        if label is None:
            continue
        path = root / row["image"]
        if row["image"] not in sizes:
            sizes[row["image"]] = _image_size(path)
        try:
            x, y = float(row["x"]), float(row["y"])
        except ValueError:
            raise DataError(f"{table} line {number}: x and y must be numbers") from None
        width, height = sizes[row["image"]]
        if window > min(width, height):
            raise DataError(f"{path} is smaller than one tile ({window:.0f} px at its µm/px)")
        left = min(max(x - window / 2, 0.0), width - window)
        top = min(max(y - window / 2, 0.0), height - window)
        group = f"{root.parent.name}/{root.name}/{row['image']}"
        point = ((x - left) / window, (y - top) / window)
        items.append(TileItem(path, label, group, crop=ImageCrop(left, top, window), point=point))
    return _capped(items, per_field), list(mapping)


def _capped(items: list[TileItem], per_field: int) -> list[TileItem]:
    by_key: dict[tuple[str, int], list[TileItem]] = {}
    for item in items:
        by_key.setdefault((item.group, item.label), []).append(item)
    kept: list[TileItem] = []
    for key in sorted(by_key):
        kept += sample_items(by_key[key], per_field, zlib.crc32(f"{key}".encode()))
    return kept


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read {path} (listed in {NUCLEI_CSV}): {exc}") from exc
