"""Stealthy TA-LBF (Bai et al., "Targeted attack against deep neural networks via flipping
limited weight bits", ICLR 2021), with the OCM paper's reformulation (supplement section 3);
docs/algorithms.md section 8.

One test sample ``x_s`` (true class ``s``) is pushed to a target class ``t`` by changing bits of
the final layer only, under a budget of ``k`` flipped bits. The bits of the final layer are
relaxed to ``b`` in [0, 1] (shape ``[out, in, N]``, initialised from the two's complement bits
of the integer codes, weight ``= step * sum_k b_k * base[k]``, bias fixed) and

    L(b) = L_eff(x_s, t) + gamma * mean L(D_aux, y)      s.t.  ||b - b0||^2 <= k, b binary

is solved with lp-box ADMM (Wu & Ghanem, TPAMI 2018): ``b`` in {0,1}^n is the intersection of
the box [0,1]^n and the sphere centred at 1/2 with radius sqrt(n)/2. ``L_eff`` and ``L`` are the
cross-entropy for vanilla models, the binary cross-entropy through ``sigmoid(2 z)`` against
the {0,1} codes for OCM models. A search over ``k`` (5, 10, ..., 6 values) and ``gamma``
(100, 50, ..., 8 values) per sample keeps the first success.

Everything runs as tensor code on the device of the cached features. The runs of one ``k`` for
its ``gamma`` values are independent: they run as one batched computation (a leading batch
dimension), finished runs leave the batch, and once a run succeeds the runs after it in the
published order are dropped (they cannot be the first success). Gradients are written out
analytically (the layer is linear in ``b``) instead of going through autograd, term by term
and in the public code's order of operations; by default the public code's floating-point
behaviour is reproduced too (float64 sphere projection, NaN when the target probability
underflows in ``log(softmax)``, its decoding: :class:`TALBFConfig`, ``numerics``).

Runs that do not meet the stop test are chaotic once the penalties saturate (rho reaches its
maximum near outer iteration 1318 with the defaults): a difference in the last float32 bit
grows to O(0.1) in ``b`` within a few hundred iterations, so where such a run ends depends on
the order of every floating-point operation and on the CPU's kernels, for the public code as
for this one (the public code agrees with itself on 81 of 97 tries of the conformance runs
when PyTorch's AVX2 kernels replace its AVX-512 ones; see tests/test_conformance_talbf.py).

D_aux of an attack can be pinned (``aux`` of :meth:`TALBF.run`, ``AttackItem.aux``, the
JSON-lines attacks file of :mod:`attacks.talbf_file`); the attacked image is appended after
D_aux in the order given, as the public code does. Example::

    from attacks.common import EvalSet
    from attacks.talbf import TALBF, TALBFConfig
    test = EvalSet(images, labels, mean, std, device)
    attack = TALBF.from_model(model, output, test, TALBFConfig())  # features computed once
    result = attack.run(index=3676, target=0, aux=attack.draw_aux(3676, seed=1))
    result.success, result.k, result.gamma, result.bits_changed, result.pa_acc

The model itself is never changed: the attack works on a copy of the final layer's bits and
reports the new integer codes (``result.codes``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import bits as bitlib
from utils.faults import FaultModel, FaultState

from .base import (Attack, AttackResult, NotApplicable, Protocol, check_params,
                   register_attack)
from .objectives import LOSSES, SCORES

log = logging.getLogger(__name__)

# Smallest norm the public code divides by in the stop rule (MATLAB's eps).
_NORM_FLOOR = 2.2204e-16
# torch.nn.BCELoss clamps the denominator of its gradient at this value (see _bce_factor).
_BCE_EPS = 1e-12
# TALBFConfig fields of the public code's floating-point behaviour (TALBFConfig.with_numerics).
NUMERICS_FIELDS = ("sphere_float64", "log_prob_nan", "public_decode")
NUMERICS = ("public", "stable")


@dataclass
class TALBFConfig:
    """Every constant of docs/algorithms.md section 8 (defaults: the public implementations' values).

    - ``init_k`` (5): first bit budget; doubled ``max_search_k`` (6) times at most;
    - ``init_gamma`` (100): first trade-off gamma (``--init-lam``); halved, ``max_search_gamma``
      (8) values per k;
    - ``n_aux`` (64): |D_aux|, test samples drawn at random (not x_s) for each attacked sample;
    - ``rho1``/``rho2``/``rho3`` (1e-4, 1e-4, 1e-5): initial ADMM penalties of the box, the
      sphere and the budget constraint, multiplied by ``rho_fact`` (1.01) per outer iteration
      up to ``max_rho1``/``max_rho2``/``max_rho3`` (50, 50, 5);
    - ``inn_lr`` (0.01) and ``inn_max_iters`` (5): gradient steps on b per outer iteration;
    - ``ext_max_iters`` (2000): outer iterations at most;
    - ``stop_threshold`` (1e-4) and ``min_ext_iters`` (100): stop once
      ``max(||b-y1||, ||b-y2||) / ||b|| <= stop_threshold`` at an outer iteration whose 0-based
      index exceeds ``min_ext_iters`` (*quirk*: the public test is ``ext_iter > 100``);
    - ``gamma_batch`` (0): how many gamma runs of one k share a batch (0 = all of them, 1 =
      one run at a time); ``k_batch`` (1): how many k values share a batch (0 = all; above 1
      the whole gamma range of each k is batched). They change the speed, and the rounding
      of the batched matrix products: a run that meets the stop test ends the same way, one
      that does not (NaN, or all ``ext_max_iters``) may end elsewhere, as on another CPU. Runs
      after the first success in the search order are dropped.

    The public code's floating-point behaviour (all on by default; ``numerics="stable"`` of
    :meth:`with_numerics` turns all three off):

    - ``sphere_float64``: the sphere projection y2 and its dual z2 are float64, as the public
      code's NumPy projection promotes them (its shift vector ``1/2 * np.ones`` is float64); the
      loss sees them rounded to float32, the z2 update and the stop test use float64;
    - ``log_prob_nan``: the attacked sample's loss is ``-log(softmax(z)[t])`` in float32, as the
      public code writes it: when the target probability underflows (``1/p`` overflows, p below
      about 2**-128) its gradient is NaN and the run ends in NaN; otherwise the gradient is the
      stable ``softmax - onehot`` (vanilla models only);
    - ``public_decode``: predictions (success of x_s, PA-ACC, clean accuracy) as the public
      TA-LBF script decides them: the top-1 of ``softmax(z)`` (``torch.topk``, its tie rule);
      for OCM of ``softmax(log(relu((2 sigmoid(2z) - 1) . C^T) + 1e-6))``. Off: the model's own
      decoding (``output.predict`` of tanh(z); ties to the lowest class).
    """

    init_k: float = 5.0
    init_gamma: float = 100.0
    max_search_k: int = 6
    max_search_gamma: int = 8
    n_aux: int = 64
    rho1: float = 1e-4
    rho2: float = 1e-4
    rho3: float = 1e-5
    max_rho1: float = 50.0
    max_rho2: float = 50.0
    max_rho3: float = 5.0
    rho_fact: float = 1.01
    inn_lr: float = 0.01
    ext_max_iters: int = 2000
    inn_max_iters: int = 5
    stop_threshold: float = 1e-4
    min_ext_iters: int = 100
    gamma_batch: int = 0
    k_batch: int = 1
    sphere_float64: bool = True
    log_prob_nan: bool = True
    public_decode: bool = True

    def validate(self) -> "TALBFConfig":
        """Raise ValueError naming the first bad value; returns self."""
        for name in ("init_k", "init_gamma", "rho1", "rho2", "rho3", "max_rho1", "max_rho2",
                     "max_rho3", "rho_fact", "inn_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name, low in (("max_search_k", 1), ("max_search_gamma", 1), ("n_aux", 1),
                          ("ext_max_iters", 1), ("inn_max_iters", 1), ("min_ext_iters", 0),
                          ("gamma_batch", 0), ("k_batch", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not self.stop_threshold >= 0:
            raise ValueError(f"stop_threshold must be >= 0, got {self.stop_threshold!r}")
        for name in NUMERICS_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        return self

    def with_numerics(self, numerics: str) -> "TALBFConfig":
        """A copy with the floating-point behaviour ``"public"`` (the public code's, the
        default) or ``"stable"`` (float32 throughout, a log-softmax that never underflows, the
        model's own decoding)."""
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
        on = numerics == "public"
        return replace(self, **{name: on for name in NUMERICS_FIELDS})

    @property
    def numerics(self) -> str:
        """``public``, ``stable`` or ``mixed`` (see :meth:`with_numerics`)."""
        flags = {getattr(self, name) for name in NUMERICS_FIELDS}
        return "mixed" if len(flags) > 1 else ("public" if flags.pop() else "stable")

    def k_values(self) -> list[float]:
        """The bit budgets in search order: ``init_k * 2**i`` (public code: floats)."""
        return [float(self.init_k) * 2.0 ** i for i in range(self.max_search_k)]

    def gamma_values(self) -> list[float]:
        """The trade-offs in search order: ``init_gamma / 2**i``."""
        return [float(self.init_gamma) / 2.0 ** i for i in range(self.max_search_gamma)]

    def search_order(self) -> list[tuple[float, float]]:
        """Every ``(k, gamma)`` run of the search, in the published order."""
        return [(k, g) for k in self.k_values() for g in self.gamma_values()]

    def batches(self) -> list[tuple[int, int]]:
        """``(start, end)`` slices of :meth:`search_order` that run as one batch each."""
        per_k, n_k = self.max_search_gamma, self.max_search_k
        if self.k_batch != 1:
            size = (self.k_batch or n_k) * per_k
            return [(s, min(s + size, n_k * per_k)) for s in range(0, n_k * per_k, size)]
        size = self.gamma_batch or per_k
        return [(k * per_k + s, k * per_k + min(s + size, per_k))
                for k in range(n_k) for s in range(0, per_k, size)]

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# lp-box projections (Wu & Ghanem; docs/algorithms.md section 8), along the last dimension
# ---------------------------------------------------------------------------------------------

def project_box(x: torch.Tensor) -> torch.Tensor:
    """Closest point of the box [0, 1]^n."""
    return x.clamp(0.0, 1.0)


def project_sphere(x: torch.Tensor) -> torch.Tensor:
    """Closest point of the sphere centred at (1/2, ..., 1/2) with radius sqrt(n)/2 (n = size of
    the last dimension), which holds every binary vector: ``1/2 + sqrt(n)/2 * v/||v||`` with
    ``v = x - 1/2``, evaluated as the public code does, ``(n**0.5 * v) / (2 ||v||) + 1/2``, in
    the dtype of ``x``."""
    v = x - 0.5
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v.mul(x.shape[-1] ** 0.5).div_(2.0 * norm).add_(0.5)


def project_positive(x: torch.Tensor) -> torch.Tensor:
    """Closest point of the non-negative orthant (the budget's slack y3)."""
    return x.clamp(min=0.0)


# ---------------------------------------------------------------------------------------------
# The attacked layer
# ---------------------------------------------------------------------------------------------

@dataclass
class FinalLayer:
    """The attacked layer, detached from the model: integer codes ``[out, in]``, frozen step,
    float bias, bit width, and whether the model applies tanh after it."""

    codes: torch.Tensor
    step: float
    bias: torch.Tensor
    n_bits: int
    tanh: bool = False

    @classmethod
    def from_model(cls, model: nn.Module) -> "FinalLayer":
        """Snapshot of ``model.final_layer()`` (which must be in integer mode)."""
        layer = model.final_layer()
        if not hasattr(layer, "step_size"):
            fmt = getattr(getattr(layer, "bit_format", None), "name", "float")
            raise ValueError(f"TA-LBF's relaxation needs a final layer of N-bit codes with one "
                             f"step per layer (a quantized model); this model's final layer "
                             f"holds {fmt} weights: attack it with attack_bfa.py or "
                             f"attack_tbfa.py")
        if not getattr(layer, "integer_mode", False):
            raise ValueError("TA-LBF needs the model in integer mode: call "
                             "models.to_integer(model) first")
        if getattr(layer, "stored_encoding", None) is not None:
            raise ValueError("TA-LBF flips the final layer's codes, which a deployment-time "
                             "defense stores encoded (deepncode): attack it with "
                             "attack_bfa.py or attack_tbfa.py")
        w = layer.weight.detach()
        bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(
            w.shape[0], device=w.device)
        return cls(layer.int_weight().clone(), float(layer.step_size.detach().reshape(-1)[0]),
                   bias.float(), layer.n_bits, getattr(model, "output_act", "linear") == "tanh")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.codes.shape, self.n_bits)

    def bits(self) -> torch.Tensor:
        """The two's complement bits ``[out, in, N]`` (uint8, MSB first)."""
        return bitlib.int_to_bits(self.codes, self.n_bits)

    def weight_from_bits(self, b: torch.Tensor) -> torch.Tensor:
        """``step * (offset + sum_k b_k * base[k])`` (as the integer layer computes it) for
        (relaxed) bits held bit-plane first, ``[G, N * out * in]`` as the ADMM holds them;
        returns ``[G, out, in]``."""
        out_f, in_f, nb = self.shape
        base = _bit_values(nb, b.dtype, b.device)
        w = torch.matmul(base, b.view(-1, nb, out_f * in_f)).view(-1, out_f, in_f)
        offset = bitlib.bit_offset(nb)
        if offset:
            w = w + offset
        return w.mul_(self.step)

    def codes_from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        return bitlib.bits_to_int(bits, self.n_bits)

    def outputs(self, features: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Activated outputs (tanh for OCM models) of ``features`` with the given codes."""
        codes = self.codes if codes is None else codes
        z = F.linear(features, codes.to(features.dtype) * self.step, self.bias)
        return torch.tanh(z) if self.tanh else z


@functools.lru_cache(maxsize=32)
def _bit_values(n_bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`models.bits.bit_values`, made once per format (the ADMM asks every step; the
    tensor is only read; a normal tensor even when first asked under inference mode)."""
    with torch.inference_mode(False):
        return bitlib.bit_values(n_bits, dtype=dtype, device=device)


@torch.inference_mode()
def compute_features(model: nn.Module, data, batch_size: int | None = None) -> torch.Tensor:
    """Penultimate features of every sample of ``data`` (an :class:`attacks.common.EvalSet`),
    computed once with the integer model in eval mode (docs/algorithms.md section 8)."""
    model.eval()
    bs = batch_size or data.batch_size
    out = [model.forward_features(data.inputs(slice(i, i + bs))).float()
           for i in range(0, len(data), bs)]
    return torch.cat(out).clone()


class FinalLayerFaults:
    """A :class:`utils.faults.FaultModel` (docs/algorithms.md section 5b) as TA-LBF applies it to
    the final layer (section 8, "Fault models"), built from the whole model: the final layer's
    bytes lie after every attacked layer before it (:class:`utils.faults.MemoryLayout`).

    - ``free`` ``[out, in, N]`` (bool, MSB first): the bits the fault model lets flip (bit
      positions, direction, profile); the ADMM never moves the others and rounding keeps them;
    - :meth:`project`: the rounded bits restricted to ``free``, then at most one changed bit per
      page (one-per-page) and at most ``budget`` changed bits, keeping the largest relaxed
      changes ``|b - b0|``;
    - :meth:`violations`: an independent check of attacked codes
      (:meth:`utils.faults.FaultState.violations` on a copy of the final layer).
    """

    def __init__(self, model: nn.Module, fault: FaultModel):
        layer = model.final_layer()
        names = [name for name, m in bitlib.bit_layers(model) if m is layer]
        if not names:
            raise ValueError("the model's final layer is not one of its attacked layers")
        self.fault, self.name = fault, names[0]
        self.state = FaultState(model, fault)
        out_f, in_f = layer.weight.shape
        numel, nb = out_f * in_f, layer.bit_format.n_bits
        self.free = self.state.mask(self.name, layer).cpu().view(out_f, in_f, nb)
        self.pages = self.state.pages_of(self.name, torch.arange(numel)) if fault.one_per_page \
            else None
        self.clean = layer.weight.detach().clone().cpu()
        # a copy of the final layer alone, under its own name, for violations()
        self.holder = nn.Module()
        parent, *path = [self.holder, *self.name.split(".")]
        for part in path[:-1]:
            parent.add_module(part, nn.Module())
            parent = parent.get_submodule(part)
        parent.add_module(path[-1], copy.deepcopy(layer).cpu())
        self.copy = self.holder.get_submodule(self.name)

    def to(self, device) -> "FinalLayerFaults":
        self.free = self.free.to(device)
        self.pages = None if self.pages is None else self.pages.to(device)
        return self

    def project(self, bits: torch.Tensor, relaxed: torch.Tensor,
                clean: torch.Tensor) -> torch.Tensor:
        """Rounded ``bits`` ``[out, in, N]`` made admissible (class docstring); ``relaxed`` the
        ADMM's b before rounding, ``clean`` the clean bits (same shape)."""
        bits = torch.where(self.free, bits, clean)
        fault = self.fault
        if not (fault.one_per_page or fault.budget is not None):
            return bits
        flat, flat_clean = bits.view(-1), clean.view(-1)
        changed = (flat != flat_clean).nonzero().view(-1)
        score = (relaxed.reshape(-1)[changed] - flat_clean[changed].float()).abs()
        changed = changed[torch.sort(score, descending=True, stable=True).indices]
        if fault.one_per_page and len(changed):
            pages = self.pages[changed // bits.shape[-1]]
            _, inverse = torch.unique(pages, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), len(changed), device=changed.device)
            first.scatter_reduce_(0, inverse, torch.arange(len(changed), device=changed.device),
                                  "amin")
            changed = changed[first.sort().values]   # the largest change of each page
        if fault.budget is not None:
            changed = changed[:fault.budget]
        out = clean.clone()
        out.view(-1)[changed] = 1 - flat_clean[changed]
        return out

    def violations(self, codes: torch.Tensor) -> list[str]:
        """How the final layer with integer ``codes`` ``[out, in]`` breaks the fault model
        (empty when it does not)."""
        with torch.no_grad():
            self.copy.weight.copy_(codes.cpu().to(self.copy.weight.dtype))
        return self.state.violations(self.holder, {self.name: self.clean})


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class ADMMRun:
    """One (k, gamma) run: how it ended and, unless it failed, its rounded bits.

    ``status``: ``converged`` (the stop rule fired), ``max_iters``, ``nan`` (b became NaN: the
    run fails, as in the public code) or ``skipped`` (dropped from a batch because an earlier run
    in the search order already succeeded; it cannot be the first success).
    """

    k: float
    gamma: float
    status: str
    iters: int = 0
    success: bool = False
    bits_changed: int | None = None
    bits: torch.Tensor | None = field(default=None, repr=False)      # rounded, [out, in, N]
    relaxed: torch.Tensor | None = field(default=None, repr=False)   # b before rounding, same

    def summary(self) -> dict:
        """The try as a record: ``k``, ``gamma``, ``status``, ``outer_iters``, ``success``,
        ``bits_changed`` (None for a NaN run)."""
        return {"k": self.k, "gamma": self.gamma, "status": self.status,
                "outer_iters": self.iters, "success": self.success,
                "bits_changed": self.bits_changed}


@dataclass
class TALBFResult(AttackResult):
    """Outcome of :meth:`TALBF.run` for one attacked sample (docs/algorithms.md section 8);
    ``codes`` (a tensor) stays out of :meth:`to_dict`."""

    index: int
    target: int
    source: int
    success: bool
    k: float | None            # the budget of the successful run (None: failed)
    gamma: float | None
    bits_changed: int | None   # changed bits of the final layer (Hamming distance)
    pa_acc: float | None       # % on the test set without x_s and D_aux, attacked layer
    pa_acc_clean: float        # same samples, clean layer
    converged: bool            # the successful run's ADMM stop rule fired
    outer_iters: int | None
    runs: int                  # runs of the search order decided (tried, in order)
    nan_runs: int              # of which failed with NaN
    aux: list = field(default_factory=list)     # D_aux in the order used (x_s after them)
    flips: list = field(default_factory=list)   # [row, col, bit] of every changed bit
    codes: torch.Tensor | None = field(default=None, repr=False)  # new integer codes
    tries: list = field(default_factory=list)   # ADMMRun.summary() of every decided run
    fault_violations: int = 0  # flips the fault model forbids, checked on the attacked codes

    EXCLUDE = ("codes",)


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------

@register_attack
class TALBF(Attack):
    """Stealthy TA-LBF on the final layer (see module docstring; docs/algorithms.md section 8).

    A campaign's items are :class:`AttackItem` s (:func:`generate_attack_list`, an attack list
    file); ``seed`` draws each item's D_aux when the item does not pin it (:func:`aux_seed`).

    ``features``: penultimate features of the whole test set ``[N, in]`` (see
    :func:`compute_features`), ``labels`` their classes; ``layer``: the attacked
    :class:`FinalLayer`; ``output``: the model's output interface (``is_ocm``, ``codebook``,
    ``predict``); ``faults``: a fault model on the final layer (:class:`FinalLayerFaults`,
    None: every bit may flip, the paper's attack). Everything runs on the features' device.
    """

    name = "talbf"
    noun = "TA-LBF attacks"
    results_dir = "attack_talbf"
    count = "bits_changed"
    summary_metrics = ("pa_acc", "bits_changed", "pa_acc_clean", "k", "gamma", "outer_iters",
                       "seconds")
    columns = (("asr", "ASR %"), ("pa_acc", "PA-ACC %"),
               ("bits_changed", "# bit-flips (bits changed)"))

    def __init__(self, layer: FinalLayer, output: nn.Module, features: torch.Tensor,
                 labels: torch.Tensor, config: TALBFConfig | None = None, seed: int = 0,
                 faults: FinalLayerFaults | None = None):
        self.seed = seed
        self.config = (config or TALBFConfig()).validate()
        self.device = features.device
        self.features = features.float()
        self.labels = labels.to(self.device, torch.int64)
        if len(self.labels) != len(self.features):
            raise ValueError(f"{len(self.features)} feature rows for {len(self.labels)} labels")
        self.layer = FinalLayer(layer.codes.to(self.device), layer.step,
                                layer.bias.to(self.device).float(), layer.n_bits, layer.tanh)
        if self.features.shape[1] != self.layer.codes.shape[1]:
            raise ValueError(f"features have {self.features.shape[1]} dimensions, the final "
                             f"layer {self.layer.codes.shape[1]} inputs")
        self.output = output
        self.ocm = bool(getattr(output, "is_ocm", False))
        # The relaxed bits are held bit-plane first, [N, out*in] flattened: every step of the
        # algorithm treats the n = out*in*N bits alike (sums, norms, elementwise), and this
        # layout makes the weight sum and its gradient contiguous (much faster on the CPU).
        self.b0 = self.layer.bits().to(torch.float32).permute(2, 0, 1).reshape(-1)
        self.faults = faults.to(self.device) if faults is not None else None
        # the bits the ADMM may move, in b0's layout (None: all of them)
        self.free = (None if faults is None else
                     self.faults.free.to(torch.float32).permute(2, 0, 1).reshape(-1))
        self.clean_pred = self.predict(self.features)
        self.clean_correct = self.clean_pred == self.labels

    @classmethod
    def from_model(cls, model: nn.Module, output: nn.Module, data,
                   config: TALBFConfig | None = None, seed: int = 0,
                   fault: FaultModel | None = None, **params) -> "TALBF":
        """Build the attack from a model in integer mode and an :class:`EvalSet`; the features
        of the whole test set are computed here, once. ``fault``: a fault model (None or an
        unconstrained one: the paper's attack); ``params``: the attack's own (:attr:`PARAMS`)."""
        layer = FinalLayer.from_model(model)
        faults = (FinalLayerFaults(model, fault) if fault is not None
                  and not fault.unconstrained else None)
        return cls(layer, output, compute_features(model, data), data.labels, config, seed,
                   faults, **params)

    @classmethod
    def from_target(cls, target, data, protocol: Protocol, **params) -> "TALBF":
        """The attack on an :class:`attacks.target.AttackTarget` (its fault model) measured on
        ``data``, D_aux drawn from ``protocol.seed`` as ``attack_talbf.py --seed`` draws it
        (:class:`attacks.base.Protocol`, docs/algorithms.md sections 8 and 14)."""
        cls.check_params(params)
        if target.deployment_record():
            raise NotApplicable(f"attack {cls.name!r} works on the final layer on cached "
                                f"features, which no deployment-time defense checks: attack "
                                f"a model with a deployment-time defense with bfa or tbfa")
        return cls.from_model(target.model, target.output, data, seed=protocol.seed,
                              fault=target.fault, **params)

    def plan(self, protocol: Protocol) -> list["AttackItem"]:
        """``protocol.samples`` attacks of :func:`generate_attack_list` with ``protocol.seed``
        (attack i targets class i mod C), as ``attack_talbf.py --n-attacks N --seed S``."""
        return generate_attack_list(self.labels, self.num_classes, protocol.samples,
                                    protocol.seed)

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.output.num_classes)

    def predict(self, features: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Classes of ``features`` with the layer's ``codes`` (default: the clean ones): the
        public TA-LBF script's decoding (``config.public_decode``, see :class:`TALBFConfig`)
        or the model's own (``output.predict``)."""
        with torch.no_grad():
            if not self.config.public_decode:
                return self.output.predict(self.layer.outputs(features, codes))
            layer = self.layer
            codes = layer.codes if codes is None else codes
            z = F.linear(features, codes.to(features.dtype) * layer.step, layer.bias)
            if self.ocm:
                # 2 sigmoid(2z) - 1 is tanh(z), rounded otherwise (the public attack's form)
                out = 2.0 * torch.sigmoid(2.0 * z) - 1.0
                book = self.output.codebook.to(out)
                z = torch.log(F.relu(torch.matmul(out, book.t())) + 1e-6)
            return torch.softmax(z, dim=1).topk(1, dim=1).indices.view(-1)

    def clean_accuracy(self) -> float:
        """% of the test set the clean layer classifies correctly (on the cached features)."""
        return _percent(self.clean_correct)

    # -- the campaign protocol (attacks/base.py); the attack never changes the model ---------
    def run_item(self, item: "AttackItem") -> dict:
        """One attack of the list: D_aux pinned by the item or drawn from ``seed``."""
        s = aux_seed(self.seed, item) if item.aux is None else None
        aux = None if item.aux is None else torch.tensor(item.aux, dtype=torch.int64)
        res = self.run(item.index, item.target, aux=aux, seed=s or 0)
        return {"pos": item.pos, **res.to_dict(exclude=("aux",)),
                "asr": 100.0 if res.success else 0.0, "clean_acc": self.clean_accuracy(),
                "aux_seed": s, "aux_idx": res.aux, "number_format": f"int{self.layer.n_bits}",
                "fault_model": self.faults.fault.to_dict() if self.faults else None,
                **self.settings()}

    @classmethod
    def summary(cls, records: list[dict]) -> list[dict]:
        """ASR over every attack; the other metrics over the successful ones (docs/algorithms.md
        section 8, :func:`campaigns.results.talbf_summary`, the rule the report uses too)."""
        from campaigns.results import TALBF as F, mean_std, successful, talbf_summary

        rows = talbf_summary(records, cls.summary_metrics)
        ok = successful(records)
        m, s = mean_std([100.0 * bool(r.get(F.converged)) for r in ok])
        rows.append({"metric": "converged_pct", "mean": m, "std": s, "n": len(ok)})
        m, s = mean_std([r.get(F.clean_acc) for r in records])
        rows.append({"metric": "clean_acc", "mean": m, "std": s, "n": len(records)})
        return rows

    @classmethod
    def recorded_flips(cls, record: dict) -> list[tuple]:
        """The bits of the final layer a successful attack changed (a failed one: none)."""
        return [(None, (row, col), bit, None) for row, col, bit in record.get("flips") or []]

    def describe(self, record: dict) -> str:
        if not record["success"]:
            return (f"{record['key']}: failed after {record['runs']} runs "
                    f"({record['seconds']:.1f}s)")
        return (f"{record['key']}: success with k={record['k']:g} gamma={record['gamma']:g}, "
                f"{record['bits_changed']} bits changed, PA-ACC {record['pa_acc']:.2f}%"
                f"{'' if record['converged'] else ', ADMM not converged'} "
                f"({record['seconds']:.1f}s)")

    def closing(self, records: list[dict]) -> str:
        return f"{len(records)} attacks, {sum(r['success'] for r in records)} successful"

    def draw_aux(self, index: int, seed: int, n_aux: int | None = None) -> torch.Tensor:
        """D_aux: ``n_aux`` distinct test indices drawn at random among all but ``index``."""
        n_aux = self.config.n_aux if n_aux is None else n_aux
        n = len(self.labels)
        if n_aux > n - 1:
            raise ValueError(f"n_aux {n_aux} is larger than the {n - 1} test samples besides "
                             f"the attacked one")
        perm = torch.randperm(n - 1, generator=torch.Generator().manual_seed(int(seed)))[:n_aux]
        return perm + (perm >= index).long()  # skip ``index``

    # -- the search ------------------------------------------------------------------------------
    def run(self, index: int, target: int, aux: torch.Tensor | None = None,
            seed: int = 0) -> TALBFResult:
        """Attack test sample ``index`` into class ``target``: search k (doubling) and gamma
        (halving) and keep the first success in that order. ``aux`` defaults to a draw with
        ``seed`` (:meth:`draw_aux`)."""
        cfg = self.config
        n = len(self.labels)
        if not 0 <= index < n:
            raise ValueError(f"test index {index} is outside the test set (0..{n - 1})")
        if not 0 <= target < self.num_classes:
            raise ValueError(f"target class {target} is outside 0..{self.num_classes - 1}")
        source = int(self.labels[index])
        if source == target:
            raise ValueError(f"sample {index} is of class {target} already: the target must be "
                             f"another class")
        aux = self.draw_aux(index, seed) if aux is None else torch.as_tensor(aux).long().cpu()
        if aux.dim() != 1 or len(aux) == 0 or (aux < 0).any() or (aux >= n).any():
            raise ValueError(f"D_aux must be a non-empty list of test indices (0..{n - 1})")
        if (aux == index).any() or len(torch.unique(aux)) != len(aux):
            raise ValueError("D_aux must not contain the attacked sample nor repeat an index")
        aux = aux.to(self.device)
        problem = self.problem(index, target, aux)
        order = cfg.search_order()
        winner, decided, nan_runs, tries = None, 0, 0, []
        for start, end in cfg.batches():
            for r in self.admm(problem, order[start:end]):
                if r.status == "skipped":  # only after a success
                    break
                decided += 1
                nan_runs += r.status == "nan"
                tries.append(r.summary())
                if r.success:
                    winner = r
                    break
            if winner is not None:
                break
        keep = torch.ones(n, dtype=torch.bool, device=self.device)
        keep[index] = False
        keep[aux] = False
        pa_clean = _percent(self.clean_correct[keep])
        if winner is None:
            return TALBFResult(index, target, source, False, None, None, None, None, pa_clean,
                               False, None, decided, nan_runs, aux.tolist(), tries=tries)
        codes = self.layer.codes_from_bits(winner.bits)
        pred = self.predict(self.features, codes)
        pa = _percent((pred == self.labels)[keep])
        changed = (winner.bits != self.layer.bits()).nonzero().tolist()
        violations = len(self.faults.violations(codes)) if self.faults is not None else 0
        return TALBFResult(index, target, source, True, winner.k, winner.gamma, winner.bits_changed,
                           pa, pa_clean, winner.status == "converged", winner.iters, decided,
                           nan_runs, aux.tolist(), changed, codes, tries, violations)

    def problem(self, index: int, target: int, aux: torch.Tensor) -> "_Problem":
        """The loss of one attack (the paper's; :class:`TALBFAdaptive` attacks the scores)."""
        return _Problem(self, index, target, aux)

    # -- lp-box ADMM, batched over runs --------------------------------------------------------
    def admm(self, problem: "_Problem", runs: list[tuple[float, float]]) -> list[ADMMRun]:
        """Run lp-box ADMM for every ``(k, gamma)`` of ``runs`` (listed in search order) as one
        batch. A run that succeeds drops the runs after it that are still going (status
        ``skipped``). Returns one :class:`ADMMRun` per entry."""
        cfg, layer, dev = self.config, self.layer, self.device
        out_f, in_f, nb = layer.shape
        n, m = self.b0.numel(), out_f * in_f
        G = len(runs)
        results: list[ADMMRun | None] = [None] * G
        ks = torch.tensor([r[0] for r in runs], dtype=torch.float32, device=dev)
        gammas = torch.tensor([r[1] for r in runs], dtype=torch.float32, device=dev)
        # Per-row loss weights: x_s 1, each D_aux sample gamma / |D_aux|; y-targets per row.
        roww, ycode = problem.row_weights(gammas)                 # [G, 1, B], [out, B]
        ycodew = ycode * roww                                     # [G, out, B]
        X = problem.x                                             # [B, in]
        Xt = X.t().contiguous()                                   # [in, B]
        bias = layer.bias.unsqueeze(1)                            # [out, 1]
        base = bitlib.bit_values(nb, dtype=torch.float32, device=dev)           # [N]
        sbase_col = (base * layer.step).view(nb, 1)   # dW/db_k = step * base[k]
        b0, free = self.b0, self.free
        layer_bits = layer.bits()
        b = b0.expand(G, n).clone()
        z1 = torch.zeros(G, n, device=dev)
        # y2 and z2 in float64 with sphere_float64 (the public code's NumPy promotion)
        sdt = torch.float64 if cfg.sphere_float64 else torch.float32
        z2 = torch.zeros(G, n, device=dev, dtype=sdt)
        z3 = torch.zeros(G, device=dev)
        rho1, rho2, rho3 = cfg.rho1, cfg.rho2, cfg.rho3
        lr = cfg.inn_lr
        active = list(range(G))   # row r of the working tensors is run active[r]
        best = G                  # smallest index of a successful run so far
        for ext in range(cfg.ext_max_iters):
            # Projections onto the box, the sphere and the positive slack (docs/algorithms.md section 8), each
            # expression in the public code's order of operations.
            y1 = project_box(b + z1 / rho1)
            y2 = project_sphere(b.to(sdt) + z2 / rho2)
            y2f, z2f = y2.float(), z2.float()   # as the loss sees them (no copy in float32)
            d = b - b0
            y3 = project_positive(ks - _sqnorm(d) - z3 / rho3)
            # Gradient steps on b with y, z, rho fixed. The augmented Lagrangian's gradient is
            #   dF/db + z1 + z2 + rho1 (b-y1) + rho2 (b-y2) + 2 (z3 + rho3 (|b-b0|^2-k+y3)) (b-b0)
            # (dF/db analytic: the layer is linear in b).
            zz = torch.add(z1, z2f)
            A0 = z3 + rho3 * (y3 - ks)                                 # [G]
            for _ in range(cfg.inn_max_iters):
                d = b - b0
                W = layer.weight_from_bits(b)
                # Logits transposed, [G, out, B]: softmax over a non-innermost dimension of
                # this size is much faster on the CPU, and dF/dW = dF/dz^T @ X needs no copy.
                zt = torch.matmul(W, Xt).add_(bias)
                gW = torch.matmul(problem.grad_zt(zt, roww, ycodew), X)   # [G, out, in]
                # the gradient term by term, then b - lr * grad, as autograd and the public
                # step compute it: each penalty acts on a difference (b - y), so near the
                # fixed point the rounding error is relative to the step, not to b
                A = torch.add(A0, _sqnorm(d), alpha=rho3).mul_(2.0)
                g = zz.clone()
                g.view(-1, nb, m).addcmul_(gW.view(-1, 1, m), sbase_col)
                g.add_((b - y1).mul_(rho1))
                g.add_((b - y2f).mul_(rho2))
                g.add_(d.mul_(A.unsqueeze(1)))
                if free is not None:  # a fault model: the bits it forbids never move
                    g.mul_(free)
                b = b - g.mul_(lr)
            # Dual and penalty updates, then the stop rule (public order).
            # b.sum is NaN when b holds a NaN (or both infinities): an exact check only then.
            nan = ~torch.isfinite(b.sum(dim=1))
            d = b - b0
            r1 = b - y1
            r2 = b.to(sdt) - y2
            z1.add_(r1 * rho1)
            z2.add_(r2 * rho2)
            z3 = z3 + rho3 * (_sqnorm(d) - ks + y3)
            rho1 = min(cfg.rho_fact * rho1, cfg.max_rho1)
            rho2 = min(cfg.rho_fact * rho2, cfg.max_rho2)
            rho3 = min(cfg.rho_fact * rho3, cfg.max_rho3)
            last = ext == cfg.ext_max_iters - 1
            if ext > cfg.min_ext_iters:  # *quirk*: the public test is ``ext_iter > 100``
                # max(|b-y1|, |b-y2|) / |b| <= threshold, each ratio in its own dtype
                norm_b = torch.linalg.vector_norm(b, dim=1).clamp_(min=_NORM_FLOOR)
                done = ((torch.linalg.vector_norm(r1, dim=1) / norm_b <= cfg.stop_threshold)
                        & (torch.linalg.vector_norm(r2, dim=1) / norm_b.to(sdt)
                           <= cfg.stop_threshold))
                flags = torch.stack([nan, done]).tolist()
            else:
                flags = [nan.tolist(), [False] * len(active)]
            for r in range(len(active)):
                if flags[0][r]:
                    flags[0][r] = bool(torch.isnan(b[r]).any())
                    flags[1][r] = flags[1][r] and not flags[0][r]
            finished = [r for r in range(len(active)) if flags[0][r] or flags[1][r] or last]
            if not finished:
                continue
            for r in finished:
                run = active[r]
                k_r, g_r = runs[run]
                relaxed = b[r].view(nb, out_f, in_f).permute(1, 2, 0).contiguous()
                if flags[0][r]:
                    results[run] = ADMMRun(k_r, g_r, "nan", ext + 1, relaxed=relaxed)
                    continue
                bits = (relaxed > 0.5).to(torch.uint8)
                if self.faults is not None:  # admissible bits only, one per page, the budget
                    bits = self.faults.project(bits, relaxed, layer_bits)
                codes = layer.codes_from_bits(bits)
                pred = self.predict(problem.x_s, codes)
                success = int(pred[0]) == problem.target
                bits_changed = int((bits != layer_bits).sum())
                results[run] = ADMMRun(k_r, g_r, "converged" if flags[1][r] else "max_iters",
                                       ext + 1, success, bits_changed, bits, relaxed)
                if success:
                    best = min(best, run)
            # Drop finished runs and the runs after the first success (not needed).
            keep_rows = [r for r in range(len(active))
                         if results[active[r]] is None and active[r] < best]
            if not keep_rows:
                break
            if len(keep_rows) < len(active):
                idx = torch.tensor(keep_rows, device=dev)
                b, z1, z2, z3 = b[idx], z1[idx], z2[idx], z3[idx]
                ks, roww, ycodew = ks[idx], roww[idx], ycodew[idx]
                active = [active[r] for r in keep_rows]
        for i in range(G):
            if results[i] is None:
                results[i] = ADMMRun(runs[i][0], runs[i][1], "skipped")
        return results


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm of each row (one pass, no temporary)."""
    return torch.linalg.vector_norm(x, dim=-1).square_()


def _percent(hits: torch.Tensor) -> float:
    """100 * the fraction of True entries (NaN when empty)."""
    return 100.0 * int(hits.sum()) / len(hits) if len(hits) else float("nan")


class _Problem:
    """The data of one attacked sample: features of D_aux then x_s (the public order), their
    loss targets and the gradient of the attack loss with respect to the logits."""

    def __init__(self, attack: TALBF, index: int, target: int, aux: torch.Tensor):
        self.target = int(target)
        self.ocm = attack.ocm
        self.log_prob_nan = attack.config.log_prob_nan and not self.ocm
        rows = torch.cat([aux, torch.tensor([index], device=aux.device)])
        self.x = attack.features[rows]                                    # [B, in]
        self.x_s = self.x[-1:]
        y = attack.labels[rows].clone()
        y[-1] = self.target
        self.n_aux = len(aux)
        if self.ocm:
            # BCE against the codes mapped to {0, 1} (OCM paper, supplement eq. 6).
            self.y = (attack.output.codebook.to(attack.device)[y] + 1.0) / 2.0    # [B, L]
        else:
            self.y = F.one_hot(y, attack.layer.codes.shape[0]).float()            # [B, C]

    def row_weights(self, gammas: torch.Tensor):
        """Per-sample factor of the loss gradient ``[G, 1, B]`` and the targets ``[out, B]``:
        1 for x_s, gamma / |D_aux| for each D_aux sample; for OCM also the BCE's 2/L."""
        G, B = len(gammas), self.x.shape[0]
        w = torch.empty(G, B, device=gammas.device)
        w[:, :-1] = (gammas / self.n_aux).unsqueeze(1)
        w[:, -1] = 1.0
        if self.ocm:
            w = w * (2.0 / self.y.shape[1])   # d/dz of mean BCE(sigmoid(2z)) = 2 (p - c) / L
        return w.unsqueeze(1), self.y.t().contiguous()

    def grad_zt(self, zt: torch.Tensor, roww: torch.Tensor, ycodew: torch.Tensor) -> torch.Tensor:
        """dF/dz for the batch of transposed logits ``zt`` ``[G, out, B]`` (same layout).

        Vanilla: ``-log softmax(z_s)[t] + gamma * CE(z_aux, y)`` gives ``w * (softmax(z) - y)``.
        With ``log_prob_nan`` (the public code's ``-log(softmax(z_s))[t]`` in float32), a run
        whose target probability p_t underflows so far that ``1/p_t`` overflows gets a NaN
        gradient, as autograd gives the public code (``-1/p_t = -inf`` times ``p_t``): the run
        ends in NaN at the end of that outer iteration. Without it, the gradient stays finite.
        OCM: ``BCE(sigmoid(2z), c)`` gives ``w * (p - c) * s / max(s, 1e-12)`` with
        ``s = p (1 - p)`` (*quirk*: ``torch.nn.BCELoss`` clamps its gradient's denominator at
        1e-12, so an output saturated in float32 passes no gradient, as in the public code).
        """
        if self.ocm:
            p = torch.sigmoid(2.0 * zt)
            s = p * (1.0 - p)
            return (p * roww - ycodew) * (s / s.clamp(min=_BCE_EPS))
        p = torch.softmax(zt, dim=1)
        g = torch.addcmul(-ycodew, p, roww)
        if self.log_prob_nan:
            pt = p[:, self.target, -1]                                     # [G]
            trap = torch.where(torch.isinf(pt.reciprocal()), float("nan"), 0.0)
            g.add_(trap.view(-1, 1, 1))  # NaN for those runs, unchanged otherwise (no sync)
        return g


# ---------------------------------------------------------------------------------------------
# Adaptive TA-LBF: the loss on the decoded class scores (docs/algorithms.md section 8b)
# ---------------------------------------------------------------------------------------------

def score_grad(zt: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, loss: str = "ce",
               codebook: torch.Tensor | None = None, tanh: bool = False,
               kappa: float = 1.0, onehot: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dz of ``L = sum_b w_b l(s_b, y_b)`` for transposed logits ``zt`` ``[G, out, B]`` (the
    layout of :meth:`_Problem.grad_zt`), same layout (docs/algorithms.md section 8b).

    Scores ``s = C g(z)`` ``[G, C, B]``: ``g`` tanh (``tanh``) or the identity, ``C`` the OCM
    ``codebook`` ``[C, L]`` (None: ``s = g(z)``, the logits of a softmax model); ``labels``
    ``[B]`` the class of each column, ``weights`` ``[G, 1, B]``. ``loss``: ``ce``, ``l =
    -log softmax(s)[y]``; ``margin``, ``l = max(kappa - (s_y - max_{c != y} s_c), 0)`` (TA-LBF
    Eq. 5 on the scores). Then ``dL/dz = (C^T dL/ds) * g'(z)``. ``onehot``: the labels as
    ``[C, B]`` one-hot columns, when the caller holds them (ADMM calls this every step).
    """
    # tanh(z) = 2 sigmoid(2z) - 1: the same function, 1.6x faster than torch.tanh on the CPU
    # (this runs at every ADMM step)
    a = torch.sigmoid(zt * 2.0).mul_(2.0).sub_(1.0) if tanh else zt
    s = torch.matmul(codebook, a) if codebook is not None else a
    if onehot is None:
        onehot = F.one_hot(labels, s.shape[1]).t().to(s.dtype)                # [C, B]
    if loss == "ce":
        gs = torch.softmax(s, dim=1).sub_(onehot).mul_(weights)
    elif loss == "margin":
        at = labels.view(1, 1, -1).expand(s.shape[0], 1, -1)
        s_y = s.gather(1, at)                                                  # [G, 1, B]
        top, other = s.masked_fill(onehot.bool(), float("-inf")).max(dim=1, keepdim=True)
        # active where the margin s_y - top is below kappa (x - y > 0 iff y < x in floats)
        on = s_y.sub_(top).lt_(kappa).mul_(weights)                           # [G, 1, B]
        gs = torch.zeros_like(s).scatter_(1, other, on).addcmul_(onehot, on, value=-1.0)
    else:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    gz = torch.matmul(codebook.t(), gs) if codebook is not None else gs
    # dL/dz = dL/dg * (1 - g^2), one fused kernel
    return torch.ops.aten.tanh_backward(gz, a) if tanh else gz


class _ScoreProblem(_Problem):
    """The adaptive attack's loss (:func:`score_grad`): x_s weighted 1, each D_aux sample
    gamma / |D_aux| (TA-LBF's weights), on the decoded class scores."""

    def __init__(self, attack: "TALBFAdaptive", index: int, target: int, aux: torch.Tensor):
        self.target = int(target)
        self.ocm = attack.ocm
        rows = torch.cat([aux, torch.tensor([index], device=aux.device)])
        self.x = attack.features[rows]
        self.x_s = self.x[-1:]
        self.y = attack.labels[rows].clone()
        self.y[-1] = self.target
        self.n_aux = len(aux)
        self.codebook = attack.output.codebook.to(attack.device).float() if self.ocm else None
        self.loss, self.kappa = attack.loss, float(attack.kappa)
        self.tanh = self.ocm and attack.scores == "tanh"
        classes = attack.output.num_classes if self.ocm else attack.layer.codes.shape[0]
        self.onehot = F.one_hot(self.y, classes).t().to(self.x.dtype)          # [C, B]

    def row_weights(self, gammas: torch.Tensor):
        """``[G, 1, B]`` weights and (unused by :meth:`grad_zt`) zero targets ``[out, B]``."""
        G, B = len(gammas), self.x.shape[0]
        w = torch.empty(G, B, device=gammas.device)
        w[:, :-1] = (gammas / self.n_aux).unsqueeze(1)
        w[:, -1] = 1.0
        return w.unsqueeze(1), torch.zeros(1, B, device=gammas.device)

    def grad_zt(self, zt: torch.Tensor, roww: torch.Tensor, ycodew: torch.Tensor) -> torch.Tensor:
        return score_grad(zt, self.y, roww, self.loss, self.codebook, self.tanh, self.kappa,
                          self.onehot)


@register_attack
class TALBFAdaptive(TALBF):
    """TA-LBF whose loss acts on the model's decoded class scores (docs/algorithms.md section
    8b): on an OCM model ``s = g(z) C^T`` (``scores``: ``tanh``, ``g = tanh``, the model's
    outputs; ``preact``, the identity: no saturated gradient), on a softmax model the logits.
    ``loss``: ``ce`` (cross-entropy over the scores) or ``margin`` (Eq. 5 of the paper with
    margin ``kappa``, in score units). Everything else is :class:`TALBF`'s (search, ADMM,
    fault models); success and PA-ACC are the model's own decision (``public_decode`` off)."""

    name = "talbf_adaptive"
    noun = "adaptive TA-LBF attacks"
    results_dir = "attack_talbf_adaptive"
    PARAMS = {"loss": LOSSES, "scores": SCORES, "kappa": ()}

    def __init__(self, layer: FinalLayer, output: nn.Module, features: torch.Tensor,
                 labels: torch.Tensor, config: TALBFConfig | None = None, seed: int = 0,
                 faults: FinalLayerFaults | None = None, loss: str = "ce",
                 scores: str = "tanh", kappa: float = 1.0):
        check_params(self.name, {"loss": loss, "scores": scores}, self.PARAMS)
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or \
                not math.isfinite(kappa) or kappa < 0:
            raise ValueError(f"attack {self.name!r}: kappa must be a number >= 0, got {kappa!r}")
        self.loss, self.scores, self.kappa = loss, scores, float(kappa)
        config = replace(config or TALBFConfig(), public_decode=False)
        super().__init__(layer, output, features, labels, config, seed, faults)

    def settings(self) -> dict:
        return {"loss": self.loss, "scores": self.scores, "kappa": self.kappa}

    def problem(self, index: int, target: int, aux: torch.Tensor) -> _ScoreProblem:
        return _ScoreProblem(self, index, target, aux)

    def predict(self, features: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own decision (``output.predict`` of the activated outputs), whatever
        the config says."""
        with torch.no_grad():
            return self.output.predict(self.layer.outputs(features, codes))


# ---------------------------------------------------------------------------------------------
# Attack lists (docs/algorithms.md section 8 protocol) and campaigns
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttackItem:
    """One line of an attack list: its position, the target class, the test index and, when
    pinned (an attacks file), D_aux in the order to use (``aux``; None: drawn per attack from
    the campaign seed, :func:`aux_seed`)."""

    pos: int
    target: int
    index: int
    aux: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        """Unique within a campaign: the position, target and index, plus a digest of a pinned
        D_aux (the same image with another D_aux is another attack)."""
        key = f"{self.pos}-t{self.target}-i{self.index}"
        if self.aux is not None:
            key += "-a" + hashlib.sha256(",".join(map(str, self.aux)).encode()).hexdigest()[:8]
        return key


def items_from_pinned(attacks) -> list[AttackItem]:
    """Attack items of :func:`attacks.talbf_file.parse_attacks` output, in file order."""
    return [AttackItem(pos, a.target, a.idx, tuple(a.aux_idx)) for pos, a in enumerate(attacks)]


def with_drawn_aux(attack: "TALBF", items: list[AttackItem], seed: int) -> list[AttackItem]:
    """``items`` with D_aux pinned: a pinned one kept, the others drawn as a campaign with
    ``seed`` draws them (:func:`aux_seed`), so that saving them repeats the campaign exactly."""
    return [it if it.aux is not None else
            AttackItem(it.pos, it.target, it.index,
                       tuple(attack.draw_aux(it.index, aux_seed(seed, it)).tolist()))
            for it in items]


def _as_int(text: str) -> int | None:
    """``text`` as an integer (``3`` or ``3.0``, as NumPy's ``loadtxt`` reads it), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def read_attack_info(text: str, name: str = "attack list") -> list[tuple[int, int, int]]:
    """Syntax of the public format: one ``target_class test_index`` pair per line (blank lines
    and ``#`` comments are skipped). Returns ``(line number, target, index)`` per pair; raises
    ValueError naming the first malformed line, or a pair listed before (it would run twice)."""
    out, first = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        values = [_as_int(p) for p in body.replace(",", " ").split()]
        if len(values) != 2 or None in values:
            raise ValueError(f"{name} line {number}: expected 'target_class test_index' (two "
                             f"integers), got {line.strip()[:60]!r}")
        if tuple(values) in first:
            raise ValueError(f"{name} line {number} repeats the attack of line "
                             f"{first[tuple(values)]} (target {values[0]}, test index "
                             f"{values[1]}): list each attack once")
        first[tuple(values)] = number
        out.append((number, values[0], values[1]))
    if not out:
        raise ValueError(f"{name} holds no 'target_class test_index' lines")
    return out


def check_attack_info(entries: list[tuple[int, int, int]], labels: torch.Tensor,
                      num_classes: int, name: str = "attack list") -> list[AttackItem]:
    """The attack items of :func:`read_attack_info` entries; raises ValueError naming the line
    of an index outside the test set, a class outside the model's or a target equal to the
    sample's own class."""
    labels = labels.cpu()
    n = len(labels)
    items = []
    for number, target, index in entries:
        if not 0 <= index < n:
            raise ValueError(f"{name} line {number}: test index {index} is outside the test set "
                             f"(0..{n - 1})")
        if not 0 <= target < num_classes:
            raise ValueError(f"{name} line {number}: target class {target} is outside the "
                             f"model's classes (0..{num_classes - 1})")
        if int(labels[index]) == target:
            raise ValueError(f"{name} line {number}: test sample {index} is of class {target}, "
                             f"the target itself; a targeted attack needs another class")
        items.append(AttackItem(len(items), target, index))
    return items


def parse_attack_info(text: str, labels: torch.Tensor, num_classes: int,
                      name: str = "attack list") -> list[AttackItem]:
    """:func:`read_attack_info` then :func:`check_attack_info`."""
    return check_attack_info(read_attack_info(text, name), labels, num_classes, name)


def generate_attack_list(labels: torch.Tensor, num_classes: int, n_attacks: int,
                         seed: int, eligible: torch.Tensor | None = None) -> list[AttackItem]:
    """The protocol's list (docs/algorithms.md section 8): attack ``i`` targets class ``i mod C``; the sources
    of each target are distinct test samples of other classes, drawn from a permutation seeded
    by ``(seed, target)``. Every class is the target equally often when ``n_attacks`` is a
    multiple of C, and a shorter list is a prefix of a longer one (a campaign can be extended).
    ``eligible`` (bool mask) restricts the sources, e.g. to correctly classified samples."""
    labels = labels.cpu()
    ok = torch.ones(len(labels), dtype=torch.bool) if eligible is None else eligible.cpu()
    per_target = -(-n_attacks // num_classes)
    pools = []
    for t in range(num_classes):
        need = n_attacks // num_classes + (t < n_attacks % num_classes)
        pool = ((labels != t) & ok).nonzero().view(-1)
        if len(pool) < need:
            raise ValueError(f"target class {t} needs {need} source samples of other classes "
                             f"but the test set has only {len(pool)}: lower --n-attacks")
        state = np.random.SeedSequence([int(seed), t]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        pools.append(pool[torch.randperm(len(pool), generator=g)[:per_target]])
    return [AttackItem(i, i % num_classes, int(pools[i % num_classes][i // num_classes]))
            for i in range(n_attacks)]


def format_attack_info(items: list[AttackItem]) -> str:
    """The public file format: ``target_class test_index`` per line."""
    return "".join(f"{it.target} {it.index}\n" for it in items)


def attack_list_digest(items: list[AttackItem]) -> str:
    """SHA-256 of the list: of its public format, plus every pinned D_aux."""
    text = format_attack_info(items)
    if any(it.aux is not None for it in items):
        text += "".join(f"{it.pos}:{','.join(map(str, it.aux or ()))}\n" for it in items)
    return hashlib.sha256(text.encode()).hexdigest()


def aux_seed(seed: int, item: AttackItem) -> int:
    """Seed of one attack's D_aux: a pure function of the campaign seed and the item, so the
    draws do not depend on which attacks ran before (resume)."""
    return int(np.random.SeedSequence([int(seed), item.pos, item.target,
                                       item.index]).generate_state(1)[0])
