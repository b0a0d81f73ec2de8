"""Output code matching (OCM, Özdenizci & Legenstein, CVPR 2022) as a training-time defense:
an output head.

The head itself (Hadamard codebook, L1 loss on tanh outputs, correlation decoding) is
:mod:`models.ocm` (docs/algorithms.md section 3); this defense sets the model config that builds
it, so the checkpoint's config and its ``"defenses"`` record say the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from models.ocm import is_power_of_two

from .base import TrainingDefense, check_param, register_defense


@register_defense
@dataclass
class OCM(TrainingDefense):
    """The network predicts the class's ``code_length``-bit string instead of its index, so a
    targeted bit-flip attack must move many outputs at once, and visibly.

    ``code_length``: L, a power of two of at least classes + 1 (16 for 10 classes, 64 in the
    paper's larger model, 1024 on ImageNet; default 16, the original main.py's).
    ``output_act``: the activation of the outputs, tanh (the codes are in {-1, +1}).

    Example: ``--defense ocm:code_length=64``, or the published ``--ocm --code_length 64
    --output_act tanh``.
    """

    name: ClassVar[str] = "ocm"
    code_length: int = 16
    output_act: str = "tanh"

    def validate(self) -> None:
        check_param(self.code_length, "code_length", integer=True, minimum=2)
        if not is_power_of_two(self.code_length):
            raise ValueError(f"code_length must be a power of two (16, 64, 1024, ...), "
                             f"got {self.code_length}")
        if self.output_act != "tanh":
            raise ValueError(f"output_act must be tanh (the codes are in {{-1, +1}}), "
                             f"got {self.output_act!r}")

    def configure(self, config):
        return dataclasses.replace(config, ocm=True, code_length=self.code_length,
                                   output_act=self.output_act)
