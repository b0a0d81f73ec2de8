"""Deployment-time defenses at inference: the check (and repair) before every evaluation.

:class:`DefendedModel` is what an attacked model with deployment-time defenses
(:class:`defenses.base.DeploymentDefense`: weight encodings, checksums) is evaluated through:
before each forward pass every defense checks the stored weights of the attacked model and
repairs what it detects (e.g. zeroes a group whose signature changed), as a deployed system
would before using the weights (docs/algorithms.md section 11). The attack's own search runs on
the undefended forward (an attacker does not get the check's help), while every accuracy, ASR
and PA-ACC it reports is measured through the defense.
"""

from __future__ import annotations

import torch.nn as nn


class DefendedModel(nn.Module):
    """``evaluated`` (the attacked model, or its deployed twin) behind ``defenses``' checks of
    ``stored`` (the module whose weights the attack flips). ``detections`` counts the units the
    defenses flagged over all checks."""

    def __init__(self, evaluated: nn.Module, stored: nn.Module, defenses: list):
        super().__init__()
        self.evaluated = evaluated
        self.defenses = list(defenses)
        self._stored = [stored]  # not a submodule: its parameters are ``evaluated``'s or apart
        self.detections = 0

    def forward(self, x):
        for defense in self.defenses:
            self.detections += int(defense.check_and_repair(self._stored[0]))
        return self.evaluated(x)
