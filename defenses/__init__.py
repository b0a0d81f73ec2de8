"""Defenses as components: each a registered name with parameters (docs/algorithms.md
section 11).

Training-time defenses (an output head, a loss term, data mixing) are given to ``main.py`` as
``--defense NAME[:key=value,...]`` (or the published flags, their aliases) and recorded in every
checkpoint under ``"defenses"``; deployment-time defenses act on a trained model's stored
weights. Registered here: ``clustering`` (piecewise clustering), ``ocm`` (output code matching),
``mixup`` and ``manifold_mixup``. Adding a defense: its module (a ``@register_defense``
dataclass) plus one import line below.
"""

from .base import (Defense, DeploymentDefense, TrainingDefense, check_defenses, create_defense,
                   defense_from_dict, list_defenses, parse_defense, register_defense)
from . import clustering, deepncode, mixup, ocm, radar  # noqa: F401 (each registers its defenses)
from .flags import config_defenses, switch_defenses

__all__ = ["Defense", "DeploymentDefense", "TrainingDefense", "check_defenses",
           "config_defenses", "create_defense", "defense_from_dict", "list_defenses",
           "parse_defense", "register_defense", "switch_defenses"]
