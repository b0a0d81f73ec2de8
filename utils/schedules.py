"""Learning-rate schedules (docs/algorithms.md section 4).

- ``step``: the reference rule: ``lr`` while ``epoch <= 0.5 E``, ``lr/10`` while
  ``epoch <= 0.75 E``, ``lr/100`` after (epochs counted from 0).
- milestones (the BFA scripts' ``--schedule 80 120 --gammas 0.1 0.1``): multiply by each
  gamma once its epoch is reached.
- ``cosine``: half-cosine from ``lr`` to 0 over the run, per iteration, with optional linear
  warm-up epochs.
- ``constant``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

NAMED = ("step", "cosine", "constant")


@dataclass
class LRSchedule:
    base_lr: float
    epochs: int
    kind: str = "step"
    milestones: list[int] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)
    warmup_epochs: float = 0.0

    def __post_init__(self):
        if self.kind not in NAMED + ("milestones",):
            raise ValueError(f"unknown schedule {self.kind!r}; use one of {', '.join(NAMED)} "
                             f"or a list of milestone epochs")
        if self.kind == "milestones" and len(self.gammas) != len(self.milestones):
            raise ValueError(f"--schedule has {len(self.milestones)} milestones but --gammas has "
                             f"{len(self.gammas)} values")

    def lr(self, epoch: int, progress: float = 0.0) -> float:
        """Learning rate at ``progress`` in [0, 1) through epoch ``epoch`` (0-based)."""
        t = epoch + progress
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            warm = (t + 1e-3) / self.warmup_epochs
        else:
            warm = 1.0
        if self.kind == "constant":
            return self.base_lr * warm
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-9)
            frac = min(max(t - self.warmup_epochs, 0.0) / span, 1.0)
            return self.base_lr * warm * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.kind == "step":
            if epoch <= 0.5 * self.epochs:
                factor = 1.0
            elif epoch <= 0.75 * self.epochs:
                factor = 0.1
            else:
                factor = 0.01
            return self.base_lr * warm * factor
        factor = 1.0
        for milestone, gamma in zip(self.milestones, self.gammas):
            if epoch >= milestone:
                factor *= gamma
        return self.base_lr * warm * factor

    @property
    def per_iteration(self) -> bool:
        return self.kind == "cosine" or self.warmup_epochs > 0


def parse_schedule(values: list[str] | None) -> tuple[str, list[int]]:
    """``--schedule`` value to ``(kind, milestones)``: a name, or milestone epochs."""
    if not values:
        return "step", []
    if len(values) == 1 and values[0] in NAMED:
        return values[0], []
    try:
        milestones = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--schedule takes one of {', '.join(NAMED)} or milestone epochs "
                         f"(e.g. 80 120), got {' '.join(values)}") from None
    if milestones != sorted(milestones) or any(m < 0 for m in milestones):
        raise ValueError(f"--schedule milestones must be increasing epochs, got {milestones}")
    return "milestones", milestones
