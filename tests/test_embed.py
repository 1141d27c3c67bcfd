"""Tile encoders and `embed`: real timm architectures with weights made here (random, saved to safetensors or a
torch file), a real slide, the CLI in a subprocess; features compared with timm's own forward."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

from tests.helpers import run_cli
from wsi_pipeline.config import TissueConfig
from wsi_pipeline.engine.embeddings import EncoderPredictor, read_embeddings
from wsi_pipeline.engine.loader import TileDataset
from wsi_pipeline.models.card import Normalisation
from wsi_pipeline.models.encoder_card import EncoderCard, shipped_encoder_cards
from wsi_pipeline.models.encoders import build_encoder_network, load_encoder, save_encoder
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.tiling import plan_tiles
from wsi_pipeline.slide.tissue import detect_tissue

pytestmark = pytest.mark.e2e  # the CLI in subprocesses / whole runs

IMAGENET = Normalisation(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def vit_small(name: str, pooling: str, **args: object) -> tuple[EncoderCard, torch.nn.Module]:
    card = EncoderCard(
        name=name,
        architecture="timm:vit_small_patch16_224",
        architecture_args={"img_size": 224, **args},
        mpp=0.5,
        tile_px=224,
        normalisation=IMAGENET,
        pooling=pooling,  # type: ignore[arg-type]
        dim=384 * (2 if pooling == "cls+mean" else 1),
    )
    torch.manual_seed(len(name))
    return card, build_encoder_network(card)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    folders = {}
    for name, pooling, args in (("vits_cls", "cls", {}), ("vits_reg", "cls+mean", {"reg_tokens": 4})):
        card, network = vit_small(name, pooling, **args)
        folders[name] = save_encoder(root / name, network, card)
    return folders


@pytest.fixture(scope="module")
def embedded(data_dir: Path, encoders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1-Small-Region embedded by both encoders in one run, fp32 features, h5 files."""
    out = tmp_path_factory.mktemp("embedded")
    slide = data_dir / "slides" / "CMU-1-Small-Region.svs"
    args = ["--encoder", str(encoders["vits_cls"]), "--encoder", str(encoders["vits_reg"])]
    result = run_cli(
        "embed", str(slide), "-o", str(out), *args, "--format", "h5", "--dtype", "float32", "--no-progress",
        "--set", "engine.precision=fp32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def reference_features(slide_path: Path, encoder_dir: Path, coords: np.ndarray) -> np.ndarray:
    """timm's own forward (plus the card's pooling recipe) on the tiles the project reads at those coordinates."""
    encoder = load_encoder(encoder_dir)
    card = encoder.card
    slide = Slide(slide_path)
    plan = plan_tiles(slide, detect_tissue(slide, TissueConfig()), card.mpp, card.tile_px, 0, 0.25)
    tiles = TileDataset(slide, plan)
    assert np.array_equal(np.stack([np.round(plan.x), np.round(plan.y)], 1), coords)
    batch = torch.stack([torch.from_numpy(tiles.rgb(i)).permute(2, 0, 1) for i in range(len(plan))]).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (card.normalisation.mean, card.normalisation.std))
    network = encoder.module.network.eval()  # type: ignore[union-attr]
    with torch.no_grad():
        if card.pooling == "cls":
            return network((batch - mean) / std).numpy()  # timm's forward: its class-token head, no classes
        tokens = network.forward_features((batch - mean) / std)  # Virchow2's recipe: class, mean of patches
        return torch.cat([tokens[:, 0], tokens[:, 1 + 4 :].mean(1)], 1).numpy()


def test_features_equal_timm_forward_and_h5_layout(data_dir: Path, encoders: dict[str, Path], embedded: Path) -> None:
    slide = data_dir / "slides" / "CMU-1-Small-Region.svs"
    folder = embedded / "CMU-1-Small-Region" / "embeddings"
    summary = json.loads((embedded / "CMU-1-Small-Region" / "summary.json").read_text())
    for name, dim in (("vits_cls", 384), ("vits_reg", 768)):
        path = folder / f"{name}.h5"
        with h5py.File(path, "r") as f:  # the TRIDENT / CLAM layout, read as their code reads it
            features, coords = f["features"][:], f["coords"][:]
            attrs = dict(f["coords"].attrs)
            assert f["features"].attrs["encoder"] == name
        assert features.shape == (len(coords), dim) and features.dtype == np.float32
        assert coords.shape[1] == 2 and coords.dtype == np.int64
        assert attrs["patch_size"] == 224 and attrs["patch_level"] == 0 and attrs["name"] == name
        assert attrs["patch_size_level0"] == round(224 * 0.5 / 0.499)
        assert abs(attrs["level0_magnification"] - 10 / 0.499) < 0.01 and attrs["target_magnification"] == 20.0
        expected = reference_features(slide, encoders[name], coords)
        assert np.abs(features - expected).max() <= 1e-4
        assert summary["embeddings"][name]["tiles"] == len(coords) > 20
        ours, _, read_attrs = read_embeddings(path)
        assert read_attrs["encoder"]["dim"] == dim and np.array_equal(ours, features)


def test_embed_resumes_and_verifies(data_dir: Path, encoders: dict[str, Path], embedded: Path) -> None:
    """A second run skips the slide; a damaged embeddings file is found and the slide redone."""
    slide = data_dir / "slides" / "CMU-1-Small-Region.svs"
    args = ["--encoder", str(encoders["vits_cls"]), "--encoder", str(encoders["vits_reg"]), "--format", "h5"]
    common = [*args, "--dtype", "float32", "--no-progress", "--set", "engine.precision=fp32"]
    again = run_cli("embed", str(slide), "-o", str(embedded), *common)
    assert again.returncode == 0 and "skipped" in again.stdout, again.stdout
    target = embedded / "CMU-1-Small-Region" / "embeddings" / "vits_cls.h5"
    before = h5py.File(target, "r")["features"][:]
    with h5py.File(target, "r+") as f:
        f["features"][0] = 0
    redone = run_cli("embed", str(slide), "-o", str(embedded), *common)
    assert redone.returncode == 0 and "done" in redone.stdout and "vits_cls.h5" in redone.stdout, redone.stdout
    assert np.array_equal(h5py.File(target, "r")["features"][:], before)


def test_zarr_default_and_shared_read_with_a_task(data_dir: Path, encoders: dict[str, Path], tmp_path: Path) -> None:
    """`run --encoder`: the task's outputs and the embeddings (float16 zarr) in one slide folder."""
    slide = data_dir / "slides" / "CMU-1-Small-Region.svs"
    result = run_cli(
        "run", str(slide), "-o", str(tmp_path), "--tasks", "metastasis", "--encoder", str(encoders["vits_cls"]),
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    features, coords, attrs = read_embeddings(tmp_path / "CMU-1-Small-Region" / "embeddings" / "vits_cls.zarr")
    assert features.shape == (len(coords), 384) and np.isfinite(features).all() and features.std() > 0
    assert attrs["format"] == "wsi-pipeline embeddings 1" and attrs["mpp"] == 0.5
    summary = json.loads((tmp_path / "CMU-1-Small-Region" / "summary.json").read_text())
    assert "metastasis" in summary and summary["embeddings"]["vits_cls"]["dtype"] == "float16"


def test_import_refuses_a_renamed_key(encoders: dict[str, Path], tmp_path: Path) -> None:
    card, network = vit_small("vits_cls", "cls")
    state = network.state_dict()
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    checkpoint = tmp_path / "pytorch_model.bin"
    torch.save(state, checkpoint)
    card_file = tmp_path / "encoder.json"
    card_file.write_text(card.model_dump_json())
    result = run_cli("import-encoder", str(card_file), str(checkpoint), "-o", str(tmp_path / "enc"))
    assert result.returncode == 10, result.stderr
    line = result.stderr.strip()
    assert "missing 1 key(s), first blocks.0.attn.qkv.weight" in line and "blocks.0.attn.qkv_renamed.weight" in line
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "enc").exists()


def test_bad_encoders_refused_before_the_first_slide(data_dir: Path, encoders: dict[str, Path], tmp_path: Path) -> None:
    slide = str(data_dir / "slides" / "CMU-1-Small-Region.svs")
    card = json.loads((encoders["vits_cls"] / "encoder.json").read_text())
    cases = {
        "pooling": ({**card, "pooling": "max"}, 10, "pooling"),
        "normalisation": ({**card, "normalisation": {"mean": [0.5, 0.5, 0.5], "scale": 2}}, 10, "normalisation"),
        "size": ({**card, "input_px": 200}, 7, "takes 224 px tiles, not 200"),
    }
    for name, (bad, status, words) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes((encoders["vits_cls"] / "weights.safetensors").read_bytes())
        (folder / "encoder.json").write_text(json.dumps(bad))
        result = run_cli("embed", slide, "-o", str(tmp_path / f"out-{name}"), "--encoder", str(folder))
        assert result.returncode == status and words in result.stderr, (name, result.stderr)
        assert not (tmp_path / f"out-{name}" / "CMU-1-Small-Region").exists()


def test_uni_architecture_embeds_two_tiles(data_dir: Path, tmp_path: Path) -> None:
    """The shipped UNI card builds UNI's exact ViT-L/16 (303 M parameters, the constructor of its model card);
    a torch checkpoint of it imports and embeds two tiles as timm's own forward does (resize 256 -> 224)."""
    card = shipped_encoder_cards()["uni"]
    torch.manual_seed(0)
    reference = timm.create_model(
        "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True
    ).eval()
    assert sum(p.numel() for p in reference.parameters()) == 303_350_784
    checkpoint = tmp_path / "pytorch_model.bin"
    torch.save(reference.state_dict(), checkpoint)
    result = run_cli("import-encoder", "uni", str(checkpoint), "-o", str(tmp_path / "uni"))
    assert result.returncode == 0, result.stderr
    checkpoint.unlink()
    encoder = load_encoder(tmp_path / "uni")
    slide = Slide(data_dir / "slides" / "CMU-1-Small-Region.svs")
    tiles = np.stack([slide.read_region(x, 400, card.tile_px, card.tile_px, card.mpp) for x in (600, 1100)])
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    ours = EncoderPredictor(encoder, torch.device("cpu"), "fp32").features(batch).numpy()
    x = torch.nn.functional.interpolate(batch.float() / 255, size=(224, 224), mode="bicubic", antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (card.normalisation.mean, card.normalisation.std))
    with torch.no_grad():
        expected = reference((x - mean) / std).numpy()
    assert ours.shape == (2, 1024) and np.abs(ours - expected).max() <= 1e-4


def test_a_model_folder_embeds_its_penultimate_features(data_dir: Path) -> None:
    from wsi_pipeline.models.folders import default_model_dir

    encoder = load_encoder(default_model_dir("metastasis"))
    assert encoder.card.pooling == "network" and encoder.card.architecture == "model-folder"
    slide = Slide(data_dir / "slides" / "CMU-1-Small-Region.svs")
    tile = slide.read_region(800, 400, encoder.card.tile_px, encoder.card.tile_px, encoder.card.mpp)
    batch = torch.from_numpy(tile).permute(2, 0, 1)[None].contiguous()
    features = EncoderPredictor(encoder, torch.device("cpu"), "fp32").features(batch)
    assert features.shape == (1, encoder.card.dim) and encoder.card.dim > 8
