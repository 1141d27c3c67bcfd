"""Inference engine + heatmaps: seamless dense stitching, exact classifier maps, OME-Zarr, bad models, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.helpers import CMU, run_cli, stitched_and_whole_region
from wsi_pipeline.config import TissueConfig
from wsi_pipeline.core.errors import ConfigError, UsageError
from wsi_pipeline.engine import EngineOptions, TaskRequest, predict_slide, resolve_device
from wsi_pipeline.heatmap import HeatmapGeometry, HeatmapWriter, open_heatmap
from wsi_pipeline.models import ModelCard, load_model, save_model
from wsi_pipeline.models.architectures import build, seeded
from wsi_pipeline.models.loading import ModelError
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import plan_tiles
from wsi_pipeline.slide.tissue import detect_tissue

CPU = torch.device("cpu")


def dense_model(tmp: Path, stride: int = 1, halo: int = 4, mpp: float = 0.499) -> Path:
    card = ModelCard(
        name=f"tiny-fcn-s{stride}",
        task="mitosis",
        kind="dense",
        architecture="tiny_fcn",
        architecture_args={"width": 8, "depth": 3, "stride": stride},
        mpp=mpp,
        tile_px=64,
        output_stride=stride,
        halo_px=halo,
        classes=["mitosis"],
        activation="sigmoid",
        normalisation={"mean": [0.8, 0.6, 0.7], "std": [0.2, 0.25, 0.2]},
    )
    module = seeded(build("tiny_fcn", 1, **card.architecture_args), seed=1)
    return save_model(tmp / card.name, module, card)


def classifier_model(tmp: Path, mpp: float = 0.998) -> Path:
    card = ModelCard(
        name="small-cnn",
        task="epithelium_stroma",
        kind="classifier",
        architecture="small_cnn",
        architecture_args={"width": 8},
        mpp=mpp,
        tile_px=32,
        classes=["epithelium", "stroma", "other"],
        heatmap_classes=["epithelium", "stroma"],
    )
    module = seeded(build("small_cnn", 3, width=8), seed=2).eval()
    return save_model(tmp / card.name, module, card)


@pytest.fixture(scope="module")
def cmu(data_dir: Path) -> tuple[Slide, object]:
    slide = Slide(CMU)
    return slide, detect_tissue(slide, TissueConfig())


@pytest.mark.parametrize(("tile_px", "stride"), [(64, 1), (128, 1), (96, 2)])
def test_dense_stitching_equals_whole_region(cmu, tmp_path: Path, tile_px: int, stride: int) -> None:
    slide, tissue = cmu
    model = load_model(dense_model(tmp_path, stride=stride), task="mitosis")
    plan = plan_tiles(slide, tissue, 0.499, tile_px, overlap_px=16, min_tissue=0.0)
    stitched, reference = stitched_and_whole_region(slide, plan, model, tmp_path / "heatmaps.zarr")
    assert stitched.shape == reference.shape
    assert np.abs(stitched - reference).max() <= 1e-4


def test_classifier_heatmap_is_one_value_per_tile(cmu, tmp_path: Path) -> None:
    slide, tissue = cmu
    model = load_model(classifier_model(tmp_path))
    plan = plan_tiles(slide, tissue, 0.998, 32, overlap_px=0, min_tissue=0.5)
    store = tmp_path / "heatmaps.zarr"
    predict_slide(
        slide,
        [TaskRequest("epithelium_stroma", model, plan, dtype="float32")],
        store,
        EngineOptions(
            device=CPU, batch_size=64, workers=0, progress=False, precision="fp32"
        ),  # compared with the network run directly in fp32
    )
    epi = open_heatmap(store / "epithelium").channel("epithelium")
    stroma = open_heatmap(store / "stroma").channel("stroma")
    assert not (store / "other").exists()
    assert epi.shape == (plan.grid[1], plan.grid[0])
    written = np.zeros(epi.shape, bool)
    for i in range(0, len(plan), 37):  # spot-check tiles against a direct forward pass
        rgb = slide.read_region(int(plan.x[i]), int(plan.y[i]), 32, 32, 0.998)
        x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.inference_mode():
            p = torch.softmax(model.module.cpu()(x), 1)[0].numpy()
        r, c = int(plan.rows[i]), int(plan.cols[i])
        assert epi[r, c] == pytest.approx(p[0], abs=1e-5) and stroma[r, c] == pytest.approx(p[1], abs=1e-5)
    written[plan.rows, plan.cols] = True
    total = epi + stroma
    assert np.all(total[written] > 0) and np.all(total[~written] == 0)  # no gaps, nothing outside the plan


def test_writer_bands_are_chunk_aligned_and_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    geometry = HeatmapGeometry(70, 45, 1.0, 0.0, (0.5, 0.5), (1.0, 1.0))
    writer = HeatmapWriter(tmp_path / "h.zarr", "x", ["x"], geometry, dtype="float32", chunk=16)
    canvas = np.zeros((70, 45), np.float32)
    for y in range(0, 70, 7):
        for x in range(0, 45, 9):
            block = rng.random((1, 7, 9), dtype=np.float32)
            writer.write(y, x, block)
            canvas[y : y + 7, x : x + 9] = block[0, : min(7, 70 - y), : min(9, 45 - x)]
        writer.advance(y + 7)
        if y + 7 >= 16:  # the band above the last chunk boundary is on disk: writing into it again is refused
            with pytest.raises(RuntimeError, match="already written"):
                writer.write((y + 7) // 16 * 16 - 1, 0, block)
    path = writer.close()
    heat = open_heatmap(path)
    assert np.array_equal(heat.channel("x"), canvas)
    assert [lv.shape for lv in heat.levels] == [(1, 70, 45), (1, 35, 22), (1, 17, 11), (1, 8, 5)]
    assert np.allclose(heat.channel("x", 1), canvas[:70, :44].reshape(35, 2, 22, 2).mean(axis=(1, 3)), atol=1e-6)


def test_ome_zarr_readers_open_it(cmu, tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    slide, tissue = cmu
    model = load_model(dense_model(tmp_path, stride=2, halo=4))
    plan = plan_tiles(slide, tissue, 0.499, 64, overlap_px=16, min_tissue=0.2)
    store = tmp_path / "heatmaps.zarr"
    predict_slide(
        slide, [TaskRequest("mitosis", model, plan)], store, EngineOptions(device=CPU, workers=0, progress=False)
    )
    nodes = list(Reader(parse_url(str(store / "mitosis")))())
    image = nodes[0]
    assert len(image.data) >= 3
    assert image.data[0].dtype == np.float16
    datasets = image.metadata["coordinateTransformations"]
    scales = [t[0]["scale"] for t in datasets]
    assert scales[0] == pytest.approx([1.0, 0.998, 0.998]) and scales[2] == pytest.approx([1.0, 3.992, 3.992])
    attrs = json.loads((store / "mitosis" / "zarr.json").read_text())["attributes"]
    assert attrs["ome"]["version"] == "0.5" and attrs["wsi_pipeline"]["complete"] is True
    assert zarr.open_group(str(store), mode="r")["mitosis"]["0"].chunks == (1, 512, 512)


def test_bad_models_fail_before_reading(cmu, tmp_path: Path) -> None:
    slide, tissue = cmu
    with pytest.raises(ModelError, match="not a epithelium_stroma model"):
        load_model(dense_model(tmp_path), task="epithelium_stroma")
    broken = dense_model(tmp_path / "b")
    (broken / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="sha256 differs from the card's"):
        load_model(broken)
    unchecked = json.loads((broken / "model_card.json").read_text())
    unchecked["weights_sha256"] = None  # a card from before checksums: the damage is still found, later
    (broken / "model_card.json").write_text(json.dumps(unchecked))
    with pytest.raises(ModelError, match="cannot be read"):
        load_model(broken)
    mismatched = dense_model(tmp_path / "m")
    card = json.loads((mismatched / "model_card.json").read_text())
    card["architecture_args"]["width"] = 12
    (mismatched / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match architecture"):
        load_model(mismatched)
    model = load_model(dense_model(tmp_path / "h", halo=12))
    plan = plan_tiles(slide, tissue, 0.499, 64, overlap_px=16)
    with pytest.raises(ConfigError, match="needs at least 24"):
        predict_slide(
            slide,
            [TaskRequest("mitosis", model, plan)],
            tmp_path / "s.zarr",
            EngineOptions(device=CPU, workers=0, progress=False),
        )
    assert not (tmp_path / "s.zarr").exists()


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # a device that is not here: a usage mistake (exit 2, the README's table)
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(UsageError, match="'tpu' is not a device"):
        resolve_device("tpu")


def _damage_middle_tile_row(path: Path) -> None:
    """Zero the JPEG data of level 0's middle row of TIFF tiles (through the tissue): OpenSlide fails on them."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        middle = -(-page.imagelength // page.tilelength) // 2
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))[middle * per_row : (middle + 1) * per_row]
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))


@pytest.mark.e2e
def test_predict_command_and_failure_midway(tmp_path: Path) -> None:
    from wsi_pipeline.slide.synth import default_layout, write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", default_layout(3000, 2400, 0.5, seed=4))
    model = dense_model(tmp_path, stride=2, halo=4, mpp=0.5)
    out = tmp_path / "out"
    args = [
        "predict",
        str(slide),
        "-o",
        str(out),
        "--task",
        "mitosis",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--set",
        "tasks.mitosis.tile_px=128",
        "--set",
        "tasks.mitosis.overlap_px=16",
        "--no-progress",
    ]
    ok = run_cli(*args)
    assert ok.returncode == 0, ok.stderr
    store = out / "s" / "heatmaps.zarr"
    mitosis, tissue = open_heatmap(store / "mitosis"), open_heatmap(store / "tissue")
    # 128 px tiles at stride 112: ceil((3000 - 16) / 112) = 27 columns, 22 rows; the map is the grid extent / 2
    assert mitosis.levels[0].shape[1:] == ((21 * 112 + 128) // 2, (26 * 112 + 128) // 2) == (1240, 1520)
    assert tissue.channel("tissue").max() == 1.0
    wrong = run_cli("predict", str(slide), "-o", str(out), "--task", "metastasis", "--model", str(model))
    assert wrong.returncode == 10 and "not a metastasis model" in wrong.stderr
    # a slide damaged in the middle fails mid-way: the error is reported, no heatmap looks complete
    _damage_middle_tile_row(slide)
    failed = run_cli(*args[:3], str(tmp_path / "out2"), *args[4:])
    assert failed.returncode == 5 and "damaged" in failed.stderr  # damaged tile data: exit 5 (issue 13), any reader
    assert failed.stderr.strip().count("\n") == 0 and "Traceback" not in failed.stderr  # one line
    store2 = tmp_path / "out2" / "s" / "heatmaps.zarr"
    assert not (store2 / "mitosis").exists()
    assert not [p for p in (tmp_path / "out2" / "s").iterdir() if "tmp" in p.name]


def test_tasks_sharing_a_resolution_share_one_read(cmu, tmp_path: Path) -> None:
    slide, tissue = cmu
    dense = load_model(dense_model(tmp_path, stride=2, halo=4, mpp=0.998))
    card = ModelCard(
        name="tiny-fcn-tumour",
        task="metastasis",
        kind="dense",
        architecture="tiny_fcn",
        architecture_args={"width": 8, "depth": 3, "stride": 2},
        mpp=0.998,
        tile_px=64,
        output_stride=2,
        halo_px=4,
        classes=["metastasis"],
        activation="sigmoid",
    )
    other = load_model(save_model(tmp_path / "other", seeded(build("tiny_fcn", 1, width=8, stride=2), 9), card))
    plan = plan_tiles(slide, tissue, 0.998, 64, overlap_px=16, min_tissue=0.3)
    together = tmp_path / "together.zarr"
    timings = predict_slide(
        slide,
        [TaskRequest("mitosis", dense, plan, "float32"), TaskRequest("metastasis", other, plan, "float32")],
        together,
        EngineOptions(device=CPU, workers=1, progress=False),
    )
    assert len(timings["reads"]) == 1 and timings["reads"][0]["tasks"] == ["mitosis", "metastasis"]
    alone = tmp_path / "alone.zarr"
    predict_slide(
        slide,
        [TaskRequest("metastasis", other, plan, "float32")],
        alone,
        EngineOptions(device=CPU, workers=0, progress=False),
    )
    assert np.array_equal(
        open_heatmap(together / "metastasis").channel("metastasis"),
        open_heatmap(alone / "metastasis").channel("metastasis"),
    )
    assert open_heatmap(together / "mitosis").channel("mitosis").max() > 0


def test_progress_is_plain_lines_off_a_terminal(tmp_path: Path) -> None:
    from wsi_pipeline.core.progress import Progress

    log = tmp_path / "log.txt"
    with log.open("w") as stream:
        bar = Progress(10, "slide-1 mitosis", stream=stream, every_s=0.0)
        bar.update(4)
        bar.update(6)
        bar.close()
    lines = log.read_text().splitlines()
    assert lines[0].startswith("slide-1 mitosis: 4/10 tiles (") and "tiles/s, ETA" in lines[0]
    assert lines[-1].startswith("slide-1 mitosis: 10/10 tiles")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")
def test_cuda_bf16_matches_cpu_fp32(cmu, tmp_path: Path) -> None:
    slide, tissue = cmu
    model = load_model(dense_model(tmp_path, stride=2, halo=4))
    plan = plan_tiles(slide, tissue, 0.499, 128, overlap_px=16, min_tissue=0.3)
    predict_slide(
        slide,
        [TaskRequest("mitosis", model, plan, "float32")],
        tmp_path / "gpu.zarr",
        EngineOptions(device=torch.device("cuda"), workers=2, progress=False),
    )
    model = load_model(dense_model(tmp_path / "c", stride=2, halo=4))
    predict_slide(
        slide,
        [TaskRequest("mitosis", model, plan, "float32")],
        tmp_path / "cpu.zarr",
        EngineOptions(device=CPU, workers=2, progress=False),
    )
    gpu = open_heatmap(tmp_path / "gpu.zarr" / "mitosis").channel("mitosis")
    cpu = open_heatmap(tmp_path / "cpu.zarr" / "mitosis").channel("mitosis")
    assert np.abs(gpu - cpu).max() < 0.02  # bf16 autocast keeps ~3 significant digits


@pytest.mark.e2e  # the CLI in a subprocess, training or whole-slide inference
@pytest.mark.parametrize(("task", "written"), [("metastasis", "tumour"), ("epithelium_stroma", "epithelium")])
def test_cpu_bf16_by_default_where_native_and_within_the_tolerance(
    data_dir: Path, tmp_path: Path, task: str, written: str
) -> None:
    """In torch (`engine.runtime: torch`), `precision: auto` autocasts to bf16 on CPUs with native bf16 (2-3x
    faster, benchmarks/cpu_model.py) for a shipped model whose card measured its bf16 outputs within half the
    engine's tolerance (0.02, as on CUDA) of fp32, and then its map of this other slide stays within the
    tolerance; a model measured further (the shipped metastasis model) runs in fp32: its map equals the fp32 one.
    With the default runtime, `auto` on the CPU is fp32 in ONNX Runtime on every CPU."""
    from wsi_pipeline.models.predictor import BF16_CARD_LIMIT, BF16_TOLERANCE, use_bf16
    from wsi_pipeline.tasks import task_model

    native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert use_bf16(CPU, "auto") is native and use_bf16(CPU, "fp32") is False and use_bf16(CPU, "bf16") is True
    assert use_bf16(CPU, "auto", runtime="auto") is False and use_bf16(CPU, "bf16", runtime="auto") is True
    slide = Slide(CMU)
    card = task_model(task, None).card
    assert card.bf16_max_difference is not None, "the shipped card carries its measured bf16 difference (publish)"
    maps, ran_in = {}, {}
    for precision in ("fp32", "bf16", "auto"):
        model = task_model(task, None)
        plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), model.card.mpp, model.card.tile_px, 48, 0.25)
        store = tmp_path / f"{precision}.zarr"
        request = TaskRequest(task, model, plan, dtype="float32")
        ran = predict_slide(
            slide, [request], store, EngineOptions(CPU, workers=0, progress=False, precision=precision, runtime="torch")
        )
        maps[precision] = open_heatmap(store / written).channel(written)
        ran_in[precision] = ran["precision"][task]
    assert ran_in["fp32"] == "fp32" and ran_in["bf16"] == "bf16"
    runs_bf16 = ran_in["auto"] == "bf16"
    assert runs_bf16 is (native and card.bf16_max_difference <= BF16_CARD_LIMIT)
    assert np.abs(maps["bf16"] - maps["fp32"]).max() > 0  # forced bf16 runs it so either way
    if runs_bf16:
        assert np.array_equal(maps["auto"], maps["bf16"])
        assert np.abs(maps["auto"] - maps["fp32"]).max() < BF16_TOLERANCE
    else:
        assert np.array_equal(maps["auto"], maps["fp32"])


def test_auto_precision_reads_the_cards_measured_bf16_difference(tmp_path: Path) -> None:
    from wsi_pipeline.models.predictor import BF16_CARD_LIMIT, use_bf16

    card = load_model(classifier_model(tmp_path)).card
    native = use_bf16(CPU, "auto")
    cases = ((None, native, True), (0.004, native, True), (0.013, False, False), (0.032, False, False))
    for measured, on_cpu, on_cuda in cases:
        measured_card = card.model_copy(update={"bf16_max_difference": measured})
        assert use_bf16(CPU, "auto", measured_card) is on_cpu
        assert use_bf16(torch.device("cuda"), "auto", measured_card) is on_cuda
        assert use_bf16(CPU, "bf16", measured_card) is True and use_bf16(CPU, "fp32", measured_card) is False
    assert use_bf16(CPU, "auto", card.model_copy(update={"bf16_max_difference": BF16_CARD_LIMIT})) is native
    with pytest.raises(ValueError, match="bf16_max_difference"):
        ModelCard.model_validate({**card.model_dump(), "bf16_max_difference": -0.1})


def test_a_read_set_up_in_another_thread_runs_as_one_set_up_in_place(cmu, tmp_path: Path) -> None:
    """`run` sets up a slide's first read while it prepares the slide, in another thread (its first batches read
    there); the heatmaps equal `predict_slide`'s, and a set-up discarded before its turn (an interrupt) leaves no
    reading thread and no heatmap."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from wsi_pipeline.engine.predict import start_inference

    slide, tissue = cmu
    model = load_model(classifier_model(tmp_path))
    plan = plan_tiles(slide, tissue, 0.998, 32, overlap_px=0, min_tissue=0.5)
    options = EngineOptions(device=CPU, batch_size=64, workers=2, progress=False, precision="fp32")

    def requests() -> list[TaskRequest]:
        return [TaskRequest("epithelium_stroma", model, plan, dtype="float32")]

    predict_slide(slide, requests(), tmp_path / "in_place.zarr", options)
    with ThreadPoolExecutor(1) as elsewhere:
        started = elsewhere.submit(start_inference, slide, requests(), tmp_path / "early.zarr", options, None, True)
        inference = started.result()
    assert inference.first is not None and inference.first.tiles is not None  # its tiles were being read already
    inference.run().finish()
    for name in ("epithelium", "stroma"):
        a, b = (open_heatmap(tmp_path / s / name).channel(name) for s in ("in_place.zarr", "early.zarr"))
        assert a.tobytes() == b.tobytes()

    discarded = start_inference(slide, requests(), tmp_path / "discarded.zarr", options, None, True)
    assert any(t.name.startswith("tile-reader") for t in threading.enumerate())
    discarded.abort()
    assert not any(t.name.startswith("tile-reader") for t in threading.enumerate())
    assert not list((tmp_path / "discarded.zarr").glob("epithelium*"))


def test_each_read_runs_in_its_own_tasks_batch_size(cmu, tmp_path: Path) -> None:
    """Reads with different plans run in batches of their own requests' batch size (`run` gives each task its
    `tasks.<task>.batch_size`; before, every read took the largest: the mitosis read's 512 px tiles in 64s), the
    engine's where a request names none; the heatmaps do not depend on it."""
    slide, tissue = cmu
    model = load_model(classifier_model(tmp_path))
    coarse = plan_tiles(slide, tissue, 0.998, 32, overlap_px=0, min_tissue=0.5)
    fine = plan_tiles(slide, tissue, 0.499, 32, overlap_px=0, min_tissue=0.5)
    options = EngineOptions(device=CPU, batch_size=64, workers=2, progress=False, precision="fp32")
    stores = {}
    for label, sizes in {"own": (8, None), "engine": (None, None)}.items():
        requests = [TaskRequest("epithelium_stroma", model, coarse, dtype="float32", batch_size=sizes[0])]
        stores[label] = tmp_path / f"{label}.zarr"
        ran = predict_slide(slide, requests, stores[label], options)
        assert [r["batch_size"] for r in ran["reads"]] == [sizes[0] or 64]
    a, b = (open_heatmap(stores[s] / "epithelium").channel("epithelium") for s in ("own", "engine"))
    assert np.allclose(a, b, atol=1e-6) and float(a.max()) > 0
    from wsi_pipeline.engine.predict import Inference, read_groups

    two = [TaskRequest("epithelium_stroma", model, coarse, batch_size=8),
           TaskRequest("metastasis", model, fine, batch_size=32)]  # fmt: skip
    inference = Inference(slide, read_groups(two), tmp_path / "two.zarr", options, None)
    assert [inference.batch_size(n) for n in range(2)] == [8, 32]


@pytest.mark.parametrize("kind", ["classifier", "dense"])
def test_tile_measurements_are_each_tiles_own_values_whatever_rows_are_read_at_once(
    cmu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """qupath.geojson's tile measurements read many tile rows of the heatmaps at once (a zarr read per row was most
    of a small slide's QuPath export): the same values with one row, three rows or all rows at a time, and each the
    tile's own heatmap value (classifier) or the mean and max over its own output area (dense)."""
    from wsi_pipeline.engine import stitch
    from wsi_pipeline.engine.stitch import dense_crop, tile_measurements

    slide, tissue = cmu
    if kind == "classifier":
        model = load_model(classifier_model(tmp_path))
        plan = plan_tiles(slide, tissue, 0.998, 32, overlap_px=0, min_tissue=0.5)
    else:
        model = load_model(dense_model(tmp_path, stride=2), task="mitosis")
        plan = plan_tiles(slide, tissue, 0.499, 96, overlap_px=16, min_tissue=0.0)
    store = tmp_path / "heatmaps.zarr"
    options = EngineOptions(device=CPU, batch_size=64, workers=0, progress=False, precision="fp32")
    predict_slide(slide, [TaskRequest(model.card.task, model, plan)], store, options)
    heats = {c: open_heatmap(store / c) for c in model.card.written_classes}
    width = max(h.levels[0].shape[-1] for h in heats.values())
    step = 1 if kind == "classifier" else dense_crop(plan.spec, model.card.output_stride).step
    by_size = {}
    for rows_at_once in (1, 3, len(plan)):
        monkeypatch.setattr(stitch, "MEASURED_VALUES_AT_ONCE", rows_at_once * step * width)
        by_size[rows_at_once] = dict(tile_measurements(plan, model.card, heats))
    assert by_size[1] == by_size[3] == by_size[len(plan)] and sorted(by_size[1]) == list(range(len(plan)))
    name = model.card.written_classes[0]
    values = heats[name].channel(name)
    for i in range(0, len(plan), 29):
        row, col = int(plan.rows[i]), int(plan.cols[i])
        measured = by_size[1][i]
        if kind == "classifier":
            assert measured[f"{name} probability"] == pytest.approx(float(values[row, col]), abs=1e-6)
        else:
            crop = dense_crop(plan.spec, model.card.output_stride)
            y0, x0 = row * crop.step + crop.margin, col * crop.step + crop.margin
            own = np.asarray(values[y0 : y0 + crop.step, x0 : x0 + crop.step], np.float32)
            assert measured[f"{name} max"] == pytest.approx(float(own.max()), abs=1e-6)
            assert measured[f"{name} mean"] == pytest.approx(float(own.mean()), abs=1e-5)
