"""`OUT/report.html`: the cohort at a glance, a static page that opens from disk (no server, no network, no external
scripts or fonts): a sortable table of slides, each slide's overview and overlays, links to its files, and the run
record (configuration, versions, timings). Reads finished files only; rewritten atomically."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wsi_pipeline.core.atomic import write_text
from wsi_pipeline.core.layout import RunLayout, SlideLayout

RECORDED_MPP = ("slide metadata", "TIFF resolution tags")  # µm/px sources that are the file's own
SLIDE_FILES = ("summary.json", "qupath.geojson", "mitoses.csv", "heatmaps.zarr", "run.json", "tissue.geojson")


@dataclass(frozen=True)
class Column:
    """A table column: a key of summary.json (`task` None: the slide's own) and its header."""

    task: str | None
    key: str
    header: str
    optional: bool = False  # shown only when some slide has a value (a slide model's answer)


@dataclass
class SlideRow:
    manifest: dict[str, str]  # slide, slide_id, status, error, seconds, tiles
    summary: dict[str, Any] | None
    record: dict[str, Any] | None
    folder: SlideLayout


def read_rows(out: Path, manifest: Sequence[dict[str, str]]) -> list[SlideRow]:
    """Every manifest row with its slide's summary and run record when they exist."""
    layout = RunLayout(out)
    rows = []
    for entry in manifest:
        folder = layout.slide(entry["slide_id"])
        summary = _json(folder.summary) if entry["status"] in ("done", "skipped") else None
        rows.append(SlideRow(entry, summary, _json(folder.run_record) if summary else None, folder))
    return rows


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cell(value: Any) -> tuple[str, str]:
    """(shown text, sort key): numbers sort as numbers, empty cells last."""
    if value is None or value == "":
        return "", ""
    if isinstance(value, bool):
        return str(value), str(value)
    if isinstance(value, int | float):
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text, repr(float(value))
    return str(value), str(value)


def _value(row: SlideRow, column: Column) -> Any:
    if column.task is None:
        if column.key in row.manifest:
            raw = row.manifest[column.key]
            try:
                return float(raw) if column.key == "seconds" else raw
            except ValueError:
                return raw
        return (row.summary or {}).get(column.key)
    figures = _figures(row, column)
    if "not_applicable" in figures:  # withheld by the domain guard: said in the cell, not left blank
        return "not applicable"
    return figures.get(column.key)


def _figures(row: SlideRow, column: Column) -> dict[str, Any]:
    """The summary.json entry of the column's task ({} for the slide's own columns)."""
    return ((row.summary or {}).get(column.task) or {}) if column.task else {}


def _cell_class(row: SlideRow, column: Column) -> str:
    """A task's figure it found implausible (`flagged`) or withheld is marked, not only noted; so is a µm/px the
    file does not record (given by an option: every area and rate of the slide rests on it)."""
    if column.task is None and column.key == "mpp":
        source = _mpp_source(row)
        if source is not None and source.startswith("estimated"):
            return " estimated"
        return " given" if source is not None and source not in RECORDED_MPP else ""
    figures = _figures(row, column)
    if "not_applicable" in figures:
        return " withheld"
    return " flagged" if column.key in figures.get("flagged", []) else ""


def _mpp_source(row: SlideRow) -> str | None:
    return (row.summary or {}).get("mpp_source")


def _tooltip(row: SlideRow, column: Column) -> str:
    if column.task is None and column.key == "mpp" and (source := _mpp_source(row)):
        summary = row.summary or {}
        own = "" if source in RECORDED_MPP else ": the file records none of its own"
        parts = [f"µm/px {source}{own}" if source.startswith("estimated") else f"µm/px from {source}{own}"]
        if interval := summary.get("mpp_estimate_interval"):
            low, high = interval
            parts.append(f"the tissue's estimate: {summary['mpp_estimate']:.3g} µm/px (interval {low:.3g}-{high:.3g})")
        return "; ".join([*parts, *summary.get("mpp_warnings", [])])
    figures = _figures(row, column)
    if column.task == "qc":  # quality control: what each class took
        shares = figures.get("fractions") or {}
        parts = [f"{c.replace('_', ' ')} {100 * v:.1f} %" for c, v in shares.items() if v]
        measured = "; ".join(parts) or "no artefact found" if figures.get("measured") else figures.get("reason", "")
        return "; ".join([measured, *figures.get("warnings", [])])
    domain = figures.get("domain") or {}
    parts = [f"model domain: {domain['model_domain']}"] if "model_domain" in domain else []
    if domain.get("in_domain_fraction") is not None:
        parts.append(f"in domain {100 * domain['in_domain_fraction']:.0f} % of tissue")
    elif parts:
        parts.append("no domain guard: tissue unlike the model's is not flagged")
    parts += figures.get("warnings", [])
    return "; ".join(parts)


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right}
th{background:#f0f0f0;cursor:pointer;user-select:none}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}td.text{text-align:left}tr.failed{background:#fde8e8}
td.flagged{background:#fff0b3;font-weight:bold}td.given{background:#e3eefc;font-style:italic}td.estimated{background:#fde3c8;font-style:italic}td.withheld{color:#777;font-style:italic}
.slide{margin:2rem 0;border-top:1px solid #ccc;padding-top:1rem}.slide img{max-width:48%;margin:.3rem;
border:1px solid #ddd;vertical-align:top}pre{background:#f7f7f7;padding:.6rem;overflow:auto;max-height:30rem}
"""
_SCRIPT = """
document.querySelectorAll("#slides th").forEach(function (th, index) {
  th.addEventListener("click", function () {
    var body = document.querySelector("#slides tbody");
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    document.querySelectorAll("#slides th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    rows.sort(function (a, b) {
      var x = a.cells[index].dataset.sort, y = b.cells[index].dataset.sort;
      if (x === "" || y === "") { return x === y ? 0 : (x === "" ? 1 : -1); }
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return ascending ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def render_report(out: Path, rows: Sequence[SlideRow], columns: Sequence[Column], title: str) -> str:
    e = html.escape
    columns = [c for c in columns if not c.optional or any(_value(r, c) not in (None, "") for r in rows)]
    head = "".join(f'<th scope="col">{e(c.header)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            text, key = _cell(_value(row, column))
            kind = "text" if column.key in ("slide_id", "status", "error", "note", "category") else "num"
            if column.key == "slide_id" and row.summary is not None:
                text_html = f'<a href="#slide-{e(text)}">{e(text)}</a>'
            else:
                text_html = e(text)
            css_class = kind + _cell_class(row, column)
            tip = _tooltip(row, column)
            title = f' title="{e(tip)}"' if tip else ""
            cells.append(f'<td class="{css_class}" data-sort="{e(key)}"{title}>{text_html}</td>')
        css = ' class="failed"' if row.manifest["status"] == "failed" else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    sections = [_slide_section(out, row) for row in rows if row.summary is not None]
    record = next((r.record for r in rows if r.record), None)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{e(title)}</h1><p>{len(rows)} slide(s): "
        + ", ".join(f"{sum(r.manifest['status'] == s for r in rows)} {s}" for s in ("done", "skipped", "failed"))
        + ". Click a column header to sort.</p>"
        f'<table id="slides"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        + "".join(sections)
        + _run_record(record)
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )


def _slide_section(out: Path, row: SlideRow) -> str:
    e = html.escape
    slide_id = row.manifest["slide_id"]
    folder = row.folder.root
    pictures = [folder / "overview.png", *sorted(folder.glob("overlay-*.png"))]
    images = "".join(
        f'<a href="{e(_rel(out, p))}"><img src="{e(_rel(out, p))}" alt="{e(p.stem)} of {e(slide_id)}"></a>'
        for p in pictures
        if p.exists()
    )
    links = " · ".join(
        f'<a href="{e(_rel(out, folder / name))}">{e(name)}</a>' for name in SLIDE_FILES if (folder / name).exists()
    )
    timings = (row.record or {}).get("timings", {})
    timing_text = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items())
    return (
        f'<section class="slide" id="slide-{e(slide_id)}"><h2>{e(slide_id)}</h2>'
        f"<p>{e(row.manifest['slide'])}</p><p>{links}</p><p>{e(timing_text)}</p>{images}</section>"
    )


def _run_record(record: dict[str, Any] | None) -> str:
    if not record:
        return ""
    e = html.escape
    config = yaml.safe_dump(record.get("config", {}), sort_keys=False)
    versions = "".join(f"<li>{e(k)} {e(str(v))}</li>" for k, v in record.get("versions", {}).items())
    return (
        f'<section id="run-record"><h2>Run record</h2><h3>Versions</h3><ul>{versions}</ul>'
        f"<h3>Configuration</h3><pre>{e(config)}</pre></section>"
    )


def _rel(out: Path, path: Path) -> str:
    return path.relative_to(out).as_posix()


def write_report(out: Path, manifest: Sequence[dict[str, str]], columns: Sequence[Column]) -> Path:
    rows = read_rows(out, manifest)
    target = RunLayout(out).report
    write_text(target, render_report(out, rows, columns, f"wsi-pipeline: {out.name}"))
    return target
