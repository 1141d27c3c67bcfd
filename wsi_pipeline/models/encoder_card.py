"""The encoder card: what a tile encoder (a foundation model, or one of our networks without its head) needs to be
fed exactly as it was trained, and how its output becomes one vector per tile. No torch here: the CLI lists and
checks cards before anything heavy is imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wsi_pipeline.models.card import Normalisation
from wsi_pipeline.models.folders import CARD_FILE, ModelError

ENCODER_CARD = "encoder.json"
ENCODER_WEIGHTS = "weights.safetensors"
# The published encoders' cards (no weights: each user downloads them under the encoder's own licence)
SHIPPED_ENCODERS = Path(__file__).resolve().parent / "encoder_cards"

# timm constructor arguments that are classes: a card names them, and only these names resolve (a card never makes
# the loader import an arbitrary object)
LAYER_NAMES = {
    "SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "SwiGLU": ("timm.layers", "SwiGLU"),
    "SiLU": ("torch.nn", "SiLU"),
    "GELU": ("torch.nn", "GELU"),
}
Pooling = Literal["cls", "mean", "cls+mean", "network"]


class EncoderSource(BaseModel):
    """Where a user gets the weights, and on what terms."""

    model_config = ConfigDict(extra="forbid")
    repository: str = Field("", description="e.g. a Hugging Face repository id")
    weights_file: str = Field("", description="the file of that repository the card was written for")
    licence: str = ""
    citation: str = ""
    gated: bool = Field(False, description="the repository asks users to accept its terms before downloading")


class EncoderCard(BaseModel):
    """An encoder folder's `encoder.json`: the architecture timm builds, the tiles it reads and its pooling."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", description="names the embeddings file")
    architecture: str = Field(description="timm:<name>, or model-folder (one of our networks, penultimate features)")
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    mpp: float = Field(gt=0, description="µm/px of the tiles it was trained on")
    tile_px: int = Field(gt=0, description="tile edge read from the slide at `mpp`")
    input_px: int | None = Field(None, gt=0, description="edge the tile is resized to (bicubic); None: tile_px")
    normalisation: Normalisation
    pooling: Pooling = Field(
        description="cls: the class token; mean: the mean of the patch tokens (register tokens dropped; a CNN's "
        "global average); cls+mean: both, concatenated; network: the network's own output"
    )
    dim: int = Field(gt=0, description="length of one tile's vector, checked on load")
    weights_sha256: str | None = Field(None, description="of weights.safetensors, written by import-encoder")
    weights_prefix: str = Field(
        "", description="import-encoder keeps only the weights under this prefix, without it (a model's vision tower)"
    )
    key_map: Literal["none", "hf_dinov2"] = Field(
        "none", description="hf_dinov2: a transformers Dinov2Model checkpoint, renamed to timm's ViT on import"
    )
    source: EncoderSource = EncoderSource()
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> EncoderCard:
        if not (self.architecture.startswith("timm:") or self.architecture == "model-folder"):
            raise ValueError(f"architecture {self.architecture!r}: an encoder is timm:<name> or model-folder")
        for key in ("mlp_layer", "act_layer", "norm_layer"):
            value = self.architecture_args.get(key)
            if value is not None and value not in LAYER_NAMES:
                raise ValueError(f"architecture_args.{key} {value!r} is not one of {', '.join(LAYER_NAMES)}")
        if self.pooling == "network" and self.architecture != "model-folder":
            raise ValueError("pooling 'network' is for our own networks (architecture model-folder)")
        return self

    @property
    def network_px(self) -> int:
        """The edge the network sees."""
        return self.input_px or self.tile_px


def read_encoder_card(path: Path) -> EncoderCard:
    try:
        return EncoderCard.model_validate(json.loads(path.read_text()))
    except (ValidationError, json.JSONDecodeError, OSError) as exc:
        raise ModelError(f"{path} is not a valid encoder card: {exc}") from exc


def encoder_folder_kind(directory: Path) -> str:
    """`encoder` (encoder.json + weights), `model` (one of our model folders: its penultimate features) or a
    ModelError naming what an encoder folder holds."""
    if (directory / ENCODER_CARD).is_file():
        return "encoder"
    if (directory / CARD_FILE).is_file():
        return "model"
    raise ModelError(
        f"--encoder {directory}: neither {ENCODER_CARD} (an encoder folder: `wsi-pipeline import-encoder` makes one "
        f"from downloaded weights) nor {CARD_FILE} (a model folder) is there"
    )


def shipped_encoder_cards() -> dict[str, EncoderCard]:
    """The cards shipped for published encoders, by name."""
    cards = [read_encoder_card(p) for p in sorted(SHIPPED_ENCODERS.glob("*.json"))]
    return {card.name: card for card in cards}
