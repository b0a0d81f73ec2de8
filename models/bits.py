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
trial flips and their undo for the bit search, :func:`random_flip` (every random draw of a
flip: torch's or the public Python stream, optionally among a fault model's flips), and
:func:`snapshot` / :func:`restore` / :func:`changed_bits` over a whole model. Nothing else
writes or compares bits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import random
    from typing import Callable

    import torch.nn as nn

MIN_BITS = 1
MAX_BITS = 16
# ModelConfig.bits of a float (unquantized) model: plain Conv2d/Linear layers, attacked as
# fp32, bf16 or fp16 (models.formats).
FLOAT_BITS = 32


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
# Number formats: the bits of a stored weight, whatever it is (docs/algorithms.md section 1b)
# ---------------------------------------------------------------------------------------------

class NumberFormat:
    """How one weight is stored: ``n_bits`` bits, MSB first (bit 0 = MSB, as every record says).

    A layer that can be attacked holds its weights *as stored* in its ``weight`` parameter
    (dtype ``storage_dtype``) and names their format in ``bit_format``; the bit search, the
    random flips, the fault models and the Hamming distance see only this interface, never
    the kind of layer. ``bytes_per_value`` is the weight's size in the memory layout the fault
    models use (:mod:`utils.faults`).
    """

    name: str
    n_bits: int
    storage_dtype: torch.dtype
    bytes_per_value: int

    def to_bits(self, values: torch.Tensor) -> torch.Tensor:
        """Bits of stored values, MSB first: shape ``values.shape + (n_bits,)``, uint8."""
        raise NotImplementedError

    def from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Stored values (``storage_dtype``) from bits along the last dimension."""
        raise NotImplementedError

    def flip(self, values: torch.Tensor, bit: torch.Tensor | int) -> torch.Tensor:
        """``values`` with bit ``bit`` (0 = MSB; scalar or one per value) flipped, same dtype."""
        raise NotImplementedError

    def flip_deltas(self, values: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """``[numel, n_bits]`` change of each value when each of its bits flips (the factor of
        the search's first-order score, docs/algorithms.md section 5); may be inf or NaN."""
        raise NotImplementedError

    # dtype of :meth:`first_order_change`; None: the gradient's own dtype
    score_dtype: torch.dtype | None = None

    def first_order_change(self, values: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``[numel, n_bits]`` first-order change of a loss when each bit of each stored value
        flips: ``(v'_k - v) * g`` with ``g = dLoss/dv`` (docs/algorithms.md sections 5 and 1b),
        in ``score_dtype`` (integer codes: the gradient's dtype, ``(1 - 2*bit_k) * base[k] * g``;
        floats: float64, where a flip to a huge value times the gradient stays finite)."""
        dtype = self.score_dtype or grad.dtype
        return self.flip_deltas(values.reshape(-1), dtype=dtype) * grad.reshape(-1, 1).to(dtype)

    def hamming(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """Number of differing bits between two tensors of stored values (NaN-safe)."""
        return int((self.to_bits(a) != self.to_bits(b)).sum())

    def describe(self, value: float) -> float | int | str:
        """A stored value as the records write it (JSON-safe: inf and NaN become strings)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def __eq__(self, other) -> bool:
        return isinstance(other, NumberFormat) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class IntFormat(NumberFormat):
    """N-bit two's complement integer codes (N = 1: binarized, bit 1 means -1), held as
    integer-valued floats (the quantized layers' integer mode). The layout of this module's
    first half; ``bytes_per_value`` is the smallest whole number of bytes holding N bits."""

    storage_dtype = torch.float32

    def __init__(self, n_bits: int):
        self.n_bits = check_bits(n_bits)
        self.name = f"int{n_bits}"
        self.bytes_per_value = (n_bits + 7) // 8

    def codes(self, values: torch.Tensor) -> torch.Tensor:
        return values.round().to(torch.int64)

    def to_bits(self, values):
        return int_to_bits(self.codes(values), self.n_bits)

    def from_bits(self, bits):
        return bits_to_int(bits, self.n_bits).to(self.storage_dtype)

    def flip(self, values, bit):
        return flip_bits(self.codes(values), bit, self.n_bits).to(values.dtype)

    def flip_deltas(self, values, dtype=torch.float32):
        b = int_to_bits(self.codes(values).reshape(-1), self.n_bits).to(dtype)
        base = bit_values(self.n_bits, dtype=dtype, device=values.device)
        return (1.0 - 2.0 * b) * base

    def describe(self, value):
        return int(round(float(value)))


class FloatFormat(NumberFormat):
    """IEEE-754 floats: sign, exponent, mantissa, MSB first (fp32: 1+8+23 bits, bf16: 1+8+7,
    fp16: 1+5+10). The weight tensor has the format's own dtype, so every bit pattern (inf,
    NaN payloads, subnormals) is held exactly; flips act on the pattern through an integer
    view of the same width."""

    _SPECS = {"fp32": (torch.float32, torch.int32, 32),
              "bf16": (torch.bfloat16, torch.int16, 16),
              "fp16": (torch.float16, torch.int16, 16)}
    score_dtype = torch.float64

    def __init__(self, name: str):
        if name not in self._SPECS:
            raise ValueError(f"unknown float format {name!r}: one of {', '.join(self._SPECS)}")
        self.name = name
        self.storage_dtype, self._int_dtype, self.n_bits = self._SPECS[name]
        self.bytes_per_value = self.n_bits // 8
        # Mask of bit k (0 = MSB) as a signed integer of the pattern's width.
        masks = [1 << (self.n_bits - 1 - k) for k in range(self.n_bits)]
        masks[0] -= 1 << self.n_bits  # the sign bit as a negative signed number
        self._masks = torch.tensor(masks, dtype=torch.int64)

    def patterns(self, values: torch.Tensor) -> torch.Tensor:
        """The raw bit patterns as non-negative int64 (0 .. 2**n_bits - 1)."""
        raw = values.to(self.storage_dtype).contiguous().view(self._int_dtype).to(torch.int64)
        return torch.remainder(raw, 1 << self.n_bits)

    def from_patterns(self, patterns: torch.Tensor) -> torch.Tensor:
        half = 1 << (self.n_bits - 1)
        signed = torch.where(patterns >= half, patterns - (1 << self.n_bits), patterns)
        return signed.to(self._int_dtype).view(self.storage_dtype)

    def to_bits(self, values):
        shifts = torch.arange(self.n_bits - 1, -1, -1, device=values.device)
        return ((self.patterns(values).unsqueeze(-1) >> shifts) & 1).to(torch.uint8)

    def from_bits(self, bits):
        shifts = torch.arange(self.n_bits - 1, -1, -1, device=bits.device)
        return self.from_patterns((bits.to(torch.int64) << shifts).sum(-1))

    def flip(self, values, bit):
        bit = torch.as_tensor(bit, device=values.device, dtype=torch.int64)
        masks = self._masks.to(values.device)[bit]
        raw = values.to(self.storage_dtype).contiguous().view(self._int_dtype)
        flipped = torch.bitwise_xor(raw, masks.to(self._int_dtype)).view(self.storage_dtype)
        return flipped.to(values.dtype)

    def flip_deltas(self, values, dtype=torch.float64):
        raw = values.reshape(-1).to(self.storage_dtype).contiguous().view(self._int_dtype)
        masks = self._masks.to(device=values.device, dtype=self._int_dtype)
        flipped = torch.bitwise_xor(raw.unsqueeze(1), masks).view(self.storage_dtype)
        # float64 keeps (huge value) * (gradient) finite where float32 would overflow
        wide = dtype if dtype == torch.float64 else torch.float64
        deltas = flipped.to(wide) - values.reshape(-1, 1).to(wide)
        return deltas.to(dtype)

    def describe(self, value):
        value = float(value)
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return value


# The float formats, the number formats by name, and the formats an attack can run in
# (``--format`` of the attack scripts: "trained" = as the model was trained, "torch-int8" =
# PyTorch's per-channel int8, docs/algorithms.md section 1b).
FLOAT_FORMAT_NAMES = tuple(FloatFormat._SPECS)
FORMAT_NAMES = ("int8",) + FLOAT_FORMAT_NAMES
ATTACK_FORMATS = ("trained",) + FLOAT_FORMAT_NAMES + ("torch-int8",)


def get_format(name: str) -> NumberFormat:
    """A format by name: ``intN`` (N = 1..16, two's complement), ``fp32``, ``bf16``, ``fp16``."""
    if name in FloatFormat._SPECS:
        return FloatFormat(name)
    if name.startswith("int") and name[3:].isdigit():
        return IntFormat(int(name[3:]))
    raise ValueError(f"unknown number format {name!r}: intN (N = 1..16), fp32, bf16 or fp16")


def weight_grad(layer) -> torch.Tensor | None:
    """``dLoss/d(stored value)`` of a layer at full precision: the float32 gradient a bf16/fp16
    layer keeps (its ``full_grad``) when there is one, else ``weight.grad``."""
    full = getattr(layer, "full_grad", None)
    return full if full is not None else layer.weight.grad


def clear_grad(layer) -> None:
    """Forget a layer's gradients before the next backward (both of :func:`weight_grad`'s)."""
    layer.weight.grad = None
    if getattr(layer, "full_grad", None) is not None:
        layer.full_grad = None


def bit_layers(model: "nn.Module") -> list[tuple[str, "nn.Module"]]:
    """``(name, module)`` of every layer of ``model`` whose weights can be attacked: modules
    with a ``bit_format`` (quantized layers, per-channel int8 layers, float-format layers),
    in registration order: the order of the search and of the memory layout."""
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "bit_format", None) is not None]


class StoredWeights:
    """Mixin of the layers whose ``weight`` holds stored values of ``bit_format`` at all times
    (per-channel int8 and float-format layers, :mod:`models.formats`): always ready to be
    attacked (``integer_mode`` is True, the name the quantized layers use for that state)."""

    integer_mode = True
    bit_format: NumberFormat
    # dLoss/d(stored value) in float32 when the weights' own dtype is narrower (bf16, fp16):
    # set by the layer's forward hook at each backward, read by weight_grad()
    full_grad: torch.Tensor | None = None

    @torch.no_grad()
    def flip_bit(self, index, bit) -> None:
        """Flip bit ``bit`` (0 = MSB) of the weight(s) at flat ``index`` (ints or tensors)."""
        flat = self.weight.data.view(-1)
        index = torch.as_tensor(index, device=flat.device, dtype=torch.int64)
        flat[index] = self.bit_format.flip(flat[index], bit)

    def read_bit(self, index: int, bit: int) -> int:
        """Bit ``bit`` (0 = MSB) of the weight at flat index ``index``."""
        return int(self.bit_format.to_bits(self.weight.detach().reshape(-1)[index])[bit])


# ---------------------------------------------------------------------------------------------
# Bits of quantized layers in integer mode, and of whole models
# ---------------------------------------------------------------------------------------------

@dataclass
class Flip:
    """One flipped bit: layer name, flat weight index, bit (0 = MSB), stored value before and
    after (an integer code, or a float; inf and NaN written as strings)."""

    layer: str
    index: int
    bit: int
    before: int | float | str
    after: int | float | str

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
    """Flip ``bits`` of the stored weights at flat ``indices`` with tensor ops only (nothing
    read back to the host: the bit search's inner loop); returns the values before, for
    :func:`restore_codes`."""
    flat = layer.weight.data.view(-1)
    saved = flat[indices].clone()
    flat[indices] = layer.bit_format.flip(saved, bits).to(flat.dtype)
    return saved


def flip_and_record(name: str, layer, index: int, bit: int) -> Flip:
    """Flip one bit of ``layer`` (through its own ``flip_bit``) and return the :class:`Flip`."""
    fmt = layer.bit_format
    flat = layer.weight.data.view(-1)
    before = fmt.describe(flat[index])
    layer.flip_bit(index, bit)
    return Flip(name, index, bit, before, fmt.describe(flat[index]))


def msb_index(lsb_position: int, n_bits: int) -> int:
    """Our bit index (0 = MSB) of the bit the public code numbers ``lsb_position`` from the LSB
    (``position = N - 1 - index``, docs/algorithms.md section 1); its own inverse."""
    return n_bits - 1 - lsb_position


def read_value(layer, index: int) -> int | float | str:
    """The stored value at flat ``index`` as its bits read it (each through the layer's
    ``read_bit``), written as the records write it: the stored value itself, except a binarized
    0 (:func:`models.quantization.use_public_sign`), which reads as -1 like the public code's
    bit conversion."""
    fmt = layer.bit_format
    bits = torch.tensor([layer.read_bit(index, k) for k in range(fmt.n_bits)], dtype=torch.uint8)
    return fmt.describe(fmt.from_bits(bits))


def random_flip(model: "nn.Module", generator: torch.Generator | None = None, *,
                python_random: "random.Random | None" = None,
                admissible: "Callable[[str, nn.Module], torch.Tensor] | None" = None
                ) -> Flip | None:
    """Flip one bit chosen uniformly: a layer, a weight in it, a bit (docs/algorithms.md
    section 6), and return it. The one random draw of every random flip:

    - ``generator`` (a ``torch.Generator``): a layer, a weight index, a bit (0 = MSB), one
      ``torch.randint`` each;
    - ``python_random`` (a ``random.Random``): the public ``random_flip_one_bit``'s draws,
      ``random.choice`` of a layer name, of a weight index, of a bit counted from the LSB
      (:func:`msb_index`); the flip's ``before`` is the value as its bits read it
      (:func:`read_value`);
    - ``admissible(name, layer)`` (with ``generator``): the ``[numel, n_bits]`` bool mask of the
      flips a fault model admits (docs/algorithms.md section 5b); a layer is drawn among those
      with an admissible flip, then one of its admissible (weight, bit) pairs: the
      unconstrained draw's distribution restricted to the admissible flips. None when nothing
      is admissible.
    """
    layers = bit_layers(model)
    if python_random is not None:
        if admissible is not None:
            raise ValueError("the public random stream draws among all bits: it cannot be "
                             "combined with a fault model")
        name = python_random.choice([n for n, _ in layers])
        layer = dict(layers)[name]
        index = python_random.choice(range(layer.weight.numel()))
        n_bits = layer.bit_format.n_bits
        bit = msb_index(python_random.choice(range(n_bits)), n_bits)
        before = read_value(layer, index)
        return replace(flip_and_record(name, layer, index, bit), before=before)
    if generator is None:
        raise ValueError("random_flip draws from a torch.Generator or a random.Random: "
                         "give generator or python_random")
    if admissible is not None:
        options = []
        for name, layer in layers:
            allowed = admissible(name, layer).reshape(-1).nonzero().view(-1)
            if len(allowed):
                options.append((name, layer, allowed))
        if not options:
            return None
        name, layer, allowed = options[int(torch.randint(len(options), (1,),
                                                         generator=generator))]
        pick = int(allowed[int(torch.randint(len(allowed), (1,), generator=generator))])
        index, bit = divmod(pick, layer.bit_format.n_bits)
        return flip_and_record(name, layer, index, bit)
    i = int(torch.randint(len(layers), (1,), generator=generator))
    name, layer = layers[i]
    index = int(torch.randint(layer.weight.numel(), (1,), generator=generator))
    bit = int(torch.randint(layer.bit_format.n_bits, (1,), generator=generator))
    return flip_and_record(name, layer, index, bit)


def format_label(model: "nn.Module") -> str:
    """The number format(s) of the model's attacked weights as records name them, e.g. ``int8``
    (``int1+int8`` for a model mixing formats)."""
    return "+".join(sorted({layer.bit_format.name for _, layer in bit_layers(model)}))


def snapshot(model: "nn.Module") -> dict[str, torch.Tensor]:
    """Copy of every attackable layer's stored weights (to restore or to compare later)."""
    return {name: layer.weight.detach().clone() for name, layer in bit_layers(model)}


@torch.no_grad()
def restore(model: "nn.Module", saved: dict[str, torch.Tensor]) -> None:
    """Write back the weights saved by :func:`snapshot` (undoes every flip since)."""
    for name, layer in bit_layers(model):
        layer.weight.copy_(saved[name])


def changed_bits(model: "nn.Module", saved: dict[str, torch.Tensor]) -> int:
    """Number of bits that differ between the model's stored weights and a :func:`snapshot`
    (the Hamming distance of the whole model's weights)."""
    total = 0
    for name, layer in bit_layers(model):
        now, then = layer.weight.detach(), saved[name]
        if isinstance(layer.bit_format, IntFormat):
            now, then = now.round(), then.round()
        changed = now != then  # NaN != NaN: counted by the bits below, 0 if the same pattern
        if bool(changed.any()):
            total += layer.bit_format.hamming(now[changed], then[changed])
    return total
