"""The RADAR-aware bit-flip attack: BFA flips paired within a checksum group so that the group's
sum, and so its signature, is unchanged (docs/algorithms.md section 15).

Each iteration is BFA's progressive search (:class:`attacks.bfa.BFA`); every bit it flips (bit
``b`` of the code at position ``i``, a change ``delta``) is paired with a flip of the same bit
``b`` of another code ``j`` of the same group whose bit ``b`` is the opposite of ``i``'s before
the flip, so that ``j`` changes by ``-delta``: the group sum is unchanged. Among those ``j`` the
one with the largest first-order gain of the attack loss is flipped (one more backward pass).

``knows_key=True``: the attacker knows the secret interleaving (the defense's own groups);
``knows_key=False``: it pairs within the groups of the plain interleaving (``i mod n_groups``,
the group size being public), which under a secret key are other groups: the pair is then
detected and both groups zeroed. Every flip (search and pairing) is recorded and counted.
"""

from __future__ import annotations

import torch

from models.bits import bit_layers, bit_values, flip_and_record, int_to_bits
from utils.bitsearch import SearchStep

from .base import NotApplicable, Protocol, register_attack
from .bfa import BFA, MAX_BITS_PER_LAYER, flip_campaign


def _radar(defenses):
    from defenses.radar import Radar

    found = [d for d in defenses if isinstance(d, Radar)]
    if not found:
        raise NotApplicable("attack 'radar_pairs' needs a model defended by radar "
                         "(--defense radar:...)")
    return found[0]


@register_attack
class RadarPairs(BFA):
    """BFA with every flip paired inside its RADAR group (module docstring).

    Args:
        model, output: as :class:`attacks.bfa.BFA` (the model protected by ``radar``).
        radar: the :class:`defenses.radar.Radar` defending it (its group size, and its key
            when ``knows_key``).
        knows_key: pair within the defense's secret groups (True) or the plain interleaving.
        k_top, max_bits_per_layer, eval_model, campaign: as :class:`attacks.bfa.BFA`.
    """

    name = "radar_pairs"
    PARAMS = {"knows_key": (True, False), "k_top": ()}
    noun = "RADAR-aware BFA runs"
    results_dir = "attack_radar_pairs"

    def __init__(self, model, output, radar, knows_key: bool = True, k_top: int | None = None,
                 max_bits_per_layer: int | None = MAX_BITS_PER_LAYER, fault=None,
                 eval_model=None, **campaign):
        if fault is not None and not fault.unconstrained:
            raise NotApplicable("attack 'radar_pairs' chooses its paired flips itself: it takes no "
                                "fault model")
        super().__init__(model, output, k_top=k_top, max_bits_per_layer=max_bits_per_layer,
                         eval_model=eval_model, **campaign)
        from defenses.radar import group_ids

        self.knows_key = knows_key
        if knows_key:
            self.groups = radar.groups_of(model)
        else:
            self.groups = {name: group_ids(layer.weight.numel(), radar.group_size, None,
                                           i).to(layer.weight.device)
                           for i, (name, layer) in enumerate(bit_layers(model))}

    @classmethod
    def from_target(cls, target, data, protocol: Protocol, **params) -> "RadarPairs":
        cls.check_params(params)
        return cls(target.model, target.output, _radar(target.defenses), **params,
                   **flip_campaign(target, data, protocol))

    def settings(self) -> dict:
        return {"knows_key": self.knows_key, "k_top": self.k_top}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> SearchStep:
        """BFA's iteration, then one paired flip per flipped bit (module docstring)."""
        found = super().step(x, y)
        if not found.flips:
            return found
        layers = dict(bit_layers(self.model))
        for _, layer in layers.items():
            layer.weight.grad = None
        with torch.enable_grad():
            self.loss(x, y).backward()
        taken = {(f.layer, f.index) for f in found.flips}
        pairs = []
        for flip in found.flips:
            layer = layers[flip.layer]
            n_bits = layer.bit_format.n_bits
            groups = self.groups[flip.layer]
            codes = layer.bit_format.codes(layer.weight.detach().reshape(-1))
            bit_now = int_to_bits(codes, n_bits)[:, flip.bit]
            flipped_now = int(bit_now[flip.index])  # i's bit b after its flip = j's bit wanted
            ok = (groups == groups[flip.index]) & (bit_now == flipped_now)
            for lname, index in taken:
                if lname == flip.layer:
                    ok[index] = False
            if not bool(ok.any()):
                continue  # no partner in the group: this flip stays unpaired (and detected)
            base = bit_values(n_bits, dtype=torch.float32, device=codes.device)[flip.bit]
            delta = (1.0 - 2.0 * bit_now.float()) * base        # change if bit b of j flips
            grad = layer.weight.grad.reshape(-1) if layer.weight.grad is not None else \
                torch.zeros_like(delta)
            gain = torch.where(ok, delta * grad, torch.tensor(float("-inf")))
            j = int(gain.argmax())
            pairs.append(flip_and_record(flip.layer, layer, j, flip.bit))
            taken.add((flip.layer, j))
        for _, layer in layers.items():
            layer.weight.grad = None
        with torch.inference_mode():
            after = float(self.loss(x, y))
        return SearchStep(found.flips + pairs, found.loss_before, after, found.all_admissible,
                          found.bits_per_layer)
