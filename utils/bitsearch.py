"""Bit-flip search shared by the attacks (SPEC section 5).

All functions act on a model in integer mode (:func:`models.to_integer`) whose quantized weight
parameters hold the integer codes ``q``; their ``.grad`` is then ``dLoss/dq``.

- :func:`first_order_change`: ``(1 - 2*bit_k) * base[k] * g`` for every weight and bit, the
  first-order change of the loss when that bit flips.
- :func:`layer_candidate`: per layer, the bit(s) whose flip moves the loss furthest in the
  attack's direction (up for BFA, down for T-BFA), vectorised over weights and bits.
- :class:`ProgressiveBitSearch`: one iteration = gradients, one trial flip per layer scored by
  the attack loss, then the best layer's flip is kept.
- :func:`random_flip`, :func:`hamming_distance`, :func:`snapshot`, :func:`restore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from models import bits as bitlib
from models import quant_layers

MAXIMIZE = 1   # untargeted BFA: raise the loss
MINIMIZE = -1  # T-BFA: lower the attack loss


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


@dataclass
class LayerCandidate:
    """The bits a layer proposes to flip together, and whether they move the loss the right way.

    ``admissible`` is False when no bit of the layer moves the loss in the attack's direction
    (all bit gradients zero or pointing the wrong way); see :func:`layer_candidate`.
    """

    name: str
    layer: nn.Module
    indices: torch.Tensor
    bits: torch.Tensor
    admissible: bool


@dataclass
class SearchStep:
    """Outcome of one progressive-search iteration."""

    flips: list[Flip]
    loss_before: float          # attack loss before the iteration
    loss_after: float           # attack loss with the chosen flip (from the layer ranking)
    all_admissible: bool        # False: some layer had no bit pointing the attack's way
    bits_per_layer: int = 1


def first_order_change(codes: torch.Tensor, grad: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``[numel, N]`` first-order loss change of flipping each bit of each weight (SPEC 5)."""
    b = bitlib.int_to_bits(codes.reshape(-1), n_bits).to(grad.dtype)
    base = bitlib.bit_values(n_bits, dtype=grad.dtype, device=grad.device)
    return (1.0 - 2.0 * b) * base * grad.reshape(-1, 1)


def layer_candidate(name: str, layer: nn.Module, direction: int, n_bits_to_flip: int = 1,
                    k_top: int | None = None) -> LayerCandidate:
    """The ``n_bits_to_flip`` bits of ``layer`` with the largest first-order change in
    ``direction`` (+1 raise the loss, -1 lower it), among the ``k_top`` weights with the
    largest ``|g|`` (all weights by default).

    Only bits whose flip moves the loss the attack's way qualify. When none does, the layer is
    not admissible and, as in the public T-BFA code (*quirk*), its candidate is an arbitrary
    bit: the MSB of the weight with the largest ``|g|`` (what the public code's ``topk`` over
    an all-zero tensor returns first).
    """
    grad = layer.weight.grad
    if grad is None:
        raise RuntimeError(f"layer {name} has no gradient: run backward on the attack loss first")
    g = grad.detach().reshape(-1)
    codes = layer.weight.detach().reshape(-1).round().to(torch.int64)
    if k_top is not None and k_top < g.numel():
        pool = g.abs().topk(k_top).indices
    else:
        pool = None
    g_pool = g if pool is None else g[pool]
    codes_pool = codes if pool is None else codes[pool]
    score = direction * first_order_change(codes_pool, g_pool, layer.n_bits)
    n_bits = layer.n_bits
    flat = score.reshape(-1)
    k = min(n_bits_to_flip, flat.numel())
    if k == 1:
        best = flat.argmax().view(1)
        values = flat[best]
    else:
        values, best = flat.topk(k)
    keep = values > 0
    if bool(keep.any()):
        best = best[keep]  # flip only bits that move the loss the attack's way
        local, bit = best // n_bits, best % n_bits
        admissible = True
    else:
        local = g_pool.abs().argmax().view(1)
        bit = torch.zeros_like(local)
        admissible = False
    indices = local if pool is None else pool[local]
    return LayerCandidate(name, layer, indices, bit, admissible)


def _apply(cand: LayerCandidate) -> list[Flip]:
    """Flip the candidate's bits one after the other (the same weight may appear twice)."""
    flips = []
    flat = cand.layer.weight.data.view(-1)
    for index, bit in zip(cand.indices.tolist(), cand.bits.tolist()):
        before = int(flat[index].round())
        cand.layer.flip_bit(index, bit)
        flips.append(Flip(cand.name, index, bit, before, int(flat[index].round())))
    return flips


class ProgressiveBitSearch:
    """Progressive bit search (Rakin et al., ICCV 2019; SPEC section 5).

    One :meth:`step`: (1) backward of the gradient loss; (2) for each quantized layer apply its
    candidate flip, score the attack loss (forward only), undo it; (3) keep the flip of the best
    layer (highest loss for ``MAXIMIZE``, lowest for ``MINIMIZE``).

    ``multi_bit_retry`` (BFA, SPEC section 6): when no layer's candidate improves on the current
    loss, retry with the top-2 bits per layer flipped together, then 3, ... up to
    ``max_bits_per_layer`` (then the best found is kept).

    ``skip_inadmissible``: a layer with no bit pointing the attack's way proposes nothing (the
    public BFA code flips no bit there); by default it proposes its arbitrary bit and competes
    like the others (the public T-BFA code). When every layer is skipped, nothing is flipped.
    """

    def __init__(self, model: nn.Module, direction: int, k_top: int | None = None,
                 multi_bit_retry: bool = False, max_bits_per_layer: int = 32,
                 skip_inadmissible: bool = False):
        if direction not in (MAXIMIZE, MINIMIZE):
            raise ValueError("direction must be MAXIMIZE (+1) or MINIMIZE (-1)")
        self.model = model
        self.direction = direction
        self.k_top = k_top
        self.multi_bit_retry = multi_bit_retry
        self.max_bits_per_layer = max_bits_per_layer
        self.skip_inadmissible = skip_inadmissible
        self.layers = quant_layers(model)
        if not self.layers:
            raise ValueError("the model has no quantized layers to attack")
        for name, layer in self.layers:
            if not layer.integer_mode:
                raise ValueError(f"layer {name} is not in integer mode: call "
                                 f"models.to_integer(model) before attacking")
        # Only the integer weights need gradients (BatchNorm and biases are never attacked).
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in self.layers:
            layer.weight.requires_grad_(True)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.direction == MAXIMIZE else a < b

    def step(self, gradient_loss: Callable[[], tuple[torch.Tensor, float]],
             attack_loss: Callable[[], float]) -> SearchStep:
        """One iteration.

        ``gradient_loss()`` returns ``(tensor to backpropagate, current attack loss value)``;
        ``attack_loss()`` returns the attack loss of the model as it is (called under
        ``torch.inference_mode``), used to rank the layers' trial flips.
        """
        self.model.eval()
        for _, layer in self.layers:
            layer.weight.grad = None
        with torch.enable_grad():
            loss, current = gradient_loss()
            loss.backward()
        n_bits = 1
        while True:
            best_loss, best_cand, all_admissible = None, None, True
            for name, layer in self.layers:
                cand = layer_candidate(name, layer, self.direction, n_bits, self.k_top)
                all_admissible &= cand.admissible
                if self.skip_inadmissible and not cand.admissible:
                    continue
                flat = layer.weight.data.view(-1)
                saved = flat[cand.indices].clone()
                _apply(cand)
                with torch.inference_mode():
                    trial = float(attack_loss())
                flat[cand.indices] = saved
                if best_loss is None or self._better(trial, best_loss):
                    best_loss, best_cand = trial, cand
            if best_cand is None:  # every layer skipped: no bit can move the loss
                return SearchStep([], float(current), float(current), False, n_bits)
            improves = self._better(best_loss, current)
            if (not self.multi_bit_retry or improves or n_bits >= self.max_bits_per_layer):
                break
            n_bits += 1
        flips = _apply(best_cand)
        return SearchStep(flips, float(current), best_loss, all_admissible, n_bits)


def random_flip(model: nn.Module, generator: torch.Generator) -> Flip:
    """Flip one bit chosen uniformly: a quantized layer, a weight in it, a bit (SPEC 6)."""
    layers = quant_layers(model)
    i = int(torch.randint(len(layers), (1,), generator=generator))
    name, layer = layers[i]
    index = int(torch.randint(layer.weight.numel(), (1,), generator=generator))
    bit = int(torch.randint(layer.n_bits, (1,), generator=generator))
    before = int(layer.weight.data.view(-1)[index].round())
    layer.flip_bit(index, bit)
    return Flip(name, index, bit, before, int(layer.weight.data.view(-1)[index].round()))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy of every quantized layer's integer codes (to restore or to compare later)."""
    return {name: layer.weight.detach().clone() for name, layer in quant_layers(model)}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write back the codes saved by :func:`snapshot` (undoes every flip since)."""
    for name, layer in quant_layers(model):
        layer.weight.copy_(saved[name])


def hamming_distance(model: nn.Module, saved: dict[str, torch.Tensor]) -> int:
    """Number of bits that differ between the model's codes and a :func:`snapshot`."""
    total = 0
    for name, layer in quant_layers(model):
        now = layer.weight.detach().round().to(torch.int64)
        then = saved[name].round().to(torch.int64)
        changed = now != then
        if bool(changed.any()):
            total += bitlib.hamming_distance(now[changed], then[changed], layer.n_bits)
    return total
