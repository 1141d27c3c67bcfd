"""A folder of slides: discovery, unique ids, per-slide µm/px overrides, the manifest, the cohort table."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

from wsi_pipeline.config import Config
from wsi_pipeline.core.atomic import remove_stale_temporaries
from wsi_pipeline.core.errors import ConfigError, SlideNotFoundError, UsageError
from wsi_pipeline.core.layout import SLIDE_EXTENSIONS, RunLayout
from wsi_pipeline.core.progress import BatchProgress
from wsi_pipeline.models import LoadedModel
from wsi_pipeline.models.encoders import LoadedEncoder
from wsi_pipeline.run.cohort import BatchResult, earlier_outcomes, write_batch_report, write_cohort, write_manifest
from wsi_pipeline.run.embed import EmbedModels
from wsi_pipeline.run.flow import run_slides
from wsi_pipeline.run.inputs import (
    assign_ids,
    check_overrides,
    discover,
    override_for,
    read_mpp_file,
    record_shard_plan,
    shard_paths,
)
from wsi_pipeline.run.lock import output_lock
from wsi_pipeline.run.pipeline import SlideOutcome, slide_steps
from wsi_pipeline.run.settings import RunSettings
from wsi_pipeline.run.slide_model import load_slide_classifier
from wsi_pipeline.tasks import task_model
from wsi_pipeline.tasks.reading import ReadSpec, read_spec

log = logging.getLogger(__name__)


def load_task_models(config: Config, names: Sequence[str]) -> dict[str, LoadedModel]:
    """Every task's model (configured, else the task's default), loaded and checked before the first slide; the log
    says once which tissue each answers for (its card's domain) and whether a domain guard checks it."""
    models = {t: task_model(t, config.task(t).model) for t in names}
    for task, model in models.items():
        domain = model.card.domain.line() if model.card.domain is not None else "not stated in its model card"
        guard = "domain guard fitted" if model.guard is not None else "no domain guard"
        log.info("%s: %s answers for %s (%s)", task, model.card.name, domain, guard)
    return models


def load_encoders(config: Config) -> dict[str, LoadedEncoder]:
    """Every configured encoder (`embed.encoders`), loaded and checked before the first slide: weights fit the
    architecture (exit 10), tiles it can take (exit 7), one name each (their files are named after them)."""
    from wsi_pipeline.models.encoders import check_tile_size, load_encoder

    encoders: dict[str, LoadedEncoder] = {}
    for folder in config.embed.encoders:
        encoder = load_encoder(folder)
        check_tile_size(encoder.card, f"embed.encoders {folder}")
        name = encoder.card.name
        if name in encoders:
            raise ConfigError(
                f"embed.encoders: two encoders are named {name!r} (their files would collide); rename one"
            )
        encoders[name] = encoder
        log.info("embeddings: %s, %d values per tile at %g µm/px, %d px", name, encoder.card.dim, encoder.card.mpp,
                 encoder.card.tile_px)  # fmt: skip
    return encoders


def read_specs(config: Config, names: Sequence[str], models: dict[str, LoadedModel]) -> dict[str, ReadSpec]:
    """Each task's read geometry, resolved once: settings a task's model cannot take fail the whole batch before
    the first slide (exit 7), not each slide."""
    return {name: read_spec(name, config.task(name), models[name].card) for name in names}


@contextlib.contextmanager
def dask_client(address: str | None) -> Iterator[None]:
    """Route dask work (chunked post-processing) to an existing dask scheduler, e.g. one from dask-jobqueue's
    SLURMCluster; without an address dask's local threaded scheduler runs it in this process."""
    if address is None:
        yield
        return
    import dask
    from distributed import Client

    # dask's own setting (30 s by default; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT), as every dask tool reads it
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        client = Client(address, timeout=timeout)
    except OSError as exc:
        raise ConfigError(
            f"--dask-scheduler {address}: cannot connect ({exc}); check the address (tcp://host:port)"
        ) from exc
    with client:
        yield


def run_batch(
    inputs: Sequence[str],
    out: Path,
    settings: RunSettings,
    *,
    mpp_file: str | None = None,
    shard: tuple[int, int] | None = None,
    dask_scheduler: str | None = None,
    on_slide: Callable[[SlideOutcome], None] | None = None,
) -> BatchResult:
    """Process every slide with `settings` (bound once: a bad device or model is refused before the first slide);
    a failing slide is recorded and the others go on. The manifest is rewritten after each slide, so it always tells
    how far a run got."""
    config, tasks = settings.config, settings.tasks
    paths = discover(inputs)
    if not paths:
        raise UsageError(f"no slides found in {', '.join(inputs)} (extensions: {', '.join(SLIDE_EXTENSIONS)})")
    if not any(p.exists() for p in paths):  # one missing among others fails alone; none at all is a typo
        raise SlideNotFoundError(f"{paths[0]}: no such file{' (nor any other slide given)' if len(paths) > 1 else ''}")
    ids = assign_ids(paths)
    overrides = read_mpp_file(mpp_file) if mpp_file else {}
    if mpp_file:
        check_overrides(overrides, ids, mpp_file)
    models = load_task_models(config, tasks)
    specs = read_specs(config, tasks, models)
    encoders = load_encoders(config)
    embedding = EmbedModels(encoders, load_slide_classifier(config, encoders))
    if not tasks and not encoders:
        raise UsageError("nothing to run: no task and no encoder (give --tasks, or --encoder for embeddings)")
    manifest_path, cohort_path = RunLayout(out).batch_files(shard)
    outcomes: list[SlideOutcome] = []
    todo = shard_paths(paths, shard)
    batch_bar = BatchProgress(len(todo))  # one line per slide in logs, also with --no-progress (tile bars only)
    with output_lock(out, shard), dask_client(dask_scheduler):
        if shard is not None:
            record_shard_plan(out, paths, shard)
        remove_stale_temporaries(out)
        # an unsharded run's files list every slide the folder holds (gather does so for shards)
        earlier = earlier_outcomes(out, set(ids.values())) if shard is None else []

        def record(outcome: SlideOutcome) -> None:
            if not any(o is outcome for o in outcomes):  # recorded again after an interrupt cut its manifest short
                outcomes.append(outcome)
            write_manifest(manifest_path, outcomes + earlier)
            if on_slide is not None:
                on_slide(outcome)
            batch_bar.update(failed=outcome.status == "failed")

        starts = [
            (path, ids[path], partial(slide_steps, path, ids[path], out, settings, models, specs,
                                      override_for(path, ids[path], overrides), embedding))
            for path in todo
        ]  # fmt: skip
        run_slides(starts, config.engine.slides_in_flight, record)
        batch_bar.close()
        every = outcomes + earlier
        write_cohort(cohort_path, (o.summary for o in every if o.summary is not None))
        if shard is None:  # shards' pages would each show part of the cohort: `gather` writes the whole one
            write_batch_report(out, every)
    return BatchResult(outcomes, earlier)


def summary_table(result: BatchResult) -> str:
    lines = [f"{'slide_id':40s} {'status':8s} {'seconds':>8s} {'tiles':>7s}  error / note"]
    for o in result.outcomes:
        lines.append(f"{o.slide_id[:40]:40s} {o.status:8s} {o.seconds:8.1f} {o.tiles:7d}  {(o.error or o.note)[:120]}")
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("done", "skipped", "failed")}
    lines.append(
        f"{len(result.outcomes)} slides: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
    )
    if result.earlier:
        lines.append(
            f"(the folder's manifest and cohort files also list {len(result.earlier)} slide(s) of earlier runs)"
        )
    return "\n".join(lines)
