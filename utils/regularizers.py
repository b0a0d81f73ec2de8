"""Piecewise weight clustering (He et al., CVPR 2020; SPEC section 4).

``lambda * sum_layers [ sum_{w>=0} (w - mean(W+))^2 + sum_{w<=0} (w - mean(W-))^2 ]`` over the
float weights of every quantized layer. *quirk* (public code): squared deviations are summed
(not a norm), and exact zeros count on both sides.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models import quant_layers


def _side_penalty(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    if count == 0:  # an empty side contributes nothing (the public code would give NaN)
        return w.new_zeros(())
    m = mask.to(w.dtype)
    mean = (w * m).sum() / count
    return (((w - mean) ** 2) * m).sum()


def piecewise_clustering(model: nn.Module, lambda_coeff: float) -> torch.Tensor:
    """The piecewise-clustering penalty of ``model`` (differentiable in the float weights)."""
    total = None
    for _, layer in quant_layers(model):
        w = layer.weight
        term = _side_penalty(w, w >= 0) + _side_penalty(w, w <= 0)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("piecewise clustering needs a model with quantized layers")
    return lambda_coeff * total
