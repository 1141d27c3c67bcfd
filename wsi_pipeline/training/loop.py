"""The epoch loop shared by every trainer: model and optimiser set-up, learning-rate schedule, early stopping on a
validation metric, and checkpoints that make a killed run resume from its last finished epoch.

Checkpoints (`checkpoint.pt`, written atomically after every epoch) hold only tensors and numbers and are read back
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, SupportsFloat

import torch
from torch import nn
from torch.utils.data import DataLoader

from wsi_pipeline.core.atomic import atomic_path
from wsi_pipeline.core.progress import Progress
from wsi_pipeline.models.architectures import build, has_batchnorm
from wsi_pipeline.models.card import Normalisation
from wsi_pipeline.models.folders import ModelError
from wsi_pipeline.training.data.items import DataError

CHECKPOINT = "checkpoint.pt"
# Every trainer feeds the network (RGB / 255 - mean) / std with these values and writes them into the card it makes,
# so the engine (which normalises from the card) sees what training saw.
NORMALISATION = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def normalise(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float on `device`, normalised as NORMALISATION says."""
    mean = torch.tensor(NORMALISATION.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALISATION.std, device=device).view(1, 3, 1, 1)
    return (batch.to(device).float() / 255.0 - mean) / std


@dataclass
class TrainConfig:
    task: str
    classes: list[str]
    architecture: str = "small_cnn"
    architecture_args: dict[str, Any] | None = None
    mpp: float = 0.5
    tile_px: int = 150
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    seed: int = 0
    workers: int = 1
    freeze_backbone: bool = False
    init_checkpoint: str | None = None
    init_head: bool = False  # take the head from init_checkpoint too (continuing), else a new head (transfer)
    recompute_batchnorm: bool = False  # after `fit`: BatchNorm statistics over the un-augmented training tiles
    average_epochs: int = 0  # > 0: the model is the mean of the last N epochs' weights (SWA; select "last")
    precision: str = "fp32"  # "bf16": the training forward pass under bf16 autocast, channels-last memory
    schedule: str = "cosine"  # "cosine": the learning rate falls to 0 over `epochs`; "constant"
    select: str = "best"  # "best": the epoch with the best validation metric; "last": the final epoch
    extra: dict[str, Any] = field(default_factory=dict)  # a trainer's own settings (e.g. target sigma)

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed. More epochs may be asked of a constant-rate run; a cosine
        schedule is fixed by its length."""
        data = {k: v for k, v in asdict(self).items() if k not in ("patience", "workers", "recompute_batchnorm")}
        data["extra"] = {k: v for k, v in self.extra.items() if k != "description"}
        for name, default in (("average_epochs", 0), ("precision", "fp32")):
            if data[name] == default:  # checkpoints written before the setting existed still resume
                del data[name]
        if self.schedule == "constant" and not self.average_epochs:  # an averaged window is fixed by the length
            data["epochs"] = None
        return json.dumps(data, sort_keys=True)


@dataclass
class LoopState:
    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def selected_metrics(self) -> dict[str, float]:
        """The validation metrics measured at the selected epoch (the model holds that epoch's weights)."""
        row = self.history[self.best_epoch - 1]
        return {k: v for k, v in row.items() if k not in ("epoch", "loss")}


def group_list(groups: set[str] | list[str]) -> list[str]:
    """Sources for the card; tiles that are each their own group (no source known) are summarised, not listed."""
    names = sorted(set(groups))
    if len(names) == 1 and names[0].startswith("tile:* ("):  # already summarised (publish re-reads a card)
        return names
    if names and all(g.startswith("tile:") for g in names):
        return [f"tile:* ({len(names)} tiles, no source known: each tile is its own group)"]
    return names


def command_line() -> str:
    """The command that is running, as a user would type it (the program by name, not by its venv path)."""
    if not sys.argv:
        return "python"
    script = Path(sys.argv[0])
    if script.suffix == ".py" and "wsi_pipeline" in script.parts:  # python -m wsi_pipeline.cli ...
        parts = script.with_suffix("").parts
        module = ".".join(parts[parts.index("wsi_pipeline") :]).removesuffix(".__main__")
        return " ".join(shlex.quote(a) for a in ["python", "-m", module, *sys.argv[1:]])
    return " ".join(shlex.quote(a) for a in [script.name, *sys.argv[1:]])


def selected_by(cfg: TrainConfig, watched: str) -> str:
    """How the saved weights were chosen, for the card."""
    if cfg.average_epochs:
        return f"mean of the weights of the last {cfg.average_epochs} epochs"
    return "last epoch" if cfg.select == "last" else f"best validation {watched}"


def build_model(cfg: TrainConfig, n_outputs: int, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = build(cfg.architecture, n_outputs, **(cfg.architecture_args or {})).to(device)
    if cfg.init_checkpoint:
        init_from(model, Path(cfg.init_checkpoint), keep_head=cfg.init_head)
    if cfg.precision == "bf16":  # oneDNN's bf16 convolutions (AMX) and cuDNN's run fastest on NHWC
        model = model.to(memory_format=torch.channels_last)
    return model


def fit(
    model: nn.Module,
    cfg: TrainConfig,
    out: Path,
    *,
    device: torch.device,
    train_epoch: Callable[[int, torch.optim.Optimizer], float],
    validate: Callable[[], dict[str, float]],
    watched: str,
) -> LoopState:
    """Run epochs until `cfg.epochs` or `cfg.patience` epochs without a better `watched` metric; leaves the model
    holding the selected epoch's weights, or with `cfg.average_epochs` the mean of the last epochs' weights (its
    BatchNorm statistics are then meaningless until recomputed). `train_epoch(epoch, optimiser)` returns the
    epoch's mean loss."""
    if cfg.schedule not in ("cosine", "constant") or cfg.select not in ("best", "last"):
        raise DataError(f"unknown schedule {cfg.schedule!r} or selection {cfg.select!r}")
    problem = averaging_problem(cfg.average_epochs, cfg.select, cfg.recompute_batchnorm, cfg.epochs)
    if problem:
        raise DataError(problem)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for name, p in model.named_parameters() if not (cfg.freeze_backbone and not _is_head(name, model))]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda e: 0.5 * (1 + math.cos(math.pi * e / cfg.epochs)) if cfg.schedule == "cosine" else 1.0
    )
    state = LoopState()
    best: dict[str, torch.Tensor] | None = None
    average: dict[str, torch.Tensor] | None = None
    path = out / CHECKPOINT
    fingerprint = cfg.fingerprint()
    if path.exists():
        best, average, state = _resume(path, fingerprint, model, optimiser, schedule, device)
    while state.epoch < cfg.epochs and state.stale < cfg.patience:
        model.train()
        loss = train_epoch(state.epoch, optimiser)
        schedule.step()
        model.eval()
        metrics = validate()
        state.epoch += 1
        state.history.append({"epoch": state.epoch, "loss": loss, **metrics})
        if cfg.select == "last" or metrics[watched] > state.best_score:
            state.best_score, state.best_epoch, state.stale = metrics[watched], state.epoch, 0
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.stale += 1
        if cfg.average_epochs and state.epoch > cfg.epochs - cfg.average_epochs:
            average = _running_mean(average, model.state_dict(), state.epoch - (cfg.epochs - cfg.average_epochs))
        _save(path, model, optimiser, schedule, best, average, state, fingerprint)
    if best is None:
        raise DataError(f"{path}: the checkpoint holds no finished epoch; delete it and train again")
    model.load_state_dict(average if average is not None else best)
    model.eval()
    return state


def averaging_problem(average_epochs: int, select: str, recompute_batchnorm: bool, epochs: int) -> str | None:
    """Why `average_epochs` cannot be used with these settings (None: it can), for the recipe's validation and the
    loop alike."""
    if average_epochs and (select != "last" or not recompute_batchnorm):
        return (
            f"average_epochs {average_epochs} needs select: last and recompute_batchnorm: true (--select last "
            "--recompute-batchnorm): averaged weights have no BatchNorm statistics of their own"
        )
    if average_epochs > epochs:
        return f"average_epochs {average_epochs} is more than epochs {epochs}"
    return None


def _running_mean(
    average: dict[str, torch.Tensor] | None, weights: dict[str, torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """Stochastic weight averaging (Izmailov et al. 2018) over epoch ends, written here because torch's
    `swa_utils.AveragedModel` keeps a second module and its own checkpoint format. `count` is the epoch's place in
    the averaged window (1 starts it; the fingerprint fixes the window, so a resumed run continues the same mean);
    integer buffers (BatchNorm's batch counters) keep the latest value."""
    if average is None or count == 1:
        return {k: v.detach().clone() for k, v in weights.items()}
    for key, value in weights.items():
        if value.is_floating_point():
            average[key] += (value.detach() - average[key]) / count
        else:
            average[key] = value.detach().clone()
    return average


def recompute_batchnorm(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """Replace every BatchNorm's running statistics by their average over `loader`'s batches of tiles (the first item
    of each batch), the "precise BN" step, with torch's `swa_utils.update_bn`: training leaves exponential averages of
    the last augmented batches, which drift from the statistics of the tiles the model is run on. Returns the number
    of tiles seen; the model is left in eval mode."""
    if not has_batchnorm(model):
        return 0
    seen = 0

    def batches() -> Iterator[torch.Tensor]:
        nonlocal seen
        for batch in loader:
            seen += len(batch[0])
            yield normalise(batch[0], device)

    torch.optim.swa_utils.update_bn(batches(), model)
    model.eval()
    return seen


def precise_batchnorm(
    model: nn.Module, train_set: Any, cfg: TrainConfig, device: torch.device, before: dict[str, float]
) -> dict[str, Any]:
    """`recompute_batchnorm` over `train_set.without_augmentation()` (the training tiles as the model is run on
    them); returns what the card records: the tiles seen and the validation figures of the selected epoch before."""
    loader = DataLoader(train_set.without_augmentation(), batch_size=cfg.batch_size, num_workers=cfg.workers)
    return {"recomputed_on_training_tiles": recompute_batchnorm(model, loader, device), "validation_before": before}


def run_epoch(
    dataset: Any,
    cfg: TrainConfig,
    epoch: int,
    optimiser: torch.optim.Optimizer,
    batch_loss: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
    *,
    device: torch.device,
    progress: bool,
) -> float:
    """One pass over `dataset` (shuffled from seed + epoch) with a progress bar; `batch_loss` maps a batch to its
    mean loss (under bf16 autocast, its tiles channels-last, with `cfg.precision` bf16; the backward pass and the
    optimiser step stay outside, on fp32 weights). Returns the epoch's mean loss per sample."""
    mixed = cfg.precision == "bf16"
    dataset.epoch = epoch  # seeds the augmentation
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed + epoch),
    )
    bar = Progress(len(dataset), f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress)
    total = 0.0
    for batch in loader:
        optimiser.zero_grad()
        if mixed:
            batch = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            loss = batch_loss(batch).float()
        loss.backward()
        optimiser.step()
        total += loss.item() * len(batch[0])
        bar.update(len(batch[0]))
    bar.close()
    return total / len(dataset)


def _is_head(name: str, model: nn.Module) -> bool:
    """The last parameterised module is the head (kept trainable when the backbone is frozen)."""
    last = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))][-1]
    return name.startswith(last + ".")


def init_from(model: nn.Module, path: Path, keep_head: bool = False) -> None:
    """Start from a local checkpoint (e.g. an ImageNet or pathology backbone): every tensor whose name and shape
    match; the head stays as built (new, for another task's classes) unless `keep_head` (continuing a model, e.g.
    the unfrozen stage after a frozen one)."""
    state = _checkpoint_tensors(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not keep_head:
        usable = {k: v for k, v in usable.items() if not _is_head(k, model)}
    if not usable:
        raise DataError(f"{path} shares no weights with the architecture (names or shapes differ)")
    model.load_state_dict(usable, strict=False)


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `--init` file; a file that needs code to load (a pickled module or object) is refused in one
    line (exit 10): it would run whatever code it holds."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, SafetensorError, EOFError, ValueError) as exc:
        raise ModelError(
            f"--init {path}: not a plain tensor checkpoint (a pickled object that needs code to load, or a damaged "
            "file); save the network's state_dict with safetensors.torch.save_file and give that file"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning-style checkpoint's weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--init {path}: expected a mapping of parameter names to tensors (a state_dict)")
    return state


def _resume(
    path: Path,
    fingerprint: str,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None, LoopState]:
    ckpt = torch.load(path, weights_only=True, map_location=device)
    if ckpt.get("config") != fingerprint:
        raise DataError(
            f"{path.parent} holds a checkpoint of another training configuration; give another -o folder "
            f"or delete {path} to start afresh"
        )
    model.load_state_dict(ckpt["model"])
    optimiser.load_state_dict(ckpt["optimiser"])
    schedule.load_state_dict(ckpt["schedule"])
    history = [dict(zip(ckpt["history_keys"], row, strict=True)) for row in ckpt["history"]]
    state = LoopState(ckpt["epoch"], ckpt["best_score"], ckpt["best_epoch"], ckpt["stale"], history)
    return ckpt["best_model"], ckpt.get("average"), state


def _save(
    path: Path,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    best: dict[str, torch.Tensor] | None,
    average: dict[str, torch.Tensor] | None,
    state: LoopState,
    fingerprint: str,
) -> None:
    keys = sorted({k for row in state.history for k in row})
    payload = {
        "config": fingerprint,
        "model": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "schedule": schedule.state_dict(),
        "best_model": best,
        "average": average,
        "epoch": state.epoch,
        "best_score": float(state.best_score),
        "best_epoch": state.best_epoch,
        "stale": state.stale,
        "history_keys": keys,
        # plain floats: a numpy scalar here would make the checkpoint unreadable with weights_only=True
        "history": [[_plain(row.get(k, float("nan"))) for k in keys] for row in state.history],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _plain(value: SupportsFloat | None) -> float | None:
    """A figure as a Python float (None stays: a metric that could not be measured)."""
    return None if value is None else float(value)
