"""Pre-activation Wide-ResNet (Zagoruyko & Komodakis 2016) for CIFAR, quantized (docs/algorithms.md section 2).

Depth 6n+4 with widen factor k (WRN-28-4, WRN-28-8 in the OCM paper). Module names follow the
published layout: ``conv1``, ``block{1,2,3}.layer.{i}.bn1/conv1/bn2/conv2/convShortcut``,
``bn1``, ``linear``.

``layout="public"`` pools the features as the public code does (``avg_pool2d(out, 8)`` on the
8x8 maps of 32x32 inputs: a kernel the size of the map); ``layout="v0"`` pools adaptively, as
checkpoints written by this tool before the conformance fix were trained (the two differ in the
last float bit, enough to break a tie between two candidate bits). See docs/algorithms.md
section 2.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import QuantNet, check_layout, check_output_act
from .quantization import QuantConv2d, QuantLinear


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv; a 1x1 ``convShortcut`` when the width or stride changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, n_bits: int,
                 drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = QuantConv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False,
                                 n_bits=n_bits)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = QuantConv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False,
                                 n_bits=n_bits)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else QuantConv2d(
            in_planes, out_planes, 1, stride=stride, padding=0, bias=False, n_bits=n_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # The reference adds the raw input on identity blocks and the shortcut of the
        # pre-activated input otherwise.
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int,
                 n_bits: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                           stride if i == 0 else 1, n_bits, drop_rate)
            for i in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(QuantNet, nn.Module):
    mixup_points = ("block1", "block2")

    def __init__(self, depth: int, widen_factor: int, num_outputs: int, n_bits: int = 8,
                 output_act: str = "linear", drop_rate: float = 0.0, layout: str = "public"):
        super().__init__()
        self.layout = check_layout(layout)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide-ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.output_act = check_output_act(output_act)
        self.conv1 = QuantConv2d(3, widths[0], 3, stride=1, padding=1, bias=False, n_bits=n_bits)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, n_bits, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, n_bits, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, n_bits, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.linear = QuantLinear(widths[3], num_outputs, n_bits=n_bits)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        if self.layout == "v0":
            return F.adaptive_avg_pool2d(out, 1).flatten(1)
        return F.avg_pool2d(out, out.shape[3]).flatten(1)
