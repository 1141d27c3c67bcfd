"""The console commands, run for real in a subprocess on every slide in ../shared/data/slides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import CMU, DICOM, NDPI, TCGA, run_cli

pytestmark = pytest.mark.e2e  # the CLI in subprocesses / whole runs


def test_info_json_on_real_slides(data_dir: Path) -> None:
    result = run_cli("info", str(CMU), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["dimensions"] == [2220, 2967] and data["mpp"]["source"] == "slide metadata"
    ndpi = json.loads(run_cli("info", str(NDPI), "--json").stdout)
    assert ndpi["level_count"] == 7 and ndpi["vendor"] == "hamamatsu"
    text = run_cli("info", str(CMU))
    assert "0.4990 x 0.4990 µm/px (slide metadata)" in text.stdout


def test_info_without_mpp_reports_then_fails(data_dir: Path) -> None:
    result = run_cli("info", str(TCGA), "--json")
    assert result.returncode == 6
    assert json.loads(result.stdout)["mpp"] is None
    assert result.stderr.count("error:") == 1 and "--mpp" in result.stderr
    ok = run_cli("info", str(TCGA), "--mpp", "1.0", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["mpp"]["source"] == "--mpp"


@pytest.mark.parametrize(
    ("make_path", "code", "words"),
    [
        (lambda tmp: tmp / "absent.svs", 3, "no such file"),
        (lambda tmp: DICOM, 4, "OpenSlide cannot read"),
    ],
)
def test_bad_slides_have_distinct_exit_codes(data_dir: Path, tmp_path: Path, make_path, code: int, words: str) -> None:
    for command in (
        ["info"],
        ["tissue", "-o", str(tmp_path / "o")],
        ["tiles", "-o", str(tmp_path / "o"), "--task", "metastasis"],
    ):
        result = run_cli(command[0], str(make_path(tmp_path)), *command[1:])
        assert result.returncode == code, (command, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr


def test_truncated_slide_exit_code(data_dir: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.svs"
    cut.write_bytes(CMU.read_bytes()[:1_000_000])
    result = run_cli("tissue", str(cut), "-o", str(tmp_path / "o"))
    assert result.returncode == 5 and "truncated" in result.stderr
    assert not (tmp_path / "o" / "cut").exists() or not any((tmp_path / "o" / "cut").iterdir())


def test_tissue_and_tiles_on_every_readable_slide(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    expectations = {CMU: [], NDPI: [], TCGA: ["--slide-mpp", "1.0"]}
    for slide, extra in expectations.items():
        tissue = run_cli("tissue", str(slide), "-o", str(out), *extra)
        assert tissue.returncode == 0, tissue.stderr
        tiles = run_cli("tiles", str(slide), "-o", str(out), "--mpp", "0.5", "--tile-px", "224", *extra)
        assert tiles.returncode == 0, tiles.stderr
        slide_dir = out / slide.name.rsplit(".", 1)[0]
        names = {p.name for p in slide_dir.iterdir()}
        assert {
            "tissue.geojson",
            "tissue_mask.png",
            "overview.png",
            "tissue.json",
            "tiles-0.5um-224px.json",
            "tiles-0.5um-224px.geojson",
            "tiles-0.5um-224px.png",
        } <= names
    cmu = json.loads((out / "CMU-1-Small-Region" / "tissue.json").read_text())
    assert 0.55 < cmu["area_mm2"] < 0.75
    plan = json.loads((out / "CMU-1-Small-Region" / "tiles-0.5um-224px.json").read_text())
    assert plan["grid"] == [10, 14] and plan["params"]["tile_px"] == 224


def test_tiles_from_task_config_with_override(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "tiles",
        str(CMU),
        "-o",
        str(tmp_path),
        "--task",
        "mitosis",
        "--set",
        "tasks.mitosis.tile_px=256",
        "--set",
        "tasks.mitosis.overlap_px=0",
        "--min-tissue",
        "0",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "CMU-1-Small-Region" / "tiles-mitosis.json").read_text())
    assert plan["params"]["tile_px"] == 256 and plan["params"]["mpp"] == 0.25
    # the configured overlap 0 is raised to twice the dense model's 32 px halo, as `run` reads it: 2220 x 2967 px at
    # 0.499 -> 4431 x 5922 px at 0.25 -> steps of 192 px: ceil((4431 - 64) / 192) x ceil((5922 - 64) / 192)
    assert plan["params"]["overlap_px"] == 64
    assert plan["grid"] == [23, 31] and plan["count"] == 23 * 31


def test_task_tiles_follow_the_model_card_and_a_conflicting_value_is_refused(data_dir: Path, tmp_path: Path) -> None:
    from wsi_pipeline.models.loading import default_model_dir, load_card

    card = load_card(default_model_dir("epithelium_stroma"))
    result = run_cli("tiles", str(CMU), "-o", str(tmp_path), "--task", "epithelium_stroma")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "CMU-1-Small-Region" / "tiles-epithelium_stroma.json").read_text())
    assert (plan["params"]["mpp"], plan["params"]["tile_px"]) == (card.mpp, card.tile_px)
    wrong = run_cli(
        "predict", str(CMU), "-o", str(tmp_path), "--task", "epithelium_stroma", "--set",
        f"tasks.epithelium_stroma.tile_px={card.tile_px + 74}", "--device", "cpu",
    )  # fmt: skip
    assert wrong.returncode == 7, wrong.stderr
    assert f"tasks.epithelium_stroma.tile_px is {card.tile_px + 74} but classifier" in wrong.stderr
    assert f"expects {card.tile_px} px tiles" in wrong.stderr
    assert not (tmp_path / "CMU-1-Small-Region" / "heatmaps.zarr").exists()


def test_config_errors_name_the_key() -> None:
    result = run_cli("config", "--set", "tasks.mitosis.tile_pz=3")
    assert result.returncode == 7
    assert "tasks.mitosis.tile_pz: unknown key" in result.stderr
    assert run_cli("config").returncode == 0


def test_no_tissue_exit_code(tmp_path: Path) -> None:
    from wsi_pipeline.slide.synth import SynthSpec, write_synthetic_slide

    empty = write_synthetic_slide(tmp_path / "empty.svs", SynthSpec(2000, 1500, 0.5))
    result = run_cli("tissue", str(empty), "-o", str(tmp_path / "o"))
    assert result.returncode == 8 and "no tissue" in result.stderr


def test_help_lists_every_command_with_its_whole_first_sentence() -> None:
    """`wsi-pipeline --help` cut each description to one line with '...' (the probe's 'rough edge')."""
    from wsi_pipeline.cli import main

    text = run_cli("--help").stdout
    listing = text[text.index("Commands:") :]
    assert "..." not in listing and "…" not in listing
    flat = "".join(listing.split())  # the wrapping may break a line after a hyphen
    for name, command in main.commands.items():
        assert name + "".join(command.get_short_help_str(limit=1000).split()) in flat, name
