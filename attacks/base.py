"""The protocol every attack follows, and the registry that names them (docs/algorithms.md
sections 5 to 8 and 12).

An attack is a class named after its paper's acronym, in the module named after it
(:class:`~attacks.bfa.BFA`, :class:`~attacks.bfa.RandomFlips`, :class:`~attacks.tbfa.TBFA`,
:class:`~attacks.talbf.TALBF`), registered with :func:`register_attack` under the short name its
records carry (``"attack"`` field). A campaign is a list of *items*, each with a ``key`` unique
in the campaign (T-BFA: one experiment per source, target and repetition; TA-LBF: one attacked
sample; BFA and random flips: one repetition with its own seed and attack batch); the attack's
module plans them (``plan_experiments``, ``generate_attack_list``, ``plan_repetitions``).
:class:`campaigns.runner.CampaignRunner` drives every attack the same way::

    attack.reset()                  # the clean model, before every item
    fields = attack.run_item(item)  # the record of one item (names: campaigns/results.py)
    attack.summary(records)         # metric, mean, std, n rows of the campaign

and writes the records (``key``, ``attack``, the item's fields, ``seconds``), resumes, shares
the items among torchrun processes and logs with ``attack.describe(record)``.

Each attack's :meth:`Attack.run` (its own arguments: an attack batch, the attacker's sets, a
sample and a target) stays the Python API for one attack; ``run_item`` maps an item onto it.
Adding an attack is its module (a subclass decorated with ``@register_attack``) plus one import
line in :mod:`attacks`; ``report.py`` then shows its campaigns (:mod:`campaigns.report`).

The defenses x attacks matrix (``evaluate_defenses.py``, :mod:`campaigns.matrix`) builds every
attack the same way, from a spec ``NAME[:key=value,...]`` (:func:`create_attack`): the class's
:meth:`Attack.from_target` takes the attack target (model, output head, fault model, defenses),
the test split and one :class:`Protocol` shared by all attacks, and :meth:`Attack.plan` gives
the campaign's items under that protocol.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Callable, ClassVar, Iterable

from utils.specs import parse_spec, spec_label

_REGISTRY: dict[str, type["Attack"]] = {}


def register_attack(cls: type["Attack"]) -> type["Attack"]:
    """Class decorator: register ``cls`` under ``cls.name`` (a name given twice is an error)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name to register")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"attack {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_attacks() -> list[str]:
    """The registered attack names, in registration order."""
    return list(_REGISTRY)


def attack_class(name: str) -> type["Attack"]:
    """The attack registered as ``name`` (KeyError naming the registered ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown attack {name!r}; registered: {', '.join(_REGISTRY)}") from None


@dataclass(frozen=True)
class Protocol:
    """One protocol for every attack of a comparison (docs/algorithms.md section 14).

    - ``pairs``: the targeted attacks' (source, target) classes; T-BFA runs each ``reps`` times
      with ``n_src`` / ``n_aux`` samples (None: the data set's protocol size) and at most
      ``iters`` iterations;
    - ``samples``: TA-LBF attacks (test samples; attack i targets class i mod C);
    - ``bfa_reps``: untargeted runs (each its own seed and attack batch of ``bfa_batch``
      training images), at most ``bfa_iters`` iterations, stopped at test accuracy
      ``break_acc`` % (None: chance + 1 point, the flips to chance accuracy);
    - ``seed``: every draw of the protocol (sets, samples, batches) derives from it.
    """

    pairs: tuple[tuple[int, int], ...] = ()
    reps: int = 1
    n_src: int | None = None
    n_aux: int | None = None
    iters: int = 5000
    samples: int = 5
    bfa_reps: int = 1
    bfa_batch: int = 128
    bfa_iters: int = 100
    break_acc: float | None = None
    seed: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [list(p) for p in self.pairs]
        return d


def create_attack(spec: str, target, data, protocol: Protocol) -> "Attack":
    """The attack of ``spec`` (``NAME[:key=value,...]``) on ``target`` (an
    :class:`attacks.target.AttackTarget`, whose fault model and defenses it honours), measuring
    on ``data`` (the test split as an :class:`attacks.common.EvalSet`). Raises KeyError for an
    unknown name and ValueError for parameters the attack does not take or cannot use."""
    name, params = parse_spec(spec)
    return attack_class(name).from_target(target, data, protocol, **params)


def attack_label(spec: str) -> str:
    """The canonical form of an attack spec (parameters sorted), as results name it; checks
    the name and the parameters (KeyError / ValueError)."""
    name, params = parse_spec(spec)
    attack_class(name).check_params(params)
    return spec_label(name, params)


class NotApplicable(ValueError):
    """The attack does not apply to this target (e.g. a defense-aware attack on a model
    without that defense): a comparison shows the cell as not applicable."""


def check_params(name: str, params: dict[str, Any], allowed: dict[str, tuple]) -> None:
    """ValueError unless every parameter is one ``allowed`` names, with one of its values."""
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(f"attack {name!r} has no parameter {key!r}; its parameters: "
                             f"{', '.join(sorted(allowed)) or 'none'}")
        if allowed[key] and value not in allowed[key]:
            raise ValueError(f"attack {name!r}: {key} must be one of "
                             f"{', '.join(map(str, allowed[key]))}, got {value!r}")


def tally(records: list[dict], field: str) -> str:
    """``"2 success, 1 oscillation"``: how many records have each value of ``field``."""
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get(field))] = counts.get(str(r.get(field)), 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def _plain(value):
    """JSON-ready form of a field value: nested dataclasses (e.g. profile rows) as dicts."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class AttackResult:
    """Base of every attack's result (subclasses are dataclasses).

    ``EXCLUDE`` names fields never written to records (tensors); ``DERIVED`` names properties
    written after the fields (counts computed from them).
    """

    EXCLUDE: ClassVar[tuple[str, ...]] = ()
    DERIVED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self, exclude: Iterable[str] = ()) -> dict:
        """The fields (then the derived values) as plain values, without ``exclude``."""
        skip = set(self.EXCLUDE) | set(exclude)
        d = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        d.update({name: getattr(self, name) for name in self.DERIVED if name not in skip})
        return d


class Attack:
    """Base of the attacks: ``__init__`` stores the target and the hyperparameters;
    :meth:`run_item` attacks one campaign item and returns its record fields.

    Class attributes every registered attack sets:

    - ``name``: the registered short name, written in every record as ``attack``;
    - ``noun``: what a campaign item is, plural, for progress bars and logs;
    - ``results_dir``: the default results folder beside the checkpoint;
    - ``count``: the record field of its flip count, named for what it counts
      (:data:`campaigns.results.COUNTS`: ``iterations``, ``bits_changed``, ``bits_flipped``);
    - ``summary_metrics``: the record fields its summary averages;
    - ``columns``: ``(metric, heading)`` of its report table, the cells read from
      :meth:`summary` (so each attack's averaging rule holds in the report too);
    - ``scalars``: record fields logged to TensorBoard per finished item.
    """

    name: ClassVar[str] = ""
    noun: ClassVar[str] = "items"
    results_dir: ClassVar[str] = ""
    count: ClassVar[str] = ""
    summary_metrics: ClassVar[tuple[str, ...]] = ()
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    scalars: ClassVar[tuple[str, ...]] = ()

    #: the spec parameters :meth:`from_target` takes: name -> allowed values (empty: any)
    PARAMS: ClassVar[dict[str, tuple]] = {}

    #: the spec of another attack this one *is* on its target (the same objective and search:
    #: e.g. an adaptive attack on a model without the defense it adapts to); set by
    #: :meth:`from_target`. A comparison shows that attack's campaign for it instead of
    #: running the same thing twice (:mod:`campaigns.matrix`).
    same_as: str | None = None

    #: called by the attack with ``(step, info: dict)`` while an item runs (progress postfix)
    on_step: Callable[[int, dict], None] | None = None

    def run(self, *args, **kwargs) -> AttackResult:
        raise NotImplementedError

    @classmethod
    def check_params(cls, params: dict) -> None:
        """ValueError unless ``params`` are parameters of this attack (:attr:`PARAMS`)."""
        check_params(cls.name, params, cls.PARAMS)

    @classmethod
    def from_target(cls, target, data, protocol: Protocol, **params) -> "Attack":
        """The attack on an :class:`attacks.target.AttackTarget` under ``protocol`` (see
        :func:`create_attack`); ``params`` are the spec's ``key=value`` parameters."""
        raise NotImplementedError(f"attack {cls.name!r} cannot be built from a target")

    def plan(self, protocol: Protocol) -> list:
        """The campaign items of ``protocol`` for this attack (each with a unique ``key``)."""
        raise NotImplementedError(f"attack {self.name!r} plans no items")

    def settings(self) -> dict:
        """What, besides the target and the protocol, defines this attack's campaigns (its
        parameters), recorded in ``campaign.json``."""
        return {}

    def run_item(self, item) -> dict:
        """Attack ``item`` and return its record fields (without ``key`` and ``attack``, which
        the runner adds); the model may stay attacked until :meth:`reset`."""
        raise NotImplementedError

    def reset(self) -> None:
        """Put the attacked model back to its clean weights (before every item, at the end)."""

    @classmethod
    def summary(cls, records: list[dict]) -> list[dict]:
        """``metric, mean, std, n`` rows over the records (mean and sample std of
        ``summary_metrics``); attacks with another rule override it. The report's columns are
        read from these rows too."""
        from campaigns.results import summarize

        return summarize(records, list(cls.summary_metrics))

    @classmethod
    def succeeded(cls, record: dict) -> bool:
        """Whether the item's attack reached its goal (TA-LBF ``success``, T-BFA stopped by its
        success rule)."""
        return bool(record.get("success", record.get("stop_reason") == "success"))

    @classmethod
    def outcome(cls, records: list[dict]) -> dict:
        """A comparison's cell (docs/algorithms.md section 14): ``asr``, ``pa_acc`` and
        ``flips`` (the attack's ``count``), each with its ``_std``, and ``n``, read from
        :meth:`summary` so that each attack's averaging rule holds (TA-LBF: PA-ACC and bits
        over its successes). A metric the attack has not is None."""
        rows = {r["metric"]: r for r in cls.summary(records)}
        out: dict = {"n": len(records), "count": cls.count}
        for key, metric in (("asr", "asr"), ("pa_acc", "pa_acc"), ("flips", cls.count)):
            row = rows.get(metric) or {}
            out[key], out[key + "_std"] = row.get("mean"), row.get("std")
        return out

    @classmethod
    def recorded_flips(cls, record: dict) -> list[tuple]:
        """Every bit the item's record says it flipped, in order, as ``(layer, index, bit,
        value before or None)``; ``layer`` None means the final layer, with ``index`` a
        ``(row, column)`` pair (TA-LBF). :mod:`campaigns.attacked` rebuilds the attacked model
        from them."""
        raise NotImplementedError(f"{cls.name} records no flips to rebuild")

    def describe(self, record: dict) -> str:
        """The log line of a finished item."""
        return f"{record['key']}: {self.count} {record.get(self.count)}"

    def closing(self, records: list[dict]) -> str:
        """The campaign's last line (before the results file's path)."""
        return f"{len(records)} {self.noun.split()[-1]}"
