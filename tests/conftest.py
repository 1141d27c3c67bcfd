"""Shared fixtures: the real data in ../shared/data and synthetic slides made by the project's generator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_pipeline.synth import SynthSpec, default_layout, write_synthetic_slide

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("WSI_SHARED_DATA", ROOT.parent / "shared" / "data"))
SLIDES = DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
NDPI = SLIDES / "Hamamatsu-fluorescence-DAPI.ndpi"
DICOM = SLIDES / "DICOM-column-major-unreadable-by-openslide.dcm"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data; missing data skips locally (with the reason) but fails in CI, where it must be present."""
    if not SLIDES.is_dir():
        message = f"real test data not found at {DATA} (set WSI_SHARED_DATA or check out ../shared)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return DATA


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSpec]:
    """A 6000 x 4000 px slide at 0.5 µm/px with a pen stroke and 12 planted figures."""
    spec = default_layout(6000, 4000, 0.5, seed=3, n_figures=12, pen=True)
    path = write_synthetic_slide(tmp_path_factory.mktemp("synth") / "synthetic.svs", spec)
    return path, spec


@pytest.fixture(scope="session")
def huge_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSpec]:
    """A 100 000 x 80 000 px slide at 0.25 µm/px (about 0.8 GB on disk, ~40 s to write)."""
    spec = default_layout(100_000, 80_000, 0.25, seed=11, n_figures=0, pen=True)
    path = write_synthetic_slide(tmp_path_factory.mktemp("huge") / "huge.svs", spec)
    return path, spec


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "wsi_pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def stitched_and_whole_region(slide, plan, model, store: Path, workers: int = 2):  # type: ignore[no-untyped-def]
    """A dense model's `mitosis` map stitched by the engine from `plan`, and the same network run once on the whole
    grid region (what stitching must reproduce), both as float32 arrays."""
    import torch

    from wsi_pipeline.engine import TaskRequest, predict_slide
    from wsi_pipeline.heatmap import open_heatmap

    device = torch.device("cpu")
    request = TaskRequest("mitosis", model, plan, dtype="float32")
    predict_slide(slide, [request], store, device=device, batch_size=16, workers=workers, progress=False)
    stitched = open_heatmap(store / "mitosis").channel("mitosis")
    tile, overlap = plan.params["tile_px"], plan.params["overlap_px"]
    n_cols, n_rows = plan.grid
    width, height = (n_cols - 1) * (tile - overlap) + tile, (n_rows - 1) * (tile - overlap) + tile
    rgb = slide.read_region(slide.bounds.x, slide.bounds.y, width, height, plan.params["mpp"])
    norm = model.card.normalisation
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        reference = torch.sigmoid(model.module(x))[0, 0].numpy()
    return stitched, reference
