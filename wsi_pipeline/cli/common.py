"""What every command shares: the group that turns errors into one line and an exit status, and common options."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import click

from wsi_pipeline.config import Config, load_config
from wsi_pipeline.core.errors import (
    OutputWriteError,
    Terminated,
    UsageError,
    WsiError,
    install_signal_handlers,
    write_failure,
)
from wsi_pipeline.slide import Slide


class WsiGroup(click.Group):
    """Turns WsiError into `error: ...` on stderr with the error's exit status, a failed write (full disk,
    read-only or forbidden folder) into exit 9, Ctrl-C into exit 130 and SIGTERM into exit 143."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command's whole first sentence, wrapped (click cuts it to one line with '...')."""
        found = ((name, self.get_command(ctx, name)) for name in self.list_commands(ctx))
        commands = [(name, command) for name, command in found if command is not None and not command.hidden]
        if commands:
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit=1000)) for name, command in commands])

    def invoke(self, ctx: click.Context) -> Any:
        install_signal_handlers()
        try:
            result = super().invoke(ctx)
            work_done()
            return result
        except SystemExit:  # the command ended with its status (run, gather): its work is done
            work_done()
            raise
        except WsiError as exc:
            _fail(exc)
        except OSError as exc:
            failure = write_failure(exc)
            if failure is None:
                raise
            _fail(failure)
        except KeyboardInterrupt as exc:
            _quiet_background_writes()
            terminated = isinstance(exc, Terminated)
            what = "terminated (SIGTERM)" if terminated else "interrupted"
            click.echo(f"{what}: outputs being written were discarded; re-run to finish", err=True)
            # Every `finally` has run: partial outputs are gone. End here rather than in interpreter shutdown,
            # where torch's and zarr's worker threads and processes can turn the exit status into a death by
            # SIGINT (seen as -2 instead of 130 when the whole process group is signalled).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(Terminated.exit_code if terminated else 130)


def work_done() -> None:
    """A command's outputs are complete: SIGINT or SIGTERM from now on (its last lines, the interpreter's shutdown,
    ~0.6 s after `gather` or `run`) would only turn a finished command's status into 130/143, or say that outputs
    were discarded when none were. Commands call it before their final lines; the group, when they return."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _quiet_background_writes() -> None:
    # zarr's writer threads may still hold writes that fail, or are cancelled, after ours did; their asyncio reports
    # at exit would bury the one line that matters
    logging.getLogger("asyncio").disabled = True


def _fail(exc: WsiError) -> None:
    if isinstance(exc, OutputWriteError):
        _quiet_background_writes()
    message = exc.one_line()
    click.echo(f"error: {message}", err=True)
    sys.exit(exc.exit_code)


positive_mpp = click.FloatRange(min=0, min_open=True)


class MppOrAuto(click.ParamType):
    """A positive µm/px, or `auto`: estimated from the tissue (docs/mpp.md)."""

    name = "MPP|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return float(positive_mpp.convert(value, param, ctx))


mpp_or_auto = MppOrAuto()


def slide_with_mpp(slide: Slide, default_mpp: float | str | None) -> Slide:
    """`--default-mpp` for a single-slide command: a number or `auto` (estimated, and said) when the file records
    none."""
    from wsi_pipeline.run.slide_mpp import estimated_warning, resolve_mpp

    resolved, estimate = resolve_mpp(slide, default_mpp, "or --slide-mpp ")
    if estimate is not None:
        click.echo(f"warning: {slide.slide_id}: {estimated_warning(estimate)}", err=True)
    return resolved


default_mpp_option = click.option(
    "--default-mpp",
    type=mpp_or_auto,
    default=None,
    help="µm/px when the file records none; `auto` estimates it from the tissue (docs/mpp.md).",
)
slide_mpp_option = click.option(
    "--slide-mpp",
    type=positive_mpp,
    default=None,
    help="µm/px of the slide's level 0, overriding its metadata (needed when the file records none).",
)
config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML configuration (see configs/default.yaml).",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any configuration key, e.g. --set tasks.mitosis.tile_px=512.",
)
backend_option = click.option(
    "--backend",
    default=None,
    help="Slide reader backend (auto, openslide, ...) [slide.backend of the configuration: auto].",
)
encoder_option = click.option(
    "--encoder",
    "encoders",
    multiple=True,
    type=click.Path(file_okay=False),
    help="An encoder folder (import-encoder) or a model folder whose tile vectors to write to "
    "<slide_id>/embeddings/ (repeatable; embed.encoders of the configuration).",
)
slide_model_option = click.option(
    "--slide-model",
    "slide_model_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="A slide-level model (train-slide): each slide's score, class and attention map; needs its --encoder.",
)
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


def run_config(config_path: str | None, overrides: tuple[str, ...], backend: str | None = None) -> Config:
    """The validated configuration; `--backend` is `--set slide.backend=...`, checked first so that a wrong name is
    told as the option the user typed."""
    if backend is not None:
        from wsi_pipeline.slide.reader import backend_names

        if backend != "auto" and backend not in backend_names():
            raise UsageError(f"--backend: unknown reader backend {backend!r}; choose auto or one of {backend_names()}")
    extra = (f"slide.backend={backend}",) if backend is not None else ()
    return load_config(config_path, (*overrides, *extra))
