"""`make demo`: write a synthetic slide, then run every stage the pipeline has on it and say where to look."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import load_config
from .slide import Slide
from .stages import tiles_stage, tissue_stage
from .synth import default_layout, write_synthetic_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output folder [demo_out]")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    cfg = load_config()
    started = time.perf_counter()
    slide_path = out / "slides" / "demo-synthetic.svs"
    if not slide_path.exists():
        spec = default_layout(12000, 9000, 0.25, seed=7, n_figures=25, pen=True)
        write_synthetic_slide(slide_path, spec)
    print(f"slide    {slide_path} (synthetic, 12000 x 9000 px at 0.25 µm/px, pen stroke, 25 planted figures)")
    with Slide(slide_path) as slide:
        slide_out = out / "results" / slide.slide_id
        tissue = tissue_stage(slide, cfg.tissue, slide_out)
        print(f"tissue   {tissue.summary['regions']} regions, {tissue.summary['area_mm2']:.2f} mm²")
        for name in ("epithelium_stroma", "mitosis", "metastasis"):
            task = getattr(cfg.tasks, name)
            plan, _ = tiles_stage(
                slide,
                tissue.tissue,
                slide_out,
                name,
                mpp=task.mpp,
                tile_px=task.tile_px,
                overlap_px=task.overlap_px,
                min_tissue=task.min_tissue,
                tissue_params=cfg.tissue,
            )
            print(f"tiles    {name}: {len(plan)} tiles of {task.tile_px} px at {task.mpp} µm/px")
    print(f"\ndone in {time.perf_counter() - started:.1f} s. Outputs are in {slide_out}:")
    for path in sorted(slide_out.iterdir()):
        print(f"  {path.name}")
    print(
        "Open overview.png and tiles-*.png to see the tissue and tiles; drag tissue.geojson or "
        "tiles-*.geojson onto the slide in QuPath."
    )


if __name__ == "__main__":
    main()
