"""The bit-flip attacks, usable from Python (docs/algorithms.md sections 5 to 8).

Each attack lives in a module named after it, follows the protocol of :mod:`attacks.base`
(a registered name, ``run_item`` per campaign item, records whose fields are named in
campaigns/results.py) and works on a model in integer mode (:func:`models.to_integer`).
Importing this package registers every attack; :func:`list_attacks` / :func:`attack_class`
look them up by name. Nothing here knows of argparse.
"""

from . import bfa, deepncode_aware, radar_pairs, talbf, tbfa  # noqa: F401 (each registers attacks)
from .base import Attack, AttackResult, attack_class, list_attacks, register_attack

__all__ = ["Attack", "AttackResult", "attack_class", "list_attacks", "register_attack"]
