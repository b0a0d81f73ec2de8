"""VGG with BatchNorm for CIFAR-sized inputs, quantized (SPEC section 2: ``vgg11_bn_quan``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import QuantNet, check_output_act
from .quantization import QuantConv2d, QuantLinear

# Channel plans of Simonyan & Zisserman (2015); "M" is a 2x2 max-pool.
VGG_PLANS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class CifarVGG(QuantNet, nn.Module):
    """``features`` (conv-BN-ReLU stacks and max-pools down to 1x1) and a linear ``classifier``."""

    final_layer_name = "classifier"

    def __init__(self, depth: int, num_outputs: int, n_bits: int = 8, output_act: str = "linear",
                 layout: str = "public"):
        super().__init__()
        if depth not in VGG_PLANS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_PLANS)}, got {depth}")
        self.output_act = check_output_act(output_act)
        layers: list[nn.Module] = []
        in_channels = 3
        for item in VGG_PLANS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [QuantConv2d(in_channels, item, 3, padding=1, n_bits=n_bits),
                           nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = QuantLinear(in_channels, num_outputs, n_bits=n_bits)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
