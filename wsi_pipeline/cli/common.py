"""What every command shares: the group that turns errors into one line and an exit status, and common options."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..config import Config, load_config
from ..errors import OutputWriteError, Terminated, WsiError, raise_on_sigterm, write_failure


class WsiGroup(click.Group):
    """Turns WsiError into `error: ...` on stderr with the error's exit status, a failed write (full disk,
    read-only or forbidden folder) into exit 9, Ctrl-C into exit 130 and SIGTERM into exit 143."""

    def invoke(self, ctx: click.Context) -> Any:
        raise_on_sigterm()
        try:
            return super().invoke(ctx)
        except WsiError as exc:
            _fail(exc)
        except OSError as exc:
            failure = write_failure(exc)
            if failure is None:
                raise
            _fail(failure)
        except Terminated:
            click.echo("terminated (SIGTERM): outputs being written were discarded; re-run to finish", err=True)
            sys.exit(Terminated.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: outputs being written were discarded; re-run to finish", err=True)
            sys.exit(130)


def _fail(exc: WsiError) -> None:
    if isinstance(exc, OutputWriteError):
        # zarr's writer threads may still hold writes that fail after ours did; their asyncio reports at exit
        # would bury the one line that matters
        logging.getLogger("asyncio").disabled = True
    message = " ".join(str(exc).split())  # one line, whatever the message's source put in it
    click.echo(f"error: {message}", err=True)
    sys.exit(exc.exit_code)


positive_mpp = click.FloatRange(min=0, min_open=True)
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
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


def run_config(config_path: str | None, overrides: tuple[str, ...], backend: str | None = None) -> Config:
    """The validated configuration; `--backend` is `--set slide.backend=...`."""
    extra = (f"slide.backend={backend}",) if backend is not None else ()
    return load_config(config_path, (*overrides, *extra))
