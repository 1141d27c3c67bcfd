"""The model-format seam: a format registered from this file alone (card name, file, loader) loads a model folder
and runs through `predict` to the same heatmap as the same network in the built-in format, with the engine's
precision and BatchNorm folding; the built-in timm, ONNX and TorchScript folders do too."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CMU, run_cli
from wsi_pipeline.core.inventory import file_sha256
from wsi_pipeline.engine import EngineOptions, TaskRequest, predict_slide
from wsi_pipeline.heatmap import open_heatmap
from wsi_pipeline.models import (
    LoadedModel,
    ModelCard,
    ModelError,
    ModelFormat,
    PredictorOptions,
    load_card,
    load_model,
    make_predictor,
    register_format,
    save_model,
)
from wsi_pipeline.models.architectures import build, seeded
from wsi_pipeline.models.formats import model_format, unregister_format
from wsi_pipeline.models.portable import export_model
from wsi_pipeline.run.record import weights_digest
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import plan_tiles
from wsi_pipeline.slide.tissue import detect_tissue
from wsi_pipeline.slide.tissue_config import TissueConfig

FP32 = PredictorOptions(precision="fp32")
NPZ = "npz_test"


def _npz_module(network: Path, card: ModelCard) -> torch.nn.Module:
    """A format of this file's own: the card's architecture with weights from a NumPy .npz (no pickles)."""
    module = build(card.architecture, len(card.classes), **card.architecture_args)
    with np.load(network, allow_pickle=False) as arrays:
        module.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files}, strict=True)
    return module


def register() -> None:
    """The plugin entry (`plugins: [this file:register]`)."""
    register_format(ModelFormat(NPZ, "weights.npz", _npz_module))


def _write_npz_folder(directory: Path, module: torch.nn.Module, card: ModelCard) -> Path:
    directory.mkdir(parents=True)
    np.savez(directory / "weights.npz", **{k: v.numpy() for k, v in module.state_dict().items()})
    card = card.model_copy(update={"format": NPZ, "weights_sha256": file_sha256(directory / "weights.npz")})
    (directory / "model_card.json").write_text(card.model_dump_json())
    return directory


@pytest.mark.e2e  # the CLI in a subprocess, training or whole-slide inference
def test_a_format_registered_from_this_file_loads_a_folder_and_runs_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    """One registration (card name, file, loader) and a folder of that format loads like a built-in one (sha256
    checked), gets the engine's precision and BatchNorm folding, and `predict` (a subprocess that loads this file
    as a plugin) writes the same heatmap as the same network in a safetensors folder. A card naming a format that
    no one registered is refused with exit 10, naming the known formats."""
    card = ModelCard(
        name="seeded-cnn", task="metastasis", kind="classifier", architecture="small_cnn",
        architecture_args={"width": 4, "blocks": 2}, mpp=2.0, tile_px=64, classes=["tumour", "normal"],
    )  # fmt: skip
    module = seeded(build("small_cnn", 2, width=4, blocks=2), 3).eval()
    save_model(tmp_path / "safetensors", module, card)
    npz = _write_npz_folder(tmp_path / "npz", module, card)
    with pytest.raises(
        ModelError, match=f"unknown model format '{NPZ}'; known: encoder_head, onnx, safetensors, torchscript"
    ):
        load_model(npz)
    register()
    try:
        loaded = load_model(npz)
        assert loaded.format == NPZ and isinstance(loaded.module, torch.nn.Module)
        assert weights_digest(loaded) == file_sha256(npz / "weights.npz")[:16]
        bf16 = make_predictor(loaded, torch.device("cpu"), PredictorOptions(precision="bf16"))
        assert bf16.bf16 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in bf16.run.modules())  # type: ignore[attr-defined]
        as_written = make_predictor(loaded, torch.device("cpu"), PredictorOptions(fuse_batchnorm=False))
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in as_written.run.modules())  # type: ignore[attr-defined]
    finally:
        unregister_format(NPZ)
    plugin = tmp_path / "plugin.yaml"
    plugin.write_text(f"plugins: ['{Path(__file__).resolve()}:register']\n")
    maps = {}
    for fmt in ("safetensors", "npz"):
        out = tmp_path / f"out-{fmt}"
        done = run_cli(
            "predict", str(CMU), "--task", "metastasis", "--model", str(tmp_path / fmt), "-o", str(out),
            "-c", str(plugin), "--device", "cpu", "--set", "engine.precision=fp32", "--no-progress",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        maps[fmt] = open_heatmap(out / CMU.stem / "heatmaps.zarr" / "tumour").channel("tumour")
    covered = maps["safetensors"] > 0
    assert covered.sum() > 20 and np.ptp(maps["safetensors"][covered]) > 1e-3
    assert np.array_equal(maps["npz"], maps["safetensors"])


def _engine_map(model: LoadedModel, slide: Slide, plan: list, store: Path, name: str) -> np.ndarray:
    request = TaskRequest(model.card.task, model, plan, dtype="float32")
    predict_slide(
        slide,
        [request],
        store,
        EngineOptions(device=torch.device("cpu"), batch_size=8, workers=0, progress=False, precision="fp32"),
    )
    return open_heatmap(store / name).channel(name)


@pytest.mark.e2e  # the CLI in a subprocess, training or whole-slide inference
def test_timm_onnx_and_torchscript_folders_give_the_same_heatmap(data_dir: Path, tmp_path: Path) -> None:
    """Bring your own model: a timm architecture saved as a safetensors folder, exported with `wsi-pipeline
    export-model` to ONNX and TorchScript (real CLI), each loaded from its folder and run by the engine on a real
    slide: the three tumour maps agree to 1e-5; a damaged ONNX file is refused with exit 10 in one line."""
    card = ModelCard(
        name="timm-test",
        task="metastasis",
        kind="classifier",
        architecture="timm:test_resnet",
        mpp=2.0,
        tile_px=64,
        classes=["tumour", "normal"],
    )
    torch.manual_seed(5)  # timm's own initialisation, seeded
    save_model(tmp_path / "timm", build("timm:test_resnet", 2).eval(), card)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "timm" / "weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' 0600
    for fmt in ("onnx", "torchscript"):
        done = run_cli("export-model", str(tmp_path / "timm"), "--format", fmt, "-o", str(tmp_path / fmt))
        assert done.returncode == 0, done.stderr
        assert load_card(tmp_path / fmt).format == fmt
    slide = Slide(CMU)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), 2.0, 64, 0, 0.2)
    maps = {
        f: _engine_map(load_model(tmp_path / f), slide, plan, tmp_path / f"{f}.zarr", "tumour")
        for f in ("timm", "onnx", "torchscript")
    }
    covered = maps["timm"] > 0
    assert covered.sum() == len(plan) > 20
    assert np.ptp(maps["timm"][covered]) > 1e-3  # the seeded network says different things about different tiles
    for fmt in ("onnx", "torchscript"):
        assert np.abs(maps[fmt] - maps["timm"]).max() < 1e-5, fmt
        # the run key follows the network file of every format (a changed graph redoes the slides)
        network = tmp_path / fmt / model_format(fmt).file
        assert weights_digest(load_model(tmp_path / fmt)) == file_sha256(network)[:16]
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"not a graph")
    stale = load_card(tmp_path / "onnx").model_copy(update={"weights_sha256": None})
    (tmp_path / "onnx" / "model_card.json").write_text(stale.model_dump_json())
    onnx_model = str(tmp_path / "onnx")
    done = run_cli("predict", str(CMU), "--task", "metastasis", "--model", onnx_model, "-o", str(tmp_path / "out"))
    assert done.returncode == 10, done.stderr
    assert "cannot be loaded by onnxruntime" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_dense_onnx_model_runs_on_larger_tiles_than_it_was_exported_for(tmp_path: Path) -> None:
    """Dense models run on tiles larger than their card's: the exported graph keeps height and width dynamic."""
    card = ModelCard(
        name="dense-test",
        task="mitosis",
        kind="dense",
        architecture="dense_fcn",
        architecture_args={"width": 4},
        mpp=0.25,
        tile_px=64,
        output_stride=4,
        halo_px=32,
        classes=["mitosis"],
        activation="sigmoid",
    )
    save_model(tmp_path / "torch", seeded(build("dense_fcn", 1, width=4), 2).eval(), card)
    export_model(tmp_path / "torch", "onnx", tmp_path / "onnx")
    batch = torch.randint(0, 256, (2, 3, 256, 192), dtype=torch.uint8)
    cpu = torch.device("cpu")
    expected = make_predictor(load_model(tmp_path / "torch"), cpu, FP32)(batch)["mitosis"]
    got = make_predictor(load_model(tmp_path / "onnx"), cpu, FP32)(batch)["mitosis"]
    assert got.shape == expected.shape == (2, 64, 48)
    assert float((got - expected).abs().max()) < 1e-5
    # `evaluate mitosis` runs whole images through the torch module: an ONNX folder is refused in one message
    from wsi_pipeline.training.detector.evaluate import DetectionParams, evaluate_detector

    with pytest.raises(ModelError, match="cannot run onnx models yet"):
        evaluate_detector(load_model(tmp_path / "onnx"), [], tmp_path / "eval", cpu, DetectionParams())


def test_batchnorm_is_folded_into_convolutions_without_changing_outputs(data_dir: Path) -> None:
    """The predictor runs a copy with every BatchNorm folded into its convolution (fx `fuse`): no BatchNorm left,
    the same probabilities on real tiles (fp32), and the loaded module itself untouched (it can still be trained)."""
    from wsi_pipeline.models.predictor import TorchModulePredictor, conv_bn_fused
    from wsi_pipeline.slide import Slide

    model = load_model(Path("wsi_pipeline/models/defaults/mitosis"))
    tiles = np.stack([Slide(CMU).read_region(x, 400, 256, 256, 0.25) for x in (300, 700, 1100)])
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    predictor = TorchModulePredictor(model, torch.device("cpu"), PredictorOptions("fp32", runtime="torch"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.run.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.module.modules()) > 0
    with torch.inference_mode():
        fused = predictor.probabilities(batch)
        predictor.run = model.module  # the unfused network, same normalisation and activation
        unfused = predictor.probabilities(batch)
    assert fused.shape == (3, 1, 64, 64) and float(unfused.max()) > 0.01
    assert float((fused - unfused).abs().max()) < 1e-5
    as_written = make_predictor(
        model, torch.device("cpu"), PredictorOptions("fp32", fuse_batchnorm=False)
    )  # engine.fuse_batchnorm: false
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in as_written.run.modules())  # type: ignore[attr-defined]

    class Branchy(torch.nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) if x.sum() > 0 else x

    branchy = Branchy().eval()
    assert conv_bn_fused(branchy) is branchy


def test_a_card_whose_class_cannot_name_a_heatmap_is_refused_at_load(tmp_path: Path) -> None:
    """A class names a heatmap folder beside the slide's `tissue` image: `../x`, `a/b` or `tissue` would write
    outside the store or over the tissue mask. Refused when the model is loaded (exit 10), naming the class."""
    card = ModelCard(
        name="ok", task="metastasis", kind="classifier", architecture="small_cnn",
        architecture_args={"width": 4, "blocks": 2}, mpp=2.0, tile_px=64, classes=["tumour", "normal"],
    )  # fmt: skip
    folder = save_model(tmp_path / "model", seeded(build("small_cnn", 2, width=4, blocks=2), 3), card)
    written = (folder / "model_card.json").read_text()
    for bad in ("../x", "a/b", "tissue"):
        (folder / "model_card.json").write_text(written.replace('"tumour"', json.dumps(bad)))
        with pytest.raises(
            ModelError, match=f"class name {re.escape(repr(bad))}: a class names a heatmap folder"
        ) as err:
            load_model(folder)
        assert err.value.exit_code == 10


class ScriptedPredictor:
    """An adapter: a TorchScript module, fed as the card says (mean/std, softmax), no Python class needed."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        self.card = model.card
        self.scripted = torch.jit.script(model.module).to(device).eval()
        self.mean = torch.tensor(self.card.normalisation.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.card.normalisation.std, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = torch.softmax(self.scripted((batch.float() / 255 - self.mean) / self.std), dim=1).cpu()
        return {name: probs[:, i] for i, name in enumerate(self.card.classes) if name in self.card.written_classes}


def test_the_earlier_in_memory_form_of_register_format_still_runs(data_dir: Path, tmp_path: Path) -> None:
    """`register_format(name, Factory)`, the entry point before formats loaded folders, still registers a format
    for models made in memory: the same heatmap as the built-in format."""
    register_format("torchscript-test", ScriptedPredictor)
    card = ModelCard(
        name="seeded-colour",
        task="metastasis",
        kind="classifier",
        architecture="small_cnn",
        architecture_args={"width": 4, "blocks": 2},
        mpp=1.0,
        tile_px=64,
        classes=["normal", "tumour"],
    )
    module = seeded(build("small_cnn", 2, width=4, blocks=2), 3).eval()
    slide = Slide(CMU)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), 1.0, 64, 0, 0.2)
    maps = {}
    for fmt in ("safetensors", "torchscript-test"):
        model = LoadedModel(card, module, None, format=fmt)
        store = tmp_path / f"{fmt}.zarr"
        request = TaskRequest("metastasis", model, plan, dtype="float32")
        cpu = torch.device("cpu")
        predict_slide(
            slide,
            [request],
            store,
            EngineOptions(device=cpu, batch_size=8, workers=0, progress=False, precision="fp32"),
        )
        maps[fmt] = open_heatmap(store / "tumour").channel("tumour")
    unregister_format("torchscript-test")
    covered = maps["safetensors"] > 0
    assert covered.sum() == len(plan)  # one value per kept tile
    assert np.abs(maps["safetensors"] - maps["torchscript-test"]).max() < 1e-5
