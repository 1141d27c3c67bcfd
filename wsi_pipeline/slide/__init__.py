"""Slide geometry: a `SlideReader` protocol with registered backends, the `Slide` facade the pipeline uses, and
what is computed from a slide without a model: tissue masks, tile plans, polygons, synthetic slides.

Knows nothing of torch (an import contract checks it). Modules: `reader` (protocol + registry), `backends/`
(one module per library), `mpp` (µm/px and its source), `resample` (regions at any µm/px), `integrity`
(truncation checks), `facade` (`Slide`), `tissue` and `tissue_config`, `tiling` (`TilePlan`), `polygons`,
`synth` (the test and demo slides).
"""

from wsi_pipeline.core.layout import SLIDE_EXTENSIONS, slide_id_for
from wsi_pipeline.slide.facade import Bounds, Slide
from wsi_pipeline.slide.integrity import check_tiff_complete
from wsi_pipeline.slide.mpp import Mpp
from wsi_pipeline.slide.reader import (
    SlideReader,
    backend_names,
    backend_versions,
    check_backend_name,
    open_reader,
    register_backend,
)

__all__ = [
    "SLIDE_EXTENSIONS",
    "Bounds",
    "Mpp",
    "Slide",
    "SlideReader",
    "backend_names",
    "backend_versions",
    "check_backend_name",
    "check_tiff_complete",
    "open_reader",
    "register_backend",
    "slide_id_for",
]
