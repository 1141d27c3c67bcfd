"""What every benchmark shares: the machine's facts, a measurement in a fresh process, and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def shared_slide(name: str) -> Path:
    """A real slide of ../shared/data (or $WSI_SHARED_DATA, as the tests find it: a GPU machine gets a copy)."""
    data = os.environ.get("WSI_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
    return Path(data) / "slides" / name


def machine_facts(gpu: str | None = None) -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **cpu_facts(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def cpu_facts() -> dict[str, Any]:
    """The CPU's model and the vector units that decide a CPU model's speed here: a virtual machine of this project
    has been lent hosts without and with AVX-512 / native bf16, whose figures differ 2-4x (docs/benchmarks.md)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    listed = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(listed.group(1).split()) if listed else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {"cpu": model.group(1).strip() if model else None, "cpu_flags": [f for f in wanted if f in flags]}


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Linux's VmHWM belongs to the process's address space, which exec
    starts afresh; `ru_maxrss` does not: a child inherits its parent's high-water mark from the fork, which made
    earlier figures of this benchmark report the parent's size."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(script: str, *args: str) -> dict[str, Any]:
    """Run `script args` in a new interpreter (so its peak RSS is its own) and return the JSON of its last line."""
    done = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
