"""Attack files with pinned D_aux: one attack per line, JSON lines, in the order to run.

Each line is an object with exactly these keys::

    {"target": 2, "idx": 53, "aux_idx": [153, 110, 238, ...]}

- ``target``: the class the attacked image is pushed to;
- ``idx``: the test-set position of the attacked image;
- ``aux_idx``: D_aux, test-set positions, in the order the attack uses them (the attacked
  image is appended after them, as the public TA-LBF code does: the order changes the
  floating-point sums, so it is kept as written).

Blank lines and lines starting with ``#`` are skipped, so a file can be written by hand.
``attack_talbf.py --save-attacks PATH`` writes the attacks of a run in this format and
``--attacks-file PATH`` repeats them exactly.

Reading is split in two, so that a script can reject a bad file before it loads anything:
:func:`parse_attacks` checks the syntax, the types, the D_aux size and its duplicates;
:func:`check_attacks` then checks the indices and classes against the test set.
Both raise ``ValueError`` with one line naming the file, the line and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KEYS = ("target", "idx", "aux_idx")


@dataclass(frozen=True)
class PinnedAttack:
    """One line of an attacks file (``line``: its 1-based line number)."""

    line: int
    target: int
    idx: int
    aux_idx: tuple[int, ...]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_attacks(text: str, name: str = "attacks file",
                  n_aux: int | None = None) -> list[PinnedAttack]:
    """The attacks of ``text`` (JSON lines, see the module docstring), in file order.

    Raises ValueError naming the first bad line: not JSON, not an object, a missing or unknown
    key, a non-integer, an ``aux_idx`` that is not a list, that repeats an index, holds the
    attacked image or (``n_aux`` given) has another size, an attack listed before (it would
    run twice); or a file without attacks.
    """
    out, first = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); each "
                             f"line must be an object like "
                             f'{{"target": 2, "idx": 53, "aux_idx": [1, 2, ...]}}') from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with keys "
                             f"{', '.join(KEYS)}, got {_describe(obj)}")
        missing = [k for k in KEYS if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing key {', '.join(repr(k) for k in missing)} "
                             f"(each attack needs {', '.join(KEYS)})")
        unknown = sorted(set(obj) - set(KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {', '.join(repr(k) for k in unknown)} "
                             f"(allowed: {', '.join(KEYS)})")
        for key in ("target", "idx"):
            if not _is_int(obj[key]):
                raise ValueError(f"{where}: {key} must be an integer, got {_describe(obj[key])}")
        aux = obj["aux_idx"]
        if not isinstance(aux, list):
            raise ValueError(f"{where}: aux_idx must be a list of test indices, got "
                             f"{_describe(aux)}")
        for pos, value in enumerate(aux):
            if not _is_int(value):
                raise ValueError(f"{where}: aux_idx[{pos}] must be an integer test index, got "
                                 f"{_describe(value)}")
        seen = {}
        for pos, value in enumerate(aux):
            if value in seen:
                raise ValueError(f"{where}: aux_idx repeats test index {value} (positions "
                                 f"{seen[value]} and {pos}); D_aux holds distinct images")
            seen[value] = pos
        if obj["idx"] in seen:
            raise ValueError(f"{where}: aux_idx holds the attacked image {obj['idx']} itself "
                             f"(position {seen[obj['idx']]}); D_aux must not contain it")
        if n_aux is not None and len(aux) != n_aux:
            raise ValueError(f"{where}: aux_idx has {len(aux)} test indices but --n_aux is "
                             f"{n_aux}; give --n_aux {len(aux)} or {n_aux} indices")
        if not aux:
            raise ValueError(f"{where}: aux_idx is empty; D_aux needs at least one image")
        attack = PinnedAttack(number, obj["target"], obj["idx"], tuple(aux))
        same = (attack.target, attack.idx, attack.aux_idx)
        if same in first:
            raise ValueError(f"{where} repeats the attack of line {first[same]} (same target, "
                             f"idx and aux_idx): list each attack once")
        first[same] = number
        out.append(attack)
    if not out:
        raise ValueError(f"{name} holds no attacks (one JSON object per line: "
                         f'{{"target": ..., "idx": ..., "aux_idx": [...]}})')
    return out


def check_attacks(attacks: list[PinnedAttack], n_test: int, labels=None,
                  num_classes: int | None = None, name: str = "attacks file") -> None:
    """Check the indices of :func:`parse_attacks` output against a test set of ``n_test``
    images (and, given, its ``labels`` and the model's ``num_classes``): every index inside
    the test set, the target a class of the model and not the attacked image's own. Raises
    ValueError naming the first bad line."""
    for a in attacks:
        where = f"{name} line {a.line}"
        if not 0 <= a.idx < n_test:
            raise ValueError(f"{where}: idx {a.idx} is outside the test set (0..{n_test - 1})")
        bad = [v for v in a.aux_idx if not 0 <= v < n_test]
        if bad:
            raise ValueError(f"{where}: aux_idx holds {bad[0]}, outside the test set "
                             f"(0..{n_test - 1})")
        if num_classes is not None and not 0 <= a.target < num_classes:
            raise ValueError(f"{where}: target class {a.target} is outside the model's "
                             f"classes (0..{num_classes - 1})")
        if labels is not None and int(labels[a.idx]) == a.target:
            raise ValueError(f"{where}: test image {a.idx} is of class {a.target}, the target "
                             f"itself; a targeted attack needs another class")


def read_attacks_file(path: str, n_aux: int | None = None) -> list[PinnedAttack]:
    """:func:`parse_attacks` of the file at ``path``; a missing or unreadable file is a
    ValueError too."""
    from utils.textfiles import read_text

    return parse_attacks(read_text(path, "the attacks file"), name=path, n_aux=n_aux)


def format_attacks(attacks) -> str:
    """JSON lines of ``attacks``: objects with ``target``, ``idx`` and ``aux_idx`` (or
    ``index`` and ``aux``, as :class:`attacks.talbf.AttackItem` has them)."""
    lines = []
    for a in attacks:
        idx = a.idx if hasattr(a, "idx") else a.index
        aux = a.aux_idx if hasattr(a, "aux_idx") else a.aux
        if aux is None:
            raise ValueError(f"attack of image {idx} has no D_aux to write")
        lines.append(json.dumps({"target": int(a.target), "idx": int(idx),
                                 "aux_idx": [int(v) for v in aux]}))
    return "".join(line + "\n" for line in lines)


def write_attacks_file(path: str, attacks) -> None:
    """Write :func:`format_attacks` of ``attacks`` to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(format_attacks(attacks))
