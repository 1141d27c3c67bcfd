"""What one `run` applies to every slide, bound once before the first: the configuration, the tasks, how the
engine runs (device resolved now, so a device that is not here is refused before any slide), and the run's own
choices (redo finished slides, the µm/px of slides that record none)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wsi_pipeline.config import Config
from wsi_pipeline.engine.options import EngineOptions


def engine_options(config: Config, *, device: str, workers: int, batch_size: int, progress: bool) -> EngineOptions:
    """The configuration's `engine` section and the command line's engine options, in one object."""
    engine = config.engine
    return EngineOptions.resolved(
        device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        precision=engine.precision,
        compile=engine.compile,
        fuse_batchnorm=engine.fuse_batchnorm,
        runtime=engine.runtime,
        loader=engine.loader,
        decode=engine.decode,
    )


@dataclass(frozen=True)
class RunSettings:
    config: Config
    tasks: tuple[str, ...]
    engine: EngineOptions
    overwrite: bool = False
    default_mpp: float | str | None = None  # for slides that record no µm/px (--default-mpp; auto: estimated)

    @classmethod
    def of(
        cls,
        config: Config,
        tasks: Sequence[str],
        *,
        device: str = "auto",
        workers: int = 1,
        progress: bool = True,
        overwrite: bool = False,
        default_mpp: float | str | None = None,
    ) -> RunSettings:
        """Settings for `tasks` (and the configuration's encoders). Each read of a slide runs in batches of its own
        tasks' batch size (engine/predict.py); the engine's, the largest of them all, is for a request without one."""
        sizes = [config.task(t).batch_size for t in tasks]
        batch_size = max([*sizes, *([config.embed.batch_size] if config.embed.encoders or not sizes else [])])
        engine = engine_options(config, device=device, workers=workers, batch_size=batch_size, progress=progress)
        return cls(config, tuple(tasks), engine, overwrite, default_mpp)
