"""VGG with BatchNorm for CIFAR-sized inputs, quantized (docs/algorithms.md section 2: ``vgg11_bn_quan``).

``layout="public"`` (the default) is the BFA repository's ``vgg11_bn_quan``
(elliothe/BFA ``models/quan_vgg_cifar.py``), with its state-dict names:

- ``features``: conv (with bias) - BN - ReLU stacks and 2x2 max-pools (``features.0`` is the
  first conv, ``features.1`` its BN, ...), flattened by a plain view (so only 32x32 inputs, whose
  feature map is 512 x 1 x 1, fit the classifier, as in the public code);
- ``classifier``: Dropout, Linear 512-512, ReLU, Dropout, Linear 512-512, ReLU, Linear 512-out
  (``classifier.1``, ``classifier.4``, ``classifier.6``; all three quantized). The final layer
  is ``classifier.6``; :meth:`forward_features` returns its input (after ``classifier.5``).
- initialisation as the public code: conv weights ``normal(0, sqrt(2 / (k*k*out)))``, conv
  biases zero, BN and the linear layers at PyTorch's defaults. Building with the same torch seed
  draws the same random numbers in the same order as the public constructor.

*Deliberate difference*: the public ``vgg11_bn_quan(num_classes)`` ignores ``num_classes`` and
always has 10 outputs (its last layer is ``quan_Linear(512, 10)``); ours has ``num_outputs``
(the public network is ``num_outputs=10``).

``layout="v0"`` is what this tool built before the conformance fix (and what its checkpoints
stored without a ``layout`` hold): the same ``features``, adaptive average pooling and a single
quantized linear ``classifier`` (He-normal fan-out conv init, ``normal(0, 0.01)`` linear init).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import QuantNet, check_layout, check_output_act
from .quantization import QuantConv2d, QuantLinear

# Channel plans of Simonyan & Zisserman (2015); "M" is a 2x2 max-pool.
VGG_PLANS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class CifarVGG(QuantNet, nn.Module):
    """``features`` (conv-BN-ReLU stacks and max-pools down to 1x1) and a ``classifier``:
    the public three-layer one (final layer ``classifier.6``) or, in layout v0, one linear
    layer (final layer ``classifier``)."""

    def __init__(self, depth: int, num_outputs: int, n_bits: int = 8, output_act: str = "linear",
                 layout: str = "public"):
        super().__init__()
        if depth not in VGG_PLANS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_PLANS)}, got {depth}")
        self.layout = check_layout(layout)
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
        if layout == "v0":
            self.final_layer_name = "classifier"
            self.classifier = QuantLinear(in_channels, num_outputs, n_bits=n_bits)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)
            return
        self.final_layer_name = "classifier.6"
        self.classifier = nn.Sequential(
            nn.Dropout(), QuantLinear(in_channels, 512, n_bits=n_bits), nn.ReLU(inplace=True),
            nn.Dropout(), QuantLinear(512, 512, n_bits=n_bits), nn.ReLU(inplace=True),
            QuantLinear(512, num_outputs, n_bits=n_bits))
        for m in self.modules():  # only the convolutions are re-initialised, as in the public code
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                with torch.no_grad():
                    m.weight.normal_(0, math.sqrt(2.0 / fan_out))
                    m.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "v0":
            return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        x = self.features(x)
        x = x.view(x.size(0), -1)
        for i in range(6):  # Dropout, Linear, ReLU, Dropout, Linear, ReLU
            x = self.classifier[i](x)
        return x
