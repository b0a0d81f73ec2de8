"""Bit-flip search shared by the attacks (docs/algorithms.md section 5).

All functions act on a model in integer mode (:func:`models.to_integer`) whose quantized weight
parameters hold the integer codes ``q``; their ``.grad`` is then ``dLoss/dq``.

- :func:`first_order_change`: ``(1 - 2*bit_k) * base[k] * g`` for every weight and bit, the
  first-order change of the loss when that bit flips.
- :func:`layer_candidate`: per layer, the bit(s) whose flip moves the loss furthest in the
  attack's direction (up for BFA, down for T-BFA), vectorised over weights and bits.
- :class:`ProgressiveBitSearch`: one iteration = gradients, one trial flip per layer scored by
  the attack loss, then the best layer's flip is kept.

Reading, flipping, saving and comparing the bits themselves is :mod:`models.bits`' work.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from models import bits as bitlib
from models.bits import Flip

if TYPE_CHECKING:
    from models.incremental import IncrementalForward
    from utils.faults import FaultState

log = logging.getLogger(__name__)

MAXIMIZE = 1   # untargeted BFA: raise the loss
MINIMIZE = -1  # T-BFA: lower the attack loss


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
    """``[numel, N]`` first-order loss change of flipping each bit of each integer code
    (docs/algorithms.md section 5): the N-bit format's
    :meth:`models.bits.NumberFormat.first_order_change`."""
    return bitlib.IntFormat(n_bits).first_order_change(codes, grad)


def flip_scores(fmt: bitlib.NumberFormat, values: torch.Tensor, grad: torch.Tensor,
                direction: int) -> torch.Tensor:
    """``[numel, n_bits]`` first-order change of the attack loss in the attack's direction when
    each bit of each stored value flips: ``direction * (v' - v) * g`` (docs/algorithms.md
    section 5) for any number format, by the format's own rule
    (:meth:`models.bits.NumberFormat.first_order_change`: integer codes in the gradient's dtype,
    floats in float64). A flip to inf scores +-inf; NaN scores (a NaN value, inf times a zero
    gradient) become -inf: never chosen."""
    score = direction * fmt.first_order_change(values, grad)
    return torch.nan_to_num(score, nan=float("-inf"), posinf=float("inf"),
                            neginf=float("-inf"))


def _grad_of(name: str, layer: nn.Module) -> torch.Tensor:
    grad = bitlib.weight_grad(layer)
    if grad is None:
        raise RuntimeError(f"layer {name} has no gradient: run backward on the attack loss first")
    return grad.detach().reshape(-1)


def layer_candidate(name: str, layer: nn.Module, direction: int, n_bits_to_flip: int = 1,
                    k_top: int | None = None, faults: "FaultState | None" = None
                    ) -> LayerCandidate | None:
    """The ``n_bits_to_flip`` bits of ``layer`` with the largest first-order change in
    ``direction`` (+1 raise the loss, -1 lower it), among the ``k_top`` weights with the
    largest ``|g|`` (all weights by default).

    Only bits whose flip moves the loss the attack's way qualify. When none does, the layer is
    not admissible and, as in the public T-BFA code (*quirk*), its candidate is an arbitrary
    bit: the MSB of the weight with the largest ``|g|`` (what the public code's ``topk`` over
    an all-zero tensor returns first).

    ``faults`` (:class:`utils.faults.FaultState`): only the flips the fault model admits are
    candidates; several bits of one candidate lie in different pages under one-flip-per-page
    (the best bit of each page, then the best pages) and never exceed the budget left. The
    fallback of a layer with no bit pointing the attack's way is then its best admissible flip,
    and a layer with no admissible flip at all proposes nothing (None).
    """
    g = _grad_of(name, layer)
    values = layer.weight.detach().reshape(-1)
    fmt = layer.bit_format
    n_bits = fmt.n_bits
    if k_top is not None and k_top < g.numel():
        pool = g.abs().topk(k_top).indices
    else:
        pool = None
    g_pool = g if pool is None else g[pool]
    values_pool = values if pool is None else values[pool]
    score = flip_scores(fmt, values_pool, g_pool, direction)
    if faults is not None:
        allowed = faults.mask(name, layer)
        if pool is not None:
            allowed = allowed[pool]
        score = score.masked_fill(~allowed, float("-inf"))
        if faults.remaining is not None:
            n_bits_to_flip = min(n_bits_to_flip, faults.remaining)
    flat = score.reshape(-1)
    k = min(n_bits_to_flip, flat.numel())
    if faults is not None and faults.fault.one_per_page and k > 1:
        values_k, best = _best_per_page(faults, name, flat, n_bits, pool, k)
    elif k == 1:
        best = flat.argmax().view(1)
        values_k = flat[best]
    else:
        values_k, best = flat.topk(k)
    keep = values_k > 0
    if bool(keep.any()):
        best = best[keep]  # flip only bits that move the loss the attack's way
        local, bit = best // n_bits, best % n_bits
        admissible = True
    elif faults is not None:
        if k == 0 or float(flat[best[0]]) == float("-inf"):
            return None  # no admissible flip in this layer
        local, bit = best[:1] // n_bits, best[:1] % n_bits
        admissible = False
    else:
        local = g_pool.abs().argmax().view(1)
        bit = torch.zeros_like(local)
        admissible = False
    indices = local if pool is None else pool[local]
    return LayerCandidate(name, layer, indices, bit, admissible)


def _best_per_page(faults, name, flat, n_bits, pool, k):
    """Top ``k`` scores of ``flat`` with at most one per memory page: the best bit of each
    page, then the ``k`` best pages (which maximises the summed score under the rule)."""
    weights = torch.arange(flat.numel(), device=flat.device) // n_bits
    if pool is not None:
        weights = pool[weights]
    pages = faults.pages_of(name, weights)
    order = torch.argsort(flat, descending=True, stable=True)
    sorted_pages = pages[order]
    # the first occurrence of each page in score order is that page's best bit
    _, inverse = torch.unique(sorted_pages, return_inverse=True)
    seen = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), len(order),
                      device=flat.device, dtype=torch.int64)
    seen.scatter_reduce_(0, inverse, torch.arange(len(order), device=flat.device),
                         reduce="amin")
    first = torch.zeros_like(order, dtype=torch.bool)
    first[seen] = True
    chosen = order[first][:k]
    return flat[chosen], chosen


def _apply(cand: LayerCandidate) -> list[Flip]:
    """Flip the candidate's bits one after the other (the same weight may appear twice)."""
    return [bitlib.flip_and_record(cand.name, cand.layer, index, bit)
            for index, bit in zip(cand.indices.tolist(), cand.bits.tolist())]


def _single_candidate(name: str, layer: nn.Module, direction: int) -> LayerCandidate:
    """:func:`layer_candidate` for one bit over all weights, without reading anything back to
    the host (``admissible`` stays a 0-d bool tensor): the search's inner loop on a GPU."""
    g = bitlib.weight_grad(layer).detach().reshape(-1)
    fmt = layer.bit_format
    score = flip_scores(fmt, layer.weight.detach().reshape(-1), g, direction).reshape(-1)
    best = score.argmax()
    admissible = score[best] > 0
    fallback = g.abs().argmax()  # the public T-BFA code's arbitrary bit (see layer_candidate)
    local = torch.where(admissible, best // fmt.n_bits, fallback).view(1)
    bit = torch.where(admissible, best % fmt.n_bits, torch.zeros_like(best)).view(1)
    return LayerCandidate(name, layer, local, bit, admissible)


def _nan_is_inf(value: float) -> float:
    return float("inf") if value != value else value


class AttackLoss:
    """An attack loss of the form ``loss_fn(model(inputs))``.

    Passing one (instead of any callable) to :meth:`ProgressiveBitSearch.step` lets the search
    score each layer's trial flip by re-running the network from that layer onward only
    (:class:`models.incremental.IncrementalForward`); calling it runs the whole model.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor], torch.Tensor]):
        self.model = model
        self.inputs = inputs
        self.loss_fn = loss_fn

    def __call__(self) -> torch.Tensor:
        return self.loss_fn(self.model(self.inputs))


class ProgressiveBitSearch:
    """Progressive bit search (Rakin et al., ICCV 2019; docs/algorithms.md section 5).

    One :meth:`step`: (1) backward of the gradient loss; (2) for each quantized layer apply its
    candidate flip, score the attack loss (forward only), undo it; (3) keep the flip of the best
    layer (highest loss for ``MAXIMIZE``, lowest for ``MINIMIZE``; the first such layer on a
    tie; a NaN loss ranks as +inf: see :meth:`_select`).

    ``multi_bit_retry`` (BFA, docs/algorithms.md section 6): when no layer's candidate improves on the current
    loss, retry with the top-2 bits per layer flipped together, then 3, ... up to
    ``max_bits_per_layer`` (then the best found is kept). ``max_bits_per_layer=None`` retries
    without a bound, as the public BFA code, until the loss improves or every layer already
    proposes all the bits that move the loss the attack's way (from there on the public code
    repeats the same trials until its ``topk`` is asked for more entries than there are).

    ``invert_binary`` (the public BFA code's binarized layers, see :mod:`attacks.bfa`): the
    candidates of 1-bit layers are chosen in the opposite direction (the bits that move the
    loss furthest *against* the attack, to first order); the layers are still ranked by the
    attack loss in the attack's direction. Other layers are unaffected.

    ``skip_inadmissible``: a layer with no bit pointing the attack's way proposes nothing (the
    public BFA code flips no bit there); by default it proposes its arbitrary bit and competes
    like the others (the public T-BFA code). When every layer is skipped, nothing is flipped.

    ``faults`` (:class:`utils.faults.FaultState`, default None: every flip allowed): only the
    flips the fault model admits are tried (see :func:`layer_candidate`); a layer without any
    proposes nothing, and ``all_admissible`` then counts only the layers that propose; the
    flips kept are recorded in it (pages used, budget spent). Once the budget is spent a step
    flips nothing.

    ``incremental`` (default): when the attack loss is an :class:`AttackLoss`, a trial flip in a
    layer re-runs the network from that layer onward on activations cached from the clean
    forward (which is itself reused from the previous step when the weights are unchanged).
    The losses are bit-identical to full forwards, so the flips are the same as with
    ``incremental=False`` (the plain search: one full forward per layer), only faster.
    """

    def __init__(self, model: nn.Module, direction: int, k_top: int | None = None,
                 multi_bit_retry: bool = False, max_bits_per_layer: int | None = 32,
                 skip_inadmissible: bool = False, incremental: bool = True,
                 invert_binary: bool = False, faults: "FaultState | None" = None):
        if direction not in (MAXIMIZE, MINIMIZE):
            raise ValueError("direction must be MAXIMIZE (+1) or MINIMIZE (-1)")
        self.model = model
        self.direction = direction
        self.k_top = k_top
        self.multi_bit_retry = multi_bit_retry
        self.max_bits_per_layer = max_bits_per_layer
        self.skip_inadmissible = skip_inadmissible
        self.incremental = incremental
        self.invert_binary = invert_binary
        self.faults = faults
        self.layers = bitlib.bit_layers(model)
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
        self._engine = None          # IncrementalForward, built on first use
        self._engine_inputs = None   # the inputs its cache belongs to
        self._engine_weights = None  # and the codes it was computed with

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.direction == MAXIMIZE else a < b

    def _select(self, losses: list[torch.Tensor]) -> int:
        """Index of the best trial loss (first on ties). A NaN loss ranks as +inf: the flip
        destroyed the output (a NaN row is no class, :func:`models.ocm.no_class_where_nan`),
        the most an untargeted attack can do and the worst for a targeted one. Only a float
        format's flip to inf or NaN produces one; integer codes never do."""
        stacked = torch.stack([loss.detach().reshape(()).float() for loss in losses])
        stacked = torch.nan_to_num(stacked, nan=float("inf"))
        pick = stacked.argmax() if self.direction == MAXIMIZE else stacked.argmin()
        return int(pick)

    # -- incremental forward ------------------------------------------------------------------

    def _engine_for(self, attack_loss) -> "IncrementalForward | None":
        """The incremental engine primed for ``attack_loss.inputs`` and the current weights, or
        None when the plain search must be used."""
        if not self.incremental or not isinstance(attack_loss, AttackLoss) \
                or attack_loss.model is not self.model:
            return None
        if self._engine is None:
            from models.incremental import IncrementalForward, NotTraceable
            try:
                self._engine = IncrementalForward(self.model, [n for n, _ in self.layers])
            except NotTraceable as err:
                log.warning("plain bit search (one full forward per layer): %s", err)
                self.incremental = False
                return None
        weights = [layer.weight.detach() for _, layer in self.layers]
        fresh = (self._engine_inputs is attack_loss.inputs and self._engine_weights is not None
                 and not bool(torch.stack([(w != s).any() for w, s in
                                           zip(weights, self._engine_weights)]).any()))
        if not fresh:
            with torch.inference_mode():
                self._engine.prime(attack_loss.inputs)
            self._engine_inputs = attack_loss.inputs
            self._engine_weights = [w.clone() for w in weights]
        return self._engine

    def _commit(self, engine, cand: LayerCandidate) -> None:
        """The kept flip enters the engine's cache (one partial rerun)."""
        with torch.inference_mode():
            engine.commit(cand.name)
        i = next(i for i, (name, _) in enumerate(self.layers) if name == cand.name)
        self._engine_weights[i] = cand.layer.weight.detach().clone()

    # -----------------------------------------------------------------------------------------

    def step(self, gradient_loss: Callable[[], tuple[torch.Tensor, float | None]],
             attack_loss: Callable[[], torch.Tensor]) -> SearchStep:
        """One iteration.

        ``gradient_loss()`` returns ``(tensor to backpropagate, current attack loss value)``;
        the value may be None: it is then the attack loss of the unflipped model (read from the
        incremental cache, or one forward). ``attack_loss()`` returns the attack loss of the
        model as it is (called under ``torch.inference_mode``), used to rank the layers' trial
        flips; make it an :class:`AttackLoss` to allow the incremental search.
        """
        self.model.eval()
        for _, layer in self.layers:
            bitlib.clear_grad(layer)
        with torch.enable_grad():
            loss, current = gradient_loss()
            loss.backward()
        engine = self._engine_for(attack_loss)
        if current is None:
            with torch.inference_mode():
                current = (attack_loss.loss_fn(engine.output) if engine is not None
                           else attack_loss())
        current = float(current)

        def trial_loss(name: str) -> torch.Tensor:
            with torch.inference_mode():
                if engine is not None:
                    return attack_loss.loss_fn(engine.rerun(name)).detach()
                return torch.as_tensor(attack_loss()).detach()

        unbounded = self.max_bits_per_layer is None
        faults = self.faults
        if faults is not None and faults.remaining == 0:
            return SearchStep([], current, current, False, 0)
        n_bits = 1
        while True:
            cands, losses = [], []
            for name, layer in self.layers:
                direction = self.direction
                if self.invert_binary and layer.bit_format.n_bits == 1:
                    direction = -direction
                if (n_bits == 1 and not self.skip_inadmissible and self.k_top is None
                        and faults is None):
                    cand = _single_candidate(name, layer, direction)
                else:
                    cand = layer_candidate(name, layer, direction, n_bits, self.k_top, faults)
                    if cand is None or (self.skip_inadmissible and not cand.admissible):
                        continue
                if len(cand.indices) == 1:  # one bit: tensor ops only, nothing read back
                    saved = bitlib.trial_flip(layer, cand.indices, cand.bits)
                else:
                    saved = bitlib.save_codes(layer, cand.indices)
                    _apply(cand)
                losses.append(trial_loss(name))
                bitlib.restore_codes(layer, cand.indices, saved)
                cands.append(cand)
            if not cands:  # every layer skipped: no bit can move the loss
                return SearchStep([], current, current, False, n_bits)
            best = self._select(losses)
            best_cand, best_loss = cands[best], float(losses[best])
            all_admissible = all(bool(c.admissible) for c in cands) and (
                faults is not None or len(cands) == len(self.layers))
            improves = self._better(_nan_is_inf(best_loss), _nan_is_inf(current))
            if current != current and self.direction == MAXIMIZE:
                improves = True  # the output is already destroyed: nothing ranks higher
            if not self.multi_bit_retry or improves:
                break
            if unbounded:
                # Every layer already proposes all its admissible bits: more bits would repeat
                # the same trials for ever (the public code loops until topk fails).
                if all(len(c.indices) < n_bits for c in cands):
                    break
            elif n_bits >= self.max_bits_per_layer:
                break
            elif faults is not None and faults.remaining is not None \
                    and n_bits >= faults.remaining:
                break
            n_bits += 1
        flips = _apply(best_cand)
        if faults is not None:
            faults.record(flips)
        if engine is not None:
            self._commit(engine, best_cand)
        return SearchStep(flips, current, best_loss, all_admissible, n_bits)
