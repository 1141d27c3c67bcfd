"""A slide's µm/px: given, recorded, or estimated from its tissue, and the lines a run says about it (estimated,
at odds with the tissue, enlarged past the scan's detail)."""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.config import Config
from wsi_pipeline.core.errors import MissingMppError, WsiError
from wsi_pipeline.models.mpp_estimator import MppEstimate, default_estimator, mismatch_warning
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tissue import TissueMask

AUTO = "auto"  # --default-mpp auto, an --mpp-file row `auto`: estimate the µm/px from the tissue
ESTIMATED = "estimated from the tissue"
MppChoice = float | str | None  # a µm/px, AUTO, or None


def open_slide(path: Path, config: Config, mpp: MppChoice, default_mpp: MppChoice) -> tuple[Slide, MppEstimate | None]:
    """The slide with its µm/px: a per-slide override (`auto`: estimated), else its metadata, else `default_mpp`
    (`auto`: estimated); with the estimate when one was made."""
    given = mpp if isinstance(mpp, float | int) else None
    slide = Slide(path, mpp=given, backend=config.slide.backend, mpp_source="--mpp-file")
    if mpp == AUTO:
        estimate = default_estimator().estimate_slide(slide)
        return slide.with_mpp(estimate.mpp, ESTIMATED), estimate
    return resolve_mpp(slide, default_mpp, "or a row in --mpp-file ")


def resolve_mpp(slide: Slide, default_mpp: MppChoice, also: str = "") -> tuple[Slide, MppEstimate | None]:
    """A slide that records no µm/px gets `default_mpp` (`auto`: the tissue's estimate); without one, the error
    names the options and says what the tissue suggests."""
    if slide.mpp_or_none is not None:
        return slide, None
    if default_mpp == AUTO:
        estimate = default_estimator().estimate_slide(slide)
        return slide.with_mpp(estimate.mpp, ESTIMATED), estimate
    if not isinstance(default_mpp, float | int):
        raise MissingMppError(
            f"{slide.path}: the slide records no µm/px; give it with --default-mpp {also}(e.g. 0.25 for 40x, 0.5 "
            f"for 20x){_estimate_hint(slide)}"
        )
    return slide.with_mpp(float(default_mpp), "--default-mpp"), None


def _estimate_hint(slide: Slide) -> str:
    """What the tissue suggests, for the missing-µm/px message ('' when it cannot say)."""
    try:
        estimate = default_estimator().estimate_slide(slide)
    except WsiError:
        return ""
    return f"; the tissue suggests {estimate.line()}: --default-mpp auto uses that estimate"


def estimated_warning(estimate: MppEstimate) -> str:
    return (
        f"µm/px estimated from the tissue: {estimate.line()}; every area, rate and size rests on it: give the "
        "scanner's µm/px (--mpp-file) when it is known"
    )


# a model reading at twice the slide's finest detail or more is said to: 2x less the 5 % by which scanners' 20x and
# 40x differ (0.499 / 0.25 = 1.996 is a 20x slide read by a 40x model)
ENLARGEMENT_WARNED = 2.0 / 1.05


def enlargement_warning(task: str, read_mpp: float, slide: Slide) -> str | None:
    """A task whose model reads the slide at 2x its finest level or more: its answer rests on
    detail the scan lacks (or on a wrong µm/px); said once per slide and task, the answer kept."""
    mpp = slide.mpp
    factor = mpp.mean / read_mpp
    if factor < ENLARGEMENT_WARNED:
        return None
    return (
        f"{task}: the model reads at {read_mpp:g} µm/px, {factor:.1f}x finer than the slide's finest level "
        f"({mpp.mean:g} µm/px, from {mpp.source}): the image is enlarged {factor:.1f} times each way; check the "
        "slide's µm/px, and trust the answer less"
    )


def mpp_findings(
    slide: Slide, tissue: TissueMask, estimate: MppEstimate | None, check: bool
) -> tuple[list[str], MppEstimate | None]:
    """The slide's µm/px lines: estimated (said), or recorded / given and checked against the tissue's estimate
    (`slide.check_mpp`; more than 2x apart: said). The estimate is returned for summary.json."""
    if estimate is not None:
        return [estimated_warning(estimate)], estimate
    if not check:
        return [], None
    try:
        estimate = default_estimator().estimate_slide(slide, tissue)
    except WsiError:  # too little tissue to say: no check, no line
        return [], None
    mismatch = mismatch_warning(slide.mpp.mean, slide.mpp.source, estimate)
    return ([mismatch] if mismatch else []), estimate
