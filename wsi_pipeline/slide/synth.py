"""Synthetic whole-slide images with exact ground truth, written as real pyramidal JPEG TIFFs.

OpenSlide opens them as vendor `aperio` (levels are top-level pages, as Aperio writes them, not SubIFDs). Tissue is a
set of ellipses (with elliptical holes) on white, textured like H&E; optional pen strokes and round dark "figures" at
known level-0 coordinates. A `<stem>.truth.json` beside the slide records the truth.

Why hand-written: no library writes vendor-flavoured slides with known content. Tiles that are entirely white or
entirely inside tissue repeat a few pre-encoded variants, so a 100 000 x 80 000 px slide takes seconds, not hours.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
import shapely
import tifffile
from shapely.geometry import LineString, Point, Polygon, mapping

from wsi_pipeline.core.atomic import atomic_path

if TYPE_CHECKING:
    from typing import TypedDict

    class _LevelOptions(TypedDict):
        """The keyword arguments of `TiffWriter.write` every pyramid level is written with."""

        dtype: str
        tile: tuple[int, int]
        photometric: str
        subsampling: tuple[int, int]
        compression: str
        metadata: None

    class _Resolution(TypedDict, total=False):
        """TIFF resolution tags, when the slide records its µm/px in them."""

        resolution: tuple[float, float]
        resolutionunit: str


BACKGROUND = (255, 255, 255)
EOSIN = np.array([232, 160, 200], dtype=np.float32)
HEMATOXYLIN = np.array([120, 70, 165], dtype=np.float32)
FIGURE_RGB = np.array([45, 20, 80], dtype=np.float32)
PEN_RGB = np.array([40, 150, 110], dtype=np.float32)
_TEXTURE_VARIANTS = 8
_JPEG_QUALITY = 85


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    angle_deg: float = 0.0

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = math.radians(self.angle_deg)
        dx, dy = x - self.cx, y - self.cy
        u = dx * math.cos(t) + dy * math.sin(t)
        v = -dx * math.sin(t) + dy * math.cos(t)
        return (u / self.rx) ** 2 + (v / self.ry) ** 2 <= 1.0

    def polygon(self, n: int = 720) -> Polygon:
        t = math.radians(self.angle_deg)
        a = np.linspace(0, 2 * math.pi, n, endpoint=False)
        u, v = self.rx * np.cos(a), self.ry * np.sin(a)
        return Polygon(np.c_[self.cx + u * math.cos(t) - v * math.sin(t), self.cy + u * math.sin(t) + v * math.cos(t)])

    @property
    def area(self) -> float:
        return math.pi * self.rx * self.ry


@dataclass(frozen=True)
class PenStroke:
    x0: float
    y0: float
    x1: float
    y1: float
    width: float  # level-0 px

    def geometry(self) -> Polygon:
        return LineString([(self.x0, self.y0), (self.x1, self.y1)]).buffer(self.width / 2, cap_style="flat")

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = self.x1 - self.x0, self.y1 - self.y0
        length2 = dx * dx + dy * dy
        t = ((x - self.x0) * dx + (y - self.y0) * dy) / length2
        px, py = self.x0 + t * dx, self.y0 + t * dy
        return (t >= 0) & (t <= 1) & ((x - px) ** 2 + (y - py) ** 2 <= (self.width / 2) ** 2)


@dataclass(frozen=True)
class Figure:
    """A round dark object (a stand-in for a mitotic figure) centred at level-0 (x, y)."""

    x: float
    y: float
    radius: float  # level-0 px


@dataclass
class SynthSpec:
    width: int
    height: int
    mpp: float
    seed: int = 0
    regions: list[Ellipse] = field(default_factory=list)
    holes: list[Ellipse] = field(default_factory=list)
    pen: list[PenStroke] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    def tissue_geometry(self) -> shapely.Geometry:
        """Level-0 tissue as polygons with holes (pen strokes are not tissue)."""
        tissue = shapely.union_all([r.polygon() for r in self.regions])
        if self.holes:
            tissue = tissue.difference(shapely.union_all([h.polygon() for h in self.holes]))
        return tissue

    def tissue_area_um2(self) -> float:
        """Exact tissue area (holes lie inside a single region and regions do not overlap in default layouts)."""
        return float(self.tissue_geometry().area) * self.mpp * self.mpp


def default_layout(
    width: int, height: int, mpp: float, seed: int = 0, n_figures: int = 0, pen: bool = False
) -> SynthSpec:
    """Three tissue pieces (one with a hole), optionally a pen stroke in the empty corner and planted figures."""
    w, h = float(width), float(height)
    regions = [
        Ellipse(0.30 * w, 0.45 * h, 0.20 * w, 0.30 * h, 15.0),
        Ellipse(0.72 * w, 0.40 * h, 0.16 * w, 0.22 * h, -20.0),
        Ellipse(0.68 * w, 0.82 * h, 0.12 * w, 0.09 * h, 0.0),
    ]
    holes = [Ellipse(0.72 * w, 0.40 * h, 0.05 * w, 0.06 * h, 0.0)]
    strokes = [PenStroke(0.08 * w, 0.90 * h, 0.40 * w, 0.96 * h, max(8.0, 0.012 * min(w, h)))] if pen else []
    spec = SynthSpec(width, height, mpp, seed, regions, holes, strokes, [])
    if n_figures:
        radius = 5.0 / mpp  # ~10 µm across, the size of a mitotic figure
        rng = np.random.default_rng(seed + 1)
        tissue = spec.tissue_geometry().buffer(-3 * radius)
        figures: list[Figure] = []
        while len(figures) < n_figures:
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            if tissue.contains(Point(x, y)) and all(math.hypot(x - f.x, y - f.y) > 6 * radius for f in figures):
                figures.append(Figure(round(x, 1), round(y, 1), radius))
        spec.figures = figures
    return spec


def lesion_layout(
    width: int, height: int, mpp: float, seed: int, lesion: bool, background: int = 30, packed: int = 40
) -> SynthSpec:
    """A slide for slide-level models: the default tissue with `background` dark nuclei-sized objects scattered over
    it and, on a positive slide (`lesion`), `packed` more in one lesion of 200 µm radius: only the lesion tells the
    classes apart, as a focus of tumour tells a positive lymph node. The lesion's objects come last in `figures`."""
    spec = default_layout(width, height, mpp, seed)
    radius = 5.0 / mpp
    rng = np.random.default_rng(seed + 7)
    tissue = spec.tissue_geometry().buffer(-3 * radius)
    placed = _scatter(tissue, background, radius, rng, [])
    if lesion:
        inner = tissue.buffer(-200.0 / mpp)
        centre = _random_point(inner if not inner.is_empty else tissue, rng)
        area = tissue.intersection(Point(centre).buffer(200.0 / mpp))
        placed = _scatter(area, packed, radius, rng, [f for f in placed if not area.buffer(10 * radius).contains(
            Point(f.x, f.y))])  # fmt: skip
    spec.figures = placed
    return spec


def _scatter(
    area: shapely.Geometry, count: int, radius: float, rng: np.random.Generator, placed: list[Figure]
) -> list[Figure]:
    """`count` more objects in `area`, 5 radii apart from each other and from those `placed`."""
    placed = list(placed)
    target = len(placed) + count
    for _ in range(200 * count):
        if len(placed) == target:
            break
        x, y = _random_point(area, rng)
        if all(math.hypot(x - f.x, y - f.y) > 5 * radius for f in placed):
            placed.append(Figure(round(x, 1), round(y, 1), radius))
    return placed


def _random_point(area: shapely.Geometry, rng: np.random.Generator) -> tuple[float, float]:
    x0, y0, x1, y1 = area.bounds
    while True:
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if area.contains(Point(x, y)):
            return x, y


def level_downsamples(width: int, height: int) -> list[int]:
    """Aperio-like pyramid: 4x steps until the level fits in ~1024 px."""
    downsamples = [1]
    while max(width, height) / downsamples[-1] > 1024:
        downsamples.append(downsamples[-1] * 4)
    return downsamples


class _Renderer:
    """Draws any tile of any level from the analytic spec (pixel centres sampled in level-0 coordinates)."""

    def __init__(self, spec: SynthSpec, tile: int) -> None:
        self.spec = spec
        self.tile = tile
        self.textures: dict[int, list[np.ndarray]] = {}

    def texture(self, ds: int, variant: int) -> np.ndarray:
        if ds not in self.textures:
            self.textures[ds] = [self._make_texture(ds, v) for v in range(_TEXTURE_VARIANTS)]
        return self.textures[ds][variant]

    def _make_texture(self, ds: int, variant: int) -> np.ndarray:
        t = self.tile
        rng = np.random.default_rng([self.spec.seed, ds, variant])
        img = np.broadcast_to(EOSIN, (t, t, 3)).copy()
        img += rng.normal(0, 4, (t, t, 1)).astype(np.float32)
        nucleus_px = 3.0 / (self.spec.mpp * ds)  # nucleus radius ~3 µm
        if nucleus_px >= 1.5:
            r = math.ceil(nucleus_px)
            wy, wx = np.mgrid[-r : r + 1, -r : r + 1]
            stamp = wx**2 + wy**2 <= nucleus_px**2
            count = int(t * t / (30 * nucleus_px * nucleus_px))
            padded = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
            for cx, cy in rng.integers(0, t, (count, 2)):
                window = padded[cy : cy + 2 * r + 1, cx : cx + 2 * r + 1]
                window[stamp] = HEMATOXYLIN + rng.normal(0, 6)
            img = padded[r:-r, r:-r]
        else:  # nuclei below a pixel: their stain averages into the colour
            img = img * 0.9 + HEMATOXYLIN * 0.1
        return np.clip(img, 0, 255)

    def render(self, ds: int, tx: int, ty: int) -> np.ndarray:
        t = self.tile
        s = self.spec
        yy, xx = np.mgrid[0:t, 0:t].astype(np.float64)
        x0 = (tx * t + xx + 0.5) * ds
        y0 = (ty * t + yy + 0.5) * ds
        inside = np.zeros((t, t), bool)
        for r in s.regions:
            inside |= r.contains(x0, y0)
        for h in s.holes:
            inside &= ~h.contains(x0, y0)
        inside &= (x0 < s.width) & (y0 < s.height)
        img = np.where(inside[..., None], self.texture(ds, _variant(tx, ty)), np.float32(255))
        for f in s.figures:
            if abs(f.x - x0[0, 0]) < (t + 2) * ds + f.radius and abs(f.y - y0[0, 0]) < (t + 2) * ds + f.radius:
                # Anti-aliased disk so that low levels keep a proportionally dark spot.
                dist = np.hypot(x0 - f.x, y0 - f.y)
                cover = np.clip((f.radius - dist) / ds + 0.5, 0, 1)[..., None]
                img = img * (1 - cover) + FIGURE_RGB * cover
        for p in s.pen:
            img = np.where(p.contains(x0, y0)[..., None], PEN_RGB, img)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _variant(tx: int, ty: int) -> int:
    return (tx * 7919 + ty * 104729) % _TEXTURE_VARIANTS


def _encode(tile: np.ndarray) -> bytes:
    return bytes(imagecodecs.jpeg8_encode(tile, level=_JPEG_QUALITY, subsampling=(1, 1)))


def _level_tiles(spec: SynthSpec, renderer: _Renderer, ds: int) -> Iterator[bytes]:
    """Encoded tiles of one level in TIFF order; uniform tiles reuse cached encodings."""
    t = renderer.tile
    lw, lh = math.ceil(spec.width / ds), math.ceil(spec.height / ds)
    nx, ny = math.ceil(lw / t), math.ceil(lh / t)
    ty_idx, tx_idx = np.mgrid[0:ny, 0:nx]
    tx_flat, ty_flat = tx_idx.ravel(), ty_idx.ravel()
    x0, y0 = tx_flat * t * ds, ty_flat * t * ds
    boxes = shapely.box(x0, y0, x0 + t * ds, y0 + t * ds)
    margin = 2.0 * ds
    tissue = spec.tissue_geometry()
    specials = [p.geometry() for p in spec.pen] + [Point(f.x, f.y).buffer(f.radius) for f in spec.figures]
    special = shapely.union_all(specials).buffer(margin) if specials else None
    anything = shapely.union_all([tissue, *(specials or [])]).buffer(margin)
    shapely.prepare(anything)
    blank = ~shapely.intersects(anything, boxes)
    inner = tissue.buffer(-margin)
    shapely.prepare(inner)
    full = shapely.contains(inner, boxes) & (x0 + t * ds <= spec.width) & (y0 + t * ds <= spec.height)
    if special is not None:
        full &= ~shapely.intersects(special, boxes)
    white = _encode(np.full((t, t, 3), 255, np.uint8))
    textures = [
        _encode(np.clip(renderer.texture(ds, v) + 0.5, 0, 255).astype(np.uint8)) for v in range(_TEXTURE_VARIANTS)
    ]
    for i in range(tx_flat.size):
        if blank[i]:
            yield white
        elif full[i]:
            yield textures[_variant(int(tx_flat[i]), int(ty_flat[i]))]
        else:
            yield _encode(renderer.render(ds, int(tx_flat[i]), int(ty_flat[i])))


def _thumbnail(spec: SynthSpec, renderer: _Renderer, ds_top: int) -> np.ndarray:
    """A small stripped page that OpenSlide lists as the `thumbnail` associated image."""
    t = renderer.tile
    lw, lh = math.ceil(spec.width / ds_top), math.ceil(spec.height / ds_top)
    nx, ny = math.ceil(lw / t), math.ceil(lh / t)
    rows = [np.concatenate([renderer.render(ds_top, x, y) for x in range(nx)], axis=1) for y in range(ny)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:lh, :lw])


def write_synthetic_slide(
    path: str | os.PathLike[str], spec: SynthSpec, tile: int = 256, record_mpp: str = "aperio"
) -> Path:
    """Write `spec` as an Aperio-flavoured pyramidal TIFF at `path` (plus `<stem>.truth.json`); returns the path.

    `record_mpp`: "aperio" (MPP in the Aperio description, as scanners write it), "tiff-tags" (only TIFF
    resolution tags) or "none" (no µm/px anywhere, like some TCGA files).
    """
    if record_mpp not in ("aperio", "tiff-tags", "none"):
        raise ValueError(f"record_mpp must be aperio, tiff-tags or none, got {record_mpp!r}")
    path = Path(path)
    renderer = _Renderer(spec, tile)
    downsamples = level_downsamples(spec.width, spec.height)
    mag = round(10.0 / spec.mpp)
    description = (
        f"Aperio Image Library v10.0.50 (wsi-pipeline synthetic)\r\n{spec.width}x{spec.height} "
        f"[0,0 {spec.width}x{spec.height}] ({tile}x{tile}) JPEG/RGB Q={_JPEG_QUALITY}"
        + (f"|AppMag = {mag}|MPP = {spec.mpp}" if record_mpp == "aperio" else "")
        + f"|Synthetic seed = {spec.seed}"
    )
    bigtiff = spec.width * spec.height * 3 > 2**31
    common: _LevelOptions = dict(
        dtype="uint8",
        tile=(tile, tile),
        photometric="ycbcr",
        subsampling=(1, 1),
        compression="jpeg",
        metadata=None,
    )
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for index, ds in enumerate(downsamples):
            shape = (math.ceil(spec.height / ds), math.ceil(spec.width / ds), 3)
            desc = description if index == 0 else f"{description} -> {shape[1]}x{shape[0]}"
            resolution: _Resolution = (
                {"resolution": (1e4 / (spec.mpp * ds),) * 2, "resolutionunit": "CENTIMETER"}
                if record_mpp == "tiff-tags"
                else {}
            )
            tw.write(_level_tiles(spec, renderer, ds), shape=shape, description=desc, **common, **resolution)
            if index == 0:
                thumb = _thumbnail(spec, renderer, downsamples[-1] * (2 if len(downsamples) > 1 else 4))
                tw.write(thumb, photometric="rgb", description=f"{description} -> thumbnail", metadata=None)
    write_truth(path, spec)
    return path


def truth_path(slide_path: str | os.PathLike[str]) -> Path:
    p = Path(slide_path)
    return p.with_name(p.stem + ".truth.json")


def write_truth(slide_path: Path, spec: SynthSpec) -> None:
    truth = {
        "spec": asdict(spec),
        "tissue_geojson": mapping(spec.tissue_geometry()),
        "tissue_area_um2": spec.tissue_area_um2(),
        "figures": [[f.x, f.y] for f in spec.figures],
    }
    with atomic_path(truth_path(slide_path)) as tmp:
        tmp.write_text(json.dumps(truth))


def read_truth(slide_path: str | os.PathLike[str]) -> SynthSpec:
    data = json.loads(truth_path(slide_path).read_text())["spec"]
    return SynthSpec(
        data["width"],
        data["height"],
        data["mpp"],
        data["seed"],
        [Ellipse(**e) for e in data["regions"]],
        [Ellipse(**e) for e in data["holes"]],
        [PenStroke(**p) for p in data["pen"]],
        [Figure(**f) for f in data["figures"]],
    )
