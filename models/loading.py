"""Loading state dicts written in other layouts into the registry's models (docs/algorithms.md section 2).

Accepts

- the published OCM checkpoints (saved from ``nn.DataParallel``: every key starts with
  ``module.``; quantized layers carry ``step_size`` and ``b_w``);
- torchvision's ImageNet weights (classifier ``fc`` instead of ``linear``; no ``step_size`` /
  ``b_w``);
- the BFA repository's checkpoints (elliothe/BFA ``main.py`` saves ``{'state_dict':
  net.state_dict(), ...}``, with ``module.`` only when trained on several GPUs): its CIFAR
  ``resnet20_quan`` / ``resnet20_bin`` (``conv_1_3x3``, ``bn_1``,
  ``stage_N.i.conv_a/bn_a/conv_b/bn_b``, ``classifier``) are renamed to ours (``conv1``,
  ``bn1``, ``layerN.i.conv1/bn1/conv2/bn2``, ``linear``) by :func:`rename_bfa_cifar_resnet`;
  its ImageNet ``resnet18_quan`` / ``resnet34_quan`` use torchvision's names (``fc`` is mapped
  as above), its ``mobilenet_v2_quan`` and ``vgg11_bn_quan`` (layout "public") ours already.

``b_w`` is a constant of the bit width; the model's own values are kept (the public binarized
layers store ``[-1]`` where ours store ``[-2]``, see :mod:`models.bits`). Mismatches raise
ValueError with a one-line explanation (bits, output size, architecture).

Reading a BFA-repository *file* is :func:`utils.checkpoint.load_checkpoint`'s job: its
checkpoint also pickles a ``utils.RecorderMeter`` object, read as an inert stand-in.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .quantization import quant_layers

QUANT_BUFFERS = ("step_size", "b_w")

# The BFA repository's CIFAR ResNet (models/quan_resnet_cifar.py, bin_resnet_cifar.py) -> ours.
_BFA_CIFAR_RESNET = [
    (re.compile(r"^conv_1_3x3\."), "conv1."),
    (re.compile(r"^bn_1\."), "bn1."),
    (re.compile(r"^stage_(\d+)\.(\d+)\.conv_a\."), r"layer\1.\2.conv1."),
    (re.compile(r"^stage_(\d+)\.(\d+)\.bn_a\."), r"layer\1.\2.bn1."),
    (re.compile(r"^stage_(\d+)\.(\d+)\.conv_b\."), r"layer\1.\2.conv2."),
    (re.compile(r"^stage_(\d+)\.(\d+)\.bn_b\."), r"layer\1.\2.bn2."),
    (re.compile(r"^classifier\."), "linear."),
]


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop ``prefix`` from every key that has it (``nn.DataParallel`` / DDP checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def is_bfa_cifar_resnet(state_dict: dict) -> bool:
    """True for a state dict (prefix already stripped) of the BFA repository's CIFAR ResNet."""
    return "conv_1_3x3.weight" in state_dict or any(k.startswith("stage_1.")
                                                    for k in state_dict)


def rename_bfa_cifar_resnet(state_dict: dict) -> dict:
    """The BFA repository's CIFAR ResNet names -> ours (see the module docstring)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _BFA_CIFAR_RESNET:
            new, n = pattern.subn(repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def adapt_state_dict(state_dict: dict, model: nn.Module, skip_final: bool = False) -> dict:
    """Return ``state_dict`` renamed and completed so that it loads into ``model``.

    ``skip_final`` drops the final layer's entries (finetuning a new output size).
    Raises ValueError when the checkpoint was made for another bit width, output size or
    architecture.
    """
    sd = strip_prefix(dict(state_dict))
    own = model.state_dict()
    final = getattr(model, "final_layer_name", "linear")
    if is_bfa_cifar_resnet(sd) and "conv1.weight" in own:
        sd = rename_bfa_cifar_resnet(sd)
    if final == "linear" and "fc.weight" in sd and "linear.weight" not in sd:
        sd = {("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in sd.items()}

    for name, layer in quant_layers(model):
        key = f"{name}.b_w"
        if key in sd and tuple(sd[key].shape) != tuple(own[key].shape):
            raise ValueError(f"checkpoint has {sd[key].shape[0]}-bit layers but the model was "
                             f"built with {layer.n_bits} bits (set --bits {sd[key].shape[0]})")
        for buf in QUANT_BUFFERS:  # recomputed from the weights anyway; fill when absent
            sd.setdefault(f"{name}.{buf}", own[f"{name}.{buf}"])
        sd[key] = own[key]  # a constant of the bit width (the public 1-bit layers store [-1])
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
        hint = "check --arch"
        if getattr(model, "layout", None) == "v0":
            hint += "; checkpoints of the public code need the model layout 'public'"
        elif "classifier.weight" in sd and "classifier.6.weight" in own:
            hint += ("; a VGG with one linear classifier is layout 'v0' (set \"layout\": "
                     "\"v0\" in the checkpoint's model_config)")
        raise ValueError(f"checkpoint does not fit architecture {arch}: {'; '.join(detail)} "
                         f"({hint})")
    return sd


def load_weights(model: nn.Module, state_dict: dict, skip_final: bool = False) -> nn.Module:
    """Load ``state_dict`` (any supported layout) into ``model``; returns the model."""
    sd = adapt_state_dict(state_dict, model, skip_final=skip_final)
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    return model
