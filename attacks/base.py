"""The API every attack shares (torchattacks' style; docs/algorithms.md sections 5 to 8).

An attack is a class named after its paper's acronym (:class:`~attacks.bfa.BFA`,
:class:`~attacks.bfa.RandomFlips`, :class:`~attacks.tbfa.TBFA`, :class:`~attacks.talbf.TALBF`),
in the module named after it. It is constructed with what it attacks and its hyperparameters,
and its ``run(...)`` returns an :class:`AttackResult`: a dataclass whose :meth:`to_dict` gives
its fields as JSON-ready values, the form in which the campaigns write their records.

What ``run`` takes differs with the threat model (an attack batch and a test split for BFA,
the attacker's sets for T-BFA, a sample index and a target for TA-LBF), so the base class
fixes the shape of the API, not the arguments.
"""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from typing import ClassVar, Iterable


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
    """Base of the attacks: ``__init__`` stores the target and the hyperparameters, ``run``
    attacks and returns an :class:`AttackResult`. ``name`` is the attack's short name, as
    written in results."""

    name: ClassVar[str] = "attack"

    def run(self, *args, **kwargs) -> AttackResult:
        raise NotImplementedError
