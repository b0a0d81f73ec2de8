"""Quantized layers (docs/algorithms.md section 1): values, STE, integer mode, bit flips, binarization."""

import pytest
import torch

from models import QuantConv2d, QuantLinear, bits, quant_layers, to_integer, get_model


def make_linear(n_bits, seed=0):
    torch.manual_seed(seed)
    return QuantLinear(6, 5, n_bits=n_bits)


@pytest.mark.parametrize("n_bits,half", [(8, 127), (4, 7)])
def test_quantizer_values(n_bits, half):
    layer = make_linear(n_bits)
    w = layer.weight.detach().clone()
    step = w.abs().max() / half
    expected = torch.round(torch.clamp(w, -half * step, half * step) / step) * step
    assert torch.allclose(layer.quantized_weight(), expected, atol=0, rtol=0)
    assert torch.allclose(layer.step_size, step.reshape(()))
    codes = layer.int_weight()
    assert codes.abs().max() == half  # the largest weight maps to +-half_lvls
    assert codes.min() >= -half and codes.max() <= half
    assert torch.equal(codes.float() * step, expected)


def test_known_values_4bit():
    layer = QuantLinear(4, 1, bias=False, n_bits=4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.7, -0.35, 0.05, 0.26]]))
    # step = 0.7 / 7 = 0.1: codes round(7, -3.5, 0.5, 2.6) = 7, -4 (half to even), 0, 3
    assert layer.int_weight().tolist() == [[7, -4, 0, 3]]


def test_straight_through_gradient():
    layer = make_linear(8)
    x = torch.randn(3, 6)
    r = torch.randn(3, 5)
    (layer(x) * r).sum().backward()
    w_grad = layer.weight.grad.clone()
    # the gradient with respect to W equals the gradient with respect to the quantized weight
    wq = layer.quantized_weight().detach().requires_grad_(True)
    (torch.nn.functional.linear(x, wq, layer.bias) * r).sum().backward()
    assert torch.allclose(w_grad, wq.grad)


@pytest.mark.parametrize("n_bits", [8, 4, 1])
def test_integer_mode_matches_training_forward(n_bits):
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, n_bits=n_bits)
    x = torch.randn(2, 3, 8, 8)
    before = conv(x).detach()
    codes = conv.int_weight()
    conv.to_integer()
    assert conv.integer_mode
    assert torch.equal(conv.weight.detach(), codes.float())
    assert torch.allclose(conv(x), before, atol=1e-6)
    conv.to_integer()  # idempotent
    assert torch.equal(conv.int_weight(), codes)
    conv.to_float()
    assert torch.allclose(conv(x), before, atol=1e-6)


def test_integer_mode_gradient_is_dloss_dq():
    layer = make_linear(8)
    layer.to_integer()
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    # d/dq of sum(x @ (q*step)^T) = step * sum_b x_b
    expected = layer.step_size * x.sum(0).expand(5, 6)
    assert torch.allclose(layer.weight.grad, expected, atol=1e-6)


def test_flip_bit_changes_exactly_one_bit():
    layer = make_linear(8)
    layer.to_integer()
    before = layer.int_weight().clone()
    for index, bit in [(0, 0), (7, 3), (29, 7)]:
        old = layer.read_bit(index, bit)
        layer.flip_bit(index, bit)
        assert layer.read_bit(index, bit) == 1 - old
        after = layer.int_weight()
        assert bits.hamming_distance(before, after, 8) == 1
        changed = (after != before).view(-1).nonzero().view(-1).tolist()
        assert changed == [index]
        layer.flip_bit(index, bit)
        assert torch.equal(layer.int_weight(), before)


def test_flip_needs_integer_mode():
    layer = make_linear(8)
    with pytest.raises(RuntimeError, match="integer mode"):
        layer.flip_bit(0, 0)


def test_set_int_weight_checks_range():
    layer = make_linear(4)
    layer.to_integer()
    codes = torch.full_like(layer.int_weight(), -8)
    layer.set_int_weight(codes)
    assert layer.int_weight().min() == -8
    with pytest.raises(ValueError):
        layer.set_int_weight(torch.full_like(codes, 8))


def test_binarized_layer():
    layer = QuantLinear(4, 1, bias=False, n_bits=1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.25, 0.0, 0.25]]))
    scale = 0.25  # mean |W|
    assert torch.allclose(layer.quantized_weight(), torch.tensor([[scale, -scale, scale, scale]]))
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    assert torch.allclose(layer.weight.grad, x.sum(0, keepdim=True))  # identity STE
    layer.to_integer()
    assert layer.int_weight().tolist() == [[1, -1, 1, 1]]
    layer.flip_bit(1, 0)
    assert layer.int_weight().tolist() == [[1, 1, 1, 1]]
    assert torch.allclose(layer(x), x.sum(1, keepdim=True) * scale)


def test_public_sign_option_and_zero_codes():
    """use_public_sign: torch.sign (0 for 0) in the float forward and the codes; a 0 code is
    read as -1 by the bits (the public int2bin) and settle_zero_codes writes -1 over it."""
    from models.quantization import settle_zero_codes, use_public_sign

    model = torch.nn.Sequential(QuantLinear(4, 1, bias=False, n_bits=1),
                                QuantLinear(1, 1, bias=False, n_bits=8))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.25, 0.0, 0.25]]))
    plus = model[0].quantized_weight().detach()
    use_public_sign(model)
    assert not model[1].public_sign  # multi-bit layers are untouched
    assert torch.equal(model[0].quantized_weight().detach(),
                       torch.tensor([[0.25, -0.25, 0.0, 0.25]]))
    assert plus[0, 2] == 0.25
    to_integer(model)
    with pytest.raises(RuntimeError, match="integer mode"):
        use_public_sign(model)
    assert model[0].int_weight().tolist() == [[1, -1, 0, 1]]
    assert model[0].read_bit(2, 0) == 1  # read as -1 (bit 1)
    assert settle_zero_codes(model) == 1
    assert model[0].int_weight().tolist() == [[1, -1, -1, 1]]


def test_zero_weights_do_not_give_nan():
    layer = QuantLinear(3, 2, n_bits=8)
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.isfinite(layer(torch.randn(1, 3))).all()
    assert layer.int_weight().abs().sum() == 0


def test_model_to_integer_and_state_dict_entries():
    model = get_model("resnet20_quan", 10, n_bits=4)
    names = [n for n, _ in quant_layers(model)]
    assert names[0] == "conv1" and names[-1] == "linear" and len(names) == 20
    sd = model.state_dict()
    assert sd["conv1.step_size"].shape == ()  # 0-d, as the public code saves it
    assert sd["conv1.b_w"].view(-1).tolist() == [-8.0, 4.0, 2.0, 1.0]
    to_integer(model)
    assert all(layer.integer_mode for _, layer in quant_layers(model))
