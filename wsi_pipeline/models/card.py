"""The model card: everything needed to feed a network correctly and to judge what it says."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_THRESHOLD = 0.5  # a class whose card chose no operating point


class Normalisation(BaseModel):
    """Applied on the device to RGB scaled to [0, 1]: (x - mean) / std."""

    model_config = ConfigDict(extra="forbid")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


class ColourStats(BaseModel):
    """The colour of the tissue a model was trained on, for the input guard (`input_guard.py`). Each training tile's
    mean tissue colour as optical density (OD, per RGB channel) is split into its direction (the unit vector: which
    stain, whatever its amount) and its length (how much stain); the card keeps their mean and standard deviation
    over the training tiles. The OD of a mean colour does not change with resolution, so a slide's thumbnail can be
    compared with tiles at the model's µm/px."""

    model_config = ConfigDict(extra="forbid")
    od_direction_mean: tuple[float, float, float]
    od_direction_std: tuple[float, float, float]
    od_length_mean: float
    od_length_std: float
    tiles: int = Field(ge=1, description="training tiles measured")
    max_z: float = Field(4.0, gt=0, description="a slide further than this many standard deviations is outside")


class ModelDomain(BaseModel):
    """What tissue a model answers for, shown beside every answer it gives (summary.json, report, overlay title)."""

    model_config = ConfigDict(extra="forbid")
    organs: list[str] = Field(min_length=1, description="e.g. lymph node, colon, breast")
    specimen: list[str] = Field(default_factory=lambda: ["FFPE"], description="FFPE and / or frozen")
    stain: str = "H&E"
    magnification: str = Field(description="the range it was trained over, e.g. 20x (0.5 µm/px)")
    sources: list[str] = Field(default_factory=list, description="datasets, centres and scanners of its training data")
    excludes: list[str] = Field(default_factory=list, description="tissue it must not be asked about")

    def line(self) -> str:
        """One line for logs and titles: "lymph node, FFPE, H&E, 10x (0.97 µm/px)"."""
        return ", ".join([" / ".join(self.organs), " / ".join(self.specimen), self.stain, self.magnification])


class DomainGuardCard(BaseModel):
    """The domain guard fitted to the model's own features (models/domain.py): where its file is, the layers it reads,
    its calibrated threshold and what it measured."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field("domain_guard.safetensors", pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(description="of the guard file, checked on every load")
    architecture: str = Field(description="the card's architecture it was fitted for")
    layers: list[str] = Field(min_length=1, description="named modules whose activations it summarises")
    window_px: int = Field(gt=0, description="input px per feature window (the training tile)")
    quantile: float = Field(gt=0, lt=1, description="of in-domain validation scores the threshold sits at")
    fit_tiles: int = Field(ge=1, description="windows of the training tile size it was fitted on")
    validation_tiles: int = Field(ge=1)
    data: list[str] = Field(default_factory=list, description="where the tiles came from")
    figures: dict[str, Any] = Field(default_factory=dict, description="measured: flagged fractions, AUROC per set")


CLASS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
RESERVED_HEATMAP = "tissue"  # the heatmap every slide gets (the tissue mask)
RESERVED_QC = "qc"  # the quality-control image (engine/qc.py)
RESERVED_ATTENTION = "attention"  # a slide model's attention image (run/slide_model.py)
DOMAIN_HEATMAP_PREFIX = "domain-"  # each guarded task's domain image is domain-<task>


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    task: str = Field(description="the registered task the model serves (e.g. mitosis)")
    kind: Literal["classifier", "dense"] = Field(description="one vector per tile, or a map per tile")
    format: str = Field(
        "safetensors",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="how the network is stored, a registered model format (models/formats.py): weights.safetensors "
        "for `architecture`, a TorchScript file (model.torchscript.pt), an ONNX graph (model.onnx), or a plugin's "
        "own; see docs/models.md",
    )
    architecture: str = Field(
        description="a name in wsi_pipeline.models.architectures, a torchvision model, timm:<name>, or (TorchScript "
        "and ONNX, which carry their graph) a free description"
    )
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    mpp: float = Field(gt=0, description="µm/px of the input")
    tile_px: int = Field(gt=0, description="input tile edge the model was trained on")
    output_stride: int = Field(1, ge=1, description="input px per output px (dense models)")
    halo_px: int = Field(0, ge=0, description="input px of context each output px needs (dense models)")
    run_tile_px: int | None = Field(
        None,
        gt=0,
        description="tile edge the engine reads when the task configures none (dense models run on larger tiles "
        "than they were trained on; None: tile_px)",
    )
    classes: list[str] = Field(min_length=1, description="output channel names; heatmaps are named after them")
    heatmap_classes: list[str] | None = Field(
        None, description="classes written as heatmaps, each an image named after its class (None: all)"
    )
    activation: Literal["softmax", "sigmoid"] = "softmax"
    normalisation: Normalisation = Normalisation()
    stain_normalisation: Literal["macenko"] | None = Field(
        None, description="stain normalisation of every tile before the network (models/stain.py); None: none"
    )
    training: dict[str, Any] = Field(default_factory=dict, description="data, split, augmentation, command")
    metrics: dict[str, Any] = Field(default_factory=dict, description="measured validation metrics")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="operating point per written class, chosen on validation data (metrics.operating_point says "
        "how); `run` uses it unless tasks.<task>.threshold is set; a class without one: 0.5",
    )
    input_stats: ColourStats | None = Field(
        None, description="colour of the training tissue; slides far outside it are skipped unless forced"
    )
    bf16_max_difference: float | None = Field(
        None,
        ge=0,
        description="largest |bf16 - fp32| of any output over the evaluation data (`evaluate`, copied here by "
        "`publish`); `engine.precision: auto` runs the model in fp32 where it exceeds 0.01; None: not measured",
    )
    weights_sha256: str | None = Field(
        None, description="sha256 of the weights file, written on export and checked on every load"
    )
    domain: ModelDomain | None = Field(None, description="the tissue the model answers for")
    domain_guard: DomainGuardCard | None = Field(
        None, description="a guard fitted to the model's features (`calibrate-domain`); None: no tile-level guard"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        for name, size in (("tile_px", self.tile_px), ("run_tile_px", self.run_tile_px)):
            if self.kind == "dense" and size is not None and size % self.output_stride:
                raise ValueError(f"{name} {size} is not a multiple of output_stride {self.output_stride}")
        if self.kind == "classifier" and self.run_tile_px not in (None, self.tile_px):
            raise ValueError(f"a classifier runs on its tile_px ({self.tile_px}), not run_tile_px {self.run_tile_px}")
        for cls in self.classes:  # each becomes a heatmap's folder name beside the slide's `tissue` image
            if (
                not CLASS_NAME.fullmatch(cls)
                or cls in (RESERVED_HEATMAP, RESERVED_QC, RESERVED_ATTENTION)
                or cls.startswith(DOMAIN_HEATMAP_PREFIX)
            ):
                raise ValueError(
                    f"class name {cls!r}: a class names a heatmap folder, so it must be letters, digits, '_', '.' or "
                    f"'-' (not starting with '.' or '-'), not {RESERVED_HEATMAP!r} (the slide's own tissue image), "
                    f"not {RESERVED_QC!r} (its quality-control image), {RESERVED_ATTENTION!r} (a slide model's) nor "
                    f"{DOMAIN_HEATMAP_PREFIX}… (a task's domain image)"
                )
        unknown = set(self.heatmap_classes or []) - set(self.classes)
        if unknown:
            raise ValueError(f"heatmap_classes {sorted(unknown)} are not in classes {self.classes}")
        strays = sorted(set(self.thresholds) - set(self.classes))
        if strays or any(not 0 <= t <= 1 for t in self.thresholds.values()):
            raise ValueError(f"thresholds must name classes of {self.classes} with values in [0, 1]: {self.thresholds}")
        if self.activation == "softmax" and len(self.classes) < 2:
            raise ValueError("softmax needs at least two classes; use sigmoid for one")
        return self

    def threshold(self, cls: str) -> float:
        """The card's operating point for `cls` (0.5 where the card has none)."""
        return self.thresholds.get(cls, DEFAULT_THRESHOLD)

    @property
    def written_classes(self) -> list[str]:
        return list(self.heatmap_classes) if self.heatmap_classes is not None else list(self.classes)
