"""Export a model folder to TorchScript or ONNX: the same card (format and sha256 changed), another network file.

Why: a lab runs a model where our Python architectures are not installed (another tool, a C++ or web viewer,
onnxruntime on a machine without torch), and a model made elsewhere comes to us as one of these files.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from wsi_pipeline.core.atomic import atomic_path, write_json
from wsi_pipeline.core.inventory import file_sha256
from wsi_pipeline.models.cpu_runtime import ONNX_OPSET
from wsi_pipeline.models.folders import CARD_FILE, ModelError
from wsi_pipeline.models.formats import model_format
from wsi_pipeline.models.loading import load_model


def export_model(source: str | os.PathLike[str], target_format: str, out: str | os.PathLike[str]) -> Path:
    """Write `out` (a model folder in `target_format`) from the model folder `source`; returns `out`."""
    if target_format not in ("torchscript", "onnx"):
        raise ModelError(f"cannot export to {target_format!r}; choose torchscript or onnx")
    model = load_model(source)
    if model.module is None:
        raise ModelError(f"{source} is an {model.card.format} model: export from its safetensors folder instead")
    module = model.module.cpu().eval()
    example = torch.zeros(2, 3, model.card.tile_px, model.card.tile_px)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    network = out / model_format(target_format).file
    with atomic_path(network) as tmp, torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch, still read everywhere
        if target_format == "torchscript":
            torch.jit.trace(module, example).save(str(tmp))
        else:
            _onnx(module, example, Path(tmp))
    # the domain guard reads the network's layers through hooks, which a TorchScript or ONNX graph does not offer:
    # the exported model states its domain but runs unguarded (docs/models.md, "The domain guard")
    card = model.card.model_copy(
        update={"format": target_format, "weights_sha256": file_sha256(network), "domain_guard": None}
    )
    write_json(out / CARD_FILE, card.model_dump(mode="json"))
    return out


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Batch and (for dense models, which run on larger tiles) height and width stay dynamic."""
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
