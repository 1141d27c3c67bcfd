"""Architectures by name. Dense networks keep the input size (padding 'same') and shrink by their output stride."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def has_batchnorm(module: nn.Module) -> bool:
    """Whether `module` holds a BatchNorm layer (the predictor folds them; training can recompute their statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def registered() -> set[str]:
    return set(_REGISTRY)


def defined_here(name: str) -> bool:
    """Whether the registered architecture `name` is one of this module's (its code is this file), not a plugin's."""
    return _REGISTRY[name].__module__ == __name__


def build(name: str, num_outputs: int, **kwargs: Any) -> nn.Module:
    if name in _REGISTRY:
        return _REGISTRY[name](num_outputs=num_outputs, **kwargs)
    if name.startswith("timm:"):
        return _timm_classifier(name.removeprefix("timm:"), num_outputs, **kwargs)
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return _torchvision_classifier(name, num_outputs, **kwargs)
    known = ", ".join(sorted(_REGISTRY)) + ", or a torchvision classification model name"
    raise KeyError(f"unknown architecture {name!r}; known: {known}")


def _timm_classifier(name: str, num_outputs: int, **kwargs: Any) -> nn.Module:
    """A timm architecture (`timm:<name>`, e.g. timm:resnet18, timm:efficientnet_b0) with `num_outputs` classes;
    never downloads: the weights come from the model folder's safetensors file, like every other model."""
    try:
        import timm
    except ImportError:
        raise KeyError(f"timm:{name} needs the timm package (pip install timm)") from None
    if name not in timm.list_models():
        raise KeyError(f"timm has no architecture {name!r} (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_outputs, **kwargs)


def _torchvision_classifier(name: str, num_outputs: int, **kwargs: Any) -> nn.Module:
    """A torchvision backbone with a new head (weights come from our checkpoint, never downloaded)."""
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_outputs, **kwargs)


@register("tiny_fcn")
def tiny_fcn(num_outputs: int, width: int = 16, depth: int = 3, stride: int = 1) -> nn.Module:
    """A small fully convolutional network: `depth` 3x3 convs (receptive radius = depth px at stride 1), then a
    1x1 head; with stride 2 or 4, average pooling after the first conv(s)."""
    layers: list[nn.Module] = []
    channels = 3
    for i in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        channels = width
        if stride > 1 and i < {1: 0, 2: 1, 4: 2}[stride]:
            layers.append(nn.AvgPool2d(2))
    layers.append(nn.Conv2d(channels, num_outputs, 1))
    return nn.Sequential(*layers)


@register("small_cnn")
def small_cnn(num_outputs: int, width: int = 16, blocks: int = 3) -> nn.Module:
    """A small patch classifier: `blocks` conv blocks (width doubling, each halving the size), global average
    pooling, linear head."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (width * 2**i for i in range(blocks)):
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_outputs))


@register("colour_logistic")
def colour_logistic(num_outputs: int) -> nn.Module:
    """Logistic regression on a tile's mean colour: a baseline, and a model whose weights can be set by hand."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_outputs))


def seeded(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights for tests and examples: re-initialise every parameter from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (1.0 / max(1, param[0].numel()) ** 0.5))
    return module


@register("dense_fcn")
def dense_fcn(num_outputs: int, width: int = 16, dilations: tuple[int, ...] = (1, 2, 2)) -> nn.Module:
    """A fully convolutional detector at output stride 4: two conv pairs each followed by 2x2 max pooling, then
    dilated 3x3 convs for context, then a 1x1 head. Receptive radius with the default dilations: 29 input px
    (1+1, pool 1, 2+2, pool 2, 4 x (1+2+2)), so a halo of 32 px (a whole output px more) stitches exactly."""

    def conv(c_in: int, c_out: int, dilation: int = 1) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    layers = [*conv(3, width), *conv(width, width), nn.MaxPool2d(2)]
    layers += [*conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2)]
    channels = 2 * width
    for dilation in dilations:
        layers += conv(channels, 4 * width, dilation)
        channels = 4 * width
    layers.append(nn.Conv2d(channels, num_outputs, 1))
    return nn.Sequential(*layers)


class _UNet(nn.Module):
    """Encoder of `levels` conv pairs each followed by 2x2 max pooling, a bottleneck pair, then a decoder that
    upsamples (nearest, 2x) and merges the encoder's map of that scale (skip connection) until `output_stride`."""

    def __init__(self, num_outputs: int, width: int, levels: int, output_stride: int) -> None:
        super().__init__()

        def pair(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

        if output_stride not in [2**i for i in range(levels + 1)]:
            raise ValueError(f"output_stride {output_stride} must be a power of 2 up to 2**levels ({2**levels})")
        channels = [width * 2**i for i in range(levels + 1)]
        inputs = [3, *channels[:-2]]
        self.encoder = nn.ModuleList(pair(c_in, c_out) for c_in, c_out in zip(inputs, channels[:-1], strict=True))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = pair(channels[-2], channels[-1])
        ups = levels - output_stride.bit_length() + 1  # decoder steps from 2**levels back to output_stride
        self.decoder = nn.ModuleList(
            pair(channels[levels - i] + channels[levels - i - 1], channels[levels - i - 1]) for i in range(ups)
        )
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(channels[levels - ups], num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block in self.decoder:
            x = block(torch.cat([self.up(x), skips.pop()], dim=1))
        return self.head(x)


@register("small_unet")
def small_unet(num_outputs: int, width: int = 16, levels: int = 3, output_stride: int = 4) -> nn.Module:
    """A small U-Net for dense class maps (epithelium / stroma). Defaults: three poolings (input sizes and tile
    steps must be multiples of 8), output stride 4; an output px depends on input px up to 52 away by counting
    (encoder convs and pools 2 + 1 + 4 + 2 + 8 + 4, bottleneck 16, upsampling 4, decoder 8, its own 3), 42 as
    measured by redrawing pixels (tests/test_dense_epithelium.py), so a halo of 64 px stitches exactly."""
    return _UNet(num_outputs, width, levels, output_stride)
