"""`wsi-pipeline calibrate-domain`: fit a model's domain guard (models/domain.py) on tiles like its training data.

Tiles come from image folders (a model's own training tiles, at a stated µm/px), slides (tissue tiles) or, for a
point detector, its own training folders (figure crops and fields; `--card-split` keeps the model's validation
sources for the threshold). Each is resampled to the model's µm/px and cut into tiles of the size `run` feeds it (a
dense model's run tile, read in windows of its training crop); a crop smaller than that is mirrored out to it.
The density is fitted on `data`, its threshold on separate validation tiles (a quantile of their scores), and every
further set named with `--held-out` (in domain) or `--outside` (tissue the model must not answer on) is measured:
the fraction of its tiles flagged, and for outside sets the AUROC between them and the validation tiles.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wsi_pipeline.core.atomic import atomic_path, write_json
from wsi_pipeline.core.inventory import file_sha256
from wsi_pipeline.core.layout import SLIDE_EXTENSIONS
from wsi_pipeline.models import LoadedModel, PredictorOptions, make_predictor
from wsi_pipeline.models.card import DomainGuardCard, ModelCard
from wsi_pipeline.models.domain import DomainGuard, FeatureTap, default_layers
from wsi_pipeline.models.folders import CARD_FILE
from wsi_pipeline.training.data.items import DataError
from wsi_pipeline.training.metrics import roc_auc

LOG = logging.getLogger("wsi_pipeline.training")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MIN_FIT_TILES = 200  # a covariance of a few hundred features needs at least this many tiles to mean anything
MIN_VALIDATION_TILES = 50  # a 99th percentile of fewer scores is one tile's score
MIN_SLIDE_TISSUE = 0.5  # a slide's tile is read when at least half of it is tissue (as `run` finds tissue)


@dataclass(frozen=True)
class TileSource:
    """A folder of image tiles or a slide, at `mpp` µm/px (None: the model's, for images; the file's, for slides);
    `groups`, a regex on a point detector's source images (`slide:24.tif`, `field:A00_01`): only those that match."""

    path: Path
    mpp: float | None = None
    name: str = ""
    groups: str | None = None

    @classmethod
    def parse(cls, text: str) -> TileSource:
        """NAME=PATH@MPP#GROUPS, each part but PATH optional."""
        text, _, groups = text.partition("#")
        name, _, rest = text.rpartition("=") if "=" in text else ("", "", text)
        path, _, mpp = rest.partition("@")
        return cls(Path(path), float(mpp) if mpp else None, name or Path(path).name, groups or None)

    def accepts(self, group: str) -> bool:
        return self.groups is None or re.search(self.groups, group) is not None


GroupFilter = Callable[[str], bool]


def source_tiles(
    source: TileSource,
    mpp: float,
    tile_px: int,
    per_image: int,
    limit: int,
    seed: int,
    points: GroupFilter | None = None,
) -> np.ndarray:
    """(N, tile_px, tile_px, 3) uint8 tiles of `source` at `mpp`, at most `limit` (a seeded sample). With `points`
    (a point detector's model) a folder is read as its training data, keeping the images whose group it accepts."""
    if not source.path.exists():
        raise DataError(f"{source.path} does not exist")
    if points is not None and _point_folder(source.path):
        tiles = list(_point_tiles(source, mpp, tile_px, per_image, points))
    elif source.groups is not None:
        raise DataError(f"{source.path}#{source.groups}: only a point detector's training folder has source groups")
    elif source.path.is_file() and source.path.suffix.lower() in SLIDE_EXTENSIONS:
        tiles = list(_slide_tiles(source, mpp, tile_px))
    else:
        found = [source.path] if source.path.is_file() else source.path.rglob("*")
        files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
        tiles = [t for f in files for t in _image_tiles(f, source.mpp or mpp, mpp, tile_px, per_image)]
    if not tiles and points is not None:  # a split may leave a source none of its images
        return np.zeros((0, tile_px, tile_px, 3), np.uint8)
    if not tiles:
        raise DataError(f"{source.path}: no tiles of {tile_px} px at {mpp} µm/px (images too small, or no tissue)")
    order = np.random.default_rng(seed).permutation(len(tiles))[:limit]
    return np.stack([tiles[i] for i in sorted(order)])


def _image_tiles(path: Path, src_mpp: float, mpp: float, tile_px: int, per_image: int) -> Iterator[np.ndarray]:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    factor = src_mpp / mpp
    if abs(factor - 1) > 1e-3:
        rgb = rgb.resize((round(rgb.width * factor), round(rgb.height * factor)), Image.Resampling.BILINEAR)
    array = np.asarray(rgb)
    if array.shape[0] < tile_px or array.shape[1] < tile_px:
        yield mirrored(array, tile_px)
        return
    # a centred grid at half-tile steps: a tile dataset's label belongs to its centre, a field gives many tiles
    step = max(1, tile_px // 2)
    rows, cols = (array.shape[0] - tile_px) // step + 1, (array.shape[1] - tile_px) // step + 1
    top = (array.shape[0] - (rows - 1) * step - tile_px) // 2
    left = (array.shape[1] - (cols - 1) * step - tile_px) // 2
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    for r, c in cells[:: max(1, len(cells) // per_image)][:per_image]:
        y, x = top + r * step, left + c * step
        yield np.ascontiguousarray(array[y : y + tile_px, x : x + tile_px])


def mirrored(rgb: np.ndarray, tile_px: int) -> np.ndarray:
    """An image smaller than the tile, centred and mirrored out to it (a dense model's 128 px training crop read as
    its 512 px run tile: every window then sees tissue, as in a run, not the network's zero padding)."""
    pad_y, pad_x = max(0, tile_px - rgb.shape[0]), max(0, tile_px - rgb.shape[1])
    pads = ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0))
    return np.ascontiguousarray(np.pad(rgb, pads, mode="symmetric")[:tile_px, :tile_px])


def _point_folder(path: Path) -> bool:
    """A folder `point_images` reads (AMi-Br, a points CSV, MITOS-2012 fields)."""
    from wsi_pipeline.training.data.points import AMIBR_CSV, POINTS_CSV

    if not path.is_dir():
        return False
    mitos = any(path.glob("*.jpg")) and any(path.glob("*.csv"))
    return (path / AMIBR_CSV).is_file() or (path / POINTS_CSV).is_file() or mitos


def _point_tiles(
    source: TileSource, mpp: float, tile_px: int, per_image: int, keep: GroupFilter
) -> Iterator[np.ndarray]:
    """A point detector's images (training/data/points.py): a crop smaller than the tile is mirrored out to it (a
    zero-padded crop's windows see the network's padding, unlike any run tile); a field gives up to `per_image`
    tiles where every pixel may be sampled (MITOS-2012: far from the painted figures)."""
    from wsi_pipeline.training.data.points import point_images, prepare

    for image in point_images(source.path, source.mpp):
        if not (keep(image.group) and source.accepts(image.group)):
            continue
        prepared = prepare(image, mpp, tile_px)
        tiles = run_tiles(prepared.rgb, prepared.usable, tile_px)
        yield from tiles[:: max(1, len(tiles) // per_image)][:per_image]


def run_tiles(rgb: np.ndarray, usable: np.ndarray | None, tile_px: int) -> list[np.ndarray]:
    """A point detector's image as the tiles its guard reads: a crop smaller than the tile mirrored out to it, a
    field cut into whole tiles where every pixel may be sampled (`usable`; MITOS-2012: away from painted figures)."""
    height, width = rgb.shape[:2]
    if height < tile_px or width < tile_px:
        return [mirrored(rgb, tile_px)]
    return [
        np.ascontiguousarray(rgb[y : y + tile_px, x : x + tile_px])
        for y in range(0, height - tile_px + 1, tile_px)
        for x in range(0, width - tile_px + 1, tile_px)
        if usable is None or usable[y : y + tile_px, x : x + tile_px].all()
    ]


def _slide_tiles(source: TileSource, mpp: float, tile_px: int) -> Iterator[np.ndarray]:
    """The tiles `run` would read of a slide: its tissue found and tiled as `run` does (default tissue settings),
    tiles at least half tissue."""
    from wsi_pipeline.slide import Slide
    from wsi_pipeline.slide.tiling import plan_tiles
    from wsi_pipeline.slide.tissue import detect_tissue
    from wsi_pipeline.slide.tissue_config import TissueConfig

    with Slide(source.path) as slide:
        if source.mpp is not None:
            slide = slide.with_mpp(source.mpp)
        plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), mpp, tile_px, 0, MIN_SLIDE_TISSUE)
        for x, y in zip(plan.x, plan.y, strict=True):
            yield slide.read_region(float(x), float(y), tile_px, tile_px, mpp)


def input_px(card: ModelCard) -> int:
    """The tile edge `run` feeds the model by default: a classifier its tile; a dense model the task's larger run
    tile, in whose windows the guard is read (a window of a training-sized crop alone would see the network's
    zero padding at every border: on the mitosis model, a median value of 0.3 for 96 px crops of a field and 2.0
    for the same field's 512 px tiles)."""
    if card.kind != "dense":
        return card.tile_px
    from wsi_pipeline.tasks import get_task

    configured = get_task(card.task).default_config().tile_px if card.task else None
    return configured or card.run_tile_px or card.tile_px


def layer_features(model: LoadedModel, layers: list[str], tiles: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    """Per layer (N, W, 2C) window features of tiles, through the predictor `run` uses (folded, fp32; in torch,
    whose layers the hooks read)."""
    predictor = make_predictor(model, torch.device("cpu"), PredictorOptions(precision="fp32", runtime="torch"))
    network = getattr(predictor, "run", None)
    if network is None:
        raise DataError(f"{model.card.name}: a {model.card.format} model's layers cannot be read; guards need torch")
    tap = FeatureTap(network, layers, model.card.tile_px)  # windows of the training tile
    parts: list[list[np.ndarray]] = [[] for _ in layers]
    try:
        with torch.inference_mode():
            for start in range(0, len(tiles), batch):
                chunk = torch.from_numpy(tiles[start : start + batch]).permute(0, 3, 1, 2).contiguous()
                predictor.probabilities(chunk)
                for part, feats in zip(parts, tap.windows(chunk.shape[-1]), strict=True):
                    part.append(feats.double().numpy())
    finally:
        tap.remove()
    return [np.concatenate(p) for p in parts]


def fit_guard(fit: list[np.ndarray], validation: list[np.ndarray], quantile: float) -> tuple[DomainGuard, np.ndarray]:
    """The guard (fitted on every window of the `fit` tiles) and the validation tiles' values (score / threshold,
    a tile's being the median over its windows, as in `run`)."""
    from sklearn.covariance import LedoitWolf  # shrinkage: a few hundred tiles for up to 512 features

    means, precisions = [], []
    for feats in (f.reshape(-1, f.shape[-1]) for f in fit):
        mean = feats.mean(axis=0)
        means.append(torch.from_numpy(mean))
        precisions.append(torch.from_numpy(LedoitWolf(assume_centered=True).fit(feats - mean).precision_))
    raw = DomainGuard(means, precisions, [1.0] * len(fit), 1.0)
    per_layer = raw.layer_scores([torch.from_numpy(v) for v in validation])  # (L, B, W)
    scales = per_layer.flatten(1).median(dim=1).values.tolist()
    scaled = DomainGuard(means, precisions, scales, 1.0)
    combined = values_of(scaled, validation)
    threshold = float(np.quantile(combined, quantile))
    return DomainGuard(means, precisions, scales, threshold), combined / threshold


def values_of(guard: DomainGuard, features: list[np.ndarray]) -> np.ndarray:
    return guard.tile_scores([torch.from_numpy(v) for v in features]).double().numpy()


def save_guard(directory: Path, model: LoadedModel, guard: DomainGuard, meta: dict[str, Any]) -> DomainGuardCard:
    """Write the guard file, then the card naming it with its sha256 (the card last: never a card without its file)."""
    from safetensors.torch import save_file

    card = model.card
    tensors = {}
    for i, (mean, precision) in enumerate(zip(guard.means, guard.precisions, strict=True)):
        tensors[f"{i}.mean"], tensors[f"{i}.precision"] = mean.contiguous(), precision.contiguous()
    info = {"layers": meta["layers"], "scales": guard.scales, "threshold": guard.threshold}
    entry = DomainGuardCard(sha256="0" * 64, architecture=card.architecture, **meta)
    path = directory / entry.file
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"guard": json.dumps(info)})
    entry = entry.model_copy(update={"sha256": file_sha256(path)})
    write_json(directory / CARD_FILE, card.model_copy(update={"domain_guard": entry}).model_dump(mode="json"))
    return entry


def calibrate(
    model: LoadedModel,
    data: Sequence[TileSource],
    validation: Sequence[TileSource],
    held_out: Sequence[TileSource] = (),
    outside: Sequence[TileSource] = (),
    *,
    quantile: float = 0.975,
    per_image: int = 4,
    max_tiles: int = 4000,
    layers: list[str] | None = None,
    seed: int = 0,
    card_split: bool = False,
) -> DomainGuardCard:
    """Fit, measure and save the guard of the model in its own folder; returns its card entry. With `card_split`,
    a point detector's DATA images of the sources its card names as validation calibrate the threshold (with any
    `validation`), the rest are fitted: the split its training used."""
    card = model.card
    if model.module is None or model.path is None:
        raise DataError(f"{card.name}: only a torch model loaded from its folder can be given a domain guard")
    layers = layers or default_layers(model.module, card.tile_px)
    size = input_px(card)
    detector = card.task is not None and _trainer(card.task) == "point_detector"
    held = set(card.training.get("val_groups", []))
    if card_split and not (detector and held):
        raise DataError(f"{card.name}: --card-split needs a point detector whose card lists its validation sources")

    def tiles_of(sources: Sequence[TileSource], keep: GroupFilter = lambda _group: True) -> np.ndarray:
        points = keep if detector else None
        found = [source_tiles(s, card.mpp, size, per_image, max_tiles, seed, points) for s in sources]
        return np.concatenate([np.zeros((0, size, size, 3), np.uint8), *found])

    if card_split:
        fit_tiles = tiles_of(data, lambda group: group not in held)
        grouped = [s for s in data if _point_folder(s.path)]  # other sources have no groups: all fitted
        val_tiles = np.concatenate([tiles_of(grouped, held.__contains__), tiles_of(validation)])
    else:
        fit_tiles, val_tiles = tiles_of(data), tiles_of(validation)
    fit_features = layer_features(model, layers, fit_tiles)
    windows = fit_features[0].shape[0] * fit_features[0].shape[1]
    if windows < MIN_FIT_TILES or len(val_tiles) < MIN_VALIDATION_TILES:
        raise DataError(
            f"a domain guard needs at least {MIN_FIT_TILES} fitting windows of {card.tile_px} px and "
            f"{MIN_VALIDATION_TILES} validation tiles of {size} px; got {windows} and {len(val_tiles)}: give more "
            "images (or more tiles per image, --per-image)"
        )
    guard, val_values = fit_guard(fit_features, layer_features(model, layers, val_tiles), quantile)
    figures: dict[str, Any] = {"validation": {"tiles": len(val_tiles), "flagged": flagged_share(val_values)}}
    for source in held_out:
        values = values_of(guard, layer_features(model, layers, tiles_of([source])))
        figures[f"held_out:{source.name}"] = {"tiles": len(values), "flagged": flagged_share(values)}
    for source in outside:
        values = values_of(guard, layer_features(model, layers, tiles_of([source])))
        labels = np.r_[np.zeros(len(val_values)), np.ones(len(values))]
        figures[f"outside:{source.name}"] = {
            "tiles": len(values),
            "flagged": flagged_share(values),
            "auroc_vs_validation": round(roc_auc(labels, np.r_[val_values, values]), 4),
        }
    meta = {
        "layers": layers,
        "window_px": card.tile_px,
        "quantile": quantile,
        "fit_tiles": windows,
        "validation_tiles": len(val_tiles),
        "data": [f"{s.path}" + (f" @ {s.mpp} µm/px" if s.mpp else "") for s in (*data, *validation)],
        "figures": figures,
    }
    return save_guard(model.path, model, guard, meta)


def _trainer(task: str) -> str:
    from wsi_pipeline.tasks import get_task

    return get_task(task).trainer


def write_domain(directory: Path, description: Path) -> str:
    """Write the model's domain (a YAML file of `ModelDomain` fields) into its card; returns its one-line form."""
    import yaml
    from pydantic import ValidationError

    from wsi_pipeline.models.card import ModelDomain
    from wsi_pipeline.models.folders import load_card

    card = load_card(directory)
    try:
        domain = ModelDomain.model_validate(yaml.safe_load(description.read_text(encoding="utf-8")))
    except (ValidationError, yaml.YAMLError) as exc:
        raise DataError(f"{description} is not a model domain: {exc}") from exc
    write_json(directory / CARD_FILE, card.model_copy(update={"domain": domain}).model_dump(mode="json"))
    return domain.line()


def flagged_share(values: np.ndarray) -> float:
    """The share of guard values over 1 (out of domain)."""
    return round(float(np.mean(values > 1.0)), 4)
