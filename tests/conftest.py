"""Shared fixtures: the real data in ../shared/data and synthetic slides made by the project's generator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import DATA, SLIDES
from wsi_pipeline.slide.synth import SynthSpec, default_layout, write_synthetic_slide


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
