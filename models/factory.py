"""A model's full description (``ModelConfig``) and the one function that builds it.

Checkpoints store the config and the OCM codebook, so that a checkpoint alone rebuilds its
model (nanoGPT's ``model_args`` habit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from .base import check_layout
from .bits import FLOAT_BITS, check_bits
from .ocm import LEGACY_SEED, build_output, check_code_length
from .registry import default_bits, get_model, get_model_entry


@dataclass
class ModelConfig:
    arch: str
    num_classes: int
    bits: int = 8
    output_act: str = "linear"
    ocm: bool = False
    code_length: int | None = None
    codebook_seed: int = LEGACY_SEED
    # Which function the architecture computes (models.base.LAYOUTS): "public" = the public
    # code's; "v0" = this tool's before the conformance fix (configs stored without the field).
    layout: str = "public"

    @property
    def num_outputs(self) -> int:
        return self.code_length if self.ocm else self.num_classes

    def validate(self) -> "ModelConfig":
        """Raise ValueError (one line, with the fix) for an impossible combination."""
        entry = get_model_entry(self.arch)
        if self.bits == FLOAT_BITS:
            if entry.fixed_bits is not None:
                raise ValueError(f"{self.arch} is a {entry.fixed_bits}-bit architecture; it has "
                                 f"no float version (--bits {FLOAT_BITS})")
        else:
            try:
                check_bits(self.bits)
            except ValueError as e:
                raise ValueError(f"{e}; or {FLOAT_BITS} for a float model") from None
        check_layout(self.layout)
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"number of classes must be at least 2, got {self.num_classes}")
        if self.ocm:
            if self.code_length is None:
                raise ValueError("--ocm needs --code_length (a power of two > classes, e.g. 16 "
                                 "for 10 classes)")
            check_code_length(self.code_length, self.num_classes)
            if self.output_act != "tanh":
                raise ValueError("OCM models need a tanh output: add --output_act tanh")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config a checkpoint stored; one stored before ``layout`` existed is layout v0."""
        names = {f.name for f in fields(cls)}
        return cls(**{"layout": "v0", **{k: v for k, v in d.items() if k in names}})


DEFAULT_ARCH = "resnet20_quan"
DEFAULT_CODE_LENGTH = 16  # the original main.py's default for --code_length


@dataclass(frozen=True)
class ModelFlags:
    """The model settings a user gave (None: not given): a new model's config is built from
    them (the defaults fill the rest), and a checkpoint's stored config must agree with them."""

    arch: str | None = None
    bits: int | None = None
    num_classes: int | None = None
    ocm: bool | None = None
    code_length: int | None = None
    output_act: str | None = None
    codebook_seed: int = LEGACY_SEED

    #: the command-line spelling of each field, for messages
    FLAGS = {"arch": "--arch", "bits": "--bits", "num_classes": "-c/--num_classes",
             "ocm": "--ocm", "code_length": "--code_length", "output_act": "--output_act"}

    def resolve(self, num_classes_default: int, stored: ModelConfig | None = None,
                source: str = "the checkpoint") -> ModelConfig:
        """The stored config (every given setting must agree with it), or a new validated
        config; raises ValueError naming the flag that disagrees or is impossible."""
        if stored is not None:
            for name, flag in self.FLAGS.items():
                value = getattr(self, name)
                if value is not None and value != getattr(stored, name):
                    raise ValueError(f"{flag} {value} does not match {source}, which has "
                                     f"{name}={getattr(stored, name)}: drop the flag or use the "
                                     f"right checkpoint")
            return stored
        arch = self.arch or DEFAULT_ARCH
        get_model_entry(arch)  # KeyError naming the registered architectures
        ocm = bool(self.ocm)
        config = ModelConfig(
            arch=arch,
            num_classes=self.num_classes if self.num_classes is not None else num_classes_default,
            bits=self.bits if self.bits is not None else default_bits(arch),
            output_act=self.output_act or "linear", ocm=ocm,
            code_length=(DEFAULT_CODE_LENGTH if self.code_length is None else self.code_length)
            if ocm else None,
            codebook_seed=self.codebook_seed)
        return config.validate()


def build_model(config: ModelConfig, codebook: torch.Tensor | None = None
                ) -> tuple[nn.Module, nn.Module]:
    """``(network, output)`` for ``config``; ``output`` is the loss/decoding interface.

    ``bits == 32`` (:data:`models.bits.FLOAT_BITS`) builds the float model: plain
    ``nn.Conv2d`` / ``nn.Linear`` layers. ``codebook`` (OCM only) overrides the seeded codebook, e.g. the one a checkpoint stored.
    """
    config.validate()
    float_model = config.bits == FLOAT_BITS
    model = get_model(config.arch, config.num_outputs, None if float_model else config.bits,
                      config.output_act, layout=config.layout)
    if float_model:  # the same architecture with plain float layers
        from .formats import plain_layers

        plain_layers(model)
    output = build_output(config.num_classes, config.ocm, config.code_length, codebook,
                          config.codebook_seed)
    if config.ocm and tuple(output.codebook.shape) != (config.num_classes, config.code_length):
        raise ValueError(f"codebook of shape {tuple(output.codebook.shape)} does not fit "
                         f"{config.num_classes} classes and code length {config.code_length}")
    return model, output
