"""torchvision's ImageNet weights for the registry's ImageNet architectures.

Used to attack a float model quantized after training (as the BFA repository's ImageNet example
does). The weights come from the local torch hub cache (``torch.hub.get_dir()/checkpoints``) or
are downloaded into it when the machine is online.
"""

from __future__ import annotations

import os

import torch

TORCHVISION_NAMES = {
    "resnet18_quan": "resnet18",
    "resnet34_quan": "resnet34",
    "resnet50_quan": "resnet50",
    "mobilenet_v2_quan": "mobilenet_v2",
}


def torchvision_weights_path(arch: str) -> str:
    """Where the torch hub cache keeps the weights file of ``arch``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints",
                        os.path.basename(_weights(arch).url))


def _weights(arch: str):
    from torchvision.models import get_model_weights

    if arch not in TORCHVISION_NAMES:
        raise ValueError(f"--pretrained needs an architecture torchvision has ImageNet weights "
                         f"for: {', '.join(sorted(TORCHVISION_NAMES))} (got {arch})")
    return get_model_weights(TORCHVISION_NAMES[arch]).IMAGENET1K_V1


def torchvision_state_dict(arch: str, progress: bool = False) -> dict:
    """torchvision's ImageNet state dict for ``arch`` (cache first, else download).

    Raises ValueError for an architecture torchvision lacks and RuntimeError (one line, with the
    cache path) when the weights are neither cached nor downloadable.
    """
    weights = _weights(arch)
    path = torchvision_weights_path(arch)
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return weights.get_state_dict(progress=progress)
    except Exception as e:  # offline, proxy, disk: all mean "not available here"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise RuntimeError(f"torchvision's ImageNet weights for {arch} are not in the torch hub "
                           f"cache ({path}) and could not be downloaded ({reason[:120]}); copy "
                           f"the file {os.path.basename(weights.url)} there or go online"
                           ) from None
