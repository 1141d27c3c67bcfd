"""Where the model waits in a `wsi-pipeline run`: the batch run in this process with every model call and every
slide step timed by thread, then what the models' thread did when no forward pass ran.

The cohort benchmark says how busy the model is (`model_busy_fraction`); this says what the rest was: the time before
the first forward pass (imports, the first slide's preparation), between batches (how much of it waiting for a slide
to be prepared or exported, seen as one slide's model turn starting only when another slide's step ends), and after
the last one; the slide steps of each thread (prepare, model turn, finish). On a GPU it tells whether the model or
the rest is the limit. Prints a summary and writes benchmarks/results/timeline.json (or --out).
Run: .venv/bin/python benchmarks/timeline.py [--out F] -- run SLIDES -o OUT --tasks epithelium_stroma [...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
EVENTS: list[tuple[str, str, float, float]] = []  # what, thread, start, end (s since this script started)


def timed(owner: Any, name: str, label: Any) -> None:
    """Replace `owner.name` (a method) by one that records each call: `label(self)` names it."""
    original = getattr(owner, name)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        begun = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            ended = time.perf_counter() - STARTED
            EVENTS.append((label(self), threading.current_thread().name, begun - STARTED, ended))

    setattr(owner, name, call)


def summary(ended: float) -> dict[str, Any]:
    calls = sorted((s, e) for what, _, s, e in EVENTS if what == "model")
    if not calls:
        return {"wall_s": round(ended, 3), "model_calls": 0}
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(calls)]
    steps = sorted((s, e, what, thread) for what, thread, s, e in EVENTS if what.startswith("step "))
    return {
        "wall_s": round(ended, 3),  # from this script's start: the interpreter's own start (~0.03 s) is not in it
        "model_calls": len(calls),
        "model_s": round(sum(e - s for s, e in calls), 3),
        "model_fraction": round(sum(e - s for s, e in calls) / ended, 3),
        "before_first_call_s": round(calls[0][0], 3),
        "between_calls_s": round(sum(gaps), 3),
        "between_calls_over_50ms_s": round(sum(g for g in gaps if g > 0.05), 3),
        "after_last_call_s": round(ended - calls[-1][1], 3),
        "steps": [
            {"slide": what[5:], "thread": thread, "start_s": round(s, 3), "seconds": round(e - s, 3)}
            for s, e, what, thread in steps
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/timeline.json")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the wsi-pipeline command to time")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from wsi_pipeline.cli import main as cli
    from wsi_pipeline.models import predictor
    from wsi_pipeline.run import flow

    timed(predictor.TorchModulePredictor, "__call__", lambda _: "model")
    timed(predictor.OnnxPredictor, "__call__", lambda _: "model")
    timed(flow.SlideInFlight, "step", lambda flight: f"step {flight.slide_id}")
    try:
        cli.main(command, prog_name="wsi-pipeline", standalone_mode=False)
    finally:
        ended = time.perf_counter() - STARTED
        from _report import machine_facts

        report = {"benchmark": "timeline", "machine": machine_facts(), "command": ["wsi-pipeline", *command]}
        report |= summary(ended)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        shown = {k: v for k, v in report.items() if k != "steps"}
        print(json.dumps(shown, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
