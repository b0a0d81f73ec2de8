"""One training epoch and one evaluation pass, shared by ``main.py`` and the attack scripts.

``output`` is the model's output interface (:class:`models.SoftmaxOutput` or
:class:`models.OutputCodeMatching`): it supplies the loss and the decoding rule, so the same
loop trains and evaluates vanilla and OCM models.

The model given to :func:`train_one_epoch` may be wrapped (``DistributedDataParallel``,
``torch.compile``); :func:`unwrap_model` finds the network inside. With loaders that serve one
rank's share of the data (``loader.world_size > 1``, see :mod:`utils.data`), the epoch's loss
and accuracy counts are summed over the processes, so every rank returns the global figures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import distributed
from .metrics import Meter, topk_correct
from .schedules import LRSchedule

if TYPE_CHECKING:
    from defenses import TrainingDefense


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
    wrappers (the module whose state dict a checkpoint stores)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled`` (``--amp``), else a no-op context.

    The quantized layers compute their quantized weights in float32 inside it (docs/algorithms.md section 1
    stays exact); convolutions and matrix products run in bfloat16.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _sum_over_ranks(meter: Meter, loader) -> Meter:
    """Sum the meter's counts over the processes when ``loader`` serves one rank's share."""
    if getattr(loader, "world_size", 1) <= 1 or not distributed.is_distributed():
        return meter
    # float64 keeps the integer counts exact (below 2**53) and the loss sum precise
    t = torch.tensor([meter.n, meter.loss_sum, meter.correct1, meter.correct5],
                     dtype=torch.float64)
    distributed.all_reduce_sum(t)
    total = Meter()
    total.n, total.loss_sum = int(t[0]), float(t[1])
    total.correct1, total.correct5 = int(t[2]), int(t[3])
    return total


@dataclass
class MixupConfig:
    """Input mixup (Zhang et al. 2018) or manifold mixup (Verma et al. 2019), docs/algorithms.md section 4."""

    alpha: float
    manifold: bool = False


@contextlib.contextmanager
def _mix_hidden(model: nn.Module, point: str, lam: float, perm: torch.Tensor):
    """Mix the output of module ``point`` with its permutation for one forward pass."""
    def hook(_module, _inputs, out):
        return lam * out + (1.0 - lam) * out[perm]

    handle = model.get_submodule(point).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def mixup_of(defenses: Sequence[TrainingDefense]) -> MixupConfig | None:
    """The data mixing of the one defense that asks for one (None: no mixing); two such
    defenses raise ValueError (each would mix every batch its own way)."""
    asked = [(d.name, m) for d in defenses if (m := d.mixup()) is not None]
    if len(asked) > 1:
        raise ValueError(f"choose one data-mixing defense (got "
                         f"{', '.join(name for name, _ in asked)})")
    return asked[0][1] if asked else None


def _defended_loss(loss: torch.Tensor, net: nn.Module,
                   defenses: Sequence[TrainingDefense]) -> torch.Tensor:
    """The batch's loss (float32) plus each defense's loss term, in the defenses' order."""
    loss = loss.float()
    for defense in defenses:
        term = defense.loss_term(net)
        if term is not None:
            loss = loss + term
    return loss


def _mixed_forward(model, images, mixup: MixupConfig, rng: np.random.Generator,
                   generator: torch.Generator):
    """Forward with mixup; returns ``(outputs, lam, perm)``."""
    lam = float(rng.beta(mixup.alpha, mixup.alpha)) if mixup.alpha > 0 else 1.0
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    net = unwrap_model(model)
    points = ("input",) + tuple(getattr(net, "mixup_points", ())) if mixup.manifold else ("input",)
    point = points[int(rng.integers(len(points)))]
    if point == "input":
        return model(lam * images + (1.0 - lam) * images[perm]), lam, perm
    with _mix_hidden(net, point, lam, perm):
        return model(images), lam, perm


def train_one_epoch(model: nn.Module, output: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    schedule: LRSchedule, epoch: int, *,
                    defenses: Sequence[TrainingDefense] = (), seed: int = 0,
                    progress: bool = True, description: str = "train", amp: bool = False) -> dict:
    """Train ``model`` for one epoch; returns ``{'loss', 'top1', 'lr'}``.

    ``defenses``: the training-time defenses of the run (:mod:`defenses`); the batches are
    mixed as the data-mixing one asks (:func:`mixup_of`), and the loss is ``output.loss`` plus
    every defense's loss term (piecewise clustering's penalty). All randomness of the epoch
    (mixup draws) is a function of ``(seed, epoch)``, so a resumed run repeats it exactly.
    ``amp``: forward and loss under bfloat16 autocast.
    ``model`` may be wrapped in ``DistributedDataParallel``; each rank's loss is then scaled
    by ``loader.batch_weight(i)`` so that DDP's gradient average is the gradient of the mean
    loss over the global batch.
    """
    model.train()
    output.train()
    meter = Meter()
    rng = np.random.default_rng([seed, epoch])
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
    n_batches = len(loader)
    lr = schedule.lr(epoch)
    net = unwrap_model(model)
    device = next(net.parameters()).device
    batch_weight = getattr(loader, "batch_weight", None)
    mixup = mixup_of(defenses)
    bar = tqdm(loader, total=n_batches, desc=f"{description} {epoch}", leave=False,
               disable=not progress, dynamic_ncols=True)
    for i, (images, targets) in enumerate(bar):
        if schedule.per_iteration or i == 0:
            lr = schedule.lr(epoch, i / n_batches)
            for group in optimizer.param_groups:
                group["lr"] = lr
        with autocast(device, amp):
            if mixup is not None:
                outputs, lam, perm = _mixed_forward(model, images, mixup, rng, generator)
                loss = (lam * output.loss(outputs, targets)
                        + (1 - lam) * output.loss(outputs, targets[perm]))
            else:
                outputs = model(images)
                loss = output.loss(outputs, targets)
        loss = _defended_loss(loss, net, defenses)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged at epoch {epoch}, batch {i} "
                                     f"(loss {value}): lower --lr")
        weight = batch_weight(i) if batch_weight is not None else 1.0
        optimizer.zero_grad(set_to_none=True)
        (loss if weight == 1.0 else loss * weight).backward()
        optimizer.step()
        with torch.no_grad():
            c1, = topk_correct(output.scores(outputs.float()), targets, ks=(1,))
        meter.update(value, c1, 0, targets.shape[0])
        bar.set_postfix(loss=f"{meter.loss:.4f}", acc=f"{meter.top1:.2f}", lr=f"{lr:.2e}")
    meter = _sum_over_ranks(meter, loader)
    return {"loss": meter.loss, "top1": meter.top1, "lr": lr}


@torch.no_grad()
def evaluate(model: nn.Module, output: nn.Module, loader, progress: bool = False,
             description: str = "eval") -> dict:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` on ``loader`` (eval mode).

    With a loader that serves one rank's share (``loader.world_size > 1``) the counts are
    summed over the processes: every rank returns the figures of the whole set. Pass the
    unwrapped network (no DDP: ranks may see different numbers of batches).
    """
    was_training = model.training
    model.eval()
    meter = Meter()
    for images, targets in tqdm(loader, desc=description, leave=False, disable=not progress,
                                dynamic_ncols=True):
        outputs = model(images)
        loss = output.loss(outputs, targets)
        c1, c5 = topk_correct(output.scores(outputs), targets, ks=(1, 5))
        meter.update(loss.item(), c1, c5, targets.shape[0])
    model.train(was_training)
    meter = _sum_over_ranks(meter, loader)
    return {"loss": meter.loss, "top1": meter.top1, "top5": meter.top5, "n": meter.n}


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum), Adam or AdamW over every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adam or adamw")
