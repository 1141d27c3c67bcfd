"""The `wsi-pipeline` command line: one module per command group, each only parsing options and delegating.

Every user-facing error is one line on stderr and a distinct exit status (see the README's table).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys

import click

from wsi_pipeline import __version__
from wsi_pipeline.cli.cluster import gather, submit
from wsi_pipeline.cli.common import WsiGroup, config_option, run_config, set_option
from wsi_pipeline.cli.embed import embed, encoders_cmd, import_encoder_cmd, train_slide
from wsi_pipeline.cli.inference import predict, run
from wsi_pipeline.cli.models import calibrate_domain, colour_stats, demo, publish, study, train_mpp_estimator
from wsi_pipeline.cli.slides import info, synth, tiles, tissue
from wsi_pipeline.cli.training import evaluate, export_model_cmd, train
from wsi_pipeline.config import dump_config, load_config_without_plugins


@click.group(cls=WsiGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="wsi-pipeline")
def main() -> None:
    """Whole-slide image analysis: tissue, tiles, CNN heatmaps and QuPath outputs."""
    log = logging.getLogger("wsi_pipeline")  # the project's own notices (e.g. a reader falling back) on stderr
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@main.command("config")
@config_option
@set_option
@click.option(
    "--load-plugins", is_flag=True, help="Also load the plugins the configuration names (their code runs) and "
    "validate their tasks' sections."
)  # fmt: skip
def config_cmd(config_path: str | None, overrides: tuple[str, ...], load_plugins: bool) -> None:
    """Validate a configuration and print it resolved (defaults + file + --set), without running its plugins."""
    if load_plugins:
        click.echo(dump_config(run_config(config_path, overrides)), nl=False)
        return
    config, unvalidated = load_config_without_plugins(config_path, overrides)
    click.echo(dump_config(config), nl=False)
    if config.plugins:
        left = f"; tasks.{', tasks.'.join(unvalidated)} not validated" if unvalidated else ""
        click.echo(f"note: plugins not loaded (they run code; --load-plugins loads them){left}", err=True)


for command in (
    *(info, synth, tissue, tiles, predict, run, embed, submit, gather, encoders_cmd, import_encoder_cmd),
    *(
        train,
        train_slide,
        evaluate,
        export_model_cmd,
        study,
        publish,
        colour_stats,
        calibrate_domain,
        train_mpp_estimator,
        demo,
    ),
):
    main.add_command(command)


def program() -> None:
    """`wsi-pipeline` run as a program (the console script, `python -m wsi_pipeline.cli`): the command, its exit
    handlers (logging, multiprocessing), then the process ends without the interpreter tearing every module down,
    which takes ~0.2 s with torch imported (measured after `run`): time that a batch of small slides, or an array of
    one-slide jobs, pays once a process. Every command has closed its files and joined its threads by then. `main`
    stays an ordinary click group for callers in the same process."""
    try:
        main()
        status: object = 0
    except SystemExit as end:
        status = end.code
    if status is not None and not isinstance(status, int):  # sys.exit("message"): printed, status 1
        print(status, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (| head) has nothing left to take
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(status or 0)
