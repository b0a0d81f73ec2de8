"""Bit layout (docs/algorithms.md section 1): two's complement round trips and flips for every code."""

import pytest
import torch

from models import bits


def reference_bits(q: int, n: int) -> list[int]:
    """Slow obvious two's complement, MSB first."""
    u = q % (1 << n)
    return [(u >> (n - 1 - k)) & 1 for k in range(n)]


def test_bit_values():
    assert bits.bit_values(8).tolist() == [-128, 64, 32, 16, 8, 4, 2, 1]
    assert bits.bit_values(4).tolist() == [-8, 4, 2, 1]
    assert bits.bit_values(1).tolist() == [-2]
    assert bits.half_levels(8) == 127 and bits.half_levels(4) == 7
    assert bits.code_range(8) == (-128, 127)


@pytest.mark.parametrize("n", list(range(2, 17)))
def test_round_trip_every_code(n):
    lo, hi = bits.code_range(n)
    codes = torch.arange(lo, hi + 1)
    b = bits.int_to_bits(codes, n)
    assert b.shape == (len(codes), n)
    assert torch.equal(bits.bits_to_int(b, n), codes)
    for q in (lo, -1, 0, 1, hi):
        assert bits.int_to_bits(torch.tensor(q), n).tolist() == reference_bits(q, n)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_flip_each_bit_of_each_code(n):
    lo, hi = bits.code_range(n)
    codes = torch.arange(lo, hi + 1)
    for k in range(n):
        flipped = bits.flip_bits(codes, k, n)
        for q, f in zip(codes.tolist(), flipped.tolist()):
            expected_bits = reference_bits(q, n)
            expected_bits[k] ^= 1
            expected = sum(b << (n - 1 - i) for i, b in enumerate(expected_bits))
            if expected_bits[0]:
                expected -= 1 << n
            assert f == expected
        # flipping twice restores; exactly one bit differs
        assert torch.equal(bits.flip_bits(flipped, k, n), codes)
        assert (bits.int_to_bits(flipped, n) != bits.int_to_bits(codes, n)).sum(-1).eq(1).all()


def test_msb_flip_can_reach_minus_two_to_the_n_minus_one():
    assert bits.flip_bits(torch.tensor(0), 0, 8).item() == -128
    assert bits.flip_bits(torch.tensor(127), 0, 8).item() == -1


def test_binarized_bits():
    codes = torch.tensor([1, -1])
    assert bits.int_to_bits(codes, 1).view(-1).tolist() == [0, 1]
    assert torch.equal(bits.bits_to_int(bits.int_to_bits(codes, 1), 1), codes)
    assert bits.flip_bits(codes, 0, 1).tolist() == [-1, 1]


def test_flip_delta_is_first_order_formula():
    codes = torch.tensor([5, -3, 127, -128])
    base = bits.bit_values(8)
    for k in range(8):
        b = bits.int_to_bits(codes, 8)[:, k].long()
        assert torch.equal(bits.flip_delta(codes, k, 8), (1 - 2 * b) * base[k])


def test_hamming_distance():
    a = torch.tensor([0, 1, -1])
    b = torch.tensor([0, 3, 0])
    assert bits.hamming_distance(a, b, 8) == 1 + 8


@pytest.mark.parametrize("n", [0, 17, 2.5])
def test_bad_widths(n):
    with pytest.raises(ValueError):
        bits.check_bits(n)
