"""Model registry: ``--arch`` names to constructors (docs/algorithms.md section 2).

Every entry builds a network from ``(num_outputs, n_bits, output_act)``; variants of a family
are registered as parameters of one class, never as copies. Like torchvision's
``get_model`` / ``list_models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch.nn as nn

from .base import check_layout
from .bits import check_bits


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    input_kind: str                 # "cifar" (32x32) or "imagenet" (224x224)
    fixed_bits: int | None = None   # e.g. 1 for the binarized ResNet-20
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., nn.Module], input_kind: str,
                   fixed_bits: int | None = None, description: str = "") -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(name, builder, input_kind, fixed_bits, description)


def list_models(input_kind: str | None = None) -> list[str]:
    """Registered architecture names (optionally only those for ``cifar`` or ``imagenet``)."""
    return sorted(n for n, e in _REGISTRY.items() if input_kind in (None, e.input_kind))


def get_model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; valid: {', '.join(list_models())}")
    return _REGISTRY[name]


def default_bits(name: str) -> int:
    entry = get_model_entry(name)
    return entry.fixed_bits if entry.fixed_bits is not None else 8


def get_model(name: str, num_outputs: int, n_bits: int | None = None,
              output_act: str = "linear", layout: str = "public") -> nn.Module:
    """Build architecture ``name`` with ``num_outputs`` outputs and ``n_bits``-bit layers.

    ``layout`` (see :data:`models.base.LAYOUTS`) selects the public code's function (default) or
    the one of this tool's pre-conformance checkpoints, for the architectures where they differ.
    """
    entry = get_model_entry(name)
    if n_bits is None:
        n_bits = default_bits(name)
    check_bits(n_bits)
    if entry.fixed_bits is not None and n_bits != entry.fixed_bits:
        raise ValueError(f"{name} is a {entry.fixed_bits}-bit architecture; got --bits {n_bits}")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"number of outputs must be a positive integer, got {num_outputs!r}")
    model = entry.builder(num_outputs=num_outputs, n_bits=n_bits, output_act=output_act,
                          layout=check_layout(layout))
    model.arch = name
    return model


def _register_all() -> None:
    from .imagenet import ImageNetMobileNetV2, ImageNetResNet
    from .resnet_cifar import CifarResNet
    from .vgg import CifarVGG
    from .wide_resnet import WideResNet

    for depth in (20, 32, 44, 56):
        register_model(f"resnet{depth}_quan", partial(CifarResNet, depth), "cifar",
                       description=f"ResNet-{depth} for CIFAR, option-A shortcuts")
    register_model("resnet20_bin", partial(CifarResNet, 20), "cifar", fixed_bits=1,
                   description="binarized ResNet-20 (binarization-aware training)")
    register_model("vgg11_bn_quan", partial(CifarVGG, 11), "cifar",
                   description="VGG-11 with BatchNorm for CIFAR, the BFA repository's "
                               "three-layer classifier (layout v0: one linear layer)")
    for k in (4, 8):
        register_model(f"wrn28_{k}_quan", partial(WideResNet, 28, k), "cifar",
                       description=f"pre-activation Wide-ResNet-28-{k}")
    for depth in (18, 34, 50):
        register_model(f"resnet{depth}_quan", partial(ImageNetResNet, depth), "imagenet",
                       description=f"torchvision ResNet-{depth}, classifier named 'linear'")
    register_model("mobilenet_v2_quan", ImageNetMobileNetV2, "imagenet",
                   description="torchvision MobileNet-V2")


_register_all()
