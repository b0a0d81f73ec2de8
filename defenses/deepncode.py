"""DeepNcode: every quantized weight stored as a codeword of a code with a minimum Hamming
distance (docs/algorithms.md section 15).

Velčický, Breier, Kovačević, Hou, "DeepNcode: Encoding-Based Protection against Bit-Flip
Attacks on Neural Networks", arXiv 2405.13891 (2024); public code ``velco22/DeepNcode``.

The codes are the six of the public code's tables (``tables_hd_bcw/signbit_tbcw_C<n>_<d>``):
``C7_3``, ``C8_4``, ``C9_4`` for 4-bit weights and ``C12_3``, ``C13_4``, ``C14_4`` for 8-bit
ones (``C<n>_<d>``: ``n``-bit codewords, minimum distance ``d``). Each table is an affine map
of the weight's two's complement bits, ``cw(v) = c0 XOR (bits(v) . G)`` over GF(2), which is
how :data:`CODES` writes it (``c0`` and the rows of ``G``, MSB first); the assignment makes
two values one bit apart at least 4 (4-bit codes) or 9 (8-bit codes) codeword bits apart, the
paper's protection margin.

Stored representation: :meth:`DeepNcode.protect` replaces each protected layer's codes by their
codewords (the layer's ``weight`` then holds the words and its ``bit_format`` is the code's
:class:`CodewordFormat`, so the attacks flip codeword bits and count them); the layer's forward
reads each word as the value of its nearest codeword (the public code's error-correction
tables; a valid word is its own value). :meth:`DeepNcode.check_and_repair` flags every word
that is not a codeword and repairs it: ``repair=zero`` writes the codeword of 0,
``repair=correct`` the nearest codeword.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from models.bits import NumberFormat, bit_layers, int_to_bits

from .base import DeploymentDefense, register_defense

# name: (value bits N, c0, rows of G for the value bits MSB first), codewords MSB first
CODES: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "C7_3": (4, "1111111", ("1111111", "1100101", "0010111", "1001011")),
    "C8_4": (4, "11111111", ("11111111", "01100101", "00010111", "01001011")),
    "C9_4": (4, "111101111", ("111101111", "010111010", "001111100", "000011111")),
    "C12_3": (8, "000000000000", (
        "111111111111", "011111101110", "011001111111", "010110111111",
        "001111011111", "111111000111", "111110101011", "111101111100")),
    "C13_4": (8, "0000000000000", (
        "0111111111111", "1011111101110", "1011001111111", "1010110111111",
        "1001111011111", "1111111000111", "1111110101011", "1111101111100")),
    "C14_4": (8, "00000000000000", (
        "10111111111111", "11011111101110", "11011001111111", "11010110111111",
        "11001111011111", "11111111000111", "11111110101011", "11111101111100")),
}
# code=auto: the code of each layer's bit width with the paper's largest margins
AUTO_CODES = {4: "C9_4", 8: "C14_4"}
REPAIRS = ("zero", "correct")


class Code:
    """One code of :data:`CODES`: ``encode`` (value -> word), the table ``decode`` (word ->
    value of the nearest codeword, ties to the smaller value) and ``valid`` (word -> is a
    codeword), over every ``2**n`` word. Words are unsigned integers, bit 0 = MSB."""

    def __init__(self, name: str):
        if name not in CODES:
            raise ValueError(f"unknown DeepNcode code {name!r}: one of {', '.join(CODES)} "
                             f"(or auto)")
        self.name = name
        self.value_bits, c0, rows = CODES[name]
        self.n = len(c0)
        self.distance = int(name.split("_")[1])
        values = torch.arange(-2 ** (self.value_bits - 1), 2 ** (self.value_bits - 1))
        bits = int_to_bits(values, self.value_bits).to(torch.int64)     # [V, N]
        gen = torch.tensor([[int(c) for c in r] for r in rows])            # [N, n]
        words_bits = (torch.tensor([int(c) for c in c0]) + bits @ gen) % 2  # [V, n]
        weights = 2 ** torch.arange(self.n - 1, -1, -1)
        self.values = values
        self.codewords = (words_bits * weights).sum(1)                   # word of each value
        all_words = torch.arange(2 ** self.n)
        dist = _popcount(all_words.unsqueeze(1) ^ self.codewords.unsqueeze(0))  # [2**n, V]
        nearest = dist.argmin(1)  # first minimum: the smaller value on a tie
        self.decode_table = values[nearest]
        self.valid_table = torch.zeros(2 ** self.n, dtype=torch.bool)
        self.valid_table[self.codewords] = True

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """Words (int64) of integer codes in ``[-2**(N-1), 2**(N-1))``."""
        table = self.codewords.to(codes.device)
        return table[codes.to(torch.int64) + 2 ** (self.value_bits - 1)]

    def decode(self, words: torch.Tensor) -> torch.Tensor:
        return self.decode_table.to(words.device)[words.to(torch.int64)]

    def valid(self, words: torch.Tensor) -> torch.Tensor:
        return self.valid_table.to(words.device)[words.to(torch.int64)]

    def cost(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Codeword bits that differ between the words of two codes (the flips a move costs)."""
        return _popcount(self.encode(before) ^ self.encode(after))


def _popcount(x: torch.Tensor) -> torch.Tensor:
    count = torch.zeros_like(x)
    while bool((x > 0).any()):
        count += x & 1
        x = x >> 1
    return count


@lru_cache(maxsize=None)
def get_code(name: str) -> Code:
    return Code(name)


class CodewordFormat(NumberFormat):
    """Stored words of a :class:`Code`: ``n`` bits, MSB first, held as integer-valued floats;
    a flip's change (the search's first-order factor) is the change of the value the word is
    read as."""

    storage_dtype = torch.float32

    def __init__(self, code: Code):
        self.code = code
        self.n_bits = code.n
        self.name = f"deepncode-{code.name}"
        self.bytes_per_value = (code.n + 7) // 8

    def words(self, values: torch.Tensor) -> torch.Tensor:
        return values.round().to(torch.int64)

    def to_bits(self, values):
        shifts = torch.arange(self.n_bits - 1, -1, -1, device=values.device)
        return ((self.words(values).unsqueeze(-1) >> shifts) & 1).to(torch.uint8)

    def from_bits(self, bits):
        shifts = torch.arange(self.n_bits - 1, -1, -1, device=bits.device)
        return (bits.to(torch.int64) << shifts).sum(-1).to(self.storage_dtype)

    def flip(self, values, bit):
        bit = torch.as_tensor(bit, device=values.device, dtype=torch.int64)
        return (self.words(values) ^ (1 << (self.n_bits - 1 - bit))).to(values.dtype)

    def flip_deltas(self, values, dtype=torch.float32):
        words = self.words(values.reshape(-1)).unsqueeze(1)
        masks = 1 << torch.arange(self.n_bits - 1, -1, -1, device=values.device)
        decode = self.code.decode_table.to(values.device)
        return (decode[words ^ masks] - decode[words]).to(dtype)

    def describe(self, value):
        return int(round(float(value)))


@register_defense
@dataclass
class DeepNcode(DeploymentDefense):
    """DeepNcode (docs/algorithms.md section 15): ``code`` one of :data:`CODES` or ``auto``
    (``C9_4`` for 4-bit layers, ``C14_4`` for 8-bit ones); ``repair`` of a detected word:
    ``zero`` (the codeword of 0) or ``correct`` (the nearest codeword). Layers of other widths
    (or not in integer codes) are refused."""

    name = "deepncode"
    code: str = "auto"
    repair: str = "zero"

    def validate(self) -> None:
        if self.code != "auto" and self.code not in CODES:
            raise ValueError(f"deepncode: code must be auto or one of {', '.join(CODES)}, got "
                             f"{self.code!r}")
        if self.repair not in REPAIRS:
            raise ValueError(f"deepncode: repair must be one of {', '.join(REPAIRS)}, got "
                             f"{self.repair!r}")

    def code_for(self, value_bits: int) -> Code:
        """The code of layers of ``value_bits``-bit codes (ValueError if it has none)."""
        name = AUTO_CODES.get(value_bits) if self.code == "auto" else self.code
        if name is None or CODES[name][0] != value_bits:
            fitting = [c for c, v in CODES.items() if v[0] == value_bits]
            raise ValueError(f"deepncode: code {self.code} does not encode {value_bits}-bit "
                             f"weights (codes for them: {', '.join(fitting) or 'none'})")
        return get_code(name)

    def protect(self, model) -> None:
        """Store every quantized layer's codes as codewords (the layer then reads them back)."""
        from models.quantization import QuantLayer

        layers = bit_layers(model)
        for lname, layer in layers:
            if not isinstance(layer, QuantLayer) or not layer.integer_mode:
                raise ValueError(f"deepncode encodes integer codes of quantized layers; layer "
                                 f"{lname} is {layer.bit_format.name}")
        for lname, layer in layers:
            if getattr(layer, "stored_encoding", None) is None:
                code = self.code_for(layer.n_bits)
                layer.set_stored_encoding(CodewordFormat(code), code.encode, code.decode)

    @torch.no_grad()
    def check_and_repair(self, model) -> int:
        flagged = 0
        for _, layer in bit_layers(model):
            fmt = getattr(layer, "stored_encoding", None)
            if not isinstance(fmt, CodewordFormat):
                continue
            flat = layer.weight.data.view(-1)
            words = fmt.words(flat)
            bad = ~fmt.code.valid(words)
            n_bad = int(bad.sum())
            if n_bad:
                if self.repair == "zero":
                    fix = fmt.code.encode(torch.zeros_like(words[bad]))
                else:
                    fix = fmt.code.encode(fmt.code.decode(words[bad]))
                flat[bad] = fix.to(flat.dtype)
                flagged += n_bad
        return flagged

    def memory_per_weight(self, model) -> tuple[float, float]:
        layers = [layer for _, layer in bit_layers(model)]
        stored = sum(layer.weight.numel() * self.code_for(layer.n_bits).n for layer in layers)
        plain = sum(layer.weight.numel() * layer.n_bits for layer in layers)
        total = sum(layer.weight.numel() for layer in layers)
        return stored / total, plain / total
