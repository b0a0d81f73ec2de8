"""Piecewise weight clustering (He et al., CVPR 2020; docs/algorithms.md section 4).

``lambda * sum_layers [ sum_{w>=0} (w - mean(W+))^p + sum_{w<=0} (w - mean(W-))^p ]``, ``p = 2``,
over the float weights of every convolution and linear layer, as the public code computes it
(elliothe/BFA ``utils.py``: ``piecewise_clustering`` / ``clustering_loss``; the same function in
IGITUGraz/OutputCodeMatching ``utils/clustering.py``):

- layers: every ``nn.Conv2d`` and ``nn.Linear`` (the quantized layers are subclasses; all our
  convolutions and linear layers are quantized), their ``weight`` only (no biases);
- *quirk*: the deviations are raised to the power ``l_norm`` and **summed** (not averaged, not a
  norm), the means are per layer and per side, and exact zeros count on both sides;
- an empty side contributes 0 (the public code's mean of an empty tensor is NaN, but it is
  subtracted from an empty tensor and summed: 0, with a finite gradient), so a layer whose
  weights are all of one sign is penalised on that side only;
- ``lambda`` multiplies the sum of all layers (the public ``--lambda_coeff``, default 1e-3); the
  result is added to the batch's mean loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _side_penalty(w: torch.Tensor, mask: torch.Tensor, l_norm: int) -> torch.Tensor:
    count = mask.sum()
    if count == 0:  # an empty side: 0, as the public code (see the module docstring)
        return w.new_zeros(())
    m = mask.to(w.dtype)
    mean = (w * m).sum() / count
    return (((w - mean) ** l_norm) * m).sum()


def piecewise_clustering(model: nn.Module, lambda_coeff: float, l_norm: int = 2) -> torch.Tensor:
    """The piecewise-clustering penalty of ``model`` (differentiable in the float weights)."""
    total = None
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight
        term = _side_penalty(w, w >= 0, l_norm) + _side_penalty(w, w <= 0, l_norm)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("piecewise clustering needs a model with convolution or linear layers")
    return lambda_coeff * total
