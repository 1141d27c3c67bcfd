"""Run configuration: YAML validated on load (pydantic), every spatial parameter in µm or µm/px.

Errors name the key (`tasks.mitosis.tile_px: ...`); `--set a.b.c=value` overrides any key from the command line.
The `tasks` section has one key per registered task (built-ins and plugins), each validated by that task's own
configuration model: the model is rebuilt whenever the task registry changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from wsi_pipeline.core.errors import ConfigError
from wsi_pipeline.core.schema import StrictModel
from wsi_pipeline.slide import check_backend_name
from wsi_pipeline.slide.qc_config import QcConfig
from wsi_pipeline.slide.tissue_config import TissueConfig
from wsi_pipeline.tasks import TaskConfig, load_plugins, tasks
from wsi_pipeline.tasks import registry as task_registry

__all__ = [
    "Config",
    "EmbedConfig",
    "EngineConfig",
    "ExportConfig",
    "QcConfig",
    "SlideClassifierConfig",
    "SlideConfig",
    "TaskConfig",
    "TissueConfig",
    "dump_config",
    "load_config",
]


class TasksConfig(StrictModel):
    """Replaced by a model with one field per registered task (see `_rebuild`)."""


class SlideConfig(StrictModel):
    backend: str = Field("auto", description="slide reader: auto (the best that opens the file) or a backend name")
    check_mpp: bool = Field(
        True,
        description="check each slide's recorded or given µm/px against the tissue's estimate; more than 2x apart is "
        "said (docs/mpp.md)",
    )

    @field_validator("backend")
    @classmethod
    def _registered(cls, name: str) -> str:
        try:
            return check_backend_name(name)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("slide.backend: ")) from None


class EngineConfig(StrictModel):
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA; fp32 on the CPU (in ONNX Runtime; with engine.runtime: torch, bf16 "
        "on CPUs with native bf16, AMX / AVX512-BF16); "
        "fp32 too for a model whose card measured bf16 outputs over 0.01 from fp32 (bf16_max_difference)",
    )
    compile: bool = Field(False, description="torch.compile every model (8-28 s per model first; pays on long runs)")
    fuse_batchnorm: bool = Field(
        True, description="run PyTorch models with BatchNorm folded into the convolutions (1.1-1.6x on the CPU)"
    )
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what runs a PyTorch model's fp32 forward pass on the CPU; auto: ONNX Runtime (exported once "
        "per run; 1.2-2.3x torch's fp32 rate on the CPUs measured, logits within a few 1e-6), torch for bf16, "
        "torch.compile and a network the exporter cannot trace",
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="device: decode stored JPEG tiles on the model's device (nvJPEG on CUDA) where a plan allows; "
        "not yet measured on a GPU, so not the default",
    )
    loader: Literal["threads", "processes"] = Field(
        "threads",
        description="--workers read tiles as threads of the run's process (the readers release the GIL; no copy of "
        "torch per worker) or as DataLoader worker processes (for a plugin backend that holds the GIL)",
    )
    slides_in_flight: int = Field(
        4,
        ge=1,
        le=8,
        description="slides a batch works on at once: while one is in the model, the next is opened and its tissue "
        "found, and the ones before post-processed and exported in order (4: two of them, so that a slide slower to "
        "export than the next is to infer does not hold the model up); 1: one slide at a time",
    )


class EmbedConfig(StrictModel):
    """Tile embeddings (docs/embeddings.md): each encoder folder's vectors of every slide, written to
    <slide_id>/embeddings/<encoder>.zarr (or .h5 in the TRIDENT / CLAM layout)."""

    encoders: list[str] = Field(
        default_factory=list, description="encoder folders (`import-encoder` makes them) or model folders"
    )
    format: Literal["zarr", "h5"] = "zarr"
    dtype: Literal["float16", "float32"] = "float16"
    min_tissue: float = Field(0.25, ge=0, le=1, description="tiles with a smaller tissue fraction are not embedded")
    overlap_px: int = Field(0, ge=0, description="overlap between neighbouring tiles in px at the encoder's µm/px")
    batch_size: int = Field(64, gt=0, le=4096)


class SlideClassifierConfig(StrictModel):
    """A slide-level model (`train-slide`) run on the embeddings of its encoder, which `embed.encoders` must hold."""

    model: str | None = Field(None, description="a slide-model folder; null: none")
    top_tiles: int = Field(20, ge=0, le=1000, description="the most attended tiles written as QuPath tile objects")
    threshold: float | None = Field(None, ge=0, le=1, description="on the positive probability; null: the card's")


class ExportConfig(StrictModel):
    geojson_gzip: bool = Field(False, description="also write qupath.geojson.gz")


class Config(StrictModel):
    plugins: list[str] = Field(
        default_factory=list, description="modules or .py files that register tasks or reader backends"
    )
    slide: SlideConfig = SlideConfig()
    tissue: TissueConfig = TissueConfig()
    qc: QcConfig = QcConfig()
    tasks: TasksConfig = TasksConfig()
    engine: EngineConfig = EngineConfig()
    export: ExportConfig = ExportConfig()
    embed: EmbedConfig = EmbedConfig()
    slide_classifier: SlideClassifierConfig = SlideClassifierConfig()

    def task(self, name: str) -> TaskConfig:
        """The configuration of task `name` (`config.tasks.<name>`)."""
        return getattr(self.tasks, name)

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): outputs made with the same hash are compatible."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: _lookup(data, s) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _rebuild() -> None:
    """Give `Config.tasks` one field per registered task. pydantic supports replacing a field's annotation and
    default followed by `model_rebuild(force=True)`; the task-registry test proves that a plugin's section
    validates with its own model."""
    fields: dict[str, Any] = {t.name: (t.config_model, t.default_config()) for t in tasks()}
    model = create_model("TasksConfig", __base__=TasksConfig, **fields)
    info = Config.model_fields["tasks"]
    info.annotation = model
    info.default = model()
    Config.model_rebuild(force=True)


_rebuild()
task_registry.on_change(_rebuild)


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        if not err["loc"] and err["type"] == "value_error":  # a check across keys: its own sentence says it all
            lines.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = "unknown key (check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        value = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        lines.append(f"{key}: {message}{value}")
    return f"invalid configuration in {origin}: " + "; ".join(lines)


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


def read_yaml_mapping(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every failure is a ConfigError naming the file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} not found; give a path to a YAML file (see configs/)") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must be a mapping of sections (tissue:, tasks:)")
    return loaded


def merged_settings(
    defaults: dict[str, Any], path: str | os.PathLike[str] | None, overrides: tuple[str, ...] | list[str], what: str
) -> tuple[dict[str, Any], str]:
    """Defaults <- YAML file <- `--set` overrides, merged (not validated); also says where the values came from."""
    data = defaults
    origin = "the defaults"
    if path is not None:
        origin = str(path)
        _merge(data, read_yaml_mapping(path, what))
    for text in overrides:
        key_path, value = parse_override(text)
        _apply(data, key_path, value)
        origin = f"{origin} with --set overrides" if "--set" not in origin else origin
    return data, origin


def validated(model: type[StrictModel], data: dict[str, Any], origin: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from exc


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `--set` overrides, validated once at the end. The plugins it names are loaded
    first (their code runs), so that their task sections get their defaults and validate with their own models."""
    return _load(path, overrides, run_plugins=True)[0]


def load_config_without_plugins(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Config, list[str]]:
    """The configuration validated without running the plugins it names (`wsi-pipeline config`), and the task
    sections left unvalidated because only those plugins would register their tasks."""
    return _load(path, overrides, run_plugins=False)


def _load(
    path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...], *, run_plugins: bool
) -> tuple[Config, list[str]]:
    given, origin = merged_settings({}, path, overrides, "config file")
    plugins = given.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"invalid configuration in {origin}: plugins: expected a list of module names or files")
    load_plugins(plugins if run_plugins else [])
    unvalidated: list[str] = []
    sections = given.get("tasks")
    if not run_plugins and plugins and isinstance(sections, dict):
        unvalidated = sorted(name for name in sections if name not in {t.name for t in tasks()})
        given["tasks"] = {name: value for name, value in sections.items() if name not in unvalidated}
    data = Config().model_dump(mode="python")
    _merge(data, given)
    return validated(Config, data, origin), unvalidated


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
