"""Run configuration: YAML validated on load (pydantic), every spatial parameter in µm or µm/px.

Errors name the key (`tasks.mitosis.tile_px: ...`); `--set a.b.c=value` overrides any key from the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

REPO_DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TissueConfig(_Strict):
    """Tissue detection on a low-resolution thumbnail."""

    mask_mpp: float = Field(8.0, gt=0, le=64, description="µm/px of the tissue mask")
    background: Literal["auto", "light", "dark"] = Field(
        "auto",
        description="light = brightfield (H&E), dark = fluorescence; auto decides from the slide's border",
    )
    saturation_min: float = Field(0.05, ge=0, le=1, description="lower clamp of the Otsu saturation threshold")
    saturation_max: float = Field(0.15, ge=0, le=1, description="upper clamp of the Otsu saturation threshold")
    smooth_um: float = Field(4.0, ge=0, description="Gaussian sigma applied before thresholding")
    closing_um: float = Field(24.0, ge=0, description="radius of the morphological closing that joins fibres")
    min_region_um2: float = Field(20000.0, ge=0, description="tissue pieces smaller than this are dropped")
    max_hole_um2: float = Field(20000.0, ge=0, description="holes smaller than this are filled")
    pen_filter: bool = Field(True, description="reject green, blue, red and black ink")
    pen_margin_um: float = Field(40.0, ge=0, description="how far around ink the mask is cleared")
    pen_min_area_um2: float = Field(2000.0, ge=0, description="ink specks smaller than this are ignored")
    pen_max_fraction: float = Field(
        0.3, ge=0, le=1, description="a tissue piece made of more ink than this fraction is dropped whole"
    )
    dark_value: int = Field(60, ge=0, le=255, description="pixels darker than this (max channel) are artefacts")
    simplify_um: float = Field(2.0, ge=0, description="polygon simplification tolerance")

    @model_validator(mode="after")
    def _ordered(self) -> TissueConfig:
        if self.saturation_min > self.saturation_max:
            raise ValueError("saturation_min must not exceed saturation_max")
        return self


class TaskConfig(_Strict):
    """One analysis task: where it reads (µm/px, tile size, overlap) and how its outputs are thresholded.

    `mpp` and `tile_px` default to the model card's: a model only works at the resolution it was trained at, and a
    classifier only on its own tile size, so a value that disagrees with the card is refused before any tile is read.
    Dense (fully convolutional) models may run on larger tiles than they were trained on.
    """

    enabled: bool = True
    mpp: float | None = Field(None, gt=0, le=64, description="µm/px the model sees; null = the model card's")
    tile_px: int | None = Field(
        None, gt=0, le=8192, description="tile edge in px at `mpp`; null = the model card's (dense: may be larger)"
    )
    overlap_px: int = Field(0, ge=0, description="overlap between neighbouring tiles in px at `mpp`")
    min_tissue: float = Field(0.1, ge=0, le=1, description="tiles with a smaller tissue fraction are skipped")
    batch_size: int = Field(64, gt=0, le=4096)
    model: str | None = Field(None, description="path to a model directory; None = the shipped default")
    threshold: float = Field(0.5, ge=0, le=1, description="probability above which a pixel/tile is positive")

    @model_validator(mode="after")
    def _overlap_fits(self) -> TaskConfig:
        if self.tile_px is not None and self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px ({self.overlap_px}) must be smaller than tile_px ({self.tile_px})")
        return self


class MitosisConfig(TaskConfig):
    min_distance_um: float = Field(10.0, gt=0, description="minimum distance between two detected mitoses")
    smooth_sigma_um: float = Field(1.0, ge=0, description="Gaussian smoothing before peak finding")
    match_radius_um: float = Field(7.5, gt=0, description="a detection within this radius of a truth is a hit")
    hpf_area_mm2: float = Field(0.237, gt=0, description="area of one high-power field (0.55 mm FN at 40x)")


class MetastasisConfig(TaskConfig):
    min_lesion_um: float = Field(0.0, ge=0, description="regions with a smaller longest diameter are dropped")
    smooth_sigma_um: float = Field(20.0, ge=0, description="Gaussian smoothing of the tumour map")


class TasksConfig(_Strict):
    epithelium_stroma: TaskConfig = TaskConfig(overlap_px=0, min_tissue=0.25)
    # the mitosis network is fully convolutional: 512 px tiles (its card says 96, the training crop) cost fewer reads
    mitosis: MitosisConfig = MitosisConfig(tile_px=512, overlap_px=64, min_tissue=0.1, batch_size=16)
    metastasis: MetastasisConfig = MetastasisConfig(overlap_px=48, min_tissue=0.25)


class ExportConfig(_Strict):
    geojson_gzip: bool = Field(False, description="also write qupath.geojson.gz")


class Config(_Strict):
    tissue: TissueConfig = TissueConfig()
    tasks: TasksConfig = TasksConfig()
    export: ExportConfig = ExportConfig()

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): outputs made with the same hash are compatible."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: _lookup(data, s) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = "unknown key (check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        value = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        lines.append(f"{key}: {message}{value}")
    return f"invalid configuration in {origin}:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`tasks.mitosis.tile_px=512` -> (['tasks','mitosis','tile_px'], 512); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set tasks.mitosis.tile_px=512")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `--set` overrides, validated once at the end."""
    data: dict[str, Any] = Config().model_dump(mode="python")
    origin = "the defaults"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found; give a path to a YAML file (see configs/)") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections (tissue:, tasks:)")
        _merge(data, loaded)
    for text in overrides:
        key_path, value = parse_override(text)
        _apply(data, key_path, value)
        origin = f"{origin} with --set overrides" if "--set" not in origin else origin
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from exc


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
