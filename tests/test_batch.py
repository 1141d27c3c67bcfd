"""Slide discovery, unique ids and the µm/px override file."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.batch import assign_ids, discover, read_mpp_file
from wsi_pipeline.errors import ConfigError


def test_discover_files_folders_and_globs(tmp_path: Path) -> None:
    for name in ("a/x.svs", "a/deep/y.NDPI", "a/notes.txt", "a/.hidden.svs", "b/x.svs", "c/z.tif"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = discover(
        [
            str(tmp_path / "a"),
            str(tmp_path / "b" / "*.svs"),
            str(tmp_path / "c" / "z.tif"),
            str(tmp_path / "missing.svs"),
            str(tmp_path / "a" / "x.svs"),
        ]
    )
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == ["a/deep/y.NDPI", "a/x.svs", "b/x.svs", "c/z.tif", "missing.svs"]  # sorted per input, unique


def test_ids_are_unique_and_stable(tmp_path: Path) -> None:
    paths = [tmp_path / "a" / "x.svs", tmp_path / "b" / "x.svs", tmp_path / "c" / "z.tif"]
    ids = assign_ids(paths)
    assert ids[paths[2]] == "z"
    assert ids[paths[0]] != ids[paths[1]] and ids[paths[0]].startswith("x-") and len(ids[paths[0]]) == 8
    assert assign_ids(paths) == ids


def test_mpp_file(tmp_path: Path) -> None:
    good = tmp_path / "mpp.csv"
    good.write_text("slide,mpp\nTCGA-1.svs,1.0\ncase-2,0.25\n")
    assert read_mpp_file(good) == {"TCGA-1.svs": 1.0, "case-2": 0.25}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,res\nx,1\n")
    with pytest.raises(ConfigError, match="columns slide,mpp"):
        read_mpp_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_mpp_file(tmp_path / "absent.csv")
