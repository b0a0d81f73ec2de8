"""ResNet for CIFAR-sized inputs (He et al. 2016, section 4.2), quantized (docs/algorithms.md section 2).

Three stages of BasicBlocks with widths 16/32/64 and the option-A shortcut (stride-2
subsampling, then the new channels filled with zeros: no parameters). Depth 6n+2: ResNet-20,
32, 44, 56. Module names follow the published OCM checkpoints: ``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, ``linear``.

``layout="public"`` (the default) computes exactly what the public OCM and BFA code computes
(docs/algorithms.md section 2): the zero channels are appended *after* the input channels
(``cat((x, 0 * x), 1)``) and the features are average-pooled with a fixed kernel
(``avg_pool2d(out, out.size(3))``). ``layout="v0"`` rebuilds the function that checkpoints
written by this tool before the conformance fix were trained with (zeros split on both sides of
the input channels, adaptive pooling), so that such files still evaluate exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import QuantNet, check_layout, check_output_act, kaiming_init
from .quantization import QuantConv2d, QuantLinear


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every second pixel and fill the new channels with zeros.

    ``split=False`` (public): ``cat((x, 0 * x), 1)`` after the subsampling, as the public
    ``DownsampleA`` does (``0 * x`` keeps its NaN propagation when a flip overflows an
    activation); more new channels than input channels are zero-padded at the end.
    ``split=True`` (layout v0): half of the zeros before the input channels, half after.
    """

    def __init__(self, in_channels: int, extra_channels: int, split: bool = False):
        super().__init__()
        self.extra_channels = extra_channels
        self.split = split
        self.append_zero_copy = not split and extra_channels == in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        if self.split:
            pad = self.extra_channels // 2
            return F.pad(x, (0, 0, 0, 0, pad, self.extra_channels - pad))
        if self.append_zero_copy:
            return torch.cat((x, x.mul(0)), 1)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, n_bits: int,
                 layout: str = "public"):
        super().__init__()
        self.conv1 = QuantConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False,
                                 n_bits=n_bits)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = QuantConv2d(planes, planes, 3, stride=1, padding=1, bias=False, n_bits=n_bits)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes - in_planes, split=layout == "v0")
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(QuantNet, nn.Module):
    """``depth = 6n + 2`` ResNet with ``num_outputs`` outputs (classes, or L for OCM)."""

    mixup_points = ("layer1", "layer2")

    def __init__(self, depth: int, num_outputs: int, n_bits: int = 8, output_act: str = "linear",
                 widths: tuple[int, int, int] = (16, 32, 64), layout: str = "public"):
        super().__init__()
        self.layout = check_layout(layout)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.output_act = check_output_act(output_act)
        self.conv1 = QuantConv2d(3, widths[0], 3, stride=1, padding=1, bias=False, n_bits=n_bits)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, planes in enumerate(widths, start=1):
            layers = []
            for i in range(blocks):
                stride = 2 if (stage > 1 and i == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, n_bits, layout))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.linear = QuantLinear(widths[-1], num_outputs, n_bits=n_bits)
        if layout == "v0":
            kaiming_init(self)
        else:  # the public initialisation: He-normal by fan-out for the convolutions only; the
            # linear layer keeps PyTorch's default
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        if self.layout == "v0":
            return F.adaptive_avg_pool2d(out, 1).flatten(1)
        return F.avg_pool2d(out, out.shape[3]).flatten(1)
