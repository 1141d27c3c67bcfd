"""The fp32 forward pass in ONNX Runtime on the CPU (models/cpu_runtime.py): the shipped models give torch's
probabilities and domain values on real tiles, one export serves every slide of a process, a network the exporter
cannot take runs in torch, and bf16 or `engine.runtime: torch` keep torch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CMU
from wsi_pipeline.engine import EngineOptions, TaskRequest, predict_slide
from wsi_pipeline.models import LoadedModel, ModelCard, PredictorOptions, load_model, make_predictor
from wsi_pipeline.models.domain import DOMAIN_KEY
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tissue import detect_tissue
from wsi_pipeline.slide.tissue_config import TissueConfig

DEFAULTS = Path("wsi_pipeline/models/defaults")
CPU = torch.device("cpu")


def _tiles(size: int, mpp: float, n: int = 24) -> torch.Tensor:
    slide = Slide(CMU)
    step = size * mpp / slide.mpp.x
    tiles = [slide.read_region(300 + (i % 6) * step, 500 + (i // 6) * step, size, size, mpp) for i in range(n)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize(("task", "tile_px", "mpp"), [("epithelium_stroma", 96, 1.0), ("mitosis", 256, 0.25)])
def test_a_shipped_model_gives_torchs_outputs_in_onnx_runtime(task: str, tile_px: int, mpp: float) -> None:
    """Real CMU tiles through both runtimes (fp32, BatchNorm folded): probabilities within 1e-5, the domain guard's
    values (computed in the graph) within 1e-3 of torch's hooks; each call of the same shape reuses one session."""
    model = load_model(DEFAULTS / task)
    batch = _tiles(tile_px, mpp, 24 if tile_px == 96 else 6)
    in_torch = make_predictor(model, CPU, PredictorOptions("fp32", runtime="torch"))
    in_onnx = make_predictor(model, CPU, PredictorOptions("fp32"))  # runtime auto
    assert (in_torch.runtime, in_onnx.runtime) == ("torch", "onnxruntime")  # type: ignore[attr-defined]
    with torch.inference_mode():
        expected, got = in_torch(batch), in_onnx(batch)
        again = make_predictor(model, CPU, PredictorOptions("fp32"))(batch[:5])  # another slide, a smaller batch
    assert set(got) == set(expected) and DOMAIN_KEY in got
    for name in expected:
        tolerance = 1e-3 * max(1.0, float(expected[name].abs().max())) if name == DOMAIN_KEY else 1e-5
        assert float((got[name] - expected[name]).abs().max()) < tolerance, name
        assert float((again[name] - got[name][:5]).abs().max()) < 1e-5, name
    assert float(expected[model.card.written_classes[0]].max()) > 0.05  # not a map of zeros
    assert len(model.sessions) == 1 and next(iter(model.sessions.values())) is not None


def test_bf16_and_the_torch_setting_keep_torch() -> None:
    model = load_model(DEFAULTS / "epithelium_stroma")
    assert make_predictor(model, CPU, PredictorOptions("bf16")).runtime == "torch"  # type: ignore[attr-defined]
    assert make_predictor(model, CPU, PredictorOptions("fp32", runtime="torch")).runtime == "torch"  # type: ignore[attr-defined]
    assert model.sessions == {}


class _Unexportable(torch.nn.Module):
    """A classifier with an operator ONNX has no counterpart for (erfcx)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.special.erfcx(self.conv(x)).mean(dim=(2, 3)))


def test_a_network_onnx_cannot_take_runs_in_torch_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    card = ModelCard(name="erfcx-net", task="epithelium_stroma", kind="classifier", architecture="custom", mpp=1.0,
                     tile_px=32, classes=["a", "b"])  # fmt: skip
    model = LoadedModel(card, _Unexportable().eval())
    batch = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    with caplog.at_level(logging.INFO, logger="wsi_pipeline.models"):
        predictors = [make_predictor(model, CPU, PredictorOptions("fp32")) for _ in range(2)]
        for predictor in predictors:
            predictor.prepare(32)  # type: ignore[attr-defined]
    assert [p.runtime for p in predictors] == ["torch", "torch"]  # type: ignore[attr-defined]
    said = [r.getMessage() for r in caplog.records if "ONNX Runtime cannot take it" in r.getMessage()]
    assert len(said) == 1 and "erfcx" in said[0] and len(said[0].splitlines()) == 1
    with torch.inference_mode():
        got = predictors[0](batch)
        expected = make_predictor(model, CPU, PredictorOptions("fp32", runtime="torch"))(batch)
    assert torch.equal(got["a"], expected["a"])


def test_the_engine_records_the_runtime_each_task_ran_in(tmp_path: Path) -> None:
    """predict_slide exports while the read is set up and names the runtime in its timings; the heatmaps equal
    torch's to the stored precision (uint8 / float16: a difference of 1e-6 can move one value by one step)."""
    from wsi_pipeline.config import Config
    from wsi_pipeline.heatmap import open_heatmap
    from wsi_pipeline.tasks import task_model
    from wsi_pipeline.tasks.reading import read_spec

    slide = Slide(CMU)
    model = task_model("epithelium_stroma", None)
    config = Config()
    spec = read_spec("epithelium_stroma", config.task("epithelium_stroma"), model.card)
    plan = spec.plan(slide, detect_tissue(slide, TissueConfig()))
    maps = {}
    for runtime in ("torch", "auto"):
        options = EngineOptions(batch_size=64, workers=0, progress=False, precision="fp32", runtime=runtime)
        timings = predict_slide(slide, [TaskRequest("epithelium_stroma", model, plan)], tmp_path / runtime, options)
        assert timings["runtime"] == {"epithelium_stroma": "torch" if runtime == "torch" else "onnxruntime"}
        maps[runtime] = np.asarray(open_heatmap(tmp_path / runtime / "epithelium").levels[0][:]).astype(float)
    assert maps["auto"].shape == (1, *plan.grid[::-1]) and float(maps["auto"].max()) > 0.5
    assert float(np.abs(maps["auto"] - maps["torch"]).max()) <= 1 / 255 + 1e-6


def test_an_exported_graph_is_kept_for_the_next_process_and_a_damaged_one_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first process exports into $WSI_PIPELINE_CACHE; the next (here: a fresh load of the model) reads the same
    graph (the file is not written again) and gives the same outputs; other weights make another graph; a damaged
    file is said in one line, exported again and replaced; a cache folder that cannot be written fails nothing."""
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path / "cache"))
    batch = _tiles(96, 1.0, 8)

    def outputs(model: LoadedModel) -> dict[str, torch.Tensor]:
        predictor = make_predictor(model, CPU, PredictorOptions("fp32"))
        predictor.prepare(96)  # type: ignore[attr-defined]
        assert predictor.runtime == "onnxruntime"  # type: ignore[attr-defined]
        with torch.inference_mode():
            return predictor(batch)

    first = outputs(load_model(DEFAULTS / "epithelium_stroma"))
    kept = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(kept) == 1 and kept[0].stat().st_size > 10_000
    written = kept[0].stat().st_ino  # a graph written again replaces the file (a new inode); a read only marks it used
    second = outputs(load_model(DEFAULTS / "epithelium_stroma"))
    assert kept[0].stat().st_ino == written
    assert all(torch.equal(first[k], second[k]) for k in first)

    other = load_model(DEFAULTS / "epithelium_stroma")
    with torch.no_grad():
        next(other.module.parameters()).mul_(1.01)  # type: ignore[union-attr]
    outputs(other)
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2

    kept[0].write_bytes(b"not a graph")
    with caplog.at_level(logging.INFO, logger="wsi_pipeline.models"):
        third = outputs(load_model(DEFAULTS / "epithelium_stroma"))
    said = [r.getMessage() for r in caplog.records if "could not be loaded" in r.getMessage()]
    assert len(said) == 1 and len(said[0].splitlines()) == 1
    assert all(torch.equal(first[k], third[k]) for k in first) and kept[0].stat().st_size > 10_000

    (tmp_path / "not-a-folder").write_text("a file where the cache folder would be")
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path / "not-a-folder"))
    fourth = outputs(load_model(DEFAULTS / "epithelium_stroma"))
    assert all(torch.equal(first[k], fourth[k]) for k in first)


def test_a_batch_runs_in_slices_with_the_same_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch larger than a slice (`PIXELS_PER_RUN`, here 5 tiles) runs slice by slice, ragged last one included,
    with the outputs of one whole-batch call, bit for bit (probabilities and the guard's values)."""
    from wsi_pipeline.models import cpu_runtime

    model = load_model(DEFAULTS / "epithelium_stroma")
    batch = _tiles(96, 1.0, 12)
    predictor = make_predictor(model, CPU, PredictorOptions("fp32"))
    calls: list[int] = []
    session = predictor.onnx.session((96, 96))  # type: ignore[attr-defined]
    whole = predictor(batch)
    monkeypatch.setattr(cpu_runtime, "PIXELS_PER_RUN", 5 * 96 * 96)
    monkeypatch.setattr(
        session, "run", lambda names, feed, run=session.run: calls.append(len(feed["input"])) or run(names, feed)
    )
    sliced = predictor(batch)
    assert calls == [5, 5, 2]
    assert set(sliced) == set(whole) and all(torch.equal(whole[k], sliced[k]) for k in whole)


_DEFERRED = """
import sys, torch
from wsi_pipeline.models import PredictorOptions, load_model, make_predictor
model = load_model(sys.argv[1], defer_network=True)
predictor = make_predictor(model, torch.device("cpu"), PredictorOptions("fp32"))
predictor.prepare(64)
with torch.inference_mode():
    out = predictor(torch.arange(2 * 3 * 64 * 64).reshape(2, 3, 64, 64).remainder(251).to(torch.uint8))
print(model.module is None, "torchvision" in sys.modules, "torch._dynamo" in sys.modules, out["b"].tolist())
"""


def test_a_kept_graph_of_a_model_folder_runs_without_building_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's load (`defer_network`) of a folder whose graph is kept builds no torch network: a torchvision
    architecture's process never imports torchvision (1.2-1.7 s, 150 MB) and gives the outputs of the process that
    built and exported it; torch, asked for, builds it then. A shipped model, deferred, gives the eager outputs."""
    import subprocess
    import sys

    import torchvision

    from wsi_pipeline.models import save_model
    from wsi_pipeline.models.architectures import seeded

    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path / "cache"))
    net = seeded(torchvision.models.get_model("mobilenet_v3_small", num_classes=2), 0).eval()
    card = ModelCard(name="m", task="epithelium_stroma", kind="classifier", architecture="mobilenet_v3_small",
                     mpp=1.0, tile_px=64, classes=["a", "b"])  # fmt: skip
    folder = save_model(tmp_path / "model", net, card)

    def process() -> list[str]:
        done = subprocess.run([sys.executable, "-c", _DEFERRED, str(folder)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split(" ", 3)

    first, second = process(), process()  # the first builds and exports; the second finds the graph
    assert first[:3] == ["False", "True", "True"] and second[:3] == ["True", "False", "False"]
    assert first[3] == second[3] and len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1

    batch = _tiles(96, 1.0, 8)
    eager = make_predictor(load_model(DEFAULTS / "epithelium_stroma", defer_network=True), CPU)
    eager.prepare(96)  # type: ignore[attr-defined]
    deferred_model = load_model(DEFAULTS / "epithelium_stroma", defer_network=True)
    assert deferred_model.module is None and deferred_model.folder_key is not None
    deferred = make_predictor(deferred_model, CPU)
    with torch.inference_mode():
        expected, got = eager(batch), deferred(batch)
        in_torch = make_predictor(deferred_model, CPU, PredictorOptions("fp32", runtime="torch"))(batch)
    assert set(got) == set(expected) and DOMAIN_KEY in got
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert deferred_model.module is not None  # built when torch was asked to run it
    assert float((in_torch["epithelium"] - got["epithelium"]).abs().max()) < 1e-5


def test_graphs_unused_for_a_month_are_removed_when_another_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Using a kept graph marks it used; keeping a new one removes ours unused for UNUSED_DAYS, and nothing else: a
    file of another name, a link (nor what it points to) and a recently used graph stay."""
    import os
    import time

    from wsi_pipeline.models import onnx_cache

    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path / "cache"))
    folder = onnx_cache.cache_folder()
    folder.mkdir(parents=True)
    month = time.time() - (onnx_cache.UNUSED_DAYS + 1) * 86400
    stale, used, foreign = folder / f"{'a' * 32}.onnx", folder / f"{'b' * 24}-{'c' * 16}.onnx", folder / "mine.onnx"
    target = tmp_path / f"{'d' * 32}.onnx"
    for path in (stale, used, foreign, target):
        path.write_bytes(b"graph")
        os.utime(path, (month, month))
    link = folder / f"{'e' * 32}.onnx"
    link.symlink_to(target)
    assert onnx_cache.kept_graph(f"{'b' * 24}-{'c' * 16}") == used  # read now: used
    assert onnx_cache.keep_graph("f" * 32, b"new graph") == folder / f"{'f' * 32}.onnx"
    assert not stale.exists()
    assert used.exists() and foreign.exists() and link.is_symlink() and target.exists()
