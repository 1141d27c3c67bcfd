"""Commands on one slide: info, synth, tissue, tiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from wsi_pipeline.cli.common import (
    backend_option,
    config_option,
    default_mpp_option,
    positive_mpp,
    run_config,
    set_option,
    slide_mpp_option,
    slide_with_mpp,
)
from wsi_pipeline.core.errors import MissingMppError
from wsi_pipeline.core.layout import RunLayout
from wsi_pipeline.slide import Slide


@click.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option(
    "--mpp",
    "--slide-mpp",
    "mpp",
    type=positive_mpp,
    default=None,
    help="µm/px of level 0, overriding the slide's metadata.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--backend", default="auto", show_default=True, help="Slide reader backend (auto, openslide, ...).")
@click.option("--no-estimate", is_flag=True, help="Do not estimate the µm/px from the tissue (faster).")
def info(slide_path: str, mpp: float | None, as_json: bool, backend: str, no_estimate: bool) -> None:
    """Geometry, levels, µm/px (and where it came from), the µm/px the tissue suggests (docs/mpp.md), bounds and
    associated images of SLIDE."""
    from wsi_pipeline.models.mpp_estimator import default_estimator

    with Slide(slide_path, mpp=mpp, backend=backend) as slide:
        data = slide.info()
        if not no_estimate:
            try:
                estimate = default_estimator().estimate_slide(slide)
                data |= estimate.to_json() | {"mpp_estimate_crops": estimate.crops}
            except MissingMppError as exc:  # too little tissue: said, not fatal
                data |= {"mpp_estimate": None, "mpp_estimate_interval": None, "mpp_estimate_error": str(exc)}
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))
    if data["mpp"] is None:
        suggestion = (
            f" (the tissue suggests about {data['mpp_estimate']:.3g}; run's --default-mpp auto uses it)"
            if data.get("mpp_estimate")
            else ""
        )
        raise MissingMppError(
            f"{slide_path}: the slide records no µm/px; give it with --mpp (or --slide-mpp), "
            f"e.g. --mpp 0.25 for 40x, 0.5 for 20x{suggestion}"
        )


def _estimate_text(d: dict[str, Any]) -> str:
    if "mpp_estimate" not in d:
        return "not made (--no-estimate)"
    if d["mpp_estimate"] is None:
        return f"none: {d.get('mpp_estimate_error', '')}"
    low, high = d["mpp_estimate_interval"]
    return f"{d['mpp_estimate']:.3g} µm/px from the tissue (interval {low:.3g}-{high:.3g}; docs/mpp.md)"


def format_info(d: dict[str, Any]) -> str:
    mpp = d["mpp"]
    mpp_text = "unknown (give --mpp)" if mpp is None else f"{mpp['x']:.4f} x {mpp['y']:.4f} µm/px ({mpp['source']})"
    b = d["bounds"]
    lines = [
        f"slide        {d['path']}",
        f"slide_id     {d['slide_id']}",
        f"reader       {d['backend']}",
        f"vendor       {d['vendor']}",
        f"dimensions   {d['dimensions'][0]} x {d['dimensions'][1]} px",
        f"mpp          {mpp_text}",
        f"mpp estimate {_estimate_text(d)}",
        f"objective    {d['objective_power'] if d['objective_power'] is not None else 'unknown'}",
        f"bounds       x={b['x']} y={b['y']} {b['width']} x {b['height']}",
        f"associated   {', '.join(d['associated_images']) or 'none'}",
        f"levels       {d['level_count']}",
    ]
    lines += [
        f"  level {lv['level']}: {lv['width']} x {lv['height']}  downsample {lv['downsample']:.4f}"
        for lv in d["levels"]
    ]
    return "\n".join(lines)


@click.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--width", type=click.IntRange(min=64), default=8000, show_default=True)
@click.option("--height", type=click.IntRange(min=64), default=6000, show_default=True)
@click.option(
    "--mpp", type=click.FloatRange(min=0.05, max=20), default=0.5, show_default=True, help="µm/px of level 0."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--figures",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Number of round dark figures planted in the tissue.",
)
@click.option("--pen/--no-pen", default=False, show_default=True, help="Draw a green pen stroke on the glass.")
def synth(out: str, width: int, height: int, mpp: float, seed: int, figures: int, pen: bool) -> None:
    """Write a synthetic pyramidal Aperio TIFF with known tissue (and OUT's .truth.json)."""
    from wsi_pipeline.slide.synth import default_layout, truth_path, write_synthetic_slide

    spec = default_layout(width, height, mpp, seed=seed, n_figures=figures, pen=pen)
    path = write_synthetic_slide(out, spec)
    click.echo(f"wrote {path} ({width} x {height} px at {mpp} µm/px); truth in {truth_path(path)}")


@click.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@slide_mpp_option
@default_mpp_option
@backend_option
@config_option
@set_option
def tissue(
    slide_path: str,
    out_dir: str,
    slide_mpp: float | None,
    default_mpp: float | str | None,
    backend: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Detect tissue: OUT/<slide_id>/tissue.geojson, tissue_mask.png, overview.png, tissue.json."""
    from wsi_pipeline.run.lock import single_slide_lock
    from wsi_pipeline.run.stages import tissue_stage

    cfg = run_config(config_path, overrides, backend)
    # the slide opens first (a missing or unreadable file leaves no OUT), then its lock beside OUT's (shared)
    with (
        Slide(slide_path, mpp=slide_mpp, backend=cfg.slide.backend) as opened,
        single_slide_lock(Path(out_dir), opened.slide_id),
    ):
        slide = slide_with_mpp(opened, default_mpp)
        result = tissue_stage(slide, cfg.tissue, RunLayout(Path(out_dir)).slide(slide.slide_id))
    s = result.summary
    click.echo(
        f"{s['slide_id']}: {s['regions']} tissue region(s), {s['area_mm2']:.3f} mm² (mask at {s['mask_mpp']:.2f} µm/px)"
    )
    for kind, path in result.files.items():
        click.echo(f"  {kind:9s} {path}")


@click.command()
@click.argument("slide_path", metavar="SLIDE", type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option(
    "--task", default=None, help="Plan the tiles `run` reads for this task (configured values, else the model card's)."
)
@click.option("--mpp", type=float, default=None, help="Target µm/px of the tiles.")
@click.option("--tile-px", type=int, default=None, help="Tile edge in px at the target µm/px.")
@click.option("--overlap-px", type=int, default=None, help="Overlap between neighbouring tiles in px [0].")
@click.option("--min-tissue", type=float, default=None, help="Keep tiles with at least this tissue fraction [0.1].")
@slide_mpp_option
@backend_option
@config_option
@set_option
def tiles(
    slide_path: str,
    out_dir: str,
    task: str | None,
    mpp: float | None,
    tile_px: int | None,
    overlap_px: int | None,
    min_tissue: float | None,
    slide_mpp: float | None,
    backend: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Plan tiles at a target µm/px: OUT/<slide_id>/tiles-<name>.json (+ .geojson for QuPath, .png)."""
    from wsi_pipeline.run.lock import single_slide_lock
    from wsi_pipeline.run.stages import tile_request, tiles_stage
    from wsi_pipeline.slide.tissue import detect_tissue

    cfg = run_config(config_path, overrides, backend)
    want = tile_request(cfg, task, mpp, tile_px, overlap_px, min_tissue)
    with (
        Slide(slide_path, mpp=slide_mpp, backend=cfg.slide.backend) as slide,
        single_slide_lock(Path(out_dir), slide.slide_id),
    ):
        plan, files = tiles_stage(
            slide,
            detect_tissue(slide, cfg.tissue),
            RunLayout(Path(out_dir)).slide(slide.slide_id),
            want.name,
            mpp=want.mpp,
            tile_px=want.tile_px,
            overlap_px=want.overlap_px,
            min_tissue=want.min_tissue,
            tissue_params=cfg.tissue,
        )
    n_cols, n_rows = plan.grid
    click.echo(
        f"{slide.slide_id}: {len(plan)} of {n_cols * n_rows} tiles kept ({n_cols} x {n_rows} grid, "
        f"{want.tile_px} px at {want.mpp:g} µm/px, overlap {want.overlap_px} px, min tissue {want.min_tissue:g})"
    )
    for kind, path in files.items():
        click.echo(f"  {kind:8s} {path}")
