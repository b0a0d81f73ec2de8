"""Untargeted bit-flip attack (BFA) and the random-flip baseline (docs/algorithms.md sections 5 and 6).

- Rakin, He, Fan, "Bit-Flip Attack: Crushing Neural Network with Progressive Bit Search",
  ICCV 2019 (the progressive bit search);
- He, Rakin, Li, Chakrabarti, Fan, "Defending and Harnessing the Bit-Flip based Adversarial
  Weight Attack", CVPR 2020 (the attack as the public BFA repository runs it, and the
  random-flip baseline).

Both attacks work on a model in integer mode (:func:`models.to_integer`), flip bits of its
quantized weights in place and report every flip as a :class:`ProfileRow`. The bit search
itself is :class:`utils.bitsearch.ProgressiveBitSearch`, shared with the other attacks.

Against the public BFA repository (elliothe/BFA ``attack/BFA.py``, ``attack/random_attack.py``,
``attack/data_conversion.py`` and the attack loop ``perform_attack`` of its ``main.py``):

Same: the attack batch is labelled once, before the first flip, with the model's own
predictions (``model(data).max(1)``; no label leak); every iteration re-runs forward and backward
on that batch for ``dLoss/dq`` (cross-entropy, mean over the batch; eval mode; integer weights
``q`` times the frozen step); per layer the candidates are the ``k_top`` weights with the
largest ``|g|`` (default all), each bit scored by its first-order change
``(1 - 2*bit) * b_w * g`` and only bits that raise the loss allowed (the public
``b_bin XOR sign(g * b_w)`` mask); a layer with no such bit flips nothing (its trial loss is the
clean one: it never wins); each layer's candidate is tried alone and the layer with the highest
attack loss wins (the first one on a tie, module order); while no layer raises the loss, the
top-2, top-3, ... bits of every layer are tried together (``n_bits2flip``); the full test split is
evaluated after every iteration and the attack stops at ``break_acc`` (11 % CIFAR-10, 0.2 %
ImageNet) or after ``n_iter`` iterations; the Hamming distance is counted against the clean
codes; the random baseline picks a quantized layer, a weight and a bit uniformly.

Different (deliberate, each with the option that selects the public behaviour):

1. The multi-bit retry stops at ``max_bits_per_layer = 32`` bits per layer and then keeps the
   best flip found even though it does not raise the loss (``MAX_BITS_PER_LAYER``); the public
   loop has no bound (it runs until the loss rises, or until ``topk`` fails). Public:
   ``max_bits_per_layer=None`` (``--max_bits_per_layer 0``), which stops only when the loss rises
   or every layer already proposes all its admissible bits (from there the public code repeats
   the same trials).
2. When a layer has fewer admissible bits than the retry asks for, the public ``topk`` fills the
   rest with masked (zero-score) bits, which ones depending on ``topk``'s tie order; we flip
   only the admissible ones. Not reproducible exactly, so no option.
3. Binarized layers: the public 1-bit ``b_w`` is ``[-1]`` while its bit conversion makes bit 1
   mean +1 (``int2bin(w) = w/2 + 0.5``), so its gradient mask selects, per 1-bit layer, the
   flips that *lower* the loss to first order (the weight with the largest ``|g|`` among them);
   the layer ranking by the real loss is unchanged. Ours scores 1-bit layers like the others
   (bit 1 means -1, ``b_w = [-2]``). Public: ``public_binary_mask=True``
   (``--public_binary_mask``).
4. When no layer has any admissible bit the public loop never ends; ours flips nothing that
   iteration (``SearchStep.flips`` empty).
5. A NaN trial loss ranks as +inf here (the flip destroyed the output: the highest loss);
   the public ``max`` over a dict with NaN depends on the layer order. Only float formats
   (docs/algorithms.md section 1b) produce one: integer codes give finite losses.
6. Exactly-zero binarized codes (only with :func:`models.quantization.use_public_sign`) are
   written as -1 before the first flip (the public BFA writes -1 over them when it rewrites
   their layer, its random flip reads them as -1 without writing the others).
7. The random baseline draws from its own ``torch.Generator``; the public one from Python's
   ``random`` seeded with ``--manualSeed``. Public stream: ``RandomFlips(python_random=True)``
   (``--public_random_stream``): the same ``random.choice`` calls in the same order, so the same
   seed flips the same bits.
8. Run-level (``attack_bfa.py``): the attack batch is a seeded random draw of un-augmented
   training images; the public one is the first batch of its shuffled training loader, which
   applies the training augmentation (random crop with 4-pixel padding and horizontal flip on
   CIFAR). Public: ``--augment_attack_batch``. The public ``break_acc`` exists only for CIFAR-10
   and ImageNet (other data sets raise a NameError after the first iteration); ours uses
   chance + 1 point there.

Example::

    from models import to_integer
    from attacks.bfa import BFA
    from attacks.common import EvalSet

    to_integer(model.eval())
    eval_set = EvalSet(test_images, test_labels, mean, std, device)
    result = BFA(model, output).run(attack_images, eval_set, n_iter=100, break_acc=11.0)
    print(result.clean_accuracy, result.final_accuracy, result.iterations)
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from models.quantization import settle_zero_codes
from models.bits import (bit_layers, changed_bits, format_label, random_flip, restore,
                         snapshot)
from utils.bitsearch import MAXIMIZE, AttackLoss, ProgressiveBitSearch, SearchStep
from utils.data import load_split_tensors, normalize_images
from utils.faults import FaultModel, FaultState

from .base import Attack, AttackResult, Protocol, register_attack, tally
from .common import EvalSet
from .objectives import LOSSES, adaptive_objective

log = logging.getLogger(__name__)

# The public code retries with ever more bits per layer and no bound; 32 (four bytes per layer
# flipped at once) only stops a model whose loss cannot rise from looping for ever.
MAX_BITS_PER_LAYER = 32

# Columns of the attack profile, in the order the CSV files use.
PROFILE_FIELDS = ("iteration", "flip", "layer", "index", "bit", "before", "after", "accuracy",
                  "accuracy_drop", "loss", "bits_changed")


@dataclass
class ProfileRow:
    """One flipped bit of the attack profile (docs/algorithms.md section 6).

    ``accuracy``, ``loss`` and ``bits_changed`` are measured after the whole iteration, so the rows
    of one multi-bit iteration share them (as in the public code).
    """

    iteration: int        # attack iteration, from 1 (the papers' "# bit-flips" when 1 bit each)
    flip: int             # running count of flipped bits (the public code's "bit-flip idx")
    layer: str            # module name of the quantized layer
    index: int            # flat index of the weight in that layer
    bit: int              # flipped bit, 0 = MSB (docs/algorithms.md section 1)
    before: int | float | str  # stored value before the flip (an integer code, or a float;
    after: int | float | str   # inf and NaN as strings) and after it
    accuracy: float       # test accuracy (%) after the iteration
    accuracy_drop: float  # clean accuracy minus ``accuracy`` (percentage points)
    loss: float           # attack loss on the attack batch after the iteration
    bits_changed: int     # Hamming distance between the clean and the attacked codes

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BFAResult(AttackResult):
    """Outcome of :meth:`BFA.run` / :meth:`RandomFlips.run`.

    ``stopped_by`` is ``"break_acc"`` (accuracy fell to the threshold), ``"n_iter"``, and under
    a fault model ``"budget"`` (the flip budget is spent) or ``"no_admissible"`` (no admissible
    flip left); a run in progress (see ``attack.result``) says ``"running"``.
    """

    attack: str
    clean_accuracy: float
    clean_loss: float
    final_accuracy: float
    final_loss: float
    iterations: int = 0
    bits_changed: int = 0         # Hamming distance to the clean codes at the stop
    stopped_by: str = "running"
    attack_images: int = 0
    test_images: int = 0
    number_format: str = ""       # the attacked weights' format(s), e.g. int8 or fp16
    fault_model: dict | None = None   # utils.faults.FaultModel.to_dict(); None: unconstrained
    fault_violations: int = 0     # flips the fault model forbids, found on the final weights
    profile: list[ProfileRow] = field(default_factory=list)

    DERIVED = ("bits_flipped", "accuracy_drop")

    @property
    def bits_flipped(self) -> int:
        """Flipped bits in all (more than ``iterations`` when multi-bit retries happened)."""
        return len(self.profile)

    @property
    def accuracy_drop(self) -> float:
        return self.clean_accuracy - self.final_accuracy



@dataclass(frozen=True)
class Repetition:
    """One BFA or random-flip run of a campaign: its own seed draws its attack batch (and the
    random flips), as the BFA papers average over runs with different seeds."""

    rep: int
    seed: int

    @property
    def key(self) -> str:
        return f"r{self.rep}"


def plan_repetitions(reps: int, seed: int) -> list[Repetition]:
    """``reps`` runs, run ``r`` seeded ``seed + r`` (run 0 is the single run of ``seed``)."""
    if reps < 1:
        raise ValueError(f"repetitions must be at least 1, got {reps}")
    return [Repetition(r, seed + r) for r in range(reps)]


@dataclass
class AttackBatch:
    """One run's attack batch: ``images`` (uint8 pixels, or float inputs already normalized),
    the ``labels`` the attack uses (None: the model's own predictions, the BFA papers' rule) and
    its ``origin`` as the records keep it (a seed, a file and its digest, training indices)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    origin: dict = field(default_factory=dict)


def drawn_attack_batches(target, size: int) -> Callable[[Repetition], AttackBatch]:
    """Each run's attack batch: ``size`` training images of ``target``'s data set drawn with
    the run's seed, labelled by the model (what ``attack_bfa.py`` does without a pinned
    batch)."""
    def draw(item: Repetition) -> AttackBatch:
        images, _ = load_split_tensors(target.dataset.name, target.data.data_dir, split="train",
                                       download=target.data.download,
                                       workers=target.data.workers, max_images=size,
                                       seed=item.seed)
        return AttackBatch(images, None, {"seed": item.seed, "augmented": False})

    return draw


@dataclass
class Stopping:
    """When a run stops: ``n_iter`` iterations, or the test accuracy at ``break_acc`` (%)."""

    n_iter: int = 100
    break_acc: float | None = None


class _FlipAttack(Attack):
    """What BFA and the random baseline share: labelling, the loss, the attack loop, and the
    campaign protocol (:mod:`attacks.base`): an item is a :class:`Repetition`, whose
    :class:`AttackBatch` ``attack_batch(item)`` gives (e.g. a seeded draw of training images, or
    a pinned batch), attacked until ``stopping`` on ``data``."""

    noun = "BFA runs"
    results_dir = "attack_bfa"
    count = "bits_flipped"
    summary_metrics = ("clean_acc", "final_acc", "accuracy_drop", "iterations", "bits_flipped",
                       "bits_changed", "fault_violations")
    columns = (("final_acc", "after attack %"), ("bits_flipped", "# bit-flips (bits flipped)"))
    scalars = ("final_acc", "bits_flipped", "iterations")

    #: called with each :class:`ProfileRow` as a campaign item flips it (live logs)
    on_flip: Callable[["ProfileRow"], None] | None = None
    #: called with ``(item, batch, labels)`` before a campaign item attacks (to save the batch)
    on_batch: Callable[[Repetition, AttackBatch, torch.Tensor], None] | None = None

    def __init__(self, model: nn.Module, output: nn.Module, fault: FaultModel | None = None,
                 eval_model: nn.Module | None = None, data: EvalSet | None = None,
                 attack_batch: Callable[[Repetition], AttackBatch] | None = None,
                 stopping: Stopping | None = None, number_format: str = ""):
        layers = bit_layers(model)
        if not layers:
            raise ValueError("the model has no quantized layers to attack")
        for lname, layer in layers:
            if not layer.integer_mode:
                raise ValueError(f"layer {lname} is not in integer mode: call "
                                 f"models.to_integer(model) before attacking")
        self.model = model
        self.output = output
        # The model the test accuracy is measured on: the attacked one, or e.g. the deployed
        # torch.ao model its codes are written back to (models.formats.DeployedModel).
        self.eval_model = eval_model if eval_model is not None else model
        self.fault = fault if fault is not None and not fault.unconstrained else None
        self.faults: FaultState | None = None   # this run's fault state
        self.result: BFAResult | None = None  # the run in progress, updated per iteration
        self.data, self.attack_batch = data, attack_batch
        self.stopping = stopping or Stopping()
        self.number_format = number_format  # its label when not the layers' own (torch-int8)
        self._clean = snapshot(model)

    # -- the campaign protocol (attacks/base.py) ---------------------------------------------
    @classmethod
    def from_target(cls, target, data: EvalSet, protocol: Protocol, **params) -> "_FlipAttack":
        """The attack on ``target`` (its fault model) under ``protocol``: each run attacks
        ``protocol.bfa_batch`` training images drawn with its seed, for at most
        ``protocol.bfa_iters`` iterations or until the test accuracy is at
        ``protocol.break_acc`` (default: chance + 1 point)."""
        cls.check_params(params)
        return cls._on_target(target, data, protocol, target.output)

    @classmethod
    def _on_target(cls, target, data, protocol: Protocol, output, **options):
        return cls(target.model, output, **flip_campaign(target, data, protocol), **options)

    def plan(self, protocol: Protocol) -> list[Repetition]:
        return plan_repetitions(protocol.bfa_reps, protocol.seed)

    def reset(self) -> None:
        restore(self.model, self._clean)

    def reseed(self, seed: int) -> None:
        """Make the attack's own random draws those of ``seed`` (none for BFA)."""

    def run_item(self, item: Repetition) -> dict:
        """One run: its attack batch and draws seeded with ``item.seed``, the whole profile."""
        self.reseed(item.seed)
        batch = self.attack_batch(item)
        labels = batch.labels
        if labels is None:
            labels = self.label(self.prepare(batch.images, self.data))
        labels = labels.to(self.device)
        if self.on_batch is not None:
            self.on_batch(item, batch, labels)
        flagged = getattr(self.eval_model, "detections", None)  # a deployment-time defense's
        result = self.run(batch.images, self.data, self.stopping.n_iter,
                          break_acc=self.stopping.break_acc, on_flip=self.on_flip,
                          labels=labels)
        d = result.to_dict()
        if flagged is not None:  # units its checks flagged during the run (groups, words)
            d["detections"] = self.eval_model.detections - flagged
        d["number_format"] = self.number_format or d["number_format"]
        return {"rep": item.rep, "seed": item.seed, "clean_acc": d.pop("clean_accuracy"),
                "final_acc": d.pop("final_accuracy"), **{k: v for k, v in d.items()
                                                          if k != "attack"},
                "n_iter": self.stopping.n_iter, "break_acc": self.stopping.break_acc,
                "attack_batch": batch.origin}

    @classmethod
    def succeeded(cls, record: dict) -> bool:
        """The run brought the test accuracy down to its ``break_acc``."""
        return record.get("stopped_by") == "break_acc"

    @classmethod
    def outcome(cls, records: list[dict]) -> dict:
        """The untargeted cell: ``asr`` is the % of runs that brought the test accuracy down to
        their ``break_acc`` (chance), ``flips`` the bits flipped to get there (mean over those
        runs); no PA-ACC (docs/algorithms.md section 14)."""
        from campaigns.results import mean_std

        reached = [r for r in records if cls.succeeded(r)]
        asr, asr_std = mean_std([100.0 * cls.succeeded(r) for r in records])
        flips, flips_std = mean_std([r.get(cls.count) for r in reached])
        return {"n": len(records), "count": cls.count, "asr": asr, "asr_std": asr_std,
                "pa_acc": None, "pa_acc_std": None, "flips": flips, "flips_std": flips_std}

    @classmethod
    def recorded_flips(cls, record: dict) -> list[tuple]:
        rows = record.get("profile") or []
        if rows and "layer" not in rows[0]:
            raise ValueError(f"record {record.get('key')} is a run of an earlier version whose "
                             f"profile keeps no flipped bits")
        return [(r["layer"], r["index"], r["bit"], r["before"]) for r in rows]

    def describe(self, record: dict) -> str:
        return (f"{record['key']}: {record['stopped_by']} after {record['iterations']} "
                f"iterations, {record['bits_flipped']} bits flipped ({record['bits_changed']} "
                f"changed), test accuracy {record['clean_acc']:.2f}% -> "
                f"{record['final_acc']:.2f}%")

    def closing(self, records: list[dict]) -> str:
        return f"{len(records)} runs ({tally(records, 'stopped_by')})"

    def new_fault_state(self) -> FaultState | None:
        """A fresh fault state for a run (pages unused, budget whole), or None."""
        self.faults = FaultState(self.model, self.fault) if self.fault is not None else None
        return self.faults

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attack loss: cross-entropy, or for OCM the L1 distance to the class code."""
        return self.output.loss(self.model(x), y)

    @torch.no_grad()  # not inference_mode: the labels enter the autograd graph of the search
    def label(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own predictions: the attack batch's labels (no label leak, docs/algorithms.md section 6)."""
        self.model.eval()
        return self.output.predict(self.model(x))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> SearchStep:
        """One attack iteration on the batch ``(x, y)``; flips bits of the model in place."""
        raise NotImplementedError

    def prepare(self, attack_x: torch.Tensor, eval_set: EvalSet) -> torch.Tensor:
        """Attack inputs on the model's device: uint8 images are normalized like ``eval_set``."""
        x = attack_x.to(self.device)
        if x.dtype == torch.uint8:
            return normalize_images(x, eval_set.mean, eval_set.std)
        return x.float()

    def run(self, attack_x: torch.Tensor, eval_set: EvalSet, n_iter: int,
            break_acc: float | None = None,
            on_flip: Callable[[ProfileRow], None] | None = None,
            on_start: Callable[[BFAResult], None] | None = None,
            progress: bool = False, labels: torch.Tensor | None = None) -> BFAResult:
        """Attack until the test accuracy falls to ``break_acc`` (%) or ``n_iter`` iterations.

        Args:
            attack_x: the attack batch: uint8 images (normalized with ``eval_set``'s mean and
                std) or already normalized float inputs. Labelled with the model's own
                predictions before the first flip.
            eval_set: the test split; its accuracy is measured after every iteration.
            n_iter: most iterations (>= 1).
            break_acc: stop once the test accuracy is at or below this % (None: never).
            on_flip: called with each :class:`ProfileRow` as soon as its iteration is done.
            on_start: called once with the result holding the clean accuracy and loss.
            progress: tqdm bar over the iterations.
            labels: the attack batch's labels (default None: the model's own predictions, the
                BFA papers' rule; a pinned batch of the public code brings its own).

        The Hamming distance is measured against the codes at the start of this call. The
        model stays attacked; keep a :func:`models.bits.snapshot` to undo the flips.
        ``self.result`` holds the result so far while the attack runs (e.g. after Ctrl-C).
        """
        if n_iter < 1:
            raise ValueError(f"n_iter must be at least 1, got {n_iter}")
        self.model.eval()
        x = self.prepare(attack_x, eval_set)
        y = self.label(x) if labels is None else labels.to(self.device)
        clean_acc = eval_set.accuracy(self.eval_model, self.output)
        with torch.inference_mode():
            clean_loss = float(self.loss(x, y))
        settle_zero_codes(self.model)  # difference 6 of the module docstring
        clean_codes = snapshot(self.model)
        faults = self.new_fault_state()
        result = BFAResult(self.name, clean_acc, clean_loss, clean_acc, clean_loss,
                           attack_images=len(x), test_images=len(eval_set),
                           number_format=format_label(self.model),
                           fault_model=self.fault.to_dict() if self.fault else None)
        self.result = result
        log.debug("%s: clean accuracy %.2f%%, attack loss %.4f", self.name, clean_acc,
                  clean_loss)
        if on_start is not None:
            on_start(result)
        bar = tqdm(range(1, n_iter + 1), desc=self.name, disable=not progress,
                   dynamic_ncols=True, leave=False)
        for iteration in bar:
            step = self.step(x, y)
            if faults is not None and not step.flips:
                result.stopped_by = "budget" if faults.remaining == 0 else "no_admissible"
                break
            accuracy = eval_set.accuracy(self.eval_model, self.output)
            hamming = changed_bits(self.model, clean_codes)
            for flip in step.flips:
                row = ProfileRow(iteration, result.bits_flipped + 1, flip.layer, flip.index,
                                 flip.bit, flip.before, flip.after, accuracy,
                                 clean_acc - accuracy, step.loss_after, hamming)
                result.profile.append(row)
                if on_flip is not None:
                    on_flip(row)
            result.iterations = iteration
            result.final_accuracy, result.final_loss = accuracy, step.loss_after
            result.bits_changed = hamming
            bar.set_postfix(acc=f"{accuracy:.2f}", loss=f"{step.loss_after:.3f}")
            if break_acc is not None and accuracy <= break_acc:
                result.stopped_by = "break_acc"
                break
        else:
            result.stopped_by = "n_iter"
        bar.close()
        if faults is not None:
            result.fault_violations = len(faults.violations(self.model, clean_codes))
        return result


@register_attack
class BFA(_FlipAttack):
    """Untargeted bit-flip attack with progressive bit search (docs/algorithms.md sections 5 and 6).

    Rakin et al., ICCV 2019; He et al., CVPR 2020. Each iteration backpropagates the attack
    loss on the attack batch, lets every quantized layer propose the bit with the largest
    loss-raising bit gradient, tries each proposal and keeps the one that raises the loss
    most. When no proposal raises the loss, the top-2, then top-3, ... bits per layer are
    tried together (``multi_bit_retry``).

    Args:
        model: the network in integer mode, on its device (parameters other than the
            quantized weights are set to ``requires_grad=False``).
        output: its output interface (:class:`models.SoftmaxOutput` or
            :class:`models.OutputCodeMatching`); its ``loss`` is the attack loss.
        k_top: only the ``k_top`` weights per layer with the largest ``|dL/dq|`` are
            candidates (default None: all weights).
        max_bits_per_layer: bound of the multi-bit retry (default 32; None: no bound, as the
            public code; module docstring, difference 1).
        public_binary_mask: choose the candidates of 1-bit layers with the public code's
            inverted mask (module docstring, difference 3).
        fault: a :class:`utils.faults.FaultModel`: only the flips it admits are made (default
            None: every flip, as the papers).
        eval_model: the model the test accuracy is measured on (default: ``model``).
        data, attack_batch, stopping: what a campaign item (:meth:`run_item`) runs on: the
            test split, ``seed -> attack images``, and :class:`Stopping`; ``number_format``
            its records' label of the weights' format when not the layers' own (torch-int8).

    Example::

        attack = BFA(model, output, k_top=None)
        y = attack.label(x)              # the model's own predictions
        step = attack.step(x, y)         # one iteration: step.flips, step.loss_after
        result = attack.run(images_uint8, eval_set, n_iter=100, break_acc=11.0)
    """

    name = "bfa"

    def __init__(self, model: nn.Module, output: nn.Module, k_top: int | None = None,
                 max_bits_per_layer: int | None = MAX_BITS_PER_LAYER, incremental: bool = True,
                 public_binary_mask: bool = False, fault: FaultModel | None = None,
                 eval_model: nn.Module | None = None, **campaign):
        super().__init__(model, output, fault, eval_model, **campaign)
        if k_top is not None and k_top < 1:
            raise ValueError(f"k_top must be at least 1 (or None for all weights), got {k_top}")
        if max_bits_per_layer is not None and max_bits_per_layer < 1:
            raise ValueError(f"max_bits_per_layer must be at least 1 (or None: no bound), got "
                             f"{max_bits_per_layer}")
        self.k_top = k_top
        self.search = ProgressiveBitSearch(model, MAXIMIZE, k_top=k_top, multi_bit_retry=True,
                                           max_bits_per_layer=max_bits_per_layer,
                                           skip_inadmissible=True, incremental=incremental,
                                           invert_binary=public_binary_mask)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> SearchStep:
        """One progressive-search iteration on ``(x, y)``; ``y`` are the model's predictions."""
        settle_zero_codes(self.model)
        self.search.faults = self.faults

        def gradient_loss():
            loss = self.loss(x, y)
            return loss, float(loss.detach())

        return self.search.step(gradient_loss,
                                AttackLoss(self.model, x, lambda out: self.output.loss(out, y)))


@register_attack
class RandomFlips(_FlipAttack):
    """Random-flip baseline (He et al., CVPR 2020; docs/algorithms.md section 6): each iteration flips one
    bit chosen uniformly (a quantized layer, a weight in it, a bit), reported like :class:`BFA`.

    Args:
        model: the network in integer mode.
        output: its output interface (used only to report the attack loss).
        seed: seed of the flips' own ``torch.Generator`` (default 0), ignored when
            ``generator`` is given.
        generator: a CPU ``torch.Generator`` to draw from instead.
        python_random: draw like the public code instead: ``random.choice`` of a layer, of a
            weight index, of a bit (counted from the LSB), from ``random.Random(seed)``
            (module docstring, difference 7).
    """

    name = "random"
    noun = "random-flip runs"
    results_dir = "attack_bfa_random"

    def __init__(self, model: nn.Module, output: nn.Module, seed: int = 0,
                 generator: torch.Generator | None = None, python_random: bool = False,
                 fault: FaultModel | None = None, eval_model: nn.Module | None = None,
                 **campaign):
        super().__init__(model, output, fault, eval_model, **campaign)
        if python_random and self.fault is not None:
            raise ValueError("the public random stream draws among all bits: it cannot be "
                             "combined with a fault model")
        self.generator = generator if generator is not None else \
            torch.Generator().manual_seed(seed)
        self.python_rng = random.Random(seed) if python_random else None

    def reseed(self, seed: int) -> None:
        """A campaign run's own stream: the generator (or the public ``random``) of ``seed``."""
        self.generator.manual_seed(seed)
        if self.python_rng is not None:
            self.python_rng.seed(seed)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> SearchStep:
        """Flip one random bit (:func:`models.bits.random_flip`, among the fault model's
        admissible flips when there is one); the losses on ``(x, y)`` before and after are
        reported."""
        self.model.eval()
        settle_zero_codes(self.model)
        with torch.inference_mode():
            before = float(self.loss(x, y))
        flip = None
        if self.faults is None or self.faults.remaining != 0:
            flip = random_flip(self.model, self.generator, python_random=self.python_rng,
                               admissible=self.faults.mask if self.faults is not None else None)
        if flip is None:
            return SearchStep([], before, before, False, 0)
        if self.faults is not None:
            self.faults.record([flip])
        with torch.inference_mode():
            after = float(self.loss(x, y))
        return SearchStep([flip], before, after, True, 1)


@register_attack
class BFAAdaptive(BFA):
    """BFA that knows the output head: the same progressive search, maximising a loss over the
    decoded class scores of the model's own predictions (:class:`attacks.objectives.
    DecodedObjective`, untargeted; docs/algorithms.md section 14). Parameters: ``loss``
    (``ce`` | ``margin``), ``scores`` (``tanh`` | ``preact``), ``kappa`` (1.0)."""

    name = "bfa_adaptive"
    PARAMS = {"loss": LOSSES, "scores": ("tanh", "preact"), "kappa": ()}

    @classmethod
    def from_target(cls, target, data: EvalSet, protocol: Protocol, **params) -> "BFA":
        cls.check_params(params)
        objective = adaptive_objective(target, untargeted=True, **params)
        # on a softmax model the cross-entropy over the decoded scores is BFA's own loss
        head_loss = objective.is_head_loss
        attack = cls._on_target(target, data, protocol,
                                target.output if head_loss else objective)
        attack.params = objective.to_dict()
        attack.same_as = BFA.name if head_loss else None
        return attack

    def settings(self) -> dict:
        return dict(self.params)


def flip_campaign(target, data: EvalSet, protocol: Protocol) -> dict:
    """The campaign arguments of a flip attack built from a target under a protocol
    (:meth:`attacks.base.Attack.from_target`): the test split, each run's ``bfa_batch``
    training images drawn with its seed, :class:`Stopping` at ``bfa_iters`` or ``break_acc``
    (None: chance + 1 point), the target's fault model, evaluation model (behind its
    deployment-time defenses) and format label."""
    classes = int(target.config.num_classes)
    break_acc = protocol.break_acc if protocol.break_acc is not None else 100.0 / classes + 1
    return dict(data=data, attack_batch=drawn_attack_batches(target, protocol.bfa_batch),
                stopping=Stopping(protocol.bfa_iters, break_acc),
                number_format=target.number_format, eval_model=target.eval_model,
                fault=target.fault)
