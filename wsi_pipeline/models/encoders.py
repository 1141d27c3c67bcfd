"""Tile encoders: a network that turns a tile into one vector (a pathology foundation model that timm builds, or
one of our classifiers without its last layer), loaded from local files only, fed with its card's preprocessing.

An encoder folder holds `encoder.json` (models/encoder_card.py) and `weights.safetensors`; `import_encoder`
makes one from a downloaded checkpoint (safetensors, or a `weights_only` torch file, converted once).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.core.inventory import file_sha256
from wsi_pipeline.models.encoder_card import (
    ENCODER_CARD,
    ENCODER_WEIGHTS,
    LAYER_NAMES,
    EncoderCard,
    encoder_folder_kind,
    read_encoder_card,
    shipped_encoder_cards,
)
from wsi_pipeline.models.folders import ModelError
from wsi_pipeline.models.loading import load_model, save_weights_and_card

LOG = logging.getLogger("wsi_pipeline.models")
SHOWN_KEYS = 3  # missing / unexpected keys named in a refusal


@dataclass
class LoadedEncoder:
    card: EncoderCard
    module: nn.Module  # uint8-free: takes the normalised (B, 3, P, P) float tensor, returns (B, dim)
    path: Path | None = None

    @property
    def sha256(self) -> str | None:
        return self.card.weights_sha256


class PooledEncoder(nn.Module):
    """A timm network's tokens (or feature map) pooled as the card says: the class token, the mean of the patch
    tokens with the class and register tokens dropped (timm's `num_prefix_tokens`), or both concatenated."""

    def __init__(self, network: nn.Module, pooling: str) -> None:
        super().__init__()
        self.network = network
        self.pooling = pooling
        self.prefix = int(getattr(network, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.network.forward_features(x)  # type: ignore[operator]
        if tokens.ndim == 4:  # a CNN's feature map: its global average
            return tokens.mean(dim=(2, 3))
        cls, patches = tokens[:, 0], tokens[:, self.prefix :]
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return patches.mean(dim=1)
        return torch.cat([cls, patches.mean(dim=1)], dim=1)


def timm_args(card: EncoderCard) -> dict[str, Any]:
    """The card's constructor arguments with layer names resolved (only the allowed ones: encoder_card.LAYER_NAMES)."""
    args = dict(card.architecture_args)
    for key in ("mlp_layer", "act_layer", "norm_layer"):
        if key in args:
            module, attribute = LAYER_NAMES[args[key]]
            args[key] = getattr(importlib.import_module(module), attribute)
    return args


def build_encoder_network(card: EncoderCard) -> nn.Module:
    """The card's timm architecture without a head, never downloading anything."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"encoder {card.name}: timm is needed (pip install timm)") from None
    name = card.architecture.removeprefix("timm:")
    if name not in timm.list_models():
        raise ModelError(f"encoder {card.name}: timm {timm.__version__} has no architecture {name!r}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **timm_args(card))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(f"encoder {card.name}: timm cannot build {name} with {card.architecture_args}: {exc}") from exc


def check_state(network: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights for another architecture, naming the first missing and unexpected keys (and shapes)."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {len(missing)} key(s), first {', '.join(missing[:SHOWN_KEYS])}" if missing else "",
            f"unexpected {len(unexpected)} key(s), first {', '.join(unexpected[:SHOWN_KEYS])}" if unexpected else "",
            f"other shapes: {', '.join(shapes[:SHOWN_KEYS])}" if shapes else "",
        ]
        raise ModelError(f"{where} does not fit the card's architecture: {'; '.join(p for p in parts if p)}")


def pooled_dim(module: nn.Module, card: EncoderCard) -> int:
    network = module.network if isinstance(module, PooledEncoder) else module
    width = int(getattr(network, "num_features", 0))
    return 2 * width if card.pooling == "cls+mean" else width


def load_encoder(directory: str | os.PathLike[str]) -> LoadedEncoder:
    """An encoder folder (encoder.json + weights.safetensors) or one of our model folders (its penultimate
    features), checked before the first slide: card, weights' sha256, keys and shapes, output length."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"--encoder {directory}: no such folder")
    if encoder_folder_kind(directory) == "model":
        return model_as_encoder(directory)
    card = read_encoder_card(directory / ENCODER_CARD)
    weights = directory / ENCODER_WEIGHTS
    if not weights.is_file():
        raise ModelError(
            f"{directory}: no {ENCODER_WEIGHTS}; download {card.source.weights_file or 'the weights'} from "
            f"{card.source.repository or 'its publisher'} and run `wsi-pipeline import-encoder {directory} FILE`"
        )
    if card.weights_sha256 is not None and file_sha256(weights) != card.weights_sha256:
        raise ModelError(f"{weights} is not the file its card was written for (sha256 differs); import it again")
    network = build_encoder_network(card)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several error types for damaged files
        raise ModelError(f"{weights} cannot be read ({exc}); import the weights again") from exc
    check_state(network, state, str(weights))
    network.load_state_dict(state, strict=True)
    module = PooledEncoder(network, card.pooling).eval()
    if pooled_dim(module, card) != card.dim:
        raise ModelError(
            f"{directory}: the network gives {pooled_dim(module, card)} values per tile, its card {card.dim}"
        )
    return LoadedEncoder(card, module, directory)


def model_as_encoder(directory: Path) -> LoadedEncoder:
    """One of our classifiers as an encoder: the input of its last linear layer (its penultimate features)."""
    model = load_model(directory)
    card = model.card
    if model.module is None or card.kind != "classifier":
        raise ModelError(f"--encoder {directory}: a {card.kind} {card.format} model gives no tile vector to embed")
    module = model.module
    last = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ModelError(f"--encoder {directory}: {card.architecture} has no linear layer to take the features before")
    name, linear = last[-1]
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    encoder_card = EncoderCard(
        name=card.name,
        architecture="model-folder",
        architecture_args={"model": str(directory)},
        mpp=card.mpp,
        tile_px=card.tile_px,
        normalisation=card.normalisation,
        pooling="network",
        dim=linear.in_features,
        weights_sha256=card.weights_sha256,
        notes=f"penultimate features of the {card.task} model {card.name}",
    )
    return LoadedEncoder(encoder_card, module.eval(), directory)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a downloaded checkpoint: safetensors, or a torch file read with `weights_only=True` (nothing is
    unpickled but tensors and plain containers); a `state_dict` / `model` / `teacher` entry is unwrapped."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several error types for damaged files
            raise ModelError(f"{path} cannot be read as safetensors ({exc})") from exc
    try:
        data: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for files it refuses
        raise ModelError(f"{path} is not a weights-only torch checkpoint ({str(exc).splitlines()[0]})") from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} holds no state dict of tensors")
    return data


def import_encoder(card_or_name: str, weights: Path, out: Path, strip_prefix: str = "") -> LoadedEncoder:
    """Make an encoder folder `out` from a shipped card's name (or an encoder.json) and a downloaded checkpoint;
    the weights are checked against the architecture before anything is written."""
    shipped = shipped_encoder_cards()
    if card_or_name in shipped:
        card = shipped[card_or_name]
    elif Path(card_or_name).is_file():
        card = read_encoder_card(Path(card_or_name))
    elif (Path(card_or_name) / ENCODER_CARD).is_file():
        card = read_encoder_card(Path(card_or_name) / ENCODER_CARD)
    else:
        raise ConfigError(f"{card_or_name}: not a shipped encoder ({', '.join(shipped)}) nor an encoder card")
    state = read_checkpoint(weights)
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    if card.weights_prefix:
        state = {k.removeprefix(card.weights_prefix): v for k, v in state.items() if k.startswith(card.weights_prefix)}
    if card.key_map == "hf_dinov2":
        state = timm_keys_of_hf_dinov2(state)
    network = build_encoder_network(card)
    check_state(network, state, str(weights))
    out.mkdir(parents=True, exist_ok=True)
    write_encoder_folder(out, state, card)
    return load_encoder(out)


def save_encoder(out: Path, network: nn.Module, card: EncoderCard) -> Path:
    """An encoder folder from a network in memory (tests, benchmarks: a real architecture with local weights)."""
    return write_encoder_folder(out, network.state_dict(), card)


def write_encoder_folder(out: Path, state: dict[str, torch.Tensor], card: EncoderCard) -> Path:
    """weights.safetensors, then encoder.json with their sha256 (checked on every load)."""
    save_weights_and_card(out, state, ENCODER_WEIGHTS, ENCODER_CARD, card)
    return out


# transformers' Dinov2Model names -> timm's VisionTransformer names (the inverse of transformers'
# convert_dinov2_to_hf.py); written here because neither library ships this direction
_HF_DINOV2 = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),  # transformers >= 5 names its modules so in memory
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("encoder.layer.", "blocks."),
    ("layernorm.", "norm."),
)


def timm_keys_of_hf_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model state dict under timm ViT names: query, key and value joined into qkv, the
    mask token (a training device) dropped."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue
        for old, new in _HF_DINOV2:
            key = key.replace(old, new)
        renamed[key] = value
    for q, k, v in (
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ):
        for key in [name for name in renamed if f".{q}." in name]:
            prefix, _, kind = key.partition(f".{q}.")
            parts = [renamed.pop(f"{prefix}.{p}.{kind}") for p in (q, k, v)]
            renamed[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return renamed


def check_tile_size(card: EncoderCard, option: str) -> None:
    """A tile size the network cannot take is refused before the first slide (exit 7): a ViT of fixed size takes
    only its own, a dynamic one a multiple of its patch."""
    args = card.architecture_args
    size, patch = args.get("img_size"), args.get("patch_size")
    if size is not None and not args.get("dynamic_img_size") and card.network_px != size:
        raise ConfigError(f"{option}: {card.name} takes {size} px tiles, not {card.network_px} (set input_px)")
    if patch is not None and card.network_px % int(patch):
        raise ConfigError(f"{option}: {card.name}'s {card.network_px} px input is not a multiple of its patch {patch}")


def resized(x: torch.Tensor, card: EncoderCard) -> torch.Tensor:
    """Tiles (B, 3, T, T) at the edge the network takes (bicubic with antialiasing, as PIL resizes in the encoders'
    published recipes); unchanged when they already are. Per-channel normalisation commutes with it."""
    size = card.network_px
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
