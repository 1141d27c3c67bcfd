"""Training settings: one validated model, loaded like the run configuration (defaults <- recipe <- `--set`, then
the options given on the command line), so that no default is decided in the CLI.

A recipe (`configs/models/<task>.yaml`) names settings by the `train` option they stand for (`arch_arg` or
`arch-arg`, `class`, `describe`, ...).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from wsi_pipeline.config import merged_settings, validated
from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.core.schema import StrictModel
from wsi_pipeline.tasks import get_task, load_plugins

if TYPE_CHECKING:
    from wsi_pipeline.training.data.augment import AugmentConfig

# Point-annotated mitosis data in ../shared/data (AMi-Br / TUPAC16 crops, MITOS-2012) is at 0.25 µm/px (40x), and the
# detector learns from 96 px windows of it: these are the defaults of a point detector, not of classifiers, whose
# tile size and µm/px must come from the data.
DENSE_DEFAULT_MPP = 0.25
DENSE_DEFAULT_TILE_PX = 96


class TrainSettings(StrictModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    task: str
    classes: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("classes", "class"),
        description="NAME=FOLDER[,FOLDER] per output class (default: one class per folder)",
    )
    kind: Literal["classifier", "class_map"] | None = Field(
        None,
        description="what a classifier task's model makes: one vector per tile (classifier) or a map of per-pixel "
        "classes (class_map: a U-Net trained on the same tiles, classifier/class_maps.py); null = classifier. A "
        "point-detector task (mitosis) always trains a point detector",
    )
    arch: str | None = Field(
        None, description="architecture [small_cnn; small_unet for a class map; dense_fcn for a point detector]"
    )
    arch_args: list[str] = Field(default_factory=list, validation_alias=AliasChoices("arch_args", "arch_arg"))
    tile_px: int | None = Field(None, ge=8, description="tile size of the data (px)")
    mpp: float | None = Field(None, gt=0, description="µm/px of the data")
    default_mpp: float | None = Field(
        None, gt=0, description="µm/px of annotated slides whose file has none (as `run --default-mpp`)"
    )
    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    select: Literal["best", "last"] = "best"
    patience: int = Field(5, ge=1)
    val_fraction: float = Field(0.25, ge=0.05, le=0.9)
    val_data: str | None = None
    group_pattern: str = r"(CRC-Prim-HE-\d+)"
    groups: str | None = Field(None, description="regex: only items whose source (group) matches it")
    seed: int = 0
    device: str = "auto"
    workers: int = Field(1, ge=0)
    describe: str = ""
    freeze_backbone: bool = False
    from_embeddings: str | None = Field(
        None, description="a folder caching the encoder's features of the tiles: train only a head on them"
    )
    encoder: str | None = Field(None, description="the encoder folder (or model folder) of --from-embeddings")
    head: Literal["linear", "mlp"] = Field("linear", description="the head trained on embeddings")
    init: str | None = None
    init_head: bool = Field(
        False, description="also take the head from --init (continuing a model); false: a new head (transfer)"
    )
    stain_normalisation: Literal["macenko"] | None = Field(
        None, description="normalise every tile's stain (Macenko, per tile) in training and wherever the model runs"
    )
    recompute_batchnorm: bool = Field(
        False,
        description="after training, recompute every BatchNorm's statistics over the un-augmented training tiles "
        "(the running averages of the last augmented batches drift from what the model sees when it runs)",
    )
    average_epochs: int = Field(
        0,
        ge=0,
        description="the model is the mean of the last N epochs' weights (stochastic weight averaging); needs "
        "select: last and recompute_batchnorm: true (averaged weights have no BatchNorm statistics of their own)",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: mixed-precision training (the forward pass under bf16 autocast, channels-last memory, "
        "weights and optimiser in fp32), several times faster on CPUs with AMX / AVX-512 BF16 and on CUDA GPUs; "
        "validation stays fp32",
    )
    augment: dict[str, float | bool] = Field(
        default_factory=dict, description="augmentation settings by name (hed_sigma, brightness, ...; data/augment.py)"
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _kind_alias(cls, value: Any) -> Any:
        return "class_map" if value == "dense" else value  # the name recipes used before class_map

    @property
    def point_detector(self) -> bool:
        """The task trains a point detector (mitosis): a probability map trained on point-annotated images."""
        return get_task(self.task).trainer == "point_detector"

    @property
    def makes_maps(self) -> bool:
        """The model makes a map per tile (a point detector, or a classifier task's class map)."""
        return self.point_detector or self.kind == "class_map"

    @model_validator(mode="after")
    def _resolution(self) -> TrainSettings:
        get_task(self.task)
        if self.point_detector:
            if self.kind == "classifier":  # class_map (or its former name, dense) is what a detector is anyway
                raise ValueError(f"{self.task} trains a point detector: its models are dense (kind: null)")
            self.__dict__["kind"] = None
            self.__dict__["arch"] = self.arch or "dense_fcn"
            if self.stain_normalisation is not None:
                raise ValueError(f"stain_normalisation is for classifier tasks' models, not {self.task}'s")
        else:
            if self.tile_px is None or self.mpp is None:
                raise ValueError(
                    f"{self.task} models learn from tiles of a known size and µm/px: give --tile-px and --mpp (the "
                    "data's tile size and µm/px, e.g. --tile-px 224 --mpp 0.5), or tile_px and mpp in the recipe"
                )
            self.__dict__["arch"] = self.arch or ("small_unet" if self.makes_maps else "small_cnn")
        return self

    @model_validator(mode="after")
    def _embeddings(self) -> TrainSettings:
        if (self.from_embeddings is None) != (self.encoder is None):
            raise ValueError("--from-embeddings DIR and --encoder DIR go together (the cache and the encoder)")
        if self.from_embeddings is not None and self.makes_maps:
            raise ValueError("--from-embeddings trains a tile classifier's head, not a map (point detector, class_map)")
        return self

    @model_validator(mode="after")
    def _averaging(self) -> TrainSettings:
        from wsi_pipeline.training.loop import averaging_problem

        problem = averaging_problem(self.average_epochs, self.select, self.recompute_batchnorm, self.epochs)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _augment_known(self) -> TrainSettings:
        from dataclasses import fields

        from wsi_pipeline.training.data.augment import AugmentConfig

        known = {f.name for f in fields(AugmentConfig)}
        unknown = sorted(set(self.augment) - known)
        if unknown:
            raise ValueError(f"augment: unknown setting(s) {unknown}; known: {sorted(known)}")
        return self

    def augmentation(self) -> AugmentConfig:
        """The recipe's augmentation over the trainer's defaults (a dense trainer moves image and target together
        itself, so flips, rotations and zoom are off in its colour augmentation)."""
        from wsi_pipeline.training.data.augment import AugmentConfig

        base = AugmentConfig(flips=False, rotate90=False, scale=0.0) if self.makes_maps else AugmentConfig()
        geometric = {"flips", "rotate90", "scale"} if self.makes_maps else set()
        # by name: `_augment_known` has checked the names, pydantic each value as a float or a bool
        overrides: dict[str, Any] = {k: v for k, v in self.augment.items() if k not in geometric}
        return replace(base, **overrides)

    @property
    def model_mpp(self) -> float:
        """The µm/px the model is made for: the data's (a point detector's data defaults to 0.25)."""
        return self.mpp if self.mpp is not None else DENSE_DEFAULT_MPP

    @property
    def model_tile_px(self) -> int:
        return self.tile_px if self.tile_px is not None else DENSE_DEFAULT_TILE_PX

    def architecture_args(self) -> dict[str, Any]:
        """`arch_arg: [width=16]` as {'width': 16}, each value read as YAML."""
        import yaml

        values: dict[str, Any] = {}
        for spec in self.arch_args:
            key, sep, raw = spec.partition("=")
            if not key or not sep:
                raise ConfigError(f"--arch-arg {spec!r}: expected KEY=VALUE")
            values[key] = yaml.safe_load(raw)
        return values

    def class_map(self) -> dict[str, list[str]] | None:
        return parse_class_map(self.classes)


def parse_class_map(specs: list[str] | tuple[str, ...]) -> dict[str, list[str]] | None:
    """`--class NAME=FOLDER[,FOLDER]` as {class: folders}; None when none were given."""
    mapping = {}
    for spec in specs:
        name, _, folders = spec.partition("=")
        if not name or not folders:
            raise ConfigError(f"--class {spec!r}: expected NAME=FOLDER[,FOLDER]")
        mapping[name] = [f for f in folders.split(",") if f]
    return mapping or None


def load_train_settings(
    task: str, recipe: str | None, overrides: tuple[str, ...], given: dict[str, Any]
) -> TrainSettings:
    """Defaults <- recipe <- `--set KEY=VALUE` <- options given on the command line, validated once. Plugin tasks
    (`WSI_PIPELINE_PLUGINS`, entry points) are loaded first: a task of a plugin is trained like a built-in one."""
    load_plugins()
    data, origin = merged_settings({}, recipe, overrides, "training recipe")
    data = {key.replace("-", "_"): value for key, value in data.items()}
    aliases = {"class": "classes", "arch_arg": "arch_args"}
    data = {aliases.get(k, k): v for k, v in data.items()}
    known = set(TrainSettings.model_fields)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"training recipe {origin}: unknown option(s) {unknown}; see wsi-pipeline train --help")
    for key, value in given.items():
        data[aliases.get(key, key)] = value
    data["task"] = task
    return validated(TrainSettings, data, origin if recipe or overrides else "the options of train")
