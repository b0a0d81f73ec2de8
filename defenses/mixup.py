"""Mixup and manifold mixup as training-time defenses: data mixing (the baselines of the OCM
paper's supplement; docs/algorithms.md section 4).

The mixing itself is :func:`utils.training.train_one_epoch`'s; each defense returns the
:class:`utils.training.MixupConfig` it asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from utils.training import MixupConfig

from .base import TrainingDefense, check_param, register_defense


@register_defense
@dataclass
class Mixup(TrainingDefense):
    """Input mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018): each
    batch is mixed with a permutation of itself, ``lam ~ Beta(alpha, alpha)``, and so is the loss.

    ``alpha``: the Beta parameter (default 1, the supplement's). Example: ``--defense
    mixup:alpha=0.4``, or the published ``--mixup --mixup-alpha 0.4``.
    """

    name: ClassVar[str] = "mixup"
    alpha: float = 1.0

    def validate(self) -> None:
        check_param(self.alpha, "alpha", above=0)

    def mixup(self) -> MixupConfig:
        return MixupConfig(self.alpha)


@register_defense
@dataclass
class ManifoldMixup(Mixup):
    """Manifold mixup (Verma et al., ICML 2019): the mixing happens at a point drawn per batch
    among the input and the model's ``mixup_points`` (hidden states).

    ``alpha``: the Beta parameter (default 2, the supplement's). Example: ``--defense
    manifold_mixup``, or the published ``--manifold-mixup``.
    """

    name: ClassVar[str] = "manifold_mixup"
    alpha: float = 2.0

    def mixup(self) -> MixupConfig:
        return MixupConfig(self.alpha, manifold=True)
