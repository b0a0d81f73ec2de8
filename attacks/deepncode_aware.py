"""The DeepNcode-aware bit-flip attack: every weight it changes moves from one valid codeword to
another, paying the code's distance in flipped bits (docs/algorithms.md section 14).

Each iteration is BFA's progressive search (:class:`attacks.bfa.BFA`) over the weights' codes
(the values the words are read as): the encoded layers are opened to their codes for the
search, the codes it changes are written back as codewords, and each change ``z -> y`` is
recorded as the flips of the codeword bits where ``cw(z)`` and ``cw(y)`` differ, one
:class:`~models.bits.Flip` per bit, in MSB-first order. So no word is ever invalid (the check
flags nothing), and ``bits_flipped`` counts the stored bits the attack needs: DeepNcode's own
evaluation (its BFA runs on the plain codes, each changed weight costing the Hamming distance
of the two codewords, ``hd_1`` to ``hd_3`` of its ``attack_bfa.py``). ``weight_bits_flipped``
is what the same changes cost without the code, their ratio the protection margin.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from models.bits import Flip, bit_layers
from utils.bitsearch import SearchStep

from .base import Protocol, check_params, register_attack
from .bfa import BFA, MAX_BITS_PER_LAYER, BFAResult, flip_campaign, plan_repetitions


def _encoded_layers(model) -> dict:
    from defenses.deepncode import CodewordFormat

    layers = {name: layer for name, layer in bit_layers(model)
              if isinstance(getattr(layer, "stored_encoding", None), CodewordFormat)}
    if not layers:
        raise ValueError("attack 'deepncode_aware' needs a model defended by deepncode "
                         "(--defense deepncode:...)")
    return layers


@contextmanager
def codes_view(layers: dict):
    """The encoded layers hold their codes (as plain N-bit layers) inside the block; their
    codes are then stored back as codewords (the one place the attack writes words)."""
    saved = {}
    with torch.no_grad():
        for name, layer in layers.items():
            codes = layer.int_weight()
            saved[name] = (layer.stored_encoding, layer._encode, layer._decode)
            layer.stored_encoding = None
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


@register_attack
class DeepNcodeAware(BFA):
    """BFA whose every change is a codeword-to-codeword move (module docstring).

    Args: as :class:`attacks.bfa.BFA`, on a model whose layers DeepNcode protects.
    """

    name = "deepncode_aware"
    noun = "DeepNcode-aware BFA runs"
    results_dir = "attack_deepncode_aware"

    def __init__(self, model, output, k_top: int | None = None,
                 max_bits_per_layer: int | None = MAX_BITS_PER_LAYER, fault=None,
                 eval_model=None, **campaign):
        if fault is not None and not fault.unconstrained:
            raise ValueError("attack 'deepncode_aware' moves whole codewords: it takes no "
                             "fault model")
        self.encoded = _encoded_layers(model)
        super().__init__(model, output, k_top=k_top, max_bits_per_layer=max_bits_per_layer,
                         eval_model=eval_model, **campaign)
        self.weight_bits = 0

    @classmethod
    def from_target(cls, target, data, protocol: Protocol, **params) -> "DeepNcodeAware":
        check_params(cls.name, params, {"k_top": ()})
        return cls(target.model, target.output, **params,
                   **flip_campaign(target, data, protocol))

    def plan(self, protocol: Protocol) -> list:
        return plan_repetitions(protocol.bfa_reps, protocol.seed)

    def settings(self) -> dict:
        return {"k_top": self.k_top}

    def run(self, *args, **kwargs) -> BFAResult:
        self.weight_bits = 0
        return super().run(*args, **kwargs)

    def run_item(self, item) -> dict:
        record = super().run_item(item)
        record["weight_bits_flipped"] = self.weight_bits
        return record

    def step(self, x: torch.Tensor, y: torch.Tensor) -> SearchStep:
        """BFA's iteration on the codes; each changed code becomes its codeword flips."""
        with codes_view(self.encoded):
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
        self.weight_bits += len(found.flips)
        return SearchStep(flips, found.loss_before, found.loss_after, found.all_admissible,
                          found.bits_per_layer)
