"""Agreement with the public BFA repository (elliothe/BFA), written from its code, not from ours.

1. Every architecture the BFA repository defines under a name we use (``resnet20_quan``,
   ``resnet20_bin``, ``vgg11_bn_quan``, ``resnet18_quan``, ``resnet34_quan``,
   ``mobilenet_v2_quan``): a state dict in *its* checkpoint layout (its module names, 0-d
   ``step_size``, ``b_w``, ``{'state_dict': ...}`` as its ``main.py`` saves, ``module.`` when it
   trained on several GPUs), built here from the public model definitions, loaded through
   ``models.loading.load_weights`` (the scripts' loader) and compared, in the float quantized
   forward and in integer mode, with a plain functional forward written here line by line from
   the public ``forward`` methods (``F.conv2d`` / ``F.batch_norm`` with running statistics /
   ``F.linear`` on the public quantizer's weights).
2. The binarized layer of the public README (the commented block of its ``models/quantization.py``):
   ``torch.sign(W) * mean|W|``; sign(0) is our documented deliberate difference.
3. Untargeted BFA: a reference of the public ``BFA.progressive_bit_search`` (its two's-complement
   gradient mask, ``topk``, the ``n_bits2flip`` retry loop, ``max`` over the layers' losses)
   written here on plain tensors, run side by side with ours; a hand-computed binarized case;
   the public random flip's ``random.choice`` stream.
4. Piecewise clustering: a hand-computed value of the public formula.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attack_bfa
from attacks.bfa import BFA, RandomFlips
from models import get_model, quant_layers, to_integer
from models.base import QuantNet
from models.loading import load_weights
from utils.checkpoint import torch_load_foreign
from models.ocm import SoftmaxOutput
from models.quantization import QuantConv2d, QuantLinear, use_public_sign
from utils.regularizers import piecewise_clustering


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------
# The public quantizers (models/quantization.py of the BFA repository)
# ---------------------------------------------------------------------------------------------

def public_weight(w: torch.Tensor, n_bits: int) -> torch.Tensor:
    """The weight a public ``quan_Conv2d`` / ``quan_Linear`` convolves with.

    Multi-bit: ``step = max|W| / half``, ``half = (2**N - 2) / 2``, ``round(hardtanh(W,
    -half*step, half*step) / step) * step``. Binarized (the README's block): ``step = mean|W|``,
    ``sign(W) * step`` with ``torch.sign`` (0 for 0). Integer mode (``__reset_weight__``) stores
    the first factor and multiplies by the same step: the same product.
    """
    if n_bits == 1:
        step = w.abs().mean()
        return torch.sign(w) * step
    half = (2 ** n_bits - 2) / 2
    step = w.abs().max() / half
    bound = half * step.item()
    return torch.round(F.hardtanh(w, min_val=-bound, max_val=bound) / step) * step


class Ref:
    """Functional building blocks over a plain (unprefixed) public state dict."""

    def __init__(self, sd: dict, n_bits: int):
        self.sd, self.n_bits = sd, n_bits

    def conv(self, name, x, stride=1, padding=1, groups=1):
        w = public_weight(self.sd[f"{name}.weight"], self.n_bits)
        return F.conv2d(x, w, self.sd.get(f"{name}.bias"), stride, padding, 1, groups)

    def bn(self, name, x):
        s = self.sd
        return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"],
                            s[f"{name}.weight"], s[f"{name}.bias"], False, 0.1, 1e-5)

    def linear(self, name, x):
        return F.linear(x, public_weight(self.sd[f"{name}.weight"], self.n_bits),
                        self.sd[f"{name}.bias"])


# ---------------------------------------------------------------------------------------------
# State dicts in the public layout, and the public forwards
# ---------------------------------------------------------------------------------------------

class PublicStateDict:
    """Entries in the order and with the names of the public modules; random values."""

    def __init__(self, n_bits: int, seed: int = 0):
        self.n_bits = n_bits
        self.gen = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def _quant_entries(self, name):
        w = self.sd[f"{name}.weight"]
        # The public step_size is a Parameter overwritten by a 0-d tensor at every forward;
        # a checkpoint holds the one of the last training forward (stale by one SGD step).
        # Store a wrong value on purpose: both codes recompute it from the weights.
        self.sd[f"{name}.step_size"] = w.abs().max() * 1.5
        b_w = 2.0 ** torch.arange(self.n_bits - 1, -1, -1).float().unsqueeze(-1)
        b_w[0] = -b_w[0]  # [-2**(N-1), ..., 1]; [-1] when N == 1
        self.sd[f"{name}.b_w"] = b_w

    def conv(self, name, cout, cin, k, bias=False, groups=1):
        fan_in = cin // groups * k * k
        self.sd[f"{name}.weight"] = torch.randn(cout, cin // groups, k, k,
                                                generator=self.gen) * math.sqrt(2.0 / fan_in)
        if bias:
            self.sd[f"{name}.bias"] = torch.randn(cout, generator=self.gen) * 0.1
        self._quant_entries(name)

    def linear(self, name, out, inp):
        self.sd[f"{name}.weight"] = torch.randn(out, inp, generator=self.gen) / math.sqrt(inp)
        self.sd[f"{name}.bias"] = torch.randn(out, generator=self.gen) * 0.1
        self._quant_entries(name)

    def bn(self, name, c):
        g = self.gen
        self.sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        self.sd[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
        self.sd[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
        self.sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        self.sd[f"{name}.num_batches_tracked"] = torch.tensor(500)


# -- models/quan_resnet_cifar.py, models/bin_resnet_cifar.py -----------------------------------

def bfa_cifar_resnet_sd(depth, num_classes, n_bits, seed):
    p = PublicStateDict(n_bits, seed)
    p.conv("conv_1_3x3", 16, 3, 3)
    p.bn("bn_1", 16)
    inplanes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for i in range((depth - 2) // 6):
            p.conv(f"stage_{stage}.{i}.conv_a", planes, inplanes, 3)
            p.bn(f"stage_{stage}.{i}.bn_a", planes)
            p.conv(f"stage_{stage}.{i}.conv_b", planes, planes, 3)
            p.bn(f"stage_{stage}.{i}.bn_b", planes)
            inplanes = planes
    p.linear("classifier", num_classes, 64)
    return p.sd


def ref_bfa_cifar_resnet(sd, x, depth, n_bits):
    """``CifarResNet.forward``: conv_1_3x3, bn_1, relu; three stages of ResNetBasicblock
    (conv_a, bn_a, relu, conv_b, bn_b; ``DownsampleA`` = AvgPool2d(kernel 1, stride 2) then
    ``cat((x, x.mul(0)), 1)`` when the width changes; relu(residual + block));
    ``AvgPool2d(8)``, view, classifier."""
    r = Ref(sd, n_bits)
    x = F.relu(r.bn("bn_1", r.conv("conv_1_3x3", x)))
    inplanes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for i in range((depth - 2) // 6):
            p = f"stage_{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            block = F.relu(r.bn(f"{p}.bn_a", r.conv(f"{p}.conv_a", x, stride)))
            block = r.bn(f"{p}.bn_b", r.conv(f"{p}.conv_b", block))
            residual = x
            if stride != 1 or inplanes != planes:
                residual = F.avg_pool2d(x, kernel_size=1, stride=2)
                residual = torch.cat((residual, residual.mul(0)), 1)
            x = F.relu(residual + block)
            inplanes = planes
    x = F.avg_pool2d(x, 8)
    return r.linear("classifier", x.view(x.size(0), -1))


# -- models/quan_vgg_cifar.py ------------------------------------------------------------------

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def bfa_vgg11_bn_sd(num_classes, n_bits, seed):
    p = PublicStateDict(n_bits, seed)
    i, cin = 0, 3
    for v in VGG11:
        if v == "M":
            i += 1
            continue
        p.conv(f"features.{i}", v, cin, 3, bias=True)
        p.bn(f"features.{i + 1}", v)
        i, cin = i + 3, v
    p.linear("classifier.1", 512, 512)
    p.linear("classifier.4", 512, 512)
    p.linear("classifier.6", num_classes, 512)
    return p.sd


def ref_vgg_features(r, x):
    i = 0
    for v in VGG11:
        if v == "M":
            x = F.max_pool2d(x, kernel_size=2, stride=2)
            i += 1
        else:
            x = F.relu(r.bn(f"features.{i + 1}", r.conv(f"features.{i}", x)))
            i += 3
    return x


def ref_bfa_vgg11_bn(sd, x, n_bits):
    """``VGG.forward``: features, ``view(N, -1)``, classifier = Dropout (identity in eval),
    Linear, ReLU, Dropout, Linear, ReLU, Linear."""
    r = Ref(sd, n_bits)
    x = ref_vgg_features(r, x)
    x = x.view(x.size(0), -1)
    x = F.relu(r.linear("classifier.1", x))
    x = F.relu(r.linear("classifier.4", x))
    return r.linear("classifier.6", x)


# -- models/quan_resnet_imagenet.py ------------------------------------------------------------

def bfa_imagenet_resnet_sd(blocks, num_classes, n_bits, seed):
    p = PublicStateDict(n_bits, seed)
    p.conv("conv1", 64, 3, 7)
    p.bn("bn1", 64)
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for i in range(count):
            q = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            p.conv(f"{q}.conv1", planes, inplanes, 3)
            p.bn(f"{q}.bn1", planes)
            p.conv(f"{q}.conv2", planes, planes, 3)
            p.bn(f"{q}.bn2", planes)
            if stride != 1 or inplanes != planes:
                p.conv(f"{q}.downsample.0", planes, inplanes, 1)
                p.bn(f"{q}.downsample.1", planes)
            inplanes = planes
    p.linear("fc", num_classes, 512)
    return p.sd


def ref_bfa_imagenet_resnet(sd, x, blocks, n_bits):
    """``ResNet.forward`` with ``BasicBlock``: conv1 (7x7, stride 2, pad 3), bn1, relu, max-pool
    3/2/1; blocks conv1 (stride), bn1, relu, conv2, bn2, ``out += downsample(x)`` (1x1 quantized
    conv + BN), relu; ``AdaptiveAvgPool2d((1, 1))``, view, fc."""
    r = Ref(sd, n_bits)
    x = F.relu(r.bn("bn1", r.conv("conv1", x, 2, 3)))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage, count in enumerate(blocks, start=1):
        for i in range(count):
            q = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            out = F.relu(r.bn(f"{q}.bn1", r.conv(f"{q}.conv1", x, stride)))
            out = r.bn(f"{q}.bn2", r.conv(f"{q}.conv2", out))
            identity = x
            if f"{q}.downsample.0.weight" in sd:
                identity = r.bn(f"{q}.downsample.1", r.conv(f"{q}.downsample.0", x, stride, 0))
            out += identity
            x = F.relu(out)
    x = F.adaptive_avg_pool2d(x, (1, 1))
    return r.linear("fc", x.view(x.size(0), -1))


# -- models/quan_mobilenet_imagenet.py ---------------------------------------------------------

MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # t, c, n, s (width 1.0: no rounding needed)


def _mobilenet_blocks():
    """(feature index, input channels, output channels, stride, expansion) of each block."""
    blocks, cin, idx = [], 32, 1
    for t, c, n, s in MOBILENET_V2:
        for i in range(n):
            blocks.append((idx, cin, c, s if i == 0 else 1, t))
            cin, idx = c, idx + 1
    return blocks


def bfa_mobilenet_v2_sd(num_classes, n_bits, seed):
    p = PublicStateDict(n_bits, seed)
    p.conv("features.0.0", 32, 3, 3)  # ConvBNReLU = Sequential(conv, BN, ReLU6)
    p.bn("features.0.1", 32)
    for idx, cin, cout, _, t in _mobilenet_blocks():
        q, j, hidden = f"features.{idx}.conv", 0, cin * t
        if t != 1:
            p.conv(f"{q}.0.0", hidden, cin, 1)
            p.bn(f"{q}.0.1", hidden)
            j = 1
        p.conv(f"{q}.{j}.0", hidden, hidden, 3, groups=hidden)
        p.bn(f"{q}.{j}.1", hidden)
        p.conv(f"{q}.{j + 1}", cout, hidden, 1)
        p.bn(f"{q}.{j + 2}", cout)
    p.conv("features.18.0", 1280, 320, 1)
    p.bn("features.18.1", 1280)
    p.linear("classifier.1", num_classes, 1280)  # classifier = Sequential(Dropout(0.2), Linear)
    return p.sd


def ref_bfa_mobilenet_v2(sd, x, n_bits):
    """``MobileNetV2._forward_impl``: features (ConvBNReLU with ReLU6; InvertedResidual =
    [1x1 expand ConvBNReLU if t != 1], 3x3 depthwise ConvBNReLU (stride), 1x1 conv, BN;
    ``x + conv(x)`` when stride 1 and same width), ``adaptive_avg_pool2d(x, 1).reshape(N, -1)``,
    classifier (Dropout: identity in eval, Linear)."""
    r = Ref(sd, n_bits)
    x = F.relu6(r.bn("features.0.1", r.conv("features.0.0", x, 2, 1)))
    for idx, cin, cout, stride, t in _mobilenet_blocks():
        q, j, hidden = f"features.{idx}.conv", 0, cin * t
        y = x
        if t != 1:
            y = F.relu6(r.bn(f"{q}.0.1", r.conv(f"{q}.0.0", y, 1, 0)))
            j = 1
        y = F.relu6(r.bn(f"{q}.{j}.1", r.conv(f"{q}.{j}.0", y, stride, 1, groups=hidden)))
        y = r.bn(f"{q}.{j + 2}", r.conv(f"{q}.{j + 1}", y, 1, 0))
        x = x + y if stride == 1 and cin == cout else y
    x = F.relu6(r.bn("features.18.1", r.conv("features.18.0", x, 1, 0)))
    x = F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1)
    return r.linear("classifier.1", x)


# ---------------------------------------------------------------------------------------------
# 1. Every BFA-repository architecture: its checkpoint layout through our loader
# ---------------------------------------------------------------------------------------------

def bfa_checkpoint(sd: dict, arch: str, data_parallel: bool) -> dict:
    """What the public ``main.py`` saves: ``{'epoch', 'arch', 'state_dict', 'recorder',
    'optimizer'}``; ``net`` is wrapped in ``DataParallel`` (keys ``module.``) only with
    ``--ngpu > 1``."""
    prefix = "module." if data_parallel else ""
    return {"epoch": 160, "arch": arch, "state_dict": {prefix + k: v for k, v in sd.items()},
            "optimizer": {}}


ARCHITECTURES = [
    # (arch, bits, input size, data_parallel, public state dict, public forward)
    ("resnet20_quan", 8, 32, False, lambda: bfa_cifar_resnet_sd(20, 10, 8, 0),
     lambda sd, x: ref_bfa_cifar_resnet(sd, x, 20, 8)),
    ("resnet20_quan", 4, 32, True, lambda: bfa_cifar_resnet_sd(20, 10, 4, 1),
     lambda sd, x: ref_bfa_cifar_resnet(sd, x, 20, 4)),
    ("resnet20_bin", 1, 32, False, lambda: bfa_cifar_resnet_sd(20, 10, 1, 2),
     lambda sd, x: ref_bfa_cifar_resnet(sd, x, 20, 1)),
    ("vgg11_bn_quan", 8, 32, True, lambda: bfa_vgg11_bn_sd(10, 8, 3),
     lambda sd, x: ref_bfa_vgg11_bn(sd, x, 8)),
    ("resnet18_quan", 8, 64, True, lambda: bfa_imagenet_resnet_sd((2, 2, 2, 2), 10, 8, 4),
     lambda sd, x: ref_bfa_imagenet_resnet(sd, x, (2, 2, 2, 2), 8)),
    ("resnet34_quan", 8, 32, False, lambda: bfa_imagenet_resnet_sd((3, 4, 6, 3), 10, 8, 5),
     lambda sd, x: ref_bfa_imagenet_resnet(sd, x, (3, 4, 6, 3), 8)),
    ("mobilenet_v2_quan", 8, 64, True, lambda: bfa_mobilenet_v2_sd(10, 8, 6),
     lambda sd, x: ref_bfa_mobilenet_v2(sd, x, 8)),
]


@pytest.mark.parametrize("arch,bits,size,data_parallel,make_sd,reference", ARCHITECTURES,
                         ids=[f"{a[0]}-{a[1]}bit{'-module' if a[3] else ''}"
                              for a in ARCHITECTURES])
def test_bfa_checkpoint_loads_and_computes_the_public_function(arch, bits, size, data_parallel,
                                                               make_sd, reference):
    """Tolerance: exact equality, float and integer mode (the same operations in the same
    order as the public forward; integer mode multiplies the same codes by the same step)."""
    sd = make_sd()
    ckpt = bfa_checkpoint(sd, arch, data_parallel)
    model = get_model(arch, 10, n_bits=bits)
    load_weights(model, ckpt["state_dict"])
    model.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference(sd, x)
        ours_float = model(x)
        to_integer(model)
        ours_int = model(x)
    assert expected.shape == (3, 10)
    assert torch.equal(ours_float, expected)
    assert torch.equal(ours_int, expected)
    for name, layer in quant_layers(model):  # b_w: our constant of the bit width (docstring)
        assert layer.b_w.view(-1)[0] == (-2.0 if bits == 1 else -(2.0 ** (bits - 1))), name


def test_bfa_cifar_resnet_names_map_one_to_one():
    """Every public entry lands on exactly one of ours (nothing left over, nothing missing) and
    the weights are the public ones, by the renaming the public structure implies."""
    sd = bfa_cifar_resnet_sd(20, 10, 8, 0)
    model = get_model("resnet20_quan", 10)
    load_weights(model, {"module." + k: v for k, v in sd.items()})
    ours = model.state_dict()
    assert torch.equal(ours["conv1.weight"], sd["conv_1_3x3.weight"])
    assert torch.equal(ours["layer3.2.bn2.running_var"], sd["stage_3.2.bn_b.running_var"])
    assert torch.equal(ours["layer2.0.conv1.weight"], sd["stage_2.0.conv_a.weight"])
    assert torch.equal(ours["linear.bias"], sd["classifier.bias"])
    assert len(ours) == len(sd)


def test_bfa_checkpoint_file_with_its_recorder_object(tmp_path):
    """The public ``main.py`` pickles a ``utils.RecorderMeter`` next to the state dict; our
    ``utils`` package has no such class. ``torch_load_foreign`` reads the file anyway."""
    import utils

    class RecorderMeter:  # the public class, as far as pickling is concerned
        def __init__(self, total_epoch):
            self.total_epoch = total_epoch

    RecorderMeter.__module__, RecorderMeter.__qualname__ = "utils", "RecorderMeter"
    sd = bfa_cifar_resnet_sd(20, 10, 8, 0)
    ckpt = bfa_checkpoint(sd, "resnet20_quan", True)
    ckpt["recorder"] = RecorderMeter(160)
    path = tmp_path / "model_best.pth.tar"
    utils.RecorderMeter = RecorderMeter
    try:
        torch.save(ckpt, path)
    finally:
        del utils.RecorderMeter
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)  # what a plain full unpickle does
    loaded = torch_load_foreign(path)
    assert loaded["recorder"].total_epoch == 160 and loaded["epoch"] == 160
    model = load_weights(get_model("resnet20_quan", 10), loaded["state_dict"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref_bfa_cifar_resnet(sd, x, 20, 8))
    # the scripts' path: load_checkpoint falls back to the foreign unpickler
    from models.factory import ModelConfig
    from utils.checkpoint import load_checkpoint, model_from_checkpoint
    model, _ = model_from_checkpoint(load_checkpoint(str(path)), ModelConfig("resnet20_quan", 10))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref_bfa_cifar_resnet(sd, x, 20, 8))


# ---------------------------------------------------------------------------------------------
# vgg11_bn_quan: the public structure; layout v0 keeps ours
# ---------------------------------------------------------------------------------------------

def test_vgg_public_structure_and_init():
    torch.manual_seed(0)
    model = get_model("vgg11_bn_quan", 10)
    keys = set(model.state_dict())
    assert {f"classifier.{i}.weight" for i in (1, 4, 6)} <= keys
    assert "classifier.weight" not in keys and "features.0.bias" in keys
    assert model.final_layer_name == "classifier.6" and model.num_outputs == 10
    kinds = [type(m).__name__ for m in model.classifier]
    assert kinds == ["Dropout", "QuantLinear", "ReLU", "Dropout", "QuantLinear", "ReLU",
                     "QuantLinear"]
    assert model.classifier[0].p == 0.5 and model.classifier[3].p == 0.5
    # public init: conv N(0, sqrt(2 / (9 * out))), conv bias 0; Linear at PyTorch's default
    # (uniform, bound 1/sqrt(512), bias too); BN 1 and 0
    last = model.features[25]
    assert torch.std(last.weight).item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.02)
    assert last.bias.abs().max() == 0
    for i in (1, 4, 6):
        lin = model.classifier[i]
        bound = 1 / math.sqrt(512)
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        assert lin.bias.abs().max() <= bound and lin.bias.abs().max() > 0
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 64, 64))  # the public view + Linear(512) fits 32x32 only


def test_vgg_layout_v0_is_the_previous_function():
    torch.manual_seed(0)
    model = get_model("vgg11_bn_quan", 10, layout="v0").eval()
    assert model.final_layer_name == "classifier"
    assert isinstance(model.classifier, QuantLinear)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    r = Ref(sd, 8)
    with torch.no_grad():
        feats = F.adaptive_avg_pool2d(ref_vgg_features(r, x), 1).flatten(1)
        assert torch.equal(model(x), r.linear("classifier", feats))
    with pytest.raises(ValueError, match="layout 'public'"):  # a public file needs "public"
        load_weights(get_model("vgg11_bn_quan", 10, layout="v0"), bfa_vgg11_bn_sd(10, 8, 0))


# ---------------------------------------------------------------------------------------------
# 2. Binarized layers: sign(0)
# ---------------------------------------------------------------------------------------------

def test_binarized_zero_weights_public_sign_option():
    """Exactly-zero weights: the public ``torch.sign`` gives them 0, ours +1 (deliberate, one bit
    per weight); ``use_public_sign`` computes the public function, float and integer mode."""
    sd = bfa_cifar_resnet_sd(20, 10, 1, 3)
    sd["stage_1.0.conv_a.weight"].view(-1)[::7] = 0.0
    sd["classifier.weight"][:, :5] = 0.0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = ref_bfa_cifar_resnet(sd, x, 20, 1)
    ours = load_weights(get_model("resnet20_bin", 10), sd).eval()
    public = use_public_sign(load_weights(get_model("resnet20_bin", 10), sd)).eval()
    with torch.no_grad():
        assert not torch.allclose(ours(x), expected, atol=1e-4)
        assert torch.equal(public(x), expected)
        to_integer(public)
        assert torch.equal(public(x), expected)
    layer = public.linear
    assert int((layer.weight == 0).sum()) == 50
    # the public bit conversion reads 0 as bit 0 = -1 (int2bin(0) = 0.5 -> 0): a flip gives +1
    layer.flip_bit(0, 0)
    assert layer.weight.view(-1)[0] == 1.0
    assert set(ours.linear.int_weight().unique().tolist()) == {-1, 1}


# ---------------------------------------------------------------------------------------------
# 3. Untargeted BFA against a reference of the public progressive bit search
# ---------------------------------------------------------------------------------------------

class TinyNet(QuantNet, nn.Module):
    final_layer_name = "fc"

    def __init__(self, n_bits, width=8):
        super().__init__()
        self.conv1 = QuantConv2d(3, 6, 3, stride=2, padding=1, bias=False, n_bits=n_bits)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = QuantConv2d(6, width, 3, stride=2, padding=1, bias=False, n_bits=n_bits)
        self.fc = QuantLinear(width, 5, n_bits=n_bits)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 1).flatten(1)


def tiny(n_bits, seed, width=8):
    torch.manual_seed(seed)
    model = TinyNet(n_bits, width).eval()
    with torch.no_grad():
        model.bn1.running_mean.normal_(0, 0.1)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return to_integer(model)


def public_two_complement(q: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``int2bin(...).short()`` of attack/data_conversion.py (1 bit: ``q/2 + 0.5``)."""
    if n_bits == 1:
        return (q / 2 + 0.5).to(torch.int64)
    return torch.where(q < 0, q + 2 ** n_bits, q).to(torch.int64)


def public_signed(u: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``bin2int``: two's complement back to the signed code (1 bit: ``2u - 1``)."""
    if n_bits == 1:
        return (2 * u - 1).float()
    return torch.where(u >= 2 ** (n_bits - 1), u - 2 ** n_bits, u).float()


def public_flip_bit(layer, n_flip: int, k_top=None):
    """``BFA.flip_bit``: the layer's weights with its ``n_flip`` chosen bits flipped, or None
    when its masked bit gradient is all zero (the public code then writes the layer back
    unchanged)."""
    n = layer.n_bits
    b_w = 2.0 ** torch.arange(n - 1, -1, -1).float()
    b_w[0] = -b_w[0]  # the public b_w: [-128, 64, ..., 1] for 8 bits, [-1] for 1 bit
    g = layer.weight.grad.detach().view(-1)
    q = layer.weight.detach().view(-1)
    k = g.numel() if k_top is None else k_top
    idx = g.abs().topk(k).indices
    b_grad = b_w[:, None] * g[idx][None, :]                       # [n, k]
    wants_one = (b_grad > 0).to(torch.int64)                      # (sign + 1) / 2, truncated
    u = public_two_complement(q[idx], n)
    value = b_w.abs().to(torch.int64)[:, None]
    bit = (u[None, :] & value) // value                           # [n, k] current bits
    b_grad = b_grad * (bit ^ wants_one)
    if b_grad.abs().max() == 0:
        return None
    top = b_grad.abs().view(-1).topk(n_flip).indices
    if (b_grad.view(-1)[top] == 0).any():  # the public code would flip masked bits here
        raise AssertionError("case outside the comparison (see attacks/bfa.py, difference 2)")
    flips = torch.zeros_like(bit).view(-1)
    flips[top] = 1
    xor = (flips.view(bit.shape) * value).sum(0)
    new = q.clone()
    new[idx] = public_signed(u ^ xor, n)
    return new.view_as(layer.weight)


def public_progressive_bit_search(model, x, y, criterion, k_top=None):
    """``BFA.progressive_bit_search`` (one call): gradients, ``while loss_max <= loss``: one
    more bit per layer, every layer's trial loss, ``max`` (first on ties); then the winner's
    flip. Returns (layer name, flat indices changed, new codes)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    for _, m in layers:
        m.weight.grad = None
    loss = criterion(model(x), y)
    loss.backward()
    loss_max, n_flip, losses = loss.item(), 0, {}
    while loss_max <= loss.item():
        n_flip += 1
        assert n_flip <= 64, "the public loop would go on"
        for name, m in layers:
            clean = m.weight.data.clone()
            new = public_flip_bit(m, n_flip, k_top)
            if new is not None:
                m.weight.data = new
            with torch.no_grad():
                losses[name] = criterion(model(x), y).item()
            m.weight.data = clean
        best = max(losses.items(), key=lambda item: item[1])[0]
        loss_max = losses[best]
    layer = dict(layers)[best]
    new = public_flip_bit(layer, n_flip, k_top)
    changed = (new != layer.weight.data).view(-1).nonzero().view(-1)
    layer.weight.data = new
    return best, changed.tolist(), new.view(-1)[changed].tolist(), n_flip


class Criterion:
    """Cross-entropy, minus ``bonus`` when 1 to ``bonus_from - 1`` codes changed since
    :meth:`reset` (called on both sides before every iteration), plus ``bonus`` from
    ``bonus_from`` changed codes on: every trial with fewer bits loses and every trial with
    ``bonus_from`` bits wins, so the retry goes to exactly ``bonus_from`` bits per layer and the
    layers are ranked by their cross-entropy there."""

    def __init__(self, model, bonus_from=None, bonus=1e3):
        self.model, self.bonus_from, self.bonus = model, bonus_from, bonus
        self.reset()

    def reset(self):
        self.start = [m.weight.detach().clone() for _, m in quant_layers(self.model)]

    def __call__(self, out, y):
        loss = F.cross_entropy(out, y)
        if self.bonus_from is None:
            return loss
        changed = sum(int((m.weight != s).sum())
                      for (_, m), s in zip(quant_layers(self.model), self.start))
        if changed == 0:
            return loss
        return loss + (self.bonus if changed >= self.bonus_from else -self.bonus)


@pytest.mark.parametrize("n_bits,seed,k_top,public_mask,bonus_from", [
    (8, 0, None, False, None), (8, 1, 3, False, None), (4, 2, None, False, None),
    (8, 5, None, False, 2), (8, 6, 4, False, 3), (1, 3, None, True, 2), (1, 4, None, True, 3)])
def test_bfa_flips_the_bits_of_the_public_search(n_bits, seed, k_top, public_mask, bonus_from):
    """Four iterations side by side: the same number of bits per layer, the same layer, weights
    and new codes every time (and the same labels: the model's own argmax).

    Binarized cases run with the public 1-bit mask and the bonus criterion: with plain
    cross-entropy the public loop, whose 1-bit candidates lower the loss, went past 64 bits per
    layer (or ran out of admissible bits) on every such tiny network tried."""
    ours = tiny(n_bits, seed, width=16)
    ref = copy.deepcopy(ours)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    output = SoftmaxOutput(5)
    ours_loss, ref_loss = Criterion(ours, bonus_from), Criterion(ref, bonus_from)
    output.loss = lambda out, y, reduction="mean": ours_loss(out, y)
    attack = BFA(ours, output, k_top=k_top, public_binary_mask=public_mask,
                 max_bits_per_layer=None)
    y = attack.label(x)
    with torch.no_grad():
        assert torch.equal(y, ref(x).max(1)[1])
    for _ in range(4):
        ours_loss.reset(), ref_loss.reset()
        name, indices, codes, n_flip = public_progressive_bit_search(ref, x, y, ref_loss, k_top)
        step = attack.step(x, y)
        assert step.bits_per_layer == n_flip == (bonus_from or n_flip)
        assert {f.layer for f in step.flips} == {name}
        assert sorted(f.index for f in step.flips) == indices
        now = dict(quant_layers(ours))[name].weight.view(-1)
        assert now[indices].tolist() == codes
        for (_, a), (_, b) in zip(quant_layers(ours), quant_layers(ref)):
            assert torch.equal(a.weight, b.weight)


def test_binarized_bfa_default_differs_from_the_public_mask():
    """Same tiny binarized network and batch: ours raises the loss with one bit; the public
    mask (the reference) proposes no 1- or 2-bit flip that raises the cross-entropy."""
    ours = tiny(1, 3, width=16)
    ref = copy.deepcopy(ours)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    attack = BFA(ours, SoftmaxOutput(5))
    y = attack.label(x)
    step = attack.step(x, y)
    assert step.bits_per_layer == 1 and step.loss_after > step.loss_before
    _, _, _, n_flip = public_progressive_bit_search(ref, x, y, Criterion(ref, bonus_from=3))
    assert n_flip == 3


class _LinearLoss(nn.Module):
    """Output interface whose loss is the model's output itself: with a one-weight-row linear
    layer and inputs ``g / step`` the loss is ``g . q`` exactly (a flip changes it by
    ``g_i * dq_i``, the first-order change, with no remainder)."""

    def loss(self, out, y, reduction="mean"):
        return out.sum()

    def predict(self, out):
        return torch.zeros(len(out), dtype=torch.int64)


@pytest.mark.parametrize("public_mask,max_bits,indices,change", [
    (False, 1, [1], 0.8), (True, 1, [0], -1.0), (True, None, [0, 3], -1.4)])
def test_binarized_bfa_hand_computed(public_mask, max_bits, indices, change):
    """q = [1, -1, 1, -1], g = [0.5, 0.4, -0.3, -0.2]: flipping weight i changes the loss by
    -2 q_i g_i = [-1.0, +0.8, +0.6, -0.4]. Ours flips weight 1 (+0.8, the largest rise); the
    public 1-bit mask (b_w = -1 with bit 1 meaning +1) proposes weight 0 (-1.0, the largest
    fall). With one bit allowed that choice is kept although the loss falls. Without a bound the
    retry proposes {0, 3} (-1.4); a third bit has no admissible candidate, so ours stops there
    (the public code would add masked bits, then fail in ``topk``: differences 1 and 2)."""
    layer = QuantLinear(4, 1, bias=False, n_bits=1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0]]) * 0.25)
    layer.to_integer()
    step = float(layer.step_size)
    x = (torch.tensor([[0.5, 0.4, -0.3, -0.2]]) / step)
    attack = BFA(layer, _LinearLoss(), public_binary_mask=public_mask,
                 max_bits_per_layer=max_bits)
    result = attack.step(x, torch.zeros(1, dtype=torch.int64))
    assert sorted(f.index for f in result.flips) == indices
    assert result.loss_after - result.loss_before == pytest.approx(change, abs=1e-5)


def test_random_flips_public_stream():
    """``random_flip_one_bit``: ``random.choice`` of a module name, of a weight index, of a bit
    (from the LSB), XOR of that bit in the two's complement, from Python's ``random`` seeded
    like the public ``--manualSeed``: the same seed flips the same bits."""
    ours = tiny(8, 6)
    ref = copy.deepcopy(ours)
    attack = RandomFlips(ours, SoftmaxOutput(5), seed=11, python_random=True)
    rng = random.Random(11)
    names = [n for n, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    x = torch.randn(2, 3, 8, 8)
    y = torch.zeros(2, dtype=torch.int64)
    for _ in range(20):
        name = rng.choice(names)
        flat = dict(ref.named_modules())[name].weight.data.view(-1)
        index = rng.choice(range(flat.numel()))
        bit = rng.choice(range(8))
        u = public_two_complement(flat[index:index + 1], 8) ^ (2 ** bit)
        flat[index] = public_signed(u, 8)[0]
        (flip,) = attack.step(x, y).flips
        assert (flip.layer, flip.index, flip.bit) == (name, index, 7 - bit)
    for (_, a), (_, b) in zip(quant_layers(ours), quant_layers(ref)):
        assert torch.equal(a.weight, b.weight)


def test_attack_batch_augmentation_is_the_public_training_transform():
    """``RandomHorizontalFlip`` then ``RandomCrop(32, padding=4)``: every image is a 32x32
    window of the zero-padded (possibly mirrored) original, at an offset of 0..8."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = attack_bfa.augment_like_public_training(images, torch.Generator().manual_seed(1))
    offsets, flips = set(), 0
    for img, aug in zip(images, out):
        found = None
        for flip in (False, True):
            padded = F.pad(img.flip(-1) if flip else img, (4, 4, 4, 4))
            for top in range(9):
                for left in range(9):
                    if torch.equal(padded[:, top:top + 32, left:left + 32], aug):
                        found = (flip, top, left)
        assert found is not None
        flips += found[0]
        offsets.add(found[1:])
    assert 16 < flips < 48 and len(offsets) > 20


# ---------------------------------------------------------------------------------------------
# 4. Piecewise clustering: the public formula, by hand
# ---------------------------------------------------------------------------------------------

def test_piecewise_clustering_hand_computed():
    """Public ``clustering_loss``: every nn.Conv2d / nn.Linear weight (not BN, not biases);
    per layer ``sum_{w>=0} (w - mean+)^2 + sum_{w<=0} (w - mean-)^2``, zeros on both sides, an
    empty side 0; times lambda.

    conv [0.5, 0.1, 0, -0.2, -0.4]: positives {0.5, 0.1, 0}, mean 0.2: 0.09 + 0.01 + 0.04;
    negatives {0, -0.2, -0.4}, mean -0.2: 0.04 + 0 + 0.04; total 0.22.
    linear [0.3, 0.1]: positives mean 0.2: 0.02; no negatives: 0. Sum 0.24."""
    model = nn.Sequential(nn.Conv2d(1, 5, 1, bias=True), nn.BatchNorm2d(5), nn.Flatten(),
                          QuantLinear(1, 2, n_bits=8))
    with torch.no_grad():
        model[0].weight.view(-1).copy_(torch.tensor([0.5, 0.1, 0.0, -0.2, -0.4]))
        model[0].bias.fill_(-3.0)
        model[1].weight.fill_(5.0)
        model[3].weight.view(-1).copy_(torch.tensor([0.3, 0.1]))
        model[3].bias.fill_(7.0)
    value = piecewise_clustering(model, 1e-3)
    assert value.item() == pytest.approx(0.24e-3, rel=1e-5)
    value.backward()
    assert torch.isfinite(model[3].weight.grad).all()
    # d/dw of sum (w - mean)^2 = 2 (w - mean) (the mean's own derivative sums to zero)
    assert model[3].weight.grad.view(-1).tolist() == pytest.approx([2e-4, -2e-4], abs=1e-9)
