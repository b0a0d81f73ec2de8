"""Stealthy targeted bit-flip attack (T-BFA "type 3", Rakin et al., TPAMI 2021), as evaluated
in the OCM paper's supplement (docs/algorithms.md section 7).

Source class ``s`` is pushed to target ``t`` with the progressive bit search
(:class:`utils.bitsearch.ProgressiveBitSearch`, minimising) on

    mean L(f(x), t) over D_src  +  mean L(f(x), y) over D_aux

where ``L`` is the training loss (cross-entropy, or L1 to the OCM codes). Example::

    from attacks.common import EvalSet
    from attacks.tbfa import TBFA, TBFAConfig, draw_sets
    test = EvalSet(images, labels, mean, std, device)
    sets = draw_sets(test.labels, source=3, n_src=500, n_aux=500, seed=7)
    result = TBFA(model, output, TBFAConfig()).run(test, sets, source=3, target=4)
    result.asr, result.pa_acc, result.iterations
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from models.bits import changed_bits, format_label, restore, snapshot
from utils.bitsearch import MINIMIZE, AttackLoss, ProgressiveBitSearch
from utils.faults import FaultModel, FaultState

from .base import Attack, AttackResult, Protocol, register_attack, tally
from .common import EvalSet
from .objectives import LOSSES, SCORES, adaptive_objective

# Paper protocol per data set (docs/algorithms.md section 7): classes used as sources, |D_src| = |D_aux|.
PROTOCOLS = {
    "cifar10": {"classes": 10, "n": 500},
    "cifar100": {"classes": 50, "n": 50},
    "imagenet": {"classes": 50, "n": 25},
}


def protocol_pairs(num_classes: int, source_start: int = 0,
                   source_end: int | None = None) -> list[tuple[int, int]]:
    """Each source ``s`` in ``[source_start, source_end)`` twice: ``t = s-1`` and ``t = s+1``
    (mod ``num_classes``), in the public scripts' order."""
    end = num_classes if source_end is None else min(source_end, num_classes)
    return [(s, (s + d) % num_classes) for s in range(source_start, end) for d in (-1, 1)]


def default_set_size(dataset: str, labels: torch.Tensor, classes: int) -> int:
    """|D_src| = |D_aux| of the protocol; elsewhere half the smallest source class's samples."""
    if dataset in PROTOCOLS:
        return PROTOCOLS[dataset]["n"]
    counts = torch.bincount(labels.cpu(), minlength=classes)[:classes]
    return max(1, int(counts.min()) // 2)


def experiment_seed(seed: int, source: int, target: int, rep: int) -> int:
    """Seed of one experiment's sets: a pure function of the campaign seed and the experiment,
    so the sets do not depend on which experiments ran before (resume, sharding)."""
    return int(np.random.SeedSequence([seed, source, target, rep]).generate_state(1)[0])


@dataclass
class TBFASets:
    """Test-set indices of one experiment: D_src, D_rest (both class s), D_aux, D_pa."""

    src: torch.Tensor
    rest: torch.Tensor
    aux: torch.Tensor
    pa: torch.Tensor

    def to_dict(self) -> dict:
        """The pinned-sets entry; ``pa`` is kept in its order (the public PA-ACC formula counts
        whole blocks of 100 in that order, see :func:`pa_acc_public`)."""
        return {k: getattr(self, k).tolist() for k in ("src", "rest", "aux", "pa")}

    def to(self, device) -> "TBFASets":
        return TBFASets(*(getattr(self, k).to(device) for k in ("src", "rest", "aux", "pa")))


def draw_sets(labels: torch.Tensor, source: int, n_src: int, n_aux: int,
              seed: int) -> TBFASets:
    """docs/algorithms.md section 7: from a random permutation of the test set, D_src = the first ``n_src``
    samples of class ``source``, D_rest = its last ``n_src`` (disjoint when the class has at
    least ``2 n_src``), D_aux = the first ``n_aux`` samples of the other classes, D_pa = the
    remaining samples of the other classes. Raises ValueError when a class is too small."""
    labels = labels.cpu()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    in_class = perm[labels[perm] == source]
    others = perm[labels[perm] != source]
    if len(in_class) < n_src:
        raise ValueError(f"class {source} has only {len(in_class)} test samples, fewer than "
                         f"--n-src {n_src}: lower --n-src")
    if len(others) < n_aux:
        raise ValueError(f"only {len(others)} test samples outside class {source}, fewer than "
                         f"--n-aux {n_aux}: lower --n-aux")
    return TBFASets(in_class[:n_src], in_class[len(in_class) - n_src:], others[:n_aux],
                    others[n_aux:])


def _percent(hits: torch.Tensor) -> float:
    """% of True in ``hits`` (NaN when empty, as :meth:`EvalSet.accuracy`)."""
    return 100.0 * int(hits.sum()) / len(hits) if len(hits) else float("nan")


def pa_acc_public(correct: torch.Tensor, block: int = 100) -> float:
    """PA-ACC as the public T-BFA code computes it: only whole blocks of ``block`` samples of
    D_pa (in its order) are scored, but the count is divided by all of D_pa, so up to
    ``block - 1`` samples are never counted (docs/algorithms.md section 7). ``correct`` is the
    per-sample hit vector in D_pa order."""
    if len(correct) == 0:
        return float("nan")
    scored = (len(correct) // block) * block
    return 100.0 * int(correct[:scored].sum()) / len(correct)


def _index_list(values, name: str, n: int) -> torch.Tensor:
    """A list of integer positions in a test set of ``n`` samples (a float such as 3.5 or true
    is refused, never truncated; so is a position outside it, however large)."""
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"pinned set {name!r} must be a list of integer test-set indices")
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise ValueError(f"pinned set {name!r} has index {bad[0]} outside the test set "
                         f"(0..{n - 1})")
    return torch.tensor(values, dtype=torch.int64)


def pinned_sets(entry: dict, labels: torch.Tensor, source: int) -> TBFASets:
    """Sets given as index lists (``src``, ``rest``, ``aux``, optionally ``pa``). D_pa is every
    other-class sample outside D_aux; a given ``pa`` must be exactly those, and fixes their
    order (which only the public PA-ACC formula sees). Checks that the indices exist, that D_src
    and D_rest are of class ``source`` and D_aux is not, and that the sets do not overlap
    (ValueError with the reason otherwise)."""
    labels = labels.cpu()
    n = len(labels)
    out = {}
    for name in ("src", "rest", "aux"):
        if name not in entry:
            raise ValueError(f"pinned sets lack {name!r}")
        idx = _index_list(entry[name], name, n)
        if len(idx) == 0:
            raise ValueError(f"pinned set {name!r} is empty")
        if len(torch.unique(idx)) != len(idx):
            raise ValueError(f"pinned set {name!r} repeats an index")
        out[name] = idx
    for name in ("src", "rest"):
        wrong = out[name][labels[out[name]] != source]
        if len(wrong):
            raise ValueError(f"pinned set {name!r} has index {int(wrong[0])} of class "
                             f"{int(labels[wrong[0]])}, not the source class {source}")
    wrong = out["aux"][labels[out["aux"]] == source]
    if len(wrong):
        raise ValueError(f"pinned set 'aux' has index {int(wrong[0])} of the source class "
                         f"{source}")
    for a, b in (("src", "rest"), ("src", "aux"), ("rest", "aux")):
        common = set(out[a].tolist()) & set(out[b].tolist())
        if common:
            raise ValueError(f"pinned sets {a!r} and {b!r} overlap (index {min(common)})")
    mask = labels != source
    mask[out["aux"]] = False
    pa = mask.nonzero().view(-1)
    if entry.get("pa") is not None:
        given = _index_list(entry["pa"], "pa", n)
        if len(given) != len(pa) or not torch.equal(torch.sort(given).values, pa):
            raise ValueError(f"pinned set 'pa' must hold exactly the {len(pa)} samples outside "
                             f"the source class and D_aux (it has {len(given)}); drop it to "
                             f"derive it")
        pa = given
    return TBFASets(out["src"], out["rest"], out["aux"], pa)


@dataclass
class TBFAConfig:
    """Stop rules and options (docs/algorithms.md section 7); defaults reproduce the public code.

    - ``max_iters``: iteration cap (5000);
    - ``success_threshold``: stop when ASR on D_src or on D_rest exceeds it (% , 99.9);
    - ``stop_on_rest``: True = *quirk* of the public code, D_rest reaching the threshold also
      stops the attack (with small sets it often fires before D_src is complete); False = the
      paper's rule, only D_src counts;
    - ``full_gradient``: False = *quirk* of both public implementations, the gradient comes from
      the D_src term only (the D_aux term is added as a number); True = the paper's objective;
    - ``oscillation_by_layer``: False = *quirk*, the oscillation rule compares only the flipped
      weight's index within its layer over three consecutive iterations; True also compares
      the layer;
    - ``curve_every``: record ASR and PA-ACC every K flips (0 = never);
    - ``fault``: a :class:`utils.faults.FaultModel`: only the flips it admits (default None:
      every flip, as the papers); the attack then also stops with ``budget`` (the flip budget
      is spent) or ``no_admissible`` (no admissible flip left, e.g. every page used);
    - ``incremental``: score trial flips by re-running the network from the flipped layer on
      (same flips as the plain search, faster; see :class:`utils.bitsearch.ProgressiveBitSearch`).
    """

    max_iters: int = 5000
    success_threshold: float = 99.9
    stop_on_rest: bool = True
    full_gradient: bool = False
    oscillation_by_layer: bool = False
    curve_every: int = 0
    incremental: bool = True
    fault: FaultModel | None = None


@dataclass
class TBFAResult(AttackResult):
    """Outcome of :meth:`TBFA.run`: the attack metrics of one experiment (docs/algorithms.md
    section 7)."""

    source: int
    target: int
    asr: float            # % of D_rest classified as t (the paper's ASR)
    asr_src: float        # % of D_src classified as t
    pa_acc: float         # % accuracy on D_pa, every sample counted
    pa_acc_public: float  # the public formula: whole blocks of 100 of D_pa only (see above)
    test_acc: float       # % accuracy on the whole test set after the attack
    iterations: int       # attack iterations, one bit each (the papers' "# bit-flips")
    bits_changed: int     # bits that differ from the clean model (a flip may undo one)
    stop_reason: str      # success | no_bit | oscillation | max_iters | budget | no_admissible
    success_on: str | None  # "src" or "rest": the set whose ASR passed the threshold first
    pa_acc_clean: float
    asr_clean: float
    flips: list = field(default_factory=list)
    curve: list = field(default_factory=list)
    fault_violations: int = 0  # flips the fault model forbids, found on the final weights


@register_attack
class TBFA(Attack):
    """Stealthy T-BFA on a model in integer mode (see module docstring).

    ``data`` (an :class:`EvalSet` of the test split) is what :meth:`run_item` attacks with; a
    campaign's items are :class:`Experiment` s (:func:`plan_experiments`, :func:`plan_pinned`).
    """

    name = "tbfa"
    noun = "T-BFA experiments"
    results_dir = "attack_tbfa"
    count = "iterations"
    summary_metrics = ("clean_acc", "asr", "asr_src", "pa_acc", "pa_acc_public", "test_acc",
                       "iterations", "bits_changed")
    columns = (("asr", "ASR %"), ("pa_acc", "PA-ACC %"),
               ("iterations", "# bit-flips (iterations)"))
    scalars = ("asr", "pa_acc", "iterations", "test_acc")

    def __init__(self, model: nn.Module, output: nn.Module, config: TBFAConfig | None = None,
                 eval_model: nn.Module | None = None, data: EvalSet | None = None,
                 number_format: str = ""):
        self.model = model
        # the records' label of the attacked weights' format (torch-int8: not the layers' own)
        self.number_format = number_format or format_label(model)
        self.output = output
        self.data = data
        self._clean = snapshot(model)
        self._clean_acc: float | None = None
        self._clean_predictions: torch.Tensor | None = None
        # where ASR and accuracies are measured (e.g. the deployed torch.ao model the codes are
        # written back to, models.formats.DeployedModel); the attacked model by default
        self.eval_model = eval_model if eval_model is not None else model
        self.config = config or TBFAConfig()
        if self.config.max_iters < 1:
            raise ValueError("max_iters must be at least 1")
        # One search for every experiment: the model is traced with torch.fx once, and the
        # search re-primes its cache when the inputs or the codes are new.
        self._search: ProgressiveBitSearch | None = None

    def run(self, data: EvalSet, sets: TBFASets, source: int, target: int,
            on_flip: Callable[[int, dict], None] | None = None,
            clean_predictions: torch.Tensor | None = None) -> TBFAResult:
        """Attack until a stop rule fires; the model keeps the flips (restore it yourself, e.g.
        with :func:`models.bits.snapshot` / :func:`~models.bits.restore`).
        ``clean_predictions``: the model's predictions of every sample of ``data`` as it is
        now, when the caller holds them (a campaign measures them once): the PA-ACC and ASR
        before the attack are read from them."""
        cfg, model, output = self.config, self.model, self.output
        if source == target:
            raise ValueError("source and target class must differ")
        sets = sets.to(data.device)
        clean = snapshot(model)
        if self._search is None:
            self._search = ProgressiveBitSearch(model, MINIMIZE, incremental=cfg.incremental)
        search = self._search
        faults = search.faults = (FaultState(model, cfg.fault) if cfg.fault is not None
                                  and not cfg.fault.unconstrained else None)
        x_src = data.inputs(sets.src)
        x_both = torch.cat([x_src, data.inputs(sets.aux)])
        ns = len(x_src)
        t_src = torch.full((ns,), target, dtype=torch.int64, device=data.device)
        y_aux = data.labels[sets.aux]
        judge = self.eval_model
        src_rest = torch.cat([sets.src, sets.rest])
        t_src_rest = torch.full((len(src_rest),), target, dtype=torch.int64, device=data.device)

        # One forward for D_src and D_aux together.
        attack_loss = AttackLoss(model, x_both, lambda out: output.loss(out[:ns], t_src)
                                 + output.loss(out[ns:], y_aux))

        def gradient_loss():
            if cfg.full_gradient:
                loss = attack_loss()
                return loss, float(loss.detach())
            # *quirk*: D_aux enters as a number only; the search reads the current value of
            # the whole objective from its clean forward.
            return output.loss(model(x_src), t_src), None

        def asr_pair():
            hits = data.predict(judge, output, src_rest) == t_src_rest
            return (100.0 * int(hits[:ns].sum()) / ns,
                    100.0 * int(hits[ns:].sum()) / (len(hits) - ns))

        if clean_predictions is not None:
            pa_clean = _percent(clean_predictions[sets.pa] == data.labels[sets.pa])
            asr_clean = _percent(clean_predictions[sets.rest] == target)
        else:
            pa_clean = data.accuracy(judge, output, sets.pa)
            asr_clean = data.accuracy(judge, output, sets.rest, t_src_rest[ns:])
        flips, curve, recent = [], [], []
        if cfg.curve_every:
            curve.append({"iterations": 0, "asr": asr_clean, "pa_acc": pa_clean})
        stop, success_on, it = "max_iters", None, 0
        for it in range(1, cfg.max_iters + 1):
            step = search.step(gradient_loss, attack_loss)
            if not step.flips:  # a fault model left no admissible flip
                stop, it = ("budget" if faults.remaining == 0 else "no_admissible"), it - 1
                break
            flip = step.flips[0]
            record = {**flip.as_dict(), "loss": step.loss_after}
            flips.append(record)  # every flip, so that the attacked model can be rebuilt
            if on_flip is not None:
                on_flip(it, record)
            if self.on_step is not None:
                self.on_step(it, {"loss": f"{step.loss_after:.4f}"})
            asr_src, asr_rest = asr_pair()
            if cfg.curve_every and it % cfg.curve_every == 0:
                curve.append({"iterations": it, "asr": asr_rest, "asr_src": asr_src,
                              "pa_acc": data.accuracy(judge, output, sets.pa)})
            recent = (recent + [(flip.layer, flip.index)])[-3:]
            if asr_src > cfg.success_threshold:
                stop, success_on = "success", "src"
                break
            if cfg.stop_on_rest and asr_rest > cfg.success_threshold:
                stop, success_on = "success", "rest"
                break
            if not step.all_admissible:
                stop = "no_bit"
                break
            if len(recent) == 3 and len({r[1] for r in recent}) == 1 and (
                    not cfg.oscillation_by_layer or len({r[0] for r in recent}) == 1):
                stop = "oscillation"
                break
        asr_src, asr_rest = asr_pair()
        hits = data.predict(judge, output) == data.labels  # every sample, one pass
        pa_hits = hits[sets.pa]
        pa_acc = _percent(pa_hits)
        if cfg.curve_every and (not curve or curve[-1]["iterations"] != it):
            curve.append({"iterations": it, "asr": asr_rest, "asr_src": asr_src,
                          "pa_acc": pa_acc})
        return TBFAResult(source=source, target=target, asr=asr_rest, asr_src=asr_src,
                          pa_acc=pa_acc, pa_acc_public=pa_acc_public(pa_hits),
                          test_acc=_percent(hits), iterations=it,
                          bits_changed=changed_bits(model, clean), stop_reason=stop,
                          success_on=success_on,
                          pa_acc_clean=pa_clean, asr_clean=asr_clean, flips=flips, curve=curve,
                          fault_violations=(len(faults.violations(model, clean))
                                            if faults is not None else 0))

    # -- the campaign protocol (attacks/base.py) ---------------------------------------------
    @classmethod
    def from_target(cls, target, data: EvalSet, protocol: Protocol, **params) -> "TBFA":
        """The paper's T-BFA on ``target`` (its fault model; at most ``protocol.iters``
        iterations), measuring on ``data``."""
        cls.check_params(params)
        return cls._on_target(target, data, protocol, target.output)

    @classmethod
    def _on_target(cls, target, data, protocol: Protocol, output, **config) -> "TBFA":
        attack = cls(target.model, output,
                     TBFAConfig(max_iters=protocol.iters, fault=target.fault, **config),
                     target.eval_model, data, target.number_format)
        attack.dataset_name = target.dataset.name
        return attack

    def plan(self, protocol: Protocol) -> list["Experiment"]:
        """``protocol.pairs`` (default: the data set's protocol pairs) ``protocol.reps`` times,
        sets of ``protocol.n_src`` / ``n_aux`` samples (default: the protocol's size)."""
        labels, classes = self.data.labels, int(self.output.num_classes)
        name = getattr(self, "dataset_name", "")
        pairs = list(protocol.pairs) or protocol_pairs(
            PROTOCOLS.get(name, {"classes": classes})["classes"])
        n = default_set_size(name, labels, classes)
        return plan_experiments(labels, pairs, protocol.reps, protocol.n_src or n,
                                protocol.n_aux or n, protocol.seed)

    def reset(self) -> None:
        restore(self.model, self._clean)

    def clean_predictions(self) -> torch.Tensor:
        """The clean model's predictions of every sample of ``data`` (measured once)."""
        if self._clean_predictions is None:
            self.reset()
            self._clean_predictions = self.data.predict(self.eval_model, self.output)
        return self._clean_predictions

    def clean_accuracy(self) -> float:
        """Test accuracy (%) of the clean model on ``data`` (measured once)."""
        if self._clean_acc is None:
            self._clean_acc = _percent(self.clean_predictions() == self.data.labels)
        return self._clean_acc

    def run_item(self, item: "Experiment") -> dict:
        """One experiment: its sets, the attack's metrics, the flip log and curve when asked."""
        clean_acc = self.clean_accuracy()
        self.reset()
        result = self.run(self.data, item.sets, item.source, item.target,
                          clean_predictions=self.clean_predictions())
        record = {"source": item.source, "target": item.target, "rep": item.rep,
                  "sets_seed": item.seed, "clean_acc": clean_acc,
                  **{k: v for k, v in result.to_dict().items()
                     if k not in ("source", "target", "flips", "curve")},
                  "n_src": len(item.sets.src), "n_aux": len(item.sets.aux),
                  "number_format": self.number_format,
                  "fault_model": self.config.fault.to_dict() if self.config.fault else None,
                  "flips": result.flips}
        if self.config.curve_every:
            record["curve"] = result.curve
        return record

    @classmethod
    def recorded_flips(cls, record: dict) -> list[tuple]:
        if "flips" not in record:
            raise ValueError(f"record {record.get('key')} lists no flips (written before every "
                             f"flip was recorded, without --flip-log): run the experiment again")
        return [(f["layer"], f["index"], f["bit"], f["before"]) for f in record["flips"]]

    def describe(self, record: dict) -> str:
        per = record["seconds"] / max(record["iterations"], 1)
        return (f"{record['key']}: {record['stop_reason']} after {record['iterations']} "
                f"iterations ({record['bits_changed']} bits changed), ASR {record['asr']:.2f}%, "
                f"PA-ACC {record['pa_acc']:.2f}%, test {record['test_acc']:.2f}% "
                f"({per:.2f}s/iteration)")

    def closing(self, records: list[dict]) -> str:
        return f"{len(records)} experiments ({tally(records, 'stop_reason')})"


@register_attack
class TBFAAdaptive(TBFA):
    """T-BFA that knows the output head: the same search and stop rules, its loss over the
    decoded class scores (:class:`attacks.objectives.DecodedObjective`; docs/algorithms.md
    section 14). Parameters: ``loss`` (``ce`` | ``margin``), ``scores`` (``tanh`` |
    ``preact``), ``kappa`` (the margin, 1.0), ``full_gradient`` (the paper objective's
    gradient, D_aux included; default False, as the paper attack)."""

    name = "tbfa_adaptive"
    PARAMS = {"loss": LOSSES, "scores": SCORES, "kappa": (), "full_gradient": (True, False)}

    @classmethod
    def from_target(cls, target, data: EvalSet, protocol: Protocol, **params) -> "TBFA":
        cls.check_params(params)
        full_gradient = params.pop("full_gradient", False)
        objective = adaptive_objective(target, **params)
        # On a softmax model the cross-entropy over the decoded scores is the paper's loss:
        # the head's own (the same function, so the same flips), and the attack is T-BFA.
        head_loss = objective.is_head_loss
        attack = cls._on_target(target, data, protocol,
                                target.output if head_loss else objective,
                                full_gradient=full_gradient)
        attack.params = {**objective.to_dict(), "full_gradient": full_gradient}
        attack.same_as = TBFA.name if head_loss and not full_gradient else None
        return attack

    def settings(self) -> dict:
        return dict(self.params)


# ---------------------------------------------------------------------------------------------
# Campaigns: many experiments, one JSON line each, resumable
# ---------------------------------------------------------------------------------------------

@dataclass
class Experiment:
    source: int
    target: int
    rep: int
    sets: TBFASets
    seed: int | None = None  # None: pinned sets

    @property
    def key(self) -> str:
        return f"s{self.source}-t{self.target}-r{self.rep}"


def plan_experiments(labels: torch.Tensor, pairs: list[tuple[int, int]], reps: int,
                     n_src: int, n_aux: int, seed: int) -> list[Experiment]:
    """The campaign: every pair ``reps`` times, each with its own seeded sets (docs/algorithms.md section 7)."""
    out = []
    for source, target in pairs:
        for rep in range(reps):
            s = experiment_seed(seed, source, target, rep)
            out.append(Experiment(source, target, rep, draw_sets(labels, source, n_src, n_aux, s),
                                  s))
    return out


def plan_pinned(labels: torch.Tensor, entries: list[dict], num_classes: int | None = None
                ) -> list[Experiment]:
    """Experiments from a pinned-sets file (see :func:`pinned_sets`); ``source`` and ``target``
    must be classes of the model (``num_classes``; default: of the labels)."""
    num_classes = num_classes or int(labels.max()) + 1
    if not isinstance(entries, list) or not entries:
        raise ValueError("'experiments' must be a non-empty list")
    out, keys = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"pinned experiment {i} is not an object")
        values = [e.get("source"), e.get("target"), e.get("rep", i)]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"pinned experiment {i} needs integer 'source' and 'target' (and "
                             f"'rep', when given) of at least 0")
        source, target, rep = values
        if max(source, target) >= num_classes:
            raise ValueError(f"pinned experiment {i}: class {max(source, target)} is out of "
                             f"range: the model has {num_classes} classes (0..{num_classes - 1})")
        try:
            sets = pinned_sets(e, labels, source)
        except ValueError as err:
            raise ValueError(f"pinned experiment {i} (source {source}, target {target}): "
                             f"{err}") from None
        experiment = Experiment(source, target, rep, sets)
        if experiment.key in keys:
            raise ValueError(f"pinned experiment {i} repeats {experiment.key} (source, target "
                             f"and rep): give each experiment a different 'rep'")
        keys.add(experiment.key)
        out.append(experiment)
    return out
