"""The DeepNcode-aware bit-flip attack: every weight it changes moves from one valid codeword to
another, paying the code's distance in flipped bits (docs/algorithms.md section 15).

Each iteration is BFA's progressive search (:class:`attacks.bfa.BFA`) over the weights' codes
(the values the words are read as): the encoded layers are opened to their codes for the
search, the codes it changes are written back as codewords, and each change ``z -> y`` is
recorded as the flips of the codeword bits where ``cw(z)`` and ``cw(y)`` differ, one
:class:`~models.bits.Flip` per bit, in MSB-first order. So no word is ever invalid (the check
flags nothing), and ``bits_flipped`` counts the stored bits the attack needs: DeepNcode's own
evaluation (its BFA runs on the plain codes, each changed weight costing the Hamming distance
of the two codewords, ``hd_1`` to ``hd_3`` of its ``attack_bfa.py``). ``weight_bits_flipped``
is what the same changes cost without the code (the Hamming distance of the two N-bit codes),
their ratio the protection margin.

``max_cost``: a cost-aware attacker. Instead of the codes' bits, the search's candidates for a
weight ``z`` are its *moves*: every value ``y`` whose codeword is at most ``max_cost`` bits from
``cw(z)`` (:class:`MoveFormat`; e.g. ``max_cost`` = the code's distance: the cheapest moves, 4
bits for ``C14_4``, which reach values far from ``z``), scored by the same first-order gain
``(y - z) * dLoss/dz`` and tried like bit flips; the change is recorded as its codeword flips.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch

from models.bits import Flip, NumberFormat, bit_layers, hamming_distance
from utils.bitsearch import SearchStep

from .base import NotApplicable, Protocol, register_attack
from .bfa import BFA, MAX_BITS_PER_LAYER, BFAResult, flip_campaign


def _encoded_layers(model) -> dict:
    from defenses.deepncode import CodewordFormat

    layers = {name: layer for name, layer in bit_layers(model)
              if isinstance(getattr(layer, "stored_encoding", None), CodewordFormat)}
    if not layers:
        raise NotApplicable("attack 'deepncode_aware' needs a model defended by deepncode "
                            "(--defense deepncode:...)")
    return layers


class MoveFormat(NumberFormat):
    """The moves of a weight's code ``z`` to every value ``y`` whose codeword is at most
    ``max_cost`` bits from ``cw(z)``, as the search's "bits": bit ``k`` of ``z`` is its ``k``-th
    move (in increasing ``y``; a weight with fewer moves pads with ``y = z``, no change)."""

    storage_dtype = torch.float32

    def __init__(self, code, max_cost: int):
        half = 2 ** (code.value_bits - 1)
        values = torch.arange(-half, half)
        z, y = torch.meshgrid(values, values, indexing="ij")
        cost = code.cost(z, y)
        allowed = (cost > 0) & (cost <= max_cost)
        self.n_bits = max(1, int(allowed.sum(1).max()))
        self.targets = values.view(-1, 1).repeat(1, self.n_bits)
        for i in range(len(values)):
            moves = values[allowed[i]]
            self.targets[i, :len(moves)] = moves
        self.half = half
        self.name = f"{code.name}-moves{max_cost}"
        self.bytes_per_value = 1

    def codes(self, values: torch.Tensor) -> torch.Tensor:
        return values.round().to(torch.int64)

    def flip(self, values, bit):
        bit = torch.as_tensor(bit, device=values.device, dtype=torch.int64)
        targets = self.targets.to(values.device)
        return targets[self.codes(values) + self.half, bit].to(values.dtype)

    def flip_deltas(self, values, dtype=torch.float32):
        codes = self.codes(values.reshape(-1))
        return (self.targets.to(values.device)[codes + self.half] - codes.unsqueeze(1)).to(dtype)

    def describe(self, value):
        return int(round(float(value)))


def _round(values: torch.Tensor) -> torch.Tensor:
    return values.round()


@contextmanager
def codes_view(layers: dict, max_cost: int | None = None):
    """The encoded layers hold their codes inside the block (as plain N-bit layers, or with
    ``max_cost`` as the :class:`MoveFormat` of their code); their codes are then stored back as
    codewords (the one place the attack writes words)."""
    saved = {}
    with torch.no_grad():
        for name, layer in layers.items():
            codes = layer.int_weight()
            saved[name] = (layer.stored_encoding, layer._encode, layer._decode)
            layer.stored_encoding = None
            if max_cost is not None:
                layer.stored_encoding = _move_format(saved[name][0].code, max_cost)
                layer._encode = layer._decode = _round
            layer.weight.copy_(codes.to(layer.weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                fmt, encode, decode = saved[name]
                codes = layer.int_weight()
                layer.stored_encoding, layer._encode, layer._decode = fmt, encode, decode
                layer.weight.copy_(encode(codes).to(layer.weight.dtype))


@lru_cache(maxsize=None)
def _move_format(code, max_cost: int) -> MoveFormat:
    return MoveFormat(code, max_cost)


@register_attack
class DeepNcodeAware(BFA):
    """BFA whose every change is a codeword-to-codeword move (module docstring).

    Args: as :class:`attacks.bfa.BFA`, on a model whose layers DeepNcode protects, and
    ``max_cost``: None (the codes' bit flips) or the most codeword bits of one move.
    """

    name = "deepncode_aware"
    PARAMS = {"k_top": (), "max_cost": ()}
    noun = "DeepNcode-aware BFA runs"
    results_dir = "attack_deepncode_aware"

    def __init__(self, model, output, k_top: int | None = None,
                 max_bits_per_layer: int | None = MAX_BITS_PER_LAYER,
                 max_cost: int | None = None, fault=None, eval_model=None, **campaign):
        if fault is not None and not fault.unconstrained:
            raise NotApplicable("attack 'deepncode_aware' moves whole codewords: it takes no "
                                "fault model")
        if max_cost is not None and (isinstance(max_cost, bool) or not isinstance(max_cost, int)
                                     or max_cost < 1):
            raise ValueError(f"attack 'deepncode_aware': max_cost must be a positive integer "
                             f"(codeword bits of one move), got {max_cost!r}")
        self.encoded = _encoded_layers(model)
        self.max_cost = max_cost
        super().__init__(model, output, k_top=k_top, max_bits_per_layer=max_bits_per_layer,
                         eval_model=eval_model, **campaign)
        self.weight_bits = 0

    @classmethod
    def from_target(cls, target, data, protocol: Protocol, **params) -> "DeepNcodeAware":
        cls.check_params(params)
        return cls(target.model, target.output, **params,
                   **flip_campaign(target, data, protocol))

    def settings(self) -> dict:
        return {"k_top": self.k_top, "max_cost": self.max_cost}

    def run(self, *args, **kwargs) -> BFAResult:
        self.weight_bits = 0
        return super().run(*args, **kwargs)

    def run_item(self, item) -> dict:
        record = super().run_item(item)
        record["weight_bits_flipped"] = self.weight_bits
        return record

    def step(self, x: torch.Tensor, y: torch.Tensor) -> SearchStep:
        """BFA's iteration on the codes; each changed code becomes its codeword flips."""
        with codes_view(self.encoded, self.max_cost):
            found = super().step(x, y)
        flips = []
        for f in found.flips:
            fmt = self.encoded[f.layer].stored_encoding
            word, target = (int(fmt.code.encode(torch.tensor(v))) for v in (f.before, f.after))
            for k in range(fmt.n_bits):
                mask = 1 << (fmt.n_bits - 1 - k)
                if (word ^ target) & mask:
                    flips.append(Flip(f.layer, f.index, k, word, word ^ mask))
                    word ^= mask
            self.weight_bits += hamming_distance(torch.tensor(f.before), torch.tensor(f.after),
                                                 fmt.code.value_bits)
        return SearchStep(flips, found.loss_before, found.loss_after, found.all_admissible,
                          found.bits_per_layer)
