"""The published flags as components: what ``main.py``'s aliases add, and what a checkpoint
written before defenses were recorded derives from its model config and stored flags.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import TrainingDefense, create_defense

# switch -> (defense, the flag that holds its parameter, that parameter)
PUBLISHED_SWITCHES = {
    "clustering": ("clustering", "lambda_coeff", "lambda_coeff"),
    "mixup": ("mixup", "mixup_alpha", "alpha"),
    "manifold_mixup": ("manifold_mixup", "manifold_mixup_alpha", "alpha"),
}


def switch_defenses(flags: Mapping) -> list[TrainingDefense]:
    """The defenses the published switches in ``flags`` stand for (``clustering`` with
    ``lambda_coeff``, ``mixup`` with ``mixup_alpha``, ``manifold_mixup`` with
    ``manifold_mixup_alpha``), in that order; a parameter left out takes the defense's
    default. ``flags``: main.py's parsed flags or the training flags a checkpoint stored."""
    defenses = []
    for switch, (name, flag, param) in PUBLISHED_SWITCHES.items():
        if flags.get(switch):
            value = flags.get(flag)
            defenses.append(create_defense(name, **({} if value is None else {param: value})))
    return defenses


def config_defenses(config) -> list[TrainingDefense]:
    """The defenses a :class:`models.factory.ModelConfig` describes: its OCM head, if any."""
    if config is None or not config.ocm:
        return []
    return [create_defense("ocm", code_length=config.code_length,
                           output_act=config.output_act)]
