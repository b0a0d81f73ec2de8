"""ImageNet networks built on torchvision's definitions with quantized layers (docs/algorithms.md section 2).

torchvision's ResNet and MobileNet-V2 are subclassed and every Conv2d/Linear is swapped for its
quantized twin, so the state-dict names stay torchvision's, except the ResNet classifier, which
is ``linear`` (not ``fc``) as in the published OCM checkpoints.

The BFA repository (elliothe/BFA) defines ``resnet18_quan`` / ``resnet34_quan``
(``models/quan_resnet_imagenet.py``) and ``mobilenet_v2_quan`` (``quan_mobilenet_imagenet.py``)
as copies of torchvision's definitions with quantized layers: the same modules, names, order of
operations (``out += identity``; ``x + conv(x)``), pooling (``AdaptiveAvgPool2d((1, 1))``,
``adaptive_avg_pool2d(x, 1)``), the quantized 1x1 downsample convolution and the
``classifier.1`` after ``Dropout(0.2)``; only its ResNet classifier is ``fc``
(:mod:`models.loading` renames it). Both layouts are therefore one function here
(tests/test_conformance_bfa.py checks it against a functional transcription of the public code).
(Its quantized ``resnet50`` is not among the names its ``models/__init__.py`` exports.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .base import QuantNet, check_output_act
from .quantization import quantize_module

RESNET_PLANS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ImageNetResNet(QuantNet, ResNet):
    mixup_points = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, num_outputs: int, n_bits: int = 8, output_act: str = "linear",
                 layout: str = "public"):  # one layout: torchvision's, as the public code's
        if depth not in RESNET_PLANS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(RESNET_PLANS)}, "
                             f"got {depth}")
        block, layers = RESNET_PLANS[depth]
        super().__init__(block, list(layers), num_classes=num_outputs)
        self.output_act = check_output_act(output_act)
        self.linear = self.fc
        del self.fc
        quantize_module(self, n_bits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ImageNetMobileNetV2(QuantNet, MobileNetV2):
    """torchvision's MobileNet-V2; the final layer is ``classifier.1`` (after dropout)."""

    final_layer_name = "classifier.1"

    def __init__(self, num_outputs: int, n_bits: int = 8, output_act: str = "linear",
                 width_mult: float = 1.0, layout: str = "public"):
        super().__init__(num_classes=num_outputs, width_mult=width_mult)
        self.output_act = check_output_act(output_act)
        quantize_module(self, n_bits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier[0](torch.flatten(x, 1))
