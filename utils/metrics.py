"""Accuracy bookkeeping shared by training, evaluation and the attacks."""

from __future__ import annotations

import torch


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the ``k`` highest scores, for each k.

    Top-1 must be computed with the output's ``predict`` rule (ties to the lowest index); the
    stable sort below gives the same ranking, so top-1 here equals ``predict``'s.
    """
    maxk = min(max(ks), scores.shape[1])
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :maxk]
    hits = ranked == targets.view(-1, 1)
    return [int(hits[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


class Meter:
    """Running sums of loss and correct counts over an epoch."""

    def __init__(self):
        self.n = 0
        self.loss_sum = 0.0
        self.correct1 = 0
        self.correct5 = 0

    def update(self, loss: float, correct1: int, correct5: int, n: int) -> None:
        self.n += n
        self.loss_sum += loss * n
        self.correct1 += correct1
        self.correct5 += correct5

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(self.n, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / max(self.n, 1)
