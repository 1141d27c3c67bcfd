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
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wsi_pipeline.config import Config
from wsi_pipeline.core.atomic import write_json
from wsi_pipeline.core.errors import OutputWriteError, WsiError, raise_if_signalled, write_failure
from wsi_pipeline.core.inventory import take_inventory
from wsi_pipeline.core.layout import RunLayout, SlideLayout
from wsi_pipeline.engine import TaskRequest
from wsi_pipeline.engine.predict import EmbedRequest, start_inference
from wsi_pipeline.heatmap import begin_store, discard_for_good, finish_store
from wsi_pipeline.models import LoadedModel
from wsi_pipeline.models.input_guard import outside_reason, slide_colour
from wsi_pipeline.models.mpp_estimator import MppEstimate
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
from wsi_pipeline.run.slide_mpp import MppChoice, enlargement_warning, mpp_findings, open_slide
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


# A slide's steps stop twice, so that a batch can overlap slides (run/flow.py): after PREPARED (opened, resume
# decided, tissue found, tiles planned) the model's turn comes; after INFERRED (its last batch is out) the
# post-processing and exports. Each step may run in another thread than the one before; never two at once.
PREPARED = "prepared"
INFERRED = "inferred"
SlideSteps = Generator[str, None, "SlideOutcome"]
# the stages a slide's run.json times, in order (mpp_estimate_s only where the µm/px was estimated or checked)
STAGE_TIMINGS = ("tissue_s", "mpp_estimate_s", "tiling_s", "read_setup_s", "inference_s", "heatmaps_s",
                 "postprocess_s", "export_s")  # fmt: skip


def slide_steps(
    path: Path,
    slide_id: str,
    out_root: Path,
    settings: RunSettings,
    models: dict[str, LoadedModel],
    specs: dict[str, ReadSpec],
    mpp: MppChoice = None,
    embedding: EmbedModels | None = None,
) -> SlideSteps:
    """One slide's steps (a generator: it yields PREPARED, then INFERRED, and returns the outcome; a slide skipped
    or failed early returns sooner). Never raises for bad input (the outcome says what failed). A failed write
    (full disk, read-only folder) raises OutputWriteError: every later slide would fail the same way. Closed
    between steps (an interrupt elsewhere), it discards what it wrote. The slide's own lock is held throughout: a
    `predict` or `tissue` of this slide (or another shard) is not writing it at the same time, and if one is, this
    slide fails alone."""
    started = time.perf_counter()
    try:
        with slide_lock(out_root, slide_id):
            return (
                yield from _slide_steps(
                    path, slide_id, out_root, settings, models, specs, mpp, started, embedding or EmbedModels()
                )
            )
    except OutputLockedError as exc:
        return SlideOutcome(path, slide_id, "failed", str(exc), time.perf_counter() - started)


def _slide_steps(
    path: Path,
    slide_id: str,
    out_root: Path,
    settings: RunSettings,
    models: dict[str, LoadedModel],
    specs: dict[str, ReadSpec],
    mpp: MppChoice,
    started: float,
    embedding: EmbedModels,
) -> SlideSteps:
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
        record = yield from _run(slide, slide_id, tmp, settings, models, specs, estimate, embedding)
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
            discard_for_good(tmp.root)


_CHECKS = ThreadPoolExecutor(1, thread_name_prefix="mpp-check")  # one at a time, in the order slides submit them


def _mpp_figures(
    slide: Slide, tissue: TissueMask, estimate: MppEstimate | None, check: bool
) -> tuple[list[str], dict[str, Any], float | None]:
    """The slide's µm/px lines, summary.json's µm/px figures, and the seconds an estimate took (None: none made)."""
    t0 = time.perf_counter()
    slide_warnings, estimate = mpp_findings(slide, tissue, estimate, check)
    figures: dict[str, Any] = {**(estimate.to_json() if estimate is not None else {})}
    figures["mpp_warnings"] = list(slide_warnings)
    return slide_warnings, figures, (time.perf_counter() - t0 if estimate is not None else None)


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
) -> Generator[str, None, dict[str, Any]]:
    config, tasks = settings.config, list(settings.tasks)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tissue = tissue_stage(slide, config.tissue, out, overview=False).tissue
    begin_store(out.heatmaps)
    timings["tissue_s"] = time.perf_counter() - t0
    # a recorded µm/px is checked beside the slide's turn in the model (the check only says something, and its CNN
    # took 0.14 s of each CMU slide's path to the model); an estimated one is needed now, to plan the tiles
    checking: Future[tuple[list[str], dict[str, Any], float | None]]
    if estimate is None and config.slide.check_mpp:
        checking = _CHECKS.submit(_mpp_figures, slide, tissue, None, True)
    else:
        checking = Future()
        checking.set_result(_mpp_figures(slide, tissue, estimate, False))
    raise_if_signalled()
    t0 = time.perf_counter()
    guard = input_guard_findings(slide_id, tissue, config, tasks, models)
    chosen = [t for t in tasks if not guard.get(t, {}).get("skipped")]
    requests = [
        TaskRequest(t, models[t], specs[t].plan(slide, tissue), batch_size=config.task(t).batch_size) for t in chosen
    ]
    embedding = embedding or EmbedModels()
    embeds = embed_requests(slide, tissue, out, config.embed, embedding.encoders)
    reads: list[TaskRequest | EmbedRequest] = [*requests, *embeds]
    timings["tiling_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the first read set up now: its predictors and stitchers made, its first batches read (beside the models'
    # work on the slide before, in a batch)
    inferred = (
        start_inference(slide, reads, out.heatmaps, settings.engine, config.qc, elsewhere=True) if reads else None
    )
    timings["read_setup_s"] = time.perf_counter() - t0
    try:
        yield PREPARED
        t0 = time.perf_counter()
        if inferred is not None:
            inferred.run()
        timings["inference_s"] = time.perf_counter() - t0
        yield INFERRED  # the models are free for the next slide: the rest is this slide's alone
        raise_if_signalled()
        slide_warnings, mpp_figures, mpp_s = checking.result()
        t0 = time.perf_counter()
        inference = inferred.finish() if inferred is not None else {"reads": []}
    except BaseException:
        checking.cancel()  # not begun: never begins; begun: it only reads the slide, and ends on its own
        if inferred is not None:
            inferred.abort()
        raise
    if mpp_s is not None:
        timings["mpp_estimate_s"] = mpp_s
    slide_level = {}
    if embedding.slide_model is not None:
        slide_level[SLIDE_CLASSIFIER] = classify_slide(slide_id, embedding.slide_model, embeds, out.heatmaps, config)
    write_tissue_heatmap(out.heatmaps, tissue)
    finish_store(out.heatmaps)
    timings["heatmaps_s"] = time.perf_counter() - t0
    raise_if_signalled()
    t0 = time.perf_counter()
    mpp = slide.mpp
    quality = qc_finding(out.heatmaps, [r.plan for r in requests], config.qc, tissue.geometry)
    results: dict[str, TaskResult] = dict(slide_level)
    for request in requests:
        raise_if_signalled()
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
