"""Each fast path of the exports equals, to the byte, the plain computation it replaced (issue #36: the fixed cost
per slide): the overlay's blend on the shown pixels alone, pyramids averaged in memory, QuPath tiles without a
shapely box each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr

from wsi_pipeline import heatmap
from wsi_pipeline.export import figures
from wsi_pipeline.export.qupath import feature, object_id, tile_features


def plain_blend(fig: figures.OverlayFigure, alpha: float) -> np.ndarray:
    """The whole image in float64, as the figure was first computed."""
    table = figures._colour_table()
    shown = fig.tissue & np.isfinite(fig.values)
    index = np.rint(np.clip(np.nan_to_num(fig.values), 0.0, 1.0) * 255).astype(np.intp)
    blended = np.where(shown[..., None], (1 - alpha) * fig.image + alpha * table[index], fig.image)
    if fig.outside is not None and fig.outside.any():
        grey = fig.image.mean(axis=-1, keepdims=True) * 0.5 + 110
        rows, cols = np.indices(fig.outside.shape)
        shade = np.where(((rows + cols) % 10 < 2)[..., None], grey - 70, grey)
        blended = np.where(fig.outside[..., None], shade, blended)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("tissue_share", [0.0, 0.05, 0.6, 1.0])
def test_the_blend_on_shown_pixels_equals_the_whole_image_blend(tissue_share: float) -> None:
    rng = np.random.default_rng(int(tissue_share * 100))
    h, w = 301, 457
    values = rng.random((h, w)) * 1.4 - 0.2
    values[rng.random((h, w)) < 0.1] = np.nan
    tissue = rng.random((h, w)) < tissue_share
    for outside in (None, tissue & (rng.random((h, w)) < 0.3)):
        fig = figures.OverlayFigure(
            title="t",
            image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            values=values,
            tissue=tissue,
            value_label="v",
            um_per_px=1.0,
            outside=outside,
        )
        assert np.array_equal(figures._blend(fig, 0.6), plain_blend(fig, 0.6))


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_pyramids_averaged_in_memory_equal_those_averaged_by_dask(
    dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    level0 = (rng.random((2, 701, 533)) * (255 if dtype == "uint8" else 1)).astype(dtype)
    levels = {}
    for name, limit in (("memory", heatmap.IN_MEMORY_LEVEL_BYTES), ("dask", 0)):
        monkeypatch.setattr(heatmap, "IN_MEMORY_LEVEL_BYTES", limit)
        group = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=3)
        group.create_array("0", shape=level0.shape, chunks=(1, 128, 128), dtype=dtype)[...] = level0
        count = heatmap.build_pyramid(group, 128)
        levels[name] = [np.asarray(group[str(i)]) for i in range(count)]
    assert len(levels["memory"]) == len(levels["dask"]) == 4
    for a, b in zip(levels["memory"], levels["dask"], strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_tiles_as_qupath_objects_equal_a_shapely_box_each() -> None:
    rng = np.random.default_rng(5)
    xy = rng.random((5000, 2)) * 90_000  # more tiles than one chunk of corners
    probabilities = rng.random(5000)
    tiles = [(i % 70, i // 70, x, y, {"p": float(probabilities[i])}) for i, (x, y) in enumerate(xy)]
    tiles[7] = (7, 0, tiles[7][2], tiles[7][3], {"p": float("nan")})
    size, offset = (223.7, 224.1), (1032.17, 17.5)
    fast = list(tile_features("s", "epithelium_stroma", iter(tiles), size, offset))
    plain = [
        feature(
            shapely.box(x, y, x + size[0], y + size[1]),
            "tile",
            object_id_=object_id("s", "epithelium_stroma", col, row),
            name="epithelium_stroma",
            measurements=m,
            offset=offset,
        )
        for col, row, x, y, m in tiles
    ]
    assert json.dumps(fast) == json.dumps(plain)


@pytest.mark.parametrize(
    ("box", "size"),
    [
        ((0.0, 0.0, 2220.0, 2967.0), (138, 185)),
        ((0.3, 1.7, 2219.1, 2960.2), (555, 741)),
        ((0.5, 0.5, 95.5, 95.5), (48, 48)),
    ],
)
def test_area_mean_in_bands_equals_one_product(
    data_dir: Path, box: tuple[float, ...], size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact area mean converts its block to float32 a band of output rows at a time: each output row sums the
    same input rows in the same order as the one product over the whole block, so the pixels are equal to the bit
    (two reads of one pixel must agree), whatever the band."""
    from scipy import sparse

    from wsi_pipeline.slide import Slide, resample

    slide = Slide(data_dir / "slides" / "CMU-1-Small-Region.svs")
    block = slide.read_region(0, 0, 2220, 2967, slide.mpp.mean)
    w, h = size
    weights = resample._area_weights(box[1], (box[3] - box[1]) / h, h, block.shape[0])
    whole = weights @ block.reshape(block.shape[0], -1).astype(np.float32)
    assert isinstance(weights, sparse.csr_matrix)
    for band_values in (1 << 21, 1 << 14, 1):  # the default, a few rows, one output row a band
        monkeypatch.setattr(resample, "VALUES_AT_ONCE", band_values)
        banded = resample._rows_mean(weights, block.reshape(block.shape[0], -1))
        assert banded.dtype == np.float32 and np.array_equal(banded, whole)
    assert resample.area_mean(block, box, size).shape == (h, w, 3)
