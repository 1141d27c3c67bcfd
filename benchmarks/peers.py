"""Side by side with TIAToolbox 1.3.2 (`make bench-peers` builds it in build/peers-venv): its PatchPredictor and
`wsi-pipeline predict`, the same seeded torchvision resnet18 (2 classes), 224 px at 0.5 µm/px, stride 224, batch 64,
2 workers, each tool's own default tissue mask, on the same synthetic 20 000 x 16 000 px slide at 0.25 µm/px (CPU).
The two alternate `--repeats` times in one run. Each is a whole process: wall time, patches/s, and peak RSS summed
over every process of its tree (VmHWM of each, read from /proc while it runs). Writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import machine_facts, write_report

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / "build" / "peers-venv" / "bin" / "python"

TIATOOLBOX_SCRIPT = r"""
import json, sys, time
import torch, torchvision
from tiatoolbox.models.engine.patch_predictor import IOPatchPredictorConfig, PatchPredictor
from tiatoolbox.models.models_abc import ModelABC

class SeededResnet(ModelABC):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None, num_classes=2)
        state = torch.load(sys.argv[2], weights_only=True)
        self.net.load_state_dict(state)
    @staticmethod
    def preproc(image):
        return image
    def forward(self, imgs):
        x = imgs.permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5).contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.net(x), dim=1)
    @staticmethod
    def infer_batch(model, batch_data, on_gpu):
        model.eval()
        with torch.inference_mode():
            return model(batch_data).numpy()

started = time.perf_counter()
model = SeededResnet().to(memory_format=torch.channels_last)
config = IOPatchPredictorConfig(
    input_resolutions=[{"units": "mpp", "resolution": 0.5}], patch_input_shape=[224, 224], stride_shape=[224, 224]
)
predictor = PatchPredictor(model=model, batch_size=64, num_loader_workers=2)
output = predictor.predict([sys.argv[1]], mode="wsi", ioconfig=config, on_gpu=False, save_dir=sys.argv[3])
# one slide: the predictions come back (a batch of slides would be saved as <save_dir>/<i>.raw.json)
result = output[0] if isinstance(output, list) else json.load(open(next(iter(output.values()))["raw"]))
patches = len(result["coordinates"])
print(json.dumps({"patches": patches, "seconds": time.perf_counter() - started}))
"""


def _tree(root: int) -> list[int]:
    """`root` and all its descendants now alive."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def measured(command: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run `command`; wall seconds, its stdout, and the sum over its process tree of each process's VmHWM."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                match = re.search(r"VmHWM:\s+(\d+) kB", status)
            except OSError:
                continue
            if match:
                peaks[pid] = max(peaks.get(pid, 0.0), int(match.group(1)) / 1024)
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": sum(peaks.values()), "stdout": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/peers.json")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"{PEERS_PYTHON} not found: run `make bench-peers` (it builds TIAToolbox there first)")
    import torch
    import torchvision

    from wsi_pipeline.models import ModelCard, save_model
    from wsi_pipeline.models.architectures import seeded
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slide = write_synthetic_slide(tmp / "slide.svs", default_layout(20000, 16000, 0.25, seed=5))
        net = seeded(torchvision.models.resnet18(weights=None, num_classes=2), 0)
        torch.save(net.state_dict(), tmp / "resnet18.pt")
        card = ModelCard(
            name="seeded-resnet18", task="epithelium_stroma", kind="classifier", architecture="resnet18",
            mpp=0.5, tile_px=224, classes=["epithelium", "stroma"],
        )  # fmt: skip
        save_model(tmp / "model", net, card)
        (tmp / "tia.py").write_text(TIATOOLBOX_SCRIPT)
        ours = [sys.executable, "-m", "wsi_pipeline.cli", "predict", str(slide), "--task", "epithelium_stroma",
                "--model", str(tmp / "model"), "--batch-size", "64", "--workers", "2", "--device", "cpu",
                "--set", "tasks.epithelium_stroma.overlap_px=0",  # stride 224 as TIAToolbox's (the task's own: 48 px)
                "--no-progress"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
        for repeat in range(args.repeats):
            tia_dir = tmp / f"tia-{repeat}"
            tia = measured([str(PEERS_PYTHON), str(tmp / "tia.py"), str(slide), str(tmp / "resnet18.pt"), str(tia_dir)])
            tia_result = json.loads(str(tia.pop("stdout")).strip().splitlines()[-1])
            mine = measured([*ours, "-o", str(tmp / f"ours-{repeat}")], env)
            tiles = int(re.search(r": (\d+) tiles with", str(mine.pop("stdout"))).group(1))  # type: ignore[union-attr]
            row = {
                "tiatoolbox": {**tia, "patches": tia_result["patches"],
                               "patches_per_s": tia_result["patches"] / float(tia["seconds"])},  # type: ignore[arg-type]
                "wsi_pipeline": {**mine, "patches": tiles, "patches_per_s": tiles / float(mine["seconds"])},  # type: ignore[arg-type]
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    speed = [r["wsi_pipeline"]["patches_per_s"] / r["tiatoolbox"]["patches_per_s"] for r in rows]  # type: ignore[index]
    wall = [r["tiatoolbox"]["seconds"] / r["wsi_pipeline"]["seconds"] for r in rows]  # type: ignore[index]
    memory = [r["wsi_pipeline"]["peak_rss_mb"] / r["tiatoolbox"]["peak_rss_mb"] for r in rows]  # type: ignore[index]
    write_report(
        args.out,
        {
            "benchmark": "peers",
            "machine": machine_facts(),
            "peer": "tiatoolbox 1.3.2 PatchPredictor",
            "rows": rows,
            "patches_per_s_ours_over_tiatoolbox": statistics.median(speed),
            "wall_tiatoolbox_over_ours": statistics.median(wall),
            "peak_rss_ours_over_tiatoolbox": statistics.median(memory),
        },
    )


if __name__ == "__main__":
    main()
