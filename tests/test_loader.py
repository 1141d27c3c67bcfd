"""The tile loader: reading threads (the default) give exactly the batches that one thread and DataLoader worker
processes give, in plan order, for both real backends; a read that fails raises its own error in the caller; no
reading thread outlives its pass, whether it ends, fails or is left early."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CMU, damage_tile
from wsi_pipeline.core.errors import SlideTruncatedError
from wsi_pipeline.engine import make_loader
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import plan_tiles
from wsi_pipeline.slide.tissue import detect_tissue
from wsi_pipeline.slide.tissue_config import TissueConfig

CPU = torch.device("cpu")


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tile-reader")]


def _batches(loader) -> list[tuple[np.ndarray, np.ndarray]]:  # type: ignore[no-untyped-def]
    return [(indices.numpy().copy(), tiles.numpy().copy()) for indices, tiles in loader]


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_threads_read_what_one_thread_and_worker_processes_read(data_dir: Path, backend: str) -> None:
    slide = Slide(CMU, backend=backend)
    # 0.972 µm/px from 0.499: a resampled read; 96 px tiles, batches of 7 so the last one is short
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), 0.972, 96, 0, 0.1)
    threads = _batches(make_loader(slide, plan, 7, 2, CPU, "threads"))
    serial = _batches(make_loader(slide, plan, 7, 0, CPU, "threads"))
    processes = _batches(make_loader(slide, plan, 7, 2, CPU, "processes"))
    assert len(plan) > 50 and len(threads) == -(-len(plan) // 7) and len(threads[-1][0]) == (len(plan) % 7 or 7)
    assert np.array_equal(np.concatenate([i for i, _ in threads]), np.arange(len(plan)))
    for (i_t, t_t), (i_s, t_s), (i_p, t_p) in zip(threads, serial, processes, strict=True):
        assert np.array_equal(i_t, i_s) and np.array_equal(i_t, i_p)
        assert t_t.shape == (len(i_t), 3, 96, 96) and t_t.dtype == np.uint8
        assert np.array_equal(t_t, t_s) and np.array_equal(t_t, t_p)
    first = int(threads[0][0][0])
    direct = slide.read_region(float(plan.x[first]), float(plan.y[first]), 96, 96, 0.972)
    assert np.array_equal(threads[0][1][0].transpose(1, 2, 0), direct)
    assert not _readers()


def test_a_failed_read_raises_its_error_and_leaves_no_thread(data_dir: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.svs"
    tx, ty = damage_tile(CMU, damaged, 0, 20)
    slide = Slide(damaged, backend="tifffile")
    tissue = detect_tissue(Slide(CMU), TissueConfig())  # the intact copy's (the damaged tile lies in the overview)
    plan = plan_tiles(slide, tissue, slide.mpp.x, 240, 0, 0.0)
    with pytest.raises(SlideTruncatedError) as err:
        _batches(make_loader(slide, plan, 4, 2, CPU))
    assert f"stored tile ({tx}, {ty}) of level 0" in str(err.value)
    assert not _readers()


def test_leaving_a_pass_early_stops_its_threads(data_dir: Path) -> None:
    slide = Slide(CMU)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), 0.5, 64, 0, 0.1)
    reads = iter(make_loader(slide, plan, 4, 2, CPU))
    indices, _ = next(reads)
    assert indices.tolist() == [0, 1, 2, 3] and _readers()
    reads.close()  # what the engine does when a slide fails or is interrupted
    assert not _readers()
