"""Defenses as components: a registered name, parameters, and the stage they act in.

Every defense is a class registered with :func:`register_defense` under its name and built by
:func:`create_defense` (``create_defense("clustering", lambda_coeff=1e-3)``) or from the
command-line form :func:`parse_defense` (``"clustering:lambda_coeff=1e-3"``). Its
:meth:`Defense.to_dict` (name and parameters) is what a checkpoint records under
``"defenses"``, so that the attack scripts rebuild every defense of a model from the
checkpoint alone (docs/algorithms.md section 11).

Two stages:

- :class:`TrainingDefense`: changes how the model is trained or built, before any weight is
  stored: an output head (OCM: :meth:`TrainingDefense.configure` edits the model config), a loss
  term (piecewise clustering: :meth:`TrainingDefense.loss_term`), data mixing (mixup:
  :meth:`TrainingDefense.mixup`). The trainer asks every defense of the run for each part.
- :class:`DeploymentDefense`: acts on the stored weights of any trained model: a transform of
  what is stored (:meth:`DeploymentDefense.protect`, e.g. an encoding or checksums), and the
  check with its repair at inference (:meth:`DeploymentDefense.check_and_repair`), which runs
  before every evaluation of an attacked model. The attack target (:mod:`attacks.target`)
  applies them after loading the weights.

Adding a defense is its module (a subclass, decorated with ``@register_defense``) plus one line
in :mod:`defenses` that imports it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from utils.specs import parse_spec

_REGISTRY: dict[str, type["Defense"]] = {}


def register_defense(cls: type["Defense"]) -> type["Defense"]:
    """Class decorator: register ``cls`` under ``cls.name`` (a duplicate name is an error)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"defense {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_defenses(stage: str | None = None) -> list[str]:
    """Registered defense names (of ``stage`` ``"training"`` / ``"deployment"`` if given)."""
    return sorted(n for n, c in _REGISTRY.items() if stage is None or c.stage == stage)


def defense_class(name: str) -> type["Defense"]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown defense {name!r}; registered: {', '.join(list_defenses())}")
    return _REGISTRY[name]


def create_defense(name: str, **params) -> "Defense":
    """The defense ``name`` with ``params`` (unknown or bad parameters raise ValueError)."""
    cls = defense_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"defense {name!r} has no parameter {', '.join(unknown)}; its "
                         f"parameters: {', '.join(sorted(known)) or 'none'}")
    defense = cls(**params)
    defense.validate()
    return defense


def parse_defense(spec: str) -> "Defense":
    """``NAME`` or ``NAME:key=value,key=value`` (numbers and true/false converted,
    :func:`utils.specs.parse_spec`)."""
    name, params = parse_spec(spec)
    return create_defense(name, **params)


def defense_from_dict(record: dict) -> "Defense":
    """The inverse of :meth:`Defense.to_dict` (as a checkpoint records it)."""
    params = {k: v for k, v in record.items() if k != "name"}
    return create_defense(record["name"], **params)


def check_defenses(defenses) -> None:
    """Raise ValueError for a list that cannot be one model's defenses: a name given twice, or
    two data-mixing defenses (each would mix every batch its own way)."""
    names = [d.name for d in defenses]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"defense {', '.join(twice)} is given twice: give each defense once")
    mixing = [d.name for d in defenses if d.stage == "training" and d.mixup() is not None]
    if len(mixing) > 1:
        raise ValueError(f"choose one data-mixing defense (got {', '.join(mixing)})")


def check_param(value, what: str, *, integer: bool = False, minimum=None, above=None) -> None:
    """A defense parameter must be a finite number (an integer where ``integer``) with
    ``value >= minimum`` and ``value > above``; raise ValueError naming ``what`` otherwise."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite {'integer' if integer else 'number'}, "
                         f"got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be at least {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise ValueError(f"{what} must be greater than {above:g}, got {value:g}")


@dataclass
class Defense:
    """Base of every defense: a registered ``name``, its ``stage`` and its parameters (the
    dataclass fields of the subclass, with the published defaults)."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""

    def __post_init__(self):
        # "clustering:lambda_coeff=1" and --lambda_coeff 1 are one defense, recorded alike
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float) and type(value) is int:
                setattr(self, f.name, float(value))

    def validate(self) -> None:
        """Raise ValueError for parameters that cannot mean what they say."""

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    def label(self) -> str:
        params = dataclasses.asdict(self)
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params
                            else "")


@dataclass
class TrainingDefense(Defense):
    """A defense that acts while the model is built and trained (the defaults do nothing)."""

    stage: ClassVar[str] = "training"

    def configure(self, config):
        """The model config this defense needs (an output head: OCM); default unchanged.
        Called on the config the model flags describe, before the model is built."""
        return config

    def loss_term(self, model):
        """A term added to every batch's training loss (a regularizer), or None.

        ``model`` is the network itself (no DDP / ``torch.compile`` wrapper); the term is a
        scalar tensor, differentiable in the weights, added in float32 after the output's
        loss (outside autocast), in the order the defenses are listed."""
        return None

    def mixup(self):
        """The :class:`utils.training.MixupConfig` of a data-mixing defense, or None."""
        return None


@dataclass
class DeploymentDefense(Defense):
    """A defense over the stored weights of a trained model (encodings, checksums).

    ``protect(model)`` prepares the stored representation from the clean weights (and keeps what
    the check needs, e.g. the reference signatures); ``check_and_repair(model)`` runs at
    inference, before the model's outputs are used: it detects changed weights and repairs them
    (e.g. zeroes a group), and returns how many units it flagged."""

    stage: ClassVar[str] = "deployment"

    def protect(self, model) -> None:
        raise NotImplementedError

    def check_and_repair(self, model) -> int:
        raise NotImplementedError

    def memory_per_weight(self, model) -> tuple[float, float]:
        """``(stored bits per weight with the defense, bits per weight without it)`` over the
        model's attacked layers: the defense's memory overhead (its stored words, signatures)."""
        raise NotImplementedError
