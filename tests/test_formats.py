"""Number formats (models.bits) and the layers of models.formats: every bit pattern round-trips,
flips agree with an independent computation, float-format and per-channel int8 layers compute
what they claim, and the torch.ao twin holds exactly the deployed model's codes."""

import copy
import math
import struct
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import get_model, to_integer
from models.bits import (FloatFormat, IntFormat, bit_layers, changed_bits, get_format,
                         random_flip, snapshot)
from models.formats import (ChannelQuantConv2d, ChannelQuantLinear, DeployedModel, FormatConv2d,
                            FormatLinear, from_ao, plain_layers, quantize_per_channel,
                            to_float_format, write_back)
from models.quantization import QuantLayer

INT_DTYPE = {"fp32": torch.int32, "bf16": torch.int16, "fp16": torch.int16}


# ---------------------------------------------------------------------------------------------
# Independent references: Python integers, struct and numpy, never models.bits
# ---------------------------------------------------------------------------------------------

def all_patterns(name):
    """Every 16-bit pattern (as a stored tensor of format ``name``) and the patterns as ints."""
    p = np.arange(1 << 16, dtype=np.uint32)
    raw = torch.from_numpy(p.astype(np.uint16).view(np.int16).copy())
    t = raw.view(FloatFormat(name).storage_dtype)
    return t, p


FP32_SPECIAL = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
                0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF, 0x7FC12345,  # NaNs
                0x00000001, 0x007FFFFF, 0x00800000, 0x80000001,  # subnormals, smallest normal
                0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF800000, 0x3F7FFFFF]


def fp32_patterns(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    p = np.concatenate([np.array(FP32_SPECIAL, dtype=np.uint32),
                        rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)])
    t = torch.from_numpy(p.view(np.int32).copy()).view(torch.float32)
    return t, p


def stored_patterns(values, name):
    """Bit patterns of stored values as non-negative numpy ints (NaN payloads kept)."""
    raw = values.contiguous().view(INT_DTYPE[name]).numpy()
    return raw.view(np.uint32 if name == "fp32" else np.uint16).astype(np.uint64)


def reference_values(patterns, name):
    """float64 values of bit patterns, computed with numpy / struct only."""
    patterns = np.asarray(patterns, dtype=np.uint64)
    if name == "fp16":
        half = patterns.astype(np.uint16).view(np.float16)
    elif name == "bf16":  # bf16 is the top half of an fp32 pattern
        half = (patterns.astype(np.uint32) << 16).view(np.float32)
    else:
        half = patterns.astype(np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):  # signalling NaNs become quiet NaNs in float64
        return half.astype(np.float64)


def same_values(a, b):
    """Equal as floats, NaN equal to NaN, and the sign of zero compared too."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    return bool(np.all(both_nan | ((a == b) & (np.signbit(a) == np.signbit(b)))))


def twos_complement_flip(code, k, n=8):
    u = (code & ((1 << n) - 1)) ^ (1 << (n - 1 - k))
    return u - (1 << n) if u >= 1 << (n - 1) else u


# ---------------------------------------------------------------------------------------------
# Formats: round trips, flips, deltas
# ---------------------------------------------------------------------------------------------

def test_int8_round_trips_every_code():
    fmt = IntFormat(8)
    values = torch.arange(-128, 128, dtype=torch.float32)
    bits = fmt.to_bits(values)
    expected = [[((c & 0xFF) >> (7 - k)) & 1 for k in range(8)] for c in range(-128, 128)]
    assert bits.tolist() == expected
    back = fmt.from_bits(bits)
    assert back.dtype == fmt.storage_dtype and torch.equal(back, values)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_formats_round_trip_every_pattern(name):
    fmt = get_format(name)
    values, p = all_patterns(name)
    bits = fmt.to_bits(values)
    shifts = np.arange(15, -1, -1, dtype=np.uint32)
    assert np.array_equal(bits.numpy(), ((p[:, None] >> shifts) & 1).astype(np.uint8))
    back = fmt.from_bits(bits)
    assert back.dtype == fmt.storage_dtype
    assert np.array_equal(stored_patterns(back, name), p)  # every NaN payload, inf, subnormal
    assert int(torch.isnan(values).sum()) == 2 * (2 ** 10 - 1 if name == "fp16" else 2 ** 7 - 1)


def test_fp32_round_trips_patterns():
    fmt = get_format("fp32")
    values, p = fp32_patterns()
    bits = fmt.to_bits(values)
    shifts = np.arange(31, -1, -1, dtype=np.uint32)
    assert np.array_equal(bits[:5000].numpy(), ((p[:5000, None] >> shifts) & 1).astype(np.uint8))
    back = fmt.from_bits(bits)
    assert back.dtype == torch.float32
    assert np.array_equal(stored_patterns(back, "fp32"), p.astype(np.uint64))


def test_int8_flip_every_bit():
    fmt = IntFormat(8)
    values = torch.arange(-128, 128, dtype=torch.float32)
    for k in range(8):
        got = fmt.flip(values, k)
        assert got.tolist() == [float(twos_complement_flip(c, k)) for c in range(-128, 128)]
    deltas = fmt.flip_deltas(values, dtype=torch.float64)
    expected = [[twos_complement_flip(c, k) - c for k in range(8)] for c in range(-128, 128)]
    assert deltas.tolist() == expected


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_float_flip_every_bit(name):
    fmt = get_format(name)
    values, p = all_patterns(name) if name != "fp32" else fp32_patterns(20_000)
    p = p.astype(np.uint64)
    for k in range(fmt.n_bits):
        got = fmt.flip(values, k)
        assert got.dtype == fmt.storage_dtype
        want = p ^ np.uint64(1 << (fmt.n_bits - 1 - k))
        assert np.array_equal(stored_patterns(got, name), want)  # patterns, NaNs included
        assert same_values(got.double().numpy(), reference_values(want, name))
    if name == "fp32":  # values from struct, one by one, for the special patterns
        for i, pattern in enumerate(FP32_SPECIAL):
            for k in range(32):
                want = struct.unpack(">f", struct.pack(">I", pattern ^ (1 << (31 - k))))[0]
                got = float(fmt.flip(values[i:i + 1], k))
                assert (math.isnan(got) and math.isnan(want)) or \
                    (got == want and math.copysign(1, got) == math.copysign(1, want))


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_float_flip_deltas(name):
    fmt = get_format(name)
    values, p = all_patterns(name) if name != "fp32" else fp32_patterns(20_000)
    deltas = fmt.flip_deltas(values)
    assert deltas.dtype == torch.float64 and deltas.shape == (len(p), fmt.n_bits)
    masks = np.array([1 << (fmt.n_bits - 1 - k) for k in range(fmt.n_bits)], dtype=np.uint64)
    flipped = reference_values(p.astype(np.uint64)[:, None] ^ masks, name)
    with np.errstate(invalid="ignore"):
        expected = flipped - reference_values(p, name)[:, None]
    assert same_values(deltas.numpy(), expected)


def test_float_flip_deltas_inf_and_nan():
    fmt = get_format("fp16")
    one = torch.tensor([1.0], dtype=torch.float16)  # 0x3C00; bit 1 is the exponent's MSB
    deltas = fmt.flip_deltas(one)[0]
    assert deltas[1] == float("inf")  # 0x7C00 = +inf
    assert deltas[0] == -2.0
    inf = torch.tensor([float("inf")], dtype=torch.float16)
    d = fmt.flip_deltas(inf)[0]
    assert (d[:6] == float("-inf")).all()  # sign and exponent bits: -inf or finite, minus inf
    assert torch.isnan(d[6:]).all()  # mantissa bits of inf give NaN; NaN - inf = NaN
    nan = torch.tensor([float("nan")], dtype=torch.float16)
    assert torch.isnan(fmt.flip_deltas(nan)).all()


# ---------------------------------------------------------------------------------------------
# Float-format layers
# ---------------------------------------------------------------------------------------------

def exact_conv(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="circular")
    with torch.no_grad():
        conv.weight.copy_(conv.weight.to(dtype).float())  # exactly representable
    return conv


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_format_conv_matches_plain(name):
    fmt = get_format(name)
    plain = exact_conv(fmt.storage_dtype)
    layer = FormatConv2d.from_module(plain, name)
    assert layer.weight.dtype == fmt.storage_dtype and layer.bias.dtype == torch.float32
    assert (layer.stride, layer.padding, layer.groups, layer.padding_mode) == \
        ((2, 2), (1, 1), 2, "circular")
    assert layer.bit_format == fmt and layer.integer_mode
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(layer(x), plain(x))
    # gradients are with respect to the stored values, in their dtype
    layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert layer.weight.grad.dtype == fmt.storage_dtype
    assert torch.equal(layer.weight.grad, plain.weight.grad.to(fmt.storage_dtype))


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_format_linear_matches_plain_and_rounds(name):
    dtype = get_format(name).storage_dtype
    torch.manual_seed(1)
    plain = nn.Linear(7, 5)
    layer = FormatLinear.from_module(plain, name)
    assert torch.equal(layer.weight, plain.weight.detach().to(dtype))  # rounded by .to(dtype)
    with torch.no_grad():
        plain.weight.copy_(layer.weight.float())
    x = torch.randn(3, 7)
    assert torch.equal(layer(x), plain(x))
    no_bias = FormatLinear.from_module(nn.Linear(7, 5, bias=False), name)
    assert no_bias.bias is None and no_bias(x).shape == (3, 5)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_format_flip_bit_changes_exactly_that_pattern(name):
    fmt = get_format(name)
    layer = FormatConv2d.from_module(exact_conv(fmt.storage_dtype), name)
    before = stored_patterns(layer.weight.detach().reshape(-1), name)
    for index, bit in [(0, 0), (5, 1), (17, fmt.n_bits - 1), (30, 4)]:
        layer.flip_bit(index, bit)
        after = stored_patterns(layer.weight.detach().reshape(-1), name)
        diff = np.nonzero(after != before)[0]
        assert diff.tolist() == [index]
        assert after[index] ^ before[index] == 1 << (fmt.n_bits - 1 - bit)
        assert layer.read_bit(index, bit) == int((after[index] >> (fmt.n_bits - 1 - bit)) & 1)
        before = after


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_format_layers_run_with_inf_and_nan(name):
    layer = FormatLinear.from_module(nn.Linear(4, 3), name)
    x = torch.randn(2, 4)
    with torch.no_grad():
        layer.weight.view(-1)[0] = float("inf")
        layer.weight.view(-1)[5] = float("nan")
    y = layer(x)
    assert not torch.isfinite(y[:, 0]).any() and torch.isnan(y[:, 1]).all()
    assert torch.isfinite(y[:, 2]).all()
    conv = FormatConv2d.from_module(nn.Conv2d(2, 2, 3), name)
    conv.flip_bit(0, 1)  # exponent MSB of a small weight: huge (inf for fp16); must just run
    with torch.no_grad():
        conv.weight.view(-1)[18] = float("inf")  # first weight of output channel 1
    y = conv(torch.randn(1, 2, 5, 5))
    assert not torch.isfinite(y[0, 1]).any()


def test_format_layers_keep_storage_dtype():
    layer = FormatLinear.from_module(nn.Linear(4, 3), "bf16")
    before = layer.weight.detach().clone()
    layer.half()
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, before)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        FormatLinear(4, 3, fmt="int8")


# ---------------------------------------------------------------------------------------------
# Per-channel int8 layers
# ---------------------------------------------------------------------------------------------

def test_channel_quant_conv_forward_and_gradient():
    torch.manual_seed(2)
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    codes = torch.randint(-128, 128, plain.weight.shape).float()
    scales = torch.rand(6) * 0.01 + 0.001
    zero_points = torch.tensor([0, 1, -3, 0, 5, -128.0])
    bias = torch.randn(6)
    layer = ChannelQuantConv2d.from_module(plain, codes, scales, zero_points, bias)
    assert layer.bit_format == IntFormat(8) and layer.integer_mode
    assert torch.equal(layer.weight, codes) and layer.scale.dtype == torch.float32
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = (codes - zero_points.view(-1, 1, 1, 1)) * scales.view(-1, 1, 1, 1)
    expected = F.conv2d(x, w, bias, stride=2, padding=1, groups=2)
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    # weight.grad is dLoss/dcode = scale * dLoss/dW
    layer(x).sum().backward()
    w_req = w.clone().requires_grad_(True)
    F.conv2d(x, w_req, bias, stride=2, padding=1, groups=2).sum().backward()
    assert torch.allclose(layer.weight.grad, w_req.grad * scales.view(-1, 1, 1, 1), rtol=1e-5)
    # a flip stays an int8 code
    layer.flip_bit(3, 0)
    assert layer.weight.view(-1)[3] == twos_complement_flip(int(codes.view(-1)[3]), 0)


def test_channel_quant_linear_forward_and_checks():
    torch.manual_seed(3)
    plain = nn.Linear(5, 4)
    codes = torch.randint(-128, 128, (4, 5)).float()
    layer = ChannelQuantLinear.from_module(plain, codes, 0.05, None, None)  # one scale, no bias
    assert layer.bias is None and torch.equal(layer.zero_point, torch.zeros(4))
    x = torch.randn(3, 5)
    assert torch.allclose(layer(x), x @ (codes * 0.05).t(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="integers in"):
        ChannelQuantLinear.from_module(plain, codes + 0.5, 0.05)
    with pytest.raises(ValueError, match="integers in"):
        ChannelQuantLinear.from_module(plain, codes * 0 + 128, 0.05)
    with pytest.raises(ValueError, match="one code per weight"):
        ChannelQuantLinear.from_module(plain, codes[:2], 0.05)
    blank = ChannelQuantLinear(5, 4)  # built directly: codes 0, scale 1, bias kept
    assert torch.equal(blank.weight, torch.zeros(4, 5)) and torch.equal(blank.scale, torch.ones(4))
    assert torch.allclose(blank(x), blank.bias.expand(3, 4))


# ---------------------------------------------------------------------------------------------
# Whole models: plain layers and float formats
# ---------------------------------------------------------------------------------------------

def test_plain_layers_keeps_weights_and_trains():
    torch.manual_seed(4)
    model = get_model("resnet20_quan", 10, 8)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    weights = {n: (model.get_submodule(n).weight, model.get_submodule(n).bias) for n in names}
    assert plain_layers(model) is model
    assert not any(isinstance(m, QuantLayer) for m in model.modules()) and not bit_layers(model)
    for n in names:
        layer = model.get_submodule(n)
        assert type(layer) in (nn.Conv2d, nn.Linear)
        assert layer.weight is weights[n][0] and layer.bias is weights[n][1]
    conv = model.get_submodule("layer2.0.conv1")
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.bias is None
    # float forward: the first conv uses the float weights, not their 8-bit quantization
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.conv1(x), F.conv2d(x, weights["conv1"][0], padding=1))
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in names)
    assert all(torch.isfinite(model.get_submodule(n).weight.grad).all() for n in names)


def test_plain_layers_refuses_integer_mode():
    model = to_integer(get_model("resnet20_quan", 10, 8))
    with pytest.raises(ValueError, match="to_float"):
        plain_layers(model)
    assert len([m for m in model.modules() if isinstance(m, QuantLayer)]) == 20  # unchanged


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_to_float_format_model(name):
    torch.manual_seed(5)
    model = plain_layers(get_model("resnet20_quan", 10, 8)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    assert to_float_format(model, name) is model
    layers = bit_layers(model)
    assert len(layers) == 20 and all(m.bit_format.name == name for _, m in layers)
    assert all(isinstance(m, (FormatConv2d, FormatLinear)) for _, m in layers)
    with torch.no_grad():
        out = model(x)
    if name == "fp32":
        assert torch.equal(out, reference)
    else:  # bf16 weights: about 3 significant digits
        assert torch.allclose(out, reference, rtol=0.05, atol=0.05 * reference.abs().max())
    saved = snapshot(model)
    flip = random_flip(model, torch.Generator().manual_seed(0))
    assert changed_bits(model, saved) == 1 and flip.layer in dict(layers)
    with pytest.raises(ValueError, match="plain_layers"):
        to_float_format(model, name)  # no plain layers left
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        to_float_format(nn.Linear(2, 2), "int8")


def test_to_float_format_inside_fused_modules():
    from torch.ao.nn.intrinsic import ConvReLU2d

    model = nn.Sequential(ConvReLU2d(nn.Conv2d(2, 3, 3), nn.ReLU()), nn.Flatten(), nn.Linear(27, 2))
    to_float_format(model, "fp16")
    assert isinstance(model[0][0], FormatConv2d) and isinstance(model[2], FormatLinear)
    assert model(torch.randn(1, 2, 5, 5)).shape == (1, 2)


# ---------------------------------------------------------------------------------------------
# torch.ao per-channel int8: FX graph mode on ResNet-20
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet20_ao():
    """A random ResNet-20 with BatchNorm statistics of its inputs, quantized by torch.ao."""
    torch.manual_seed(1)
    model = plain_layers(get_model("resnet20_quan", 10, 8))
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32))
    model.eval()
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ao = quantize_per_channel(model, calibration)
        twin = from_ao(ao, model)
    assert not caught, [str(w.message) for w in caught]  # torch.ao's notices silenced
    return model, ao, twin


def quantized_modules(ao):
    import torch.ao.nn.quantized as nnq
    return {n: m for n, m in ao.named_modules() if isinstance(m, (nnq.Conv2d, nnq.Linear))}


def test_twin_holds_the_ao_codes(resnet20_ao):
    model, ao, twin = resnet20_ao
    quantized = quantized_modules(ao)
    layers = bit_layers(twin)
    assert len(quantized) == len(layers) == 20
    assert [n for n, _ in layers] == [m.ao_name for _, m in layers] == list(quantized)
    assert not bit_layers(model)  # the float model is not changed
    # the same network: class, methods, names; the folded BatchNorms are gone
    assert type(twin) is type(model) and isinstance(twin.final_layer(), ChannelQuantLinear)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19
    for name, layer in layers:
        w = quantized[layer.ao_name].weight()
        assert w.qscheme() == torch.per_channel_affine
        assert torch.equal(layer.weight, w.int_repr().float())
        assert torch.equal(layer.scale.double(), w.q_per_channel_scales())  # float32 exactly
        assert torch.equal(layer.zero_point, torch.zeros(w.shape[0]))  # symmetric
        assert layer.scale.unique().numel() > 1  # per channel
        assert torch.equal(layer.bias, quantized[layer.ao_name].bias().detach())
    assert isinstance(twin.get_submodule("conv1"), ChannelQuantConv2d)  # ao: ConvReLU2d
    assert isinstance(twin.get_submodule("layer1.0.conv2"), ChannelQuantConv2d)


def test_twin_layers_compute_the_ao_layers_before_requantization(resnet20_ao):
    """Each twin layer (and the ReLU the ao layer fuses), fed the ao layer's own quantized
    input, gives the ao layer's output up to the rounding of that output to its activation
    grid: at most half a step (elements beyond the grid's range are clamped by the ao layer
    and skipped; they are rare)."""
    import torch.ao.nn.intrinsic.quantized as nniq

    _, ao, twin = resnet20_ao
    relu = {n for n, m in quantized_modules(ao).items()
            if isinstance(m, (nniq.ConvReLU2d, nniq.LinearReLU))}
    assert len(relu) == 10  # the stem and every block's first conv
    captured = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, (i[0], o)))
             for n, m in quantized_modules(ao).items()]
    try:
        with torch.no_grad():
            ao(torch.randn(32, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    skipped = total = 0
    for name, (q_in, q_out) in captured.items():
        with torch.no_grad():
            y = twin.get_submodule(name)(q_in.dequantize())
        if name in relu:
            y = F.relu(y)
        s, zp = q_out.q_scale(), q_out.q_zero_point()
        inside = (y >= (0 - zp) * s) & (y <= (255 - zp) * s)
        error = (y - q_out.dequantize()).abs()[inside]
        assert float(error.max()) <= 0.501 * s, name  # measured: 0.50006 steps at most
        skipped += int((~inside).sum())
        total += y.numel()
    assert skipped <= 1e-3 * total


def test_twin_outputs_close_to_ao(resnet20_ao):
    """End to end the twin differs from the ao model only by activation quantization (quint8,
    7 bits with x86's reduce_range, at every layer's output). Measured on this model: per-input
    relative L2 difference 2.5 % mean, 4.5 % max (seeds 0-2: at most 6.1 %), argmax equal on
    100 % (88 % on a seed whose random logits nearly tie); a twin with a wrong scale, bias or
    layer is off by order 100 %."""
    model, ao, twin = resnet20_ao
    x = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        a, b, f = ao(x), twin(x), model(x)
    relative = (a - b).norm(dim=1) / a.norm(dim=1)
    assert float(relative.mean()) < 0.06 and float(relative.max()) < 0.15
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) >= 0.9
    # the twin is closer to the float model than the ao model is (it skips activation rounding)
    assert float((b - f).norm()) < float((a - f).norm())


def test_twin_of_partly_quantized_model(resnet20_ao):
    """A layer the qconfig leaves in float keeps its folded BatchNorm in the twin too."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model, _, _ = resnet20_ao
    mapping = get_default_qconfig_mapping("x86").set_module_name("layer1.0.conv2", None)
    x = torch.randn(8, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), mapping, (x,))
        with torch.no_grad():
            prepared(x)
        ao = convert_fx(prepared)
    twin = from_ao(ao, model)
    assert len(bit_layers(twin)) == 19 and "layer1.0.conv2" not in dict(bit_layers(twin))
    float_conv = ao.get_submodule("layer1.0.conv2")
    assert type(float_conv) is nn.Conv2d and float_conv.bias is not None  # BatchNorm folded
    assert torch.equal(twin.get_submodule("layer1.0.conv2").weight, float_conv.weight)
    assert torch.equal(twin.get_submodule("layer1.0.conv2").bias, float_conv.bias)
    assert isinstance(twin.get_submodule("layer1.0.bn2"), nn.Identity)
    with torch.no_grad():
        a, b = ao(x), twin(x)
    assert float(((a - b).norm(dim=1) / a.norm(dim=1)).max()) < 0.15


def test_twin_is_attackable(resnet20_ao):
    _, _, twin = resnet20_ao
    twin = copy.deepcopy(twin)
    x = torch.randn(4, 3, 32, 32)
    F.cross_entropy(twin(x), torch.tensor([0, 1, 2, 3])).backward()
    for _, layer in bit_layers(twin):
        assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape
    saved = snapshot(twin)
    random_flip(twin, torch.Generator().manual_seed(1))
    assert changed_bits(twin, saved) == 1


def flipped_reference(ao, name, codes, bias):
    """A copy of ``ao`` whose module ``name`` gets ``codes`` by torch.quantize_per_channel."""
    ref = copy.deepcopy(ao)
    module = ref.get_submodule(name)
    w = module.weight()
    per_tensor = w.qscheme() == torch.per_tensor_affine
    if per_tensor:
        scales, zps = torch.tensor([w.q_scale()]).double(), torch.tensor([w.q_zero_point()])
    else:
        scales, zps = w.q_per_channel_scales(), w.q_per_channel_zero_points()
    shape = (-1,) + (1,) * (codes.dim() - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dequantized = ((codes.double() - zps.view(shape)) * scales.view(shape)).float()
        if per_tensor:
            qw = torch.quantize_per_tensor(dequantized, w.q_scale(), w.q_zero_point(),
                                           torch.qint8)
        else:
            qw = torch.quantize_per_channel(dequantized, scales, zps, 0, torch.qint8)
    assert torch.equal(qw.int_repr(), codes.to(torch.int8))
    module.set_weight_bias(qw, bias)
    return ref


def test_write_back(resnet20_ao):
    _, ao, twin = resnet20_ao
    ao, twin = copy.deepcopy(ao), copy.deepcopy(twin)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = ao(x)
    write_back(twin, ao)  # nothing flipped: the ao model is bit for bit the same
    with torch.no_grad():
        assert torch.equal(ao(x), before)
    layer = twin.get_submodule("layer2.0.conv2")
    layer.flip_bit(7, 0)
    layer.flip_bit(100, 1)
    other = twin.get_submodule("conv1")
    other.flip_bit(0, 0)
    write_back(twin, ao, names=["layer2.0.conv2"])
    quantized = quantized_modules(ao)
    assert torch.equal(quantized["layer2.0.conv2"].weight().int_repr().float(), layer.weight)
    assert not torch.equal(quantized["conv1"].weight().int_repr().float(), other.weight)
    write_back(twin, ao, names=["conv1"])
    assert torch.equal(quantized["conv1"].weight().int_repr().float(), other.weight)
    with pytest.raises(ValueError, match="bit_layers"):
        write_back(twin, ao, names=["nope"])
    with torch.no_grad():
        layer.weight.view(-1)[0] = 128.0
    with pytest.raises(ValueError, match="integers in"):
        write_back(twin, ao)


def test_deployed_model(resnet20_ao):
    _, ao, twin = resnet20_ao
    original = ao
    ao, twin = copy.deepcopy(ao), copy.deepcopy(twin)
    deployed = DeployedModel(twin, ao)
    assert bit_layers(deployed) == [] and deployed.twin is twin
    x = torch.randn(16, 3, 32, 32)
    y0 = deployed(x)
    with torch.no_grad():
        assert torch.equal(y0, original(x))
    assert deployed.sync() == []
    layer = twin.get_submodule("layer3.0.conv1")
    index = int(layer.weight.detach().abs().reshape(-1).argmax())
    layer.flip_bit(index, 0)  # the sign bit of the largest code: a large change
    y1 = deployed(x)
    assert not torch.equal(y1, y0)
    reference = flipped_reference(original, "layer3.0.conv1", layer.weight.detach(),
                                  layer.bias.detach())
    with torch.no_grad():
        assert torch.equal(y1, reference(x))
    assert deployed.sync() == []  # written once
    layer.flip_bit(index, 0)  # undone: back to the original outputs
    assert torch.equal(deployed(x), y0)


def test_qnnpack_per_tensor(resnet20_ao):
    """qnnpack's default qconfig quantizes weights per tensor: one scale repeated in the twin,
    and written back per tensor."""
    model, _, _ = resnet20_ao
    previous = torch.backends.quantized.engine
    try:
        ao = quantize_per_channel(model, [torch.randn(8, 3, 32, 32)], backend="qnnpack")
        assert torch.backends.quantized.engine == "qnnpack"
        twin = from_ao(ao, model)
        quantized = quantized_modules(ao)
        for _, layer in bit_layers(twin):
            w = quantized[layer.ao_name].weight()
            assert w.qscheme() == torch.per_tensor_affine
            assert torch.equal(layer.weight, w.int_repr().float())
            assert layer.weight.is_contiguous()  # qnnpack's int_repr is channels-last
            assert torch.equal(layer.scale.double(),
                               torch.full_like(layer.scale.double(), w.q_scale()))
        deployed = DeployedModel(twin, copy.deepcopy(ao))
        layer = twin.get_submodule("layer1.1.conv2")
        layer.flip_bit(3, 0)
        x = torch.randn(4, 3, 32, 32)
        y = deployed(x)
        module = quantized_modules(deployed.ao_model)["layer1.1.conv2"]
        assert module.weight().qscheme() == torch.per_tensor_affine
        reference = flipped_reference(ao, "layer1.1.conv2", layer.weight.detach(),
                                      layer.bias.detach())
        with torch.no_grad():
            assert torch.equal(y, reference(x)) and not torch.equal(y, ao(x))
    finally:
        torch.backends.quantized.engine = previous


def test_ao_errors(resnet20_ao):
    model, ao, _ = resnet20_ao
    with pytest.raises(ValueError, match="plain_layers"):
        quantize_per_channel(get_model("resnet20_quan", 10, 8), [torch.randn(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="calibration batch"):
        quantize_per_channel(model, [])
    with pytest.raises(ValueError, match="quantize it first"):
        from_ao(model, model)
    torch.manual_seed(99)
    stranger = plain_layers(get_model("resnet20_quan", 10, 8)).eval()
    with pytest.raises(ValueError, match="float model that was quantized"):
        from_ao(ao, stranger)
    with pytest.raises(ValueError, match="float model"):
        from_ao(ao, nn.Sequential(nn.Conv2d(3, 16, 3)))
    with pytest.raises(ValueError, match="from_ao"):
        DeployedModel(model, ao)


# ---------------------------------------------------------------------------------------------
# torch.ao eager mode: torchvision's quantizable ResNet-18
# ---------------------------------------------------------------------------------------------

def test_eager_torchvision_resnet18():
    import torchvision
    from torch.ao import quantization as tq

    torch.manual_seed(6)
    torch.backends.quantized.engine = "x86"
    model = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    model.fuse_model()
    model.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model)
        with torch.no_grad():
            for _ in range(2):
                prepared(torch.randn(2, 3, 64, 64))
        ao = tq.convert(prepared)
    twin = from_ao(ao, model)  # fused model detected: no fuse_fx
    quantized = quantized_modules(ao)
    layers = bit_layers(twin)
    assert len(layers) == len(quantized) == 21
    for name, layer in layers:
        assert torch.equal(layer.weight, quantized[layer.ao_name].weight().int_repr().float())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ao(x), twin(x)
    assert float(((a - b).norm(dim=1) / a.norm(dim=1)).max()) < 0.15
    assert isinstance(twin.get_submodule("layer4.1.conv1.0"), ChannelQuantConv2d)  # ConvReLU2d
    assert twin.get_submodule("layer4.1.conv1.0").ao_name == "layer4.1.conv1"
    deployed = DeployedModel(twin, copy.deepcopy(ao))
    layer = twin.get_submodule("layer4.1.conv1.0")
    layer.flip_bit(11, 0)
    write_back(twin, deployed.ao_model, names=["layer4.1.conv1"])  # the ao name works too
    assert torch.equal(quantized_modules(deployed.ao_model)["layer4.1.conv1"].weight()
                       .int_repr().float(), layer.weight)
    y = deployed(x)
    reference = flipped_reference(ao, "layer4.1.conv1", layer.weight.detach(), layer.bias.detach())
    with torch.no_grad():
        assert torch.equal(y, reference(x))


def test_half_formats_keep_a_full_precision_gradient_for_the_search():
    """fp16 gradients underflow: the search reads the float32 dLoss/dW (models.bits.weight_grad)."""
    from models.bits import clear_grad, weight_grad

    torch.manual_seed(0)
    plain = nn.Linear(16, 4)
    for fmt, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        layer = FormatLinear.from_module(plain, fmt)
        x = torch.randn(8, 16) * 1e-6  # tiny activations: gradients below fp16
        (layer(x).sum() * 1e-3).backward()
        reference = nn.Linear(16, 4)
        reference.weight.data = layer.weight.detach().float()
        reference.bias.data = layer.bias.detach().clone()
        (reference(x).sum() * 1e-3).backward()
        g = weight_grad(layer)
        assert g.dtype == torch.float32 and torch.equal(g, reference.weight.grad)
        assert layer.weight.grad.dtype == dtype
        if fmt == "fp16":  # what autograd alone would have given: underflow to 0
            assert (layer.weight.grad == 0).any() and not (g == 0).any()
        clear_grad(layer)
        assert weight_grad(layer) is None
