"""What every benchmark shares: the machine's facts, a measurement in a fresh process, and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def machine_facts(gpu: str | None = None) -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def in_fresh_process(script: str, *args: str) -> dict[str, Any]:
    """Run `script args` in a new interpreter (so its peak RSS is its own) and return the JSON of its last line."""
    done = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
