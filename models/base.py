"""Behaviour shared by every network of the registry: the head, the output activation and
the hooks the training code needs (final layer, penultimate features, mixup points)."""

from __future__ import annotations

import torch
import torch.nn as nn

OUTPUT_ACTIVATIONS = ("linear", "tanh")
# "public": computes what the public OCM / BFA code computes (docs/algorithms.md section 2).
# "v0": the function of checkpoints this tool wrote before the conformance fix (their config has
# no ``layout`` entry); kept so that such files evaluate exactly as they did.
LAYOUTS = ("public", "v0")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"model layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def check_output_act(output_act: str) -> str:
    if output_act not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output activation must be one of {', '.join(OUTPUT_ACTIVATIONS)}, "
                         f"got {output_act!r}")
    return output_act


class QuantNet:
    """Mixin for the networks: ``forward = head(features(x))``, then the output activation.

    Subclasses implement :meth:`forward_features` (input to penultimate features) and set
    ``final_layer_name`` (the module that maps features to outputs) and ``mixup_points``
    (modules after whose output manifold mixup may mix hidden states, besides the input).
    """

    final_layer_name: str = "linear"
    mixup_points: tuple[str, ...] = ()
    output_act: str = "linear"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_layer(self) -> nn.Module:
        return self.get_submodule(self.final_layer_name)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Final layer and output activation (``tanh`` for OCM models, docs/algorithms.md section 2)."""
        out = self.final_layer()(features)
        return torch.tanh(out) if self.output_act == "tanh" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def num_outputs(self) -> int:
        return self.final_layer().out_features


def kaiming_init(model: nn.Module) -> None:
    """He-normal initialisation of every conv and linear weight (the CIFAR ResNets' scheme)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
