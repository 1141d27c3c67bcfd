"""Batched inference over tile plans (MONAI's inferer): one read feeds every task whose plan reads the same tiles.

Tiles travel from the loader as uint8; each task's `Predictor` normalises and runs its model on the device and its
`Stitcher` writes the outputs. On CUDA: pinned memory, non-blocking copies, channels_last and bf16 autocast; on the
CPU, bf16 where the CPU has it natively (`models.predictor.use_bf16`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.engine.batches import Batch, close_reads, run_read
from wsi_pipeline.engine.embeddings import EmbeddingTarget, EmbeddingWriter, EncoderPredictor, embedding_attributes
from wsi_pipeline.engine.loader import make_loader
from wsi_pipeline.engine.options import EngineOptions
from wsi_pipeline.engine.qc import QcRecorder, qc_read
from wsi_pipeline.engine.stitch import DomainStitcher, Stitcher, stitcher_class
from wsi_pipeline.models import LoadedModel, Predictor, make_predictor
from wsi_pipeline.models.card import ModelCard
from wsi_pipeline.models.encoders import LoadedEncoder
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.qc_config import QcConfig
from wsi_pipeline.slide.tiling import TilePlan, TileSpec

DEFAULT_OPTIONS = EngineOptions()


@dataclass
class TaskRequest:
    """One task to run: its name, its loaded model and its tile plan."""

    name: str
    model: LoadedModel
    plan: TilePlan
    dtype: str = "float16"
    batch_size: int | None = None  # its own (tasks.<task>.batch_size); None: the engine's


@dataclass
class EmbedRequest:
    """One encoder to run: its tile plan (the card's µm/px and tile size) and where its embeddings go."""

    name: str  # the encoder's name (embeddings/<name>.zarr)
    encoder: LoadedEncoder
    plan: TilePlan
    target: EmbeddingTarget
    slide_mpp: float
    batch_size: int | None = None  # embed.batch_size; None: the engine's

    def writer(self) -> EmbeddingWriter:
        card = self.encoder.card
        record = {"name": card.name, "architecture": card.architecture, "pooling": card.pooling, "dim": card.dim}
        record["weights_sha256"] = card.weights_sha256 or ""
        attrs = embedding_attributes(self.plan, record, self.slide_mpp)
        return EmbeddingWriter(self.target, self.plan, card.dim, attrs)


Request = TaskRequest | EmbedRequest


def check_request(request: TaskRequest) -> None:
    """Refuse a plan the model cannot be run on, before any tile is read (the engine's own guard for every caller;
    `run` and `predict` have checked the same geometry once already, as a task's `ReadSpec`)."""
    spec = request.plan.spec
    check_geometry(request.name, request.model.card, spec.mpp, spec.tile_px, spec.overlap_px)


def check_geometry(task: str, card: ModelCard, mpp: float, tile_px: int, overlap_px: int) -> None:
    """Whether `card`'s model can be run on tiles of this µm/px, size and overlap (no slide needed)."""
    key = f"tasks.{task}"
    if abs(mpp - card.mpp) > 1e-6 * card.mpp:
        raise ConfigError(f"{key}.mpp is {mpp} but model {card.name} expects {card.mpp} µm/px")
    stitcher_class(card).check(card, tile_px, overlap_px, key)


def read_groups(requests: Sequence[Request]) -> list[list[Request]]:
    """Tasks and encoders whose plans read identical tiles (same spec and kept tiles) share one read."""
    groups: dict[tuple[TileSpec, int], list[Request]] = {}
    for request in requests:
        groups.setdefault((request.plan.spec, len(request.plan)), []).append(request)
    return list(groups.values())


def predict_slide(
    slide: Slide,
    requests: Sequence[Request],
    store: Path,
    options: EngineOptions = DEFAULT_OPTIONS,
    qc: QcConfig | None = None,
) -> dict[str, Any]:
    """Run every request over its plan and write its heatmaps into `store`; returns timings (the three parts of
    `Inference` in turn, in this thread). On any failure, partial heatmaps are discarded."""
    return start_inference(slide, requests, store, options, qc).run().finish()


@dataclass
class _Read:
    """One read set up: its predictors and the stitchers each feeds, its tiles (being read once started)."""

    plan: TilePlan
    names: list[str]
    pairs: list[tuple[Predictor | EncoderPredictor, list[Stitcher]]]
    recorder: QcRecorder | None
    setup_s: float
    tiles: Iterator[Batch] | None = None


@dataclass
class Inference:
    """A slide's reads through the models, in three calls: `start_inference` checks them and sets up the first
    (its predictors and stitchers made, its first batches being read), `run` runs every read, `finish` does what
    is left once the last batch is out (each stitcher's last rows and pyramid, the QC image). Split so that a batch
    can set up the next slide, and finish the one before, while a slide is in the models (run/flow.py); `abort`
    discards it all at any point."""

    slide: Slide
    groups: list[list[Request]]
    store: Path
    options: EngineOptions
    qc: QcConfig | None
    timings: dict[str, Any] = field(default_factory=lambda: {"reads": [], "precision": {}, "runtime": {}})  # per model
    stitchers: list[Stitcher] = field(default_factory=list)
    recorder: tuple[QcRecorder, list[str]] | None = None  # and the names of the read it measured
    first: _Read | None = None

    @property
    def qc_group(self) -> int | None:
        """Which read measures quality (`engine.qc.qc_read`); None when quality control is off."""
        return qc_read([g[0].plan for g in self.groups]) if self.qc is not None and self.qc.enabled else None

    def set_up(self, number: int, elsewhere: bool = False) -> _Read:
        """Read `number`'s predictors and stitchers, its tiles being read meanwhile (the loader starts first, so its
        first batches are read while the models move to the device); `elsewhere`: in another thread than the
        models', where only reading threads start (worker processes and reads decoded on the device start in the
        models' own turn: a fork from beside a running model is not safe)."""
        started = time.perf_counter()
        group = self.groups[number]
        plan, names = group[0].plan, [r.name for r in group]
        recorder = QcRecorder(plan, self.store, self.qc) if self.qc is not None and number == self.qc_group else None
        if recorder is not None:
            self.recorder = (recorder, names)
        read = _Read(plan, names, [], recorder, 0.0)
        if not elsewhere or (self.options.loader == "threads" and self.options.decode == "cpu"):
            read.tiles = self.read(number)
        try:
            self._make_predictors(group, read)
        except BaseException:
            if read.tiles is not None:
                close_reads(read.tiles)
            raise
        read.setup_s = time.perf_counter() - started
        return read

    def _make_predictors(self, group: list[Request], read: _Read) -> None:
        options, device = self.options, self.options.device
        for request in group:
            if isinstance(request, EmbedRequest):  # its vectors go to an embeddings file, not a heatmap
                encoder = EncoderPredictor(request.encoder, device, options.predictor.precision)
                self.timings["precision"][f"embed:{request.name}"] = "bf16" if encoder.bf16 else "fp32"
                writer = request.writer()
                self.stitchers.append(writer)
                read.pairs.append((encoder, [writer]))
                continue
            predictor = make_predictor(request.model, device, options.predictor)
            self.timings["precision"][request.name] = "bf16" if getattr(predictor, "bf16", False) else "fp32"
            if hasattr(predictor, "prepare"):  # a torch module's network exported to ONNX Runtime, where it runs
                predictor.prepare(request.plan.spec.tile_px)
                self.timings["runtime"][request.name] = predictor.runtime
            card = request.model.card
            fed: list[Stitcher] = [stitcher_class(card)(request.name, card, request.plan, self.store, request.dtype)]
            if getattr(predictor, "guarded", False):  # its tiles' domain values: an image of their own
                fed.append(DomainStitcher(request.name, card, request.plan, self.store))
            self.stitchers += fed
            read.pairs.append((predictor, fed))

    def read(self, number: int) -> Iterator[Batch]:
        """Read `number`'s tiles, being read from now on (a spawned worker process re-imports torch: seconds on a
        GPU machine), in batches of the largest batch size its requests ask for (the engine's where none does: a
        mitosis read of 512 px tiles in batches of 64, the largest of the default tasks', peaked 1 GB higher than
        in its own 16)."""
        o = self.options
        plan = self.groups[number][0].plan
        return iter(make_loader(self.slide, plan, self.batch_size(number), o.workers, o.device, o.loader, o.decode))

    def batch_size(self, number: int) -> int:
        sizes = [r.batch_size for r in self.groups[number] if r.batch_size is not None]
        return max(sizes, default=self.options.batch_size)

    def run(self) -> Inference:
        """Every read, in this thread: the models see each batch as it comes."""
        try:
            for number in range(len(self.groups)):
                read, self.first = self.first or self.set_up(number), None
                started = time.perf_counter() - read.setup_s  # a read's seconds count its set-up, wherever it ran
                if read.tiles is None:
                    read.tiles = self.read(number)
                try:
                    timing = run_read(self.slide, read.plan, read.names, read.pairs, read.tiles, self.options,
                                      started, read.recorder)  # fmt: skip
                    self.timings["reads"].append({**timing, "batch_size": self.batch_size(number)})
                finally:
                    close_reads(read.tiles)
        except BaseException:
            self.abort()
            raise
        return self

    def finish(self) -> dict[str, Any]:
        try:
            for stitcher in self.stitchers:
                stitcher.finalize()
            if self.recorder is not None:
                recorder, names = self.recorder
                started = time.perf_counter()
                recorder.finalize()
                seconds = recorder.seconds + time.perf_counter() - started
                self.timings["qc"] = {"read": "+".join(names), "mpp": recorder.plan.spec.mpp, "seconds": seconds}
        except BaseException:
            self.abort()
            raise
        return self.timings

    def abort(self) -> None:
        if self.first is not None and self.first.tiles is not None:
            close_reads(self.first.tiles)
        self.first = None
        for stitcher in self.stitchers:
            stitcher.abort()


def start_inference(
    slide: Slide,
    requests: Sequence[Request],
    store: Path,
    options: EngineOptions = DEFAULT_OPTIONS,
    qc: QcConfig | None = None,
    elsewhere: bool = False,
) -> Inference:
    """Check every request and set up the first read (`Inference`; `elsewhere`: in another thread than the one that
    will run it). `options` says how (engine/options.py): the
    predictor options go to each model's predictor (`models.predictor`), the rest to the loader. The timings name
    the precision each task ran in (`auto` decides per device and model card). Raises before reading when a model
    cannot serve its plan."""
    tasks = [r for r in requests if isinstance(r, TaskRequest)]
    names = [c for request in tasks for c in request.model.card.written_classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two tasks write heatmaps named {duplicates}; set heatmap_classes in a model card")
    for task in tasks:
        check_request(task)
    inference = Inference(slide, read_groups(requests), store, options, qc)
    try:
        inference.first = inference.set_up(0, elsewhere) if inference.groups else None
    except BaseException:
        inference.abort()
        raise
    return inference
