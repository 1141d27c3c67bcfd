"""Side by side with two peers that do what `wsi-pipeline predict` does for a classifier: TIAToolbox 1.3.2's
PatchPredictor and WSInfer 0.6.1's `wsinfer run` (`make bench-peers` builds each in its own venv under build/), the
same seeded torchvision resnet18 (2 classes; WSInfer takes it as TorchScript), 224 px at 0.5 µm/px, stride 224,
batch 64, each tool's own tissue mask, on a synthetic 20 000 x 16 000 px slide at 0.25 µm/px and on
CMU-1-Small-Region (CPU). Ours runs at its defaults (on the CPU: fp32 in ONNX Runtime), in fp32 named (the peers'
precision) and in torch at its `auto` precision (bf16 where the CPU has it natively). The tools alternate
`--repeats` times in one run. Each is a whole process: wall time, patches/s, peak RSS summed over every process of
its tree (VmHWM of each) and the peak of the tree's summed PSS (shared pages counted once), read from /proc while it
runs. Writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import contextlib
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


def measured(command: list[str], env: dict[str, str] | None = None, interval: float = 0.1) -> dict[str, object]:
    """Run `command`; wall seconds, its stdout, and the sum over its process tree of each process's VmHWM. Every
    `interval` s the tree is found anew (each process's VmHWM is its own high-water mark; PSS, which has none, is
    sampled then): each look reads every process's stat on the machine, a few ms of CPU."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, float] = {}
    pss_peak = 0.0
    while proc.poll() is None:
        pss = 0.0
        for pid in _tree(proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                match = re.search(r"VmHWM:\s+(\d+) kB", status)
                rollup = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
            except OSError:
                continue
            if match:
                peaks[pid] = max(peaks.get(pid, 0.0), int(match.group(1)) / 1024)
            if rollup:
                pss += int(rollup.group(1)) / 1024
        pss_peak = max(pss_peak, pss)
        with contextlib.suppress(subprocess.TimeoutExpired):  # back as soon as it ends: the wall is not late
            proc.wait(timeout=interval)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({proc.returncode}):\n{err[-3000:]}")
    wall = time.perf_counter() - started
    return {"seconds": wall, "peak_rss_mb": sum(peaks.values()), "peak_pss_mb": pss_peak, "stdout": out}


WSINFER = ROOT / "build" / "wsinfer-venv" / "bin" / "wsinfer"
WSINFER_CONFIG = {
    "spec_version": "1.0",
    "architecture": "resnet18",
    "num_classes": 2,
    "class_names": ["epithelium", "stroma"],
    "patch_size_pixels": 224,
    "spacing_um_px": 0.5,
    # the size it was read at (a no-op at 0.5 µm/px; WSInfer reads level 0 and resizes only when told), then our
    # card's default normalisation (mean = std = 0.5)
    "transform": [
        {"name": "Resize", "arguments": {"size": 224}},
        {"name": "ToTensor"},
        {"name": "Normalize", "arguments": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
    ],
}


def wsinfer_setup(tmp: Path, net: object) -> tuple[list[str], dict[str, str]]:
    """WSInfer's command and environment: the network as TorchScript, its config, and a HOME whose empty model-zoo
    registry lets it start without the network (it fetches the registry on every call otherwise)."""
    import torch

    torch.jit.script(net).save(str(tmp / "model.ts.pt"))
    (tmp / "wsinfer.json").write_text(json.dumps(WSINFER_CONFIG))
    zoo = tmp / "home" / ".wsinfer-zoo"
    zoo.mkdir(parents=True)
    (zoo / "wsinfer-zoo-registry.json").write_text('{"models": {}}')
    env = {**os.environ, "HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "HF_HUB_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore::FutureWarning", "TQDM_DISABLE": "1"}  # fmt: skip
    command = [str(WSINFER), "--log-level", "warning", "run", "--model-path", str(tmp / "model.ts.pt"),
               "--config", str(tmp / "wsinfer.json"), "--batch-size", "64", "--num-workers", "2"]  # fmt: skip
    return command, env


def rated(measure: dict[str, object], patches: int) -> dict[str, object]:
    """A tool's measures with its patch count and patches per second (its stdout dropped)."""
    measure.pop("stdout", None)
    return {**measure, "patches": patches, "patches_per_s": patches / float(measure["seconds"])}  # type: ignore[arg-type]


def median_ratio(rows: list[dict[str, object]], ours: str, peer: str, key: str) -> float:
    """The median over `rows` of ours[key] / peer[key] (each row: one round of the tools)."""
    return statistics.median(float(r[ours][key]) / float(r[peer][key]) for r in rows)  # type: ignore[index]


def wsinfer_patches(results: Path) -> int:
    """Rows of the one CSV WSInfer wrote (a header, then a patch per line)."""
    table = next((results / "model-outputs-csv").glob("*.csv"))
    return len(table.read_text().strip().splitlines()) - 1


# ours three ways: the default (on the CPU: fp32 in ONNX Runtime), fp32 named (the peers' precision), and torch at
# its `auto` precision (bf16 where the CPU has it natively: the default before engine.runtime)
OURS = {"auto": "engine.precision=auto", "fp32": "engine.precision=fp32", "torch_auto": "engine.runtime=torch"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/peers.json")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"{PEERS_PYTHON} not found: run `make bench-peers` (it builds TIAToolbox there first)")
    import torch
    import torchvision
    from _report import shared_slide

    from wsi_pipeline.models import ModelCard, save_model
    from wsi_pipeline.models.architectures import seeded
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slides = {
            "synthetic": write_synthetic_slide(
                tmp / "synthetic" / "slide.svs", default_layout(20000, 16000, 0.25, seed=5)
            ),
            "CMU-1-Small-Region": shared_slide("CMU-1-Small-Region.svs"),
        }
        (tmp / "synthetic" / "slide.truth.json").unlink()  # WSInfer takes every file of a folder for a slide
        folders = {"synthetic": tmp / "synthetic", "CMU-1-Small-Region": tmp / "cmu"}
        folders["CMU-1-Small-Region"].mkdir()
        (folders["CMU-1-Small-Region"] / "CMU-1-Small-Region.svs").symlink_to(slides["CMU-1-Small-Region"])
        net = seeded(torchvision.models.resnet18(weights=None, num_classes=2), 0).eval()
        torch.save(net.state_dict(), tmp / "resnet18.pt")
        card = ModelCard(
            name="seeded-resnet18", task="epithelium_stroma", kind="classifier", architecture="resnet18",
            mpp=0.5, tile_px=224, classes=["epithelium", "stroma"],
        )  # fmt: skip
        save_model(tmp / "model", net, card)
        (tmp / "tia.py").write_text(TIATOOLBOX_SCRIPT)
        wsinfer, wsinfer_env = wsinfer_setup(tmp, net) if WSINFER.exists() else ([], {})
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
        for repeat in range(args.repeats):
            for slide_name, slide in slides.items():
                row: dict[str, object] = {"slide": slide_name, "repeat": repeat}
                tia = measured([str(PEERS_PYTHON), str(tmp / "tia.py"), str(slide), str(tmp / "resnet18.pt"),
                                str(tmp / f"tia-{slide_name}-{repeat}")])  # fmt: skip
                row["tiatoolbox"] = rated(tia, json.loads(str(tia.pop("stdout")).strip().splitlines()[-1])["patches"])
                if wsinfer:
                    results = tmp / f"wsinfer-{slide_name}-{repeat}"
                    folder = ["--wsi-dir", str(folders[slide_name]), "--results-dir", str(results)]
                    peer = measured([*wsinfer, *folder], wsinfer_env)
                    row["wsinfer"] = rated(peer, wsinfer_patches(results))
                for precision, setting in OURS.items():
                    ours = [sys.executable, "-m", "wsi_pipeline.cli", "predict", str(slide),
                            "--task", "epithelium_stroma", "--model", str(tmp / "model"), "--batch-size", "64",
                            "--workers", "2", "--device", "cpu",
                            "--set", "tasks.epithelium_stroma.overlap_px=0",  # stride 224 as the peers'
                            "--set", setting, "--no-progress",
                            "-o", str(tmp / f"ours-{slide_name}-{precision}-{repeat}")]  # fmt: skip
                    mine = measured(ours, env)
                    said = re.search(r": (\d+) tiles with", str(mine["stdout"]))
                    row[f"wsi_pipeline_{precision}"] = rated(mine, int(said.group(1)))  # type: ignore[union-attr]
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary: dict[str, object] = {}
    for slide_name in ("synthetic", "CMU-1-Small-Region"):
        mine = [r for r in rows if r["slide"] == slide_name]
        figures: dict[str, float] = {}
        for peer in ("tiatoolbox", "wsinfer"):
            if not all(peer in r for r in mine):
                continue
            for precision in OURS:
                ours = f"wsi_pipeline_{precision}"
                figures[f"patches_per_s_ours_{precision}_over_{peer}"] = median_ratio(mine, ours, peer, "patches_per_s")
            for memory in ("peak_rss_mb", "peak_pss_mb"):
                figures[f"{memory}_ours_over_{peer}"] = median_ratio(mine, "wsi_pipeline_auto", peer, memory)
        summary[slide_name] = figures
    write_report(
        args.out,
        {
            "benchmark": "peers",
            "machine": machine_facts(),
            "peers": ["tiatoolbox 1.3.2 PatchPredictor", "wsinfer 0.6.1 run (TorchScript of the same network)"]
            if WSINFER.exists()
            else ["tiatoolbox 1.3.2 PatchPredictor"],
            "rows": rows,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
