"""Bit-level representation of quantized weights (docs/algorithms.md section 1).

One home for everything that maps integer weight codes to bits and back, so that training,
the attacks and the tests agree on one layout:

- N >= 2: N-bit two's complement, bit k (k = 0 is the MSB) has value ``base[k]`` with
  ``base = [-2**(N-1), 2**(N-2), ..., 2, 1]`` and ``q = sum_k bit_k * base[k]``.
- N == 1 (binarized layers): the code is +1 or -1; its single bit is 1 for -1, so
  ``q = 1 + bit_0 * base[0]`` with ``base = [-2]``. Flipping the bit negates the weight.

Both cases are written ``q = offset + sum_k bit_k * base[k]`` (offset 0 for N >= 2, 1 for N == 1),
so the first-order change of a loss from flipping bit k of a weight with gradient g is
``(1 - 2*bit_k) * base[k] * g`` for every N (docs/algorithms.md section 5).

The second half acts on quantized layers in integer mode (their weight tensor holds the codes):
trial flips and their undo for the bit search, :func:`random_flip`, and :func:`snapshot` /
:func:`restore` / :func:`changed_bits` over a whole model. Nothing else writes or compares bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import torch.nn as nn

MIN_BITS = 1
MAX_BITS = 16


def check_bits(n_bits: int) -> int:
    """Return ``n_bits`` if it is a supported width (1 = binarized, 2..16), else raise ValueError."""
    if not isinstance(n_bits, int) or not MIN_BITS <= n_bits <= MAX_BITS:
        raise ValueError(f"bit width must be an integer from {MIN_BITS} to {MAX_BITS} "
                         f"(1 = binarized), got {n_bits!r}")
    return n_bits


def code_range(n_bits: int) -> tuple[int, int]:
    """Smallest and largest integer code a weight can hold (flips included)."""
    check_bits(n_bits)
    if n_bits == 1:
        return -1, 1
    return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1


def half_levels(n_bits: int) -> int:
    """Largest code produced by quantization, ``(2**N - 2) / 2`` (127 for N=8, 7 for N=4)."""
    check_bits(n_bits)
    return 1 if n_bits == 1 else 2 ** (n_bits - 1) - 1


def bit_offset(n_bits: int) -> int:
    """Constant term of the code: 1 for binarized layers, 0 otherwise."""
    return 1 if check_bits(n_bits) == 1 else 0


def bit_values(n_bits: int, dtype=torch.int64, device=None) -> torch.Tensor:
    """The value of each bit, MSB first: ``[-2**(N-1), 2**(N-2), ..., 1]`` (``[-2]`` for N=1)."""
    check_bits(n_bits)
    if n_bits == 1:
        return torch.tensor([-2], dtype=dtype, device=device)
    values = [2 ** (n_bits - 1 - k) for k in range(n_bits)]
    values[0] = -values[0]
    return torch.tensor(values, dtype=dtype, device=device)


def int_to_bits(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Bits of integer codes, MSB first: shape ``codes.shape + (N,)``, dtype uint8."""
    check_bits(n_bits)
    q = codes.to(torch.int64)
    if n_bits == 1:
        return (q < 0).to(torch.uint8).unsqueeze(-1)
    unsigned = torch.remainder(q, 2 ** n_bits)  # two's complement as an unsigned N-bit number
    shifts = torch.arange(n_bits - 1, -1, -1, device=q.device)
    return ((unsigned.unsqueeze(-1) >> shifts) & 1).to(torch.uint8)


def bits_to_int(bits: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Inverse of :func:`int_to_bits`: int64 codes from bits along the last dimension."""
    base = bit_values(n_bits, device=bits.device)
    return bit_offset(n_bits) + (bits.to(torch.int64) * base).sum(-1)


def flip_delta(codes: torch.Tensor, bit: torch.Tensor | int, n_bits: int) -> torch.Tensor:
    """Change of each code when its bit ``bit`` is flipped: ``(1 - 2*bit_k) * base[k]``."""
    base = bit_values(n_bits, device=codes.device)
    bit = torch.as_tensor(bit, device=codes.device, dtype=torch.int64)
    current = int_to_bits(codes, n_bits).gather(-1, bit.expand(codes.shape).unsqueeze(-1))
    return (1 - 2 * current.squeeze(-1).to(torch.int64)) * base[bit]


def flip_bits(codes: torch.Tensor, bit: torch.Tensor | int, n_bits: int) -> torch.Tensor:
    """Codes with bit ``bit`` (0 = MSB; scalar or one per code) flipped, same dtype as ``codes``."""
    return (codes.to(torch.int64) + flip_delta(codes, bit, n_bits)).to(codes.dtype)


def hamming_distance(codes_a: torch.Tensor, codes_b: torch.Tensor, n_bits: int) -> int:
    """Number of differing bits between two tensors of integer codes."""
    return int((int_to_bits(codes_a, n_bits) != int_to_bits(codes_b, n_bits)).sum())


# ---------------------------------------------------------------------------------------------
# Bits of quantized layers in integer mode, and of whole models
# ---------------------------------------------------------------------------------------------

@dataclass
class Flip:
    """One flipped bit: layer name, flat weight index, bit (0 = MSB), code before and after."""

    layer: str
    index: int
    bit: int
    before: int
    after: int

    def as_dict(self) -> dict:
        return {"layer": self.layer, "index": self.index, "bit": self.bit,
                "before": self.before, "after": self.after}


def save_codes(layer, indices: torch.Tensor) -> torch.Tensor:
    """The stored codes of ``layer`` at flat ``indices`` (to undo a trial with :func:`restore_codes`)."""
    return layer.weight.data.view(-1)[indices].clone()


def restore_codes(layer, indices: torch.Tensor, saved: torch.Tensor) -> None:
    """Write back codes saved by :func:`save_codes` or :func:`trial_flip`."""
    layer.weight.data.view(-1)[indices] = saved


def trial_flip(layer, indices: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Flip ``bits`` of the codes at flat ``indices`` with tensor ops only (nothing read back to
    the host: the bit search's inner loop); returns the codes before, for :func:`restore_codes`."""
    flat = layer.weight.data.view(-1)
    saved = flat[indices].clone()
    flat[indices] = flip_bits(saved.round().to(torch.int64), bits, layer.n_bits).to(flat.dtype)
    return saved


def random_flip(model: "nn.Module", generator: torch.Generator) -> Flip:
    """Flip one bit chosen uniformly: a quantized layer, a weight in it, a bit (docs/algorithms.md section 6)."""
    from .quantization import quant_layers

    layers = quant_layers(model)
    i = int(torch.randint(len(layers), (1,), generator=generator))
    name, layer = layers[i]
    index = int(torch.randint(layer.weight.numel(), (1,), generator=generator))
    bit = int(torch.randint(layer.n_bits, (1,), generator=generator))
    before = int(layer.weight.data.view(-1)[index].round())
    layer.flip_bit(index, bit)
    return Flip(name, index, bit, before, int(layer.weight.data.view(-1)[index].round()))


def snapshot(model: "nn.Module") -> dict[str, torch.Tensor]:
    """Copy of every quantized layer's integer codes (to restore or to compare later)."""
    from .quantization import quant_layers

    return {name: layer.weight.detach().clone() for name, layer in quant_layers(model)}


@torch.no_grad()
def restore(model: "nn.Module", saved: dict[str, torch.Tensor]) -> None:
    """Write back the codes saved by :func:`snapshot` (undoes every flip since)."""
    from .quantization import quant_layers

    for name, layer in quant_layers(model):
        layer.weight.copy_(saved[name])


def changed_bits(model: "nn.Module", saved: dict[str, torch.Tensor]) -> int:
    """Number of bits that differ between the model's codes and a :func:`snapshot` (the
    Hamming distance of the whole model's weights)."""
    from .quantization import quant_layers

    total = 0
    for name, layer in quant_layers(model):
        now = layer.weight.detach().round().to(torch.int64)
        then = saved[name].round().to(torch.int64)
        changed = now != then
        if bool(changed.any()):
            total += hamming_distance(now[changed], then[changed], layer.n_bits)
    return total
