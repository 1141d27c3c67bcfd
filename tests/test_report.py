"""Outputs people open, from one real run over a folder (two synthetic slides with planted figures and a slide
OpenSlide refuses): valid OME-Zarr 0.5 read back level by level, overlay pictures, the cohort report in a real
headless Chromium, the batch progress lines, and the QuPath import script's file names."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import regex
import zarr
from PIL import Image

from tests.helpers import DICOM, run_cli
from wsi_pipeline.core.layout import SLIDE_EXTENSIONS, slide_id_for
from wsi_pipeline.models.demo import write_figure_detector
from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
GROOVY = ROOT / "workflows" / "qupath" / "import_wsi_pipeline.groovy"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("report")
    slides = root / "slides"
    write_synthetic_slide(slides / "case A.svs", default_layout(4000, 3000, 0.25, seed=5, n_figures=8, pen=True))
    write_synthetic_slide(slides / "case-b.svs", default_layout(3600, 3200, 0.25, seed=9, n_figures=3))
    shutil.copy(DICOM, slides / "broken.dcm")
    model = write_figure_detector(root / "model", 0.25)
    out = root / "out"
    result = run_cli(
        "run", str(slides), "-o", str(out), "--workers", "1", "--no-progress", "--device", "cpu",
        "--set", f"tasks.mitosis.model={model}", "--set", "tasks.mitosis.smooth_sigma_um=3",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # the broken slide fails, the others are done
    return out, result.stderr


def _done(out: Path) -> list[dict[str, str]]:
    return [r for r in csv.DictReader((out / "manifest.csv").open()) if r["status"] == "done"]


def test_every_heatmap_is_valid_ome_zarr_0_5_and_reads_back_level_by_level(finished_run: tuple[Path, str]) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.bioformats2raw import BioFormats2RawAttrs
    from ome_zarr_models.v05.image import Image as NgffImage

    out, _ = finished_run
    assert len(_done(out)) == 2
    for row in _done(out):
        store = out / row["slide_id"] / "heatmaps.zarr"
        names = sorted(p.name for p in store.iterdir() if p.is_dir() and p.name != "OME")
        # each task's classes, the tissue, quality control, and the domain images of the two guarded models
        domain = ["domain-epithelium_stroma", "domain-metastasis"]
        assert names == [*domain, "epithelium", "mitosis", "normal", "qc", "stroma", "tissue", "tumour"]
        root = zarr.open_group(str(store), mode="r")
        assert BioFormats2RawAttrs.model_validate(root.attrs["ome"]).bioformats2raw_layout == 3
        assert zarr.open_group(str(store / "OME"), mode="r").attrs["ome"]["series"] == names
        for name in names:
            group = zarr.open_group(str(store / name), mode="r")
            image = NgffImage.from_zarr(group)  # raises on any NGFF 0.5 violation (dimension_names included)
            axes = [a.name for a in image.ome_attributes.multiscales[0].axes]
            nodes = list(Reader(parse_url(str(store / name)))())
            levels = nodes[0].data
            assert len(levels) == len(image.ome_attributes.multiscales[0].datasets) >= 3
            for index, level in enumerate(levels):
                array = group[str(index)]
                assert tuple(array.metadata.dimension_names) == tuple(axes) == ("c", "y", "x")
                assert np.array_equal(np.asarray(level), array[:])


def test_overlays_show_the_heatmap_only_on_tissue(finished_run: tuple[Path, str]) -> None:
    out, _ = finished_run
    for row in _done(out):
        folder = out / row["slide_id"]
        for task in ("epithelium_stroma", "mitosis", "metastasis"):
            picture = Image.open(folder / f"overlay-{task}.png")
            assert max(picture.size) >= 1500 and picture.mode in ("RGB", "RGBA")
            pixels = np.asarray(picture.convert("RGB")).astype(np.uint32)
            colours = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
            assert len(np.unique(colours)) > 1000  # a picture, not a blank page
        assert (folder / "overview.png").is_file()


def test_report_in_a_real_browser(finished_run: tuple[Path, str]) -> None:
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:  # CI installs it (.ci/run): there a missing browser is a failure, not a skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no Chromium on PATH: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    out, _ = finished_run
    manifest = list(csv.DictReader((out / "manifest.csv").open()))
    summaries = {r["slide_id"]: json.loads((out / r["slide_id"] / "summary.json").read_text()) for r in _done(out)}
    report = out / "report.html"
    assert "http://" not in report.read_text() and "https://" not in report.read_text()  # nothing from a network
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        headers = page.locator("#slides thead th").all_inner_texts()

        def table() -> list[dict[str, str]]:
            return [dict(zip(headers, r, strict=True)) for r in page.evaluate(
                "Array.from(document.querySelectorAll('#slides tbody tr')).map("
                "r => Array.from(r.cells).map(c => c.innerText.trim()))"
            )]  # fmt: skip

        rows = table()
        assert sorted(r["slide"] for r in rows) == sorted(m["slide_id"] for m in manifest)
        by_id = {r["slide"]: r for r in rows}
        assert by_id["broken"]["status"] == "failed" and "OpenSlide cannot read" in by_id["broken"]["error"]
        for slide_id, summary in summaries.items():
            row = by_id[slide_id]
            assert row["status"] == "done"
            assert int(row["mitoses"]) == summary["mitosis"]["count"]
            for header, task, key in (("epithelium fraction", "epithelium_stroma", "epithelium_fraction"),
                                      ("metastasis", "metastasis", "category")):  # fmt: skip
                if "not_applicable" in summary[task]:  # withheld by the domain guard: said, not left blank
                    assert row[header] == "not applicable"
                elif key == "category":
                    assert row[header] == summary[task][key]
                else:
                    assert float(row[header]) == pytest.approx(summary[task][key], rel=1e-3)
            assert float(row["tissue mm²"]) == pytest.approx(summary["tissue_area_mm2"], rel=1e-3)
        page.locator("#slides thead th", has_text="mitoses").first.click()
        counts = [r["mitoses"] for r in table()]
        assert counts == [*sorted(counts[:2], key=int), ""]  # ascending, the failed slide (no figure) last
        page.locator("#slides thead th", has_text="mitoses").first.click()
        assert [r["mitoses"] for r in table()][:2] == sorted(counts[:2], key=int, reverse=True)
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
        )
        assert len(images) == 2 * 5 and all(ok for _, ok in images)  # overview, 3 overlays, the QC overlay per slide
        links = page.evaluate(
            "Array.from(document.querySelectorAll('section.slide a')).map(a => a.getAttribute('href'))"
        )
        assert all((out / href).exists() for href in links) and any(h.endswith("qupath.geojson") for h in links)
        assert "tasks:" in page.locator("#run-record pre").inner_text()
        page.screenshot(path=str(out / "report-screenshot.png"), full_page=False)
        browser.close()
    assert problems == []


def test_batch_progress_lines(finished_run: tuple[Path, str]) -> None:
    _, stderr = finished_run
    lines = [line for line in stderr.splitlines() if line.startswith("slides ")]
    assert [line.split(" done")[0] for line in lines] == ["slides 1/3", "slides 2/3", "slides 3/3"]
    assert all(re.search(r"elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|unknown)$", line) for line in lines)
    assert "1 failed" in next(line for line in lines if "3/3" in line)


def test_qupath_script_names_the_files_the_run_wrote(finished_run: tuple[Path, str]) -> None:
    """The Groovy script cannot run here (no QuPath); its slide-id rule, extensions and file name are checked
    against what the run wrote."""
    out, _ = finished_run
    script = GROOVY.read_text()
    extensions = re.search(r"SLIDE_EXTENSIONS = \[([^\]]*)\]", script)
    assert extensions is not None
    assert tuple(e.strip(" '") for e in extensions.group(1).split(",")) == SLIDE_EXTENSIONS
    unsafe = re.search(r"UNSAFE = /(.+)/\n", script)
    assert unsafe is not None
    assert "new File(new File(RUN_FOLDER, slideId(fileName)), 'qupath.geojson')" in script

    def groovy_rule(name: str) -> str:  # the script's rule, transliterated; `regex` reads its \p{L} as Java does
        name = unicodedata.normalize("NFC", name)
        stem = next((name[: -len(e)] for e in SLIDE_EXTENSIONS if name.lower().endswith(e)), name)
        safe = re.sub(r"^[._]+|[._]+$", "", regex.sub(unsafe.group(1), "_", stem))
        return safe or "slide"

    for row in _done(out):
        name = Path(row["slide"]).name
        assert groovy_rule(name) == slide_id_for(name) == row["slide_id"]
        assert (out / groovy_rule(name) / "qupath.geojson").is_file()
    tricky = ("x/slide name (copy).ome.tiff", "/x/..svs", "a.b.SVS", "a é b.svs", "e\u0301 ½ 日本.ndpi", "Ωmega².tif")
    for name in tricky:
        assert groovy_rule(Path(name).name) == slide_id_for(name)
    assert slide_id_for("a é b.svs") != slide_id_for("a b.svs")  # non-ASCII letters are kept, not dropped
