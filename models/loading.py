"""Loading state dicts written in other layouts into the registry's models (SPEC section 2).

Accepts the published OCM checkpoints (saved from ``nn.DataParallel``: every key starts with
``module.``; quantized layers carry ``step_size`` and ``b_w``) and torchvision's ImageNet weights
(classifier ``fc`` instead of ``linear``; no ``step_size`` / ``b_w``). Mismatches raise
ValueError with a one-line explanation (bits, output size, architecture).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .quantization import quant_layers

QUANT_BUFFERS = ("step_size", "b_w")


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop ``prefix`` from every key that has it (``nn.DataParallel`` / DDP checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def adapt_state_dict(state_dict: dict, model: nn.Module, skip_final: bool = False) -> dict:
    """Return ``state_dict`` renamed and completed so that it loads into ``model``.

    ``skip_final`` drops the final layer's entries (finetuning a new output size).
    Raises ValueError when the checkpoint was made for another bit width, output size or
    architecture.
    """
    sd = strip_prefix(dict(state_dict))
    own = model.state_dict()
    final = getattr(model, "final_layer_name", "linear")
    if final == "linear" and "fc.weight" in sd and "linear.weight" not in sd:
        sd = {("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in sd.items()}

    for name, layer in quant_layers(model):
        key = f"{name}.b_w"
        if key in sd and tuple(sd[key].shape) != tuple(own[key].shape):
            raise ValueError(f"checkpoint has {sd[key].shape[0]}-bit layers but the model was "
                             f"built with {layer.n_bits} bits (set --bits {sd[key].shape[0]})")
        for buf in QUANT_BUFFERS:  # recomputed from the weights anyway; fill when absent
            sd.setdefault(f"{name}.{buf}", own[f"{name}.{buf}"])
        key = f"{name}.step_size"  # 0-d in the public files and ours; shape [1] in our older ones
        if sd[key].numel() == 1:
            sd[key] = sd[key].reshape(own[key].shape)

    if skip_final:
        sd = {k: v for k, v in sd.items() if not k.startswith(final + ".")}
        sd.update({k: v for k, v in own.items() if k.startswith(final + ".")})
    else:
        key = f"{final}.weight"
        if key in sd and key in own and sd[key].shape[0] != own[key].shape[0]:
            raise ValueError(f"checkpoint's final layer has {sd[key].shape[0]} outputs but the "
                             f"model has {own[key].shape[0]} (check -c/--num_classes, --ocm and "
                             f"--code_length)")

    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape_bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_bad:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} entries (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected entries (e.g. {unexpected[0]})")
        if shape_bad:
            k = shape_bad[0]
            detail.append(f"{len(shape_bad)} shape mismatches (e.g. {k}: "
                          f"{tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        arch = getattr(model, "arch", type(model).__name__)
        raise ValueError(f"checkpoint does not fit architecture {arch}: {'; '.join(detail)} "
                         f"(check --arch)")
    return sd


def load_weights(model: nn.Module, state_dict: dict, skip_final: bool = False) -> nn.Module:
    """Load ``state_dict`` (any supported layout) into ``model``; returns the model."""
    sd = adapt_state_dict(state_dict, model, skip_final=skip_final)
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    return model
