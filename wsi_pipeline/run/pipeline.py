"""One slide, end to end: tissue, tiles, inference, post-processing, exports. Sequencing only; resumable and
all-or-nothing.

Everything for a slide is built in a hidden temporary folder beside `OUT/<slide_id>/` and renamed to it when
complete, so `OUT/<slide_id>/` exists only when finished. Its `run.json` records a compatibility key, the slide's
fingerprint and every output file's size and sha256 (see `run.record`); a re-run skips a slide only when all of them
still match, and otherwise redoes it and says why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wsi_pipeline.config import Config
from wsi_pipeline.core.atomic import write_json
from wsi_pipeline.core.errors import MissingMppError, OutputWriteError, WsiError, raise_if_signalled, write_failure
from wsi_pipeline.core.inventory import take_inventory
from wsi_pipeline.core.layout import RunLayout, SlideLayout
from wsi_pipeline.engine import TaskRequest, predict_slide
from wsi_pipeline.engine.predict import EmbedRequest
from wsi_pipeline.heatmap import begin_store, finish_store, settle_pending_writes
from wsi_pipeline.models import LoadedModel
from wsi_pipeline.models.input_guard import outside_reason, slide_colour
from wsi_pipeline.models.mpp_estimator import MppEstimate, default_estimator, mismatch_warning
from wsi_pipeline.run.domain import apply_domain, domain_finding
from wsi_pipeline.run.embed import EmbedModels, embed_requests, embeddings_summary
from wsi_pipeline.run.lock import OutputLockedError, slide_lock
from wsi_pipeline.run.outputs import write_task_outputs
from wsi_pipeline.run.qc import qc_finding
from wsi_pipeline.run.record import (
    RUN_FORMAT,
    compatibility_key,
    model_records,
    resume_decision,
    slide_fingerprint,
    versions,
)
from wsi_pipeline.run.settings import RunSettings
from wsi_pipeline.run.slide_model import SLIDE_CLASSIFIER, classify_slide
from wsi_pipeline.run.stages import tissue_stage, write_tissue_heatmap
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tissue import TissueMask
from wsi_pipeline.tasks import TaskContext, TaskResult, get_task
from wsi_pipeline.tasks.reading import ReadSpec

log = logging.getLogger(__name__)


@dataclass
class SlideOutcome:
    slide: Path
    slide_id: str
    status: str  # done | failed | skipped
    error: str = ""
    seconds: float = 0.0
    tiles: int = 0
    summary: dict[str, Any] | None = None
    note: str = ""  # why finished outputs were redone (a missing chunk, ...); the input guard's and tasks' warnings


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


def process_slide(
    path: Path,
    slide_id: str,
    out_root: Path,
    settings: RunSettings,
    models: dict[str, LoadedModel],
    specs: dict[str, ReadSpec],
    mpp: MppChoice = None,
    embedding: EmbedModels | None = None,
) -> SlideOutcome:
    """Run `tasks` on one slide into OUT/<slide_id>/; never raises for bad input (the outcome says what failed).
    A failed write (full disk, read-only folder) raises OutputWriteError: every later slide would fail the same way.
    The slide's own lock is held throughout: a `predict` or `tissue` of this slide (or another shard) is not
    writing it at the same time, and if one is, this slide fails alone."""
    started = time.perf_counter()
    try:
        with slide_lock(out_root, slide_id):
            return _process_slide(
                path, slide_id, out_root, settings, models, specs, mpp, started, embedding or EmbedModels()
            )
    except OutputLockedError as exc:
        return SlideOutcome(path, slide_id, "failed", str(exc), time.perf_counter() - started)


def _process_slide(
    path: Path,
    slide_id: str,
    out_root: Path,
    settings: RunSettings,
    models: dict[str, LoadedModel],
    specs: dict[str, ReadSpec],
    mpp: MppChoice,
    started: float,
    embedding: EmbedModels,
) -> SlideOutcome:
    config, tasks, overwrite = settings.config, list(settings.tasks), settings.overwrite
    run = RunLayout(out_root)
    final = run.slide(slide_id)
    tmp = run.slide_temporary(slide_id)

    def outcome(status: str, error: str = "", **extra: Any) -> SlideOutcome:
        return SlideOutcome(path, slide_id, status, error, time.perf_counter() - started, **extra)

    if final.root.is_symlink():  # its outputs would be written wherever the link points, and replaced there
        return outcome(
            "failed",
            f"{final.root} is a symbolic link; a run never follows a link it did not create: remove it (or give this "
            "run another -o folder)",
        )
    try:
        slide, estimate = open_slide(path, config, mpp, settings.default_mpp)
        key = compatibility_key(config, tasks, models, slide.mpp.mean, slide.backend, embedding.record())
        fingerprint = slide_fingerprint(path)
        decision = resume_decision(final, key, fingerprint, path, check_outputs=not overwrite)
        if decision.foreign is not None:
            return outcome(
                "failed",
                f"{final.root} holds the outputs of another slide with the same id ({decision.foreign}); give this "
                "run another -o folder, or rename one of the two files",
            )
        if decision.skip:  # the note says again what the run that made the outputs said of them
            note = record_note(decision.record or {})
            return outcome("skipped", tiles=decision.tiles, summary=json.loads(final.summary.read_text()), note=note)
        note = "redone (--overwrite)" if overwrite and final.root.exists() else decision.note
        tmp.root.mkdir(parents=True)
        record = _run(slide, slide_id, tmp, settings, models, specs, estimate, embedding)
        raise_if_signalled()  # an interrupt some library swallowed still discards this slide
        record.update(
            {
                "compatibility": key,
                "slide_fingerprint": fingerprint,
                "format": RUN_FORMAT,
                "complete": True,
                "seconds": time.perf_counter() - started,
                "outputs": take_inventory(tmp.root),
            }
        )
        write_json(tmp.run_record, record)
        if final.root.exists():
            shutil.rmtree(final.root)
        os.replace(tmp.root, final.root)
        summary = json.loads(final.summary.read_text())
        note = "; ".join(n for n in (note, record_note(record)) if n)
        return outcome("done", tiles=record["tiles"], summary=summary, note=note)
    except OutputWriteError as exc:  # named as the user's folder, not the hidden one it was being built in
        raise OutputWriteError(str(exc).replace(str(tmp.root), str(final.root))) from exc
    except WsiError as exc:
        return outcome("failed", str(exc))
    except Exception as exc:  # an unexpected bug must not stop the other slides either
        failure = write_failure(exc, final.root)
        if failure is not None:
            raise failure from exc
        if not path.exists():  # deleted or unmounted while it was read: the slide's own problem, not a bug
            return outcome(
                "failed", f"{path}: the slide file went away while it was read; check that it is there, then run again"
            )
        # one line: a reading worker's exception arrives with its whole traceback in the message
        last = next((line for line in reversed(str(exc).splitlines()) if line.strip()), "")
        return outcome("failed", f"internal error {type(exc).__name__}: {last.strip()} (please report)")
    finally:
        if tmp.root.exists():  # the slide failed or was interrupted
            discard_temporary(tmp.root)


def discard_temporary(folder: Path, rounds: int = 5) -> None:
    """Remove a failed slide's temporary folder for good. Writes that an interrupt left running (zarr's I/O thread,
    a dask worker finishing its chunk of the pyramid) can create it again after a first removal: wait for zarr's
    pending writes, remove, and look again a few times (0.05 s apart)."""
    for _ in range(rounds):
        settle_pending_writes()
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.05)
        if not folder.exists():
            return


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


def input_guard_findings(
    slide_id: str, tissue: TissueMask, config: Config, tasks: list[str], models: dict[str, LoadedModel]
) -> dict[str, dict[str, Any]]:
    """Tasks whose model the slide's tissue does not suit (`input_guard`): skipped unless `tasks.<task>.force`;
    each finding is logged, and goes to summary.json, the run record and the manifest's note."""
    findings: dict[str, dict[str, Any]] = {}
    for task in tasks:
        reason = outside_reason(tissue, models[task].card.input_stats)
        if reason is None:
            continue
        forced = config.task(task).force
        findings[task] = {"reason": reason, "skipped": not forced, "slide_colour_od": slide_colour(tissue)}
        action = "run anyway (forced)" if forced else f"skipped; set tasks.{task}.force: true to run it anyway"
        log.warning("warning: %s: %s model not trusted here: %s; %s", slide_id, task, reason, action)
    return findings


def record_note(record: dict[str, Any]) -> str:
    """The manifest's note on a slide's finished outputs: the input guard's findings and the tasks' warnings."""
    return "; ".join(n for n in (guard_note(record.get("input_guard") or {}), *record.get("warnings", [])) if n)


def guard_note(findings: dict[str, dict[str, Any]]) -> str:
    if not findings:
        return ""
    skipped = [t for t, f in findings.items() if f["skipped"]]
    forced = [t for t, f in findings.items() if not f["skipped"]]
    reason = next(iter(findings.values()))["reason"]
    parts = [f"{', '.join(skipped)} skipped" if skipped else "", f"{', '.join(forced)} forced" if forced else ""]
    return f"input guard: {'; '.join(p for p in parts if p)} ({reason})"


def _run(
    slide: Slide,
    slide_id: str,
    out: SlideLayout,
    settings: RunSettings,
    models: dict[str, LoadedModel],
    specs: dict[str, ReadSpec],
    estimate: MppEstimate | None = None,
    embedding: EmbedModels | None = None,
) -> dict[str, Any]:
    config, tasks = settings.config, list(settings.tasks)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tissue = tissue_stage(slide, config.tissue, out, overview=False).tissue
    begin_store(out.heatmaps)
    timings["tissue_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    slide_warnings, estimate = mpp_findings(slide, tissue, estimate, config.slide.check_mpp)
    mpp_figures: dict[str, Any] = {**(estimate.to_json() if estimate is not None else {})}
    mpp_figures["mpp_warnings"] = list(slide_warnings)
    if estimate is not None:
        timings["mpp_estimate_s"] = time.perf_counter() - t0
    raise_if_signalled()
    t0 = time.perf_counter()
    guard = input_guard_findings(slide_id, tissue, config, tasks, models)
    chosen = [t for t in tasks if not guard.get(t, {}).get("skipped")]
    requests = [TaskRequest(t, models[t], specs[t].plan(slide, tissue)) for t in chosen]
    embedding = embedding or EmbedModels()
    embeds = embed_requests(slide, tissue, out, config.embed, embedding.encoders)
    timings["tiling_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reads: list[TaskRequest | EmbedRequest] = [*requests, *embeds]
    inference = predict_slide(slide, reads, out.heatmaps, settings.engine, config.qc) if reads else {"reads": []}
    slide_level = {}
    if embedding.slide_model is not None:
        slide_level[SLIDE_CLASSIFIER] = classify_slide(slide_id, embedding.slide_model, embeds, out.heatmaps, config)
    write_tissue_heatmap(out.heatmaps, tissue)
    finish_store(out.heatmaps)
    timings["inference_s"] = time.perf_counter() - t0
    raise_if_signalled()
    t0 = time.perf_counter()
    mpp = slide.mpp
    quality = qc_finding(out.heatmaps, [r.plan for r in requests], config.qc, tissue.geometry)
    results: dict[str, TaskResult] = dict(slide_level)
    for request in requests:
        finding = domain_finding(out.heatmaps, request.name, request.model.card, request.plan, tissue.geometry)
        task_config = config.task(request.name)
        context = TaskContext(
            request.name,
            slide_id,
            request.model.card,
            task_config,
            out.heatmaps,
            (mpp.x, mpp.y),
            tissue.area_mm2,
            tissue.geometry,
            quality.counted(finding.area if finding.area is not None or quality.failed is None else tissue.geometry),
        )
        result = get_task(request.name).postprocess(context)
        result = apply_domain(result, finding, task_config.min_in_domain, task_config.force, request.name)
        enlarged = enlargement_warning(request.name, specs[request.name].mpp, slide)
        results[request.name] = replace(result, warnings=[*result.warnings, enlarged]) if enlarged else result
        for warning in results[request.name].warnings:
            log.warning("warning: %s: %s", slide_id, warning)
    slide_warnings += [w for w in (quality.warning(),) if w]
    for warning in slide_warnings:
        log.warning("warning: %s: %s", slide_id, warning)
    timings["postprocess_s"] = time.perf_counter() - t0
    raise_if_signalled()
    t0 = time.perf_counter()
    if embeds:
        mpp_figures["embeddings"] = embeddings_summary(embeds, out.root)
    write_task_outputs(out, slide, tissue, requests, results, guard, config.export, quality, mpp_figures)
    timings["export_s"] = time.perf_counter() - t0
    return {
        "slide": str(slide.path),
        "slide_id": slide_id,
        "slide_info": slide.info(),
        "config": config.model_dump(mode="json"),
        "tasks": tasks,
        "models": model_records(tasks, models),
        "tiles": sum(len(r.plan) for r in reads),
        "input_guard": guard,
        "warnings": [*slide_warnings, *(w for r in results.values() for w in r.warnings)],
        "qc": quality.summary(),
        "timings": timings,
        "inference": inference,
        "versions": versions(),
    }
