"""Piecewise weight clustering (He et al., CVPR 2020) as a training-time defense: a loss term.

The penalty itself is :func:`utils.regularizers.piecewise_clustering` (docs/algorithms.md
section 4, with the public code's quirks); this module only gives it a name and a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from utils.regularizers import piecewise_clustering

from .base import TrainingDefense, check_param, register_defense


@register_defense
@dataclass
class PiecewiseClustering(TrainingDefense):
    """Pull each layer's positive and negative weights towards their own means, so that a
    flipped bit moves a weight less far from its cluster (He et al., "Defending and Harnessing
    the Bit-Flip based Adversarial Weight Attack", CVPR 2020).

    ``lambda_coeff``: strength of the penalty (the public ``--lambda_coeff``: 1e-3 on CIFAR,
    5e-4 for ResNet-50 on ImageNet); 0 adds nothing.

    Example: ``create_defense("clustering", lambda_coeff=5e-4)``, ``--defense
    clustering:lambda_coeff=5e-4``, or the published ``--clustering --lambda_coeff 5e-4``.
    """

    name: ClassVar[str] = "clustering"
    lambda_coeff: float = 1e-3

    def validate(self) -> None:
        check_param(self.lambda_coeff, "lambda_coeff", minimum=0)

    def loss_term(self, model):
        if self.lambda_coeff == 0:  # as the public code: lambda 0 computes no penalty
            return None
        return piecewise_clustering(model, self.lambda_coeff)
