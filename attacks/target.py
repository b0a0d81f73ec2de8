"""What an attack runs on, built from a typed spec: the model in the number format it is
attacked in, its output head, the fault model, its deployment-time defenses and its data
(docs/algorithms.md sections 1, 1b, 5b and 11).

:func:`build_target` is the one function that builds it, from a checkpoint (ours or a
published one, whose flags :class:`~models.factory.ModelFlags` describe) or from torchvision's
ImageNet weights; the attack scripts, the benchmarks and the tests call it::

    from attacks.target import TargetSpec, build_target
    target = build_target(TargetSpec(checkpoint="runs/r20/model_best.pth.tar",
                                     data=DataSpec("data")), "cpu")
    images, labels = target.load_test_split()
    target.model, target.output, target.fault, target.defenses

Every check of the spec raises :class:`utils.errors.UserError` (one line, what to do) before
anything is written, the fault model's against the attacked format included (bit positions
inside it, profile cells inside its weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.bits import ATTACK_FORMATS, FLOAT_BITS, FLOAT_FORMAT_NAMES
from models.factory import ModelConfig, ModelFlags
from utils.errors import UserError
from utils.faults import FaultModel, check_applies

# ATTACK_FORMATS (models/bits.py): the number formats a model can be attacked in
# (docs/algorithms.md section 1b): as trained (N-bit per-layer codes, fp32 for a float model),
# the IEEE formats, PyTorch's per-channel int8.


@dataclass(frozen=True)
class DataSpec:
    """Where the data set lives and how to read it."""

    data_dir: str = "data"
    download: bool = False  # CIFAR: download with torchvision when missing
    workers: int = 4        # ImageNet: loading processes


@dataclass(frozen=True)
class TargetSpec:
    """Everything that defines an attack target.

    ``checkpoint``: our checkpoint or a published one (``model`` then gives the flags its
    config needs, and must agree with a config the checkpoint stores); ``pretrained``:
    torchvision's ImageNet weights quantized to ``model.bits``. ``dataset`` defaults to the
    checkpoint's, else cifar10. ``number_format`` is one of :data:`ATTACK_FORMATS`
    (torch-int8 calibrates on ``calibration_images`` training images drawn with ``seed``).
    ``defenses``: deployment-time defenses (``"NAME[:key=value,...]"``) added to those the
    checkpoint records. ``normalization``: ``auto`` (the checkpoint's own; the BFA repository's
    for its checkpoints; else the data set's), ``dataset`` or ``bfa``
    (:func:`utils.checkpoint.checkpoint_normalization`). ``trust_checkpoint``: unpickle a file
    that needs more than the allowed types (runs its code); ``verify_checkpoint``: check the
    stored tensor digest (:func:`utils.checkpoint.load_checkpoint`).
    """

    checkpoint: str | None = None
    pretrained: bool = False
    model: ModelFlags = field(default_factory=ModelFlags)
    dataset: str | None = None
    data: DataSpec = field(default_factory=DataSpec)
    number_format: str = "trained"
    calibration_images: int = 512
    seed: int = 0
    fault: FaultModel | None = None
    defenses: tuple[str, ...] = ()
    normalization: str = "auto"
    trust_checkpoint: bool = False
    verify_checkpoint: bool = True


@dataclass
class AttackTarget:
    """The model an attack works on, in integer mode (or its float format) on its device."""

    model: nn.Module
    output: nn.Module
    config: ModelConfig
    dataset: object            # utils.data.DatasetInfo
    source: str                # checkpoint path, or "torchvision:<name>"
    mean: tuple
    std: tuple
    number_format: str = ""    # the attacked weights' format (ATTACK_FORMATS; "" = as trained)
    eval_model: nn.Module | None = None  # where accuracy is measured (torch-int8: the torch.ao
    #                                      model with the codes written back; a deployment-time
    #                                      defense: the model behind its check), None: ``model``
    data: DataSpec = field(default_factory=DataSpec)
    fault: FaultModel | None = None
    defenses: list = field(default_factory=list)  # every defense of the model (defenses/)
    normalization: str = "dataset"  # whose normalization mean/std are (utils.data.Normalization)

    def describe(self) -> str:
        """``<source> (<arch>, <bits>-bit[, OCM<n>][, as <format>][, <defense>...])``, as the
        attack logs name the model."""
        c = self.config
        bits = "float" if c.bits == FLOAT_BITS else f"{c.bits}-bit"
        deployed = [d.label() for d in self.defenses if d.stage == "deployment"]
        return (f"{self.source} ({c.arch}, {bits}{f', OCM{c.code_length}' if c.ocm else ''}"
                f"{f', as {self.number_format}' if self.number_format else ''}"
                f"{''.join(', ' + d for d in deployed)})")

    def deployment_record(self) -> list[dict] | None:
        """The deployment-time defenses as a campaign records them (None: none, so that
        campaigns written before defenses existed resume)."""
        deployed = [d.to_dict() for d in self.defenses if d.stage == "deployment"]
        return deployed or None

    def normalization_record(self) -> dict:
        """The inputs' normalization as the results record it."""
        return {"name": self.normalization, "mean": list(self.mean), "std": list(self.std)}

    def load_test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split of the model's data set as uint8 images and labels; labels the model
        cannot output are refused."""
        from utils.data import load_split_tensors

        images, labels = load_split_tensors(self.dataset.name, self.data.data_dir, "test",
                                            download=self.data.download,
                                            workers=self.data.workers)
        if int(labels.max()) >= self.config.num_classes:
            raise UserError(f"the test set has labels up to {int(labels.max())} but the model "
                            f"has {self.config.num_classes} classes")
        return images, labels


def build_target(spec: TargetSpec, device) -> AttackTarget:
    """Build the attacked model of ``spec``: load its weights, move it to ``device``, put it in
    the number format it is attacked in (integer mode by default) and put its deployment-time
    defenses in front of its evaluation."""
    if spec.number_format not in ATTACK_FORMATS:
        raise UserError(f"number format {spec.number_format!r}: use one of "
                        f"{', '.join(ATTACK_FORMATS)}")
    loaded = _load_pretrained(spec) if spec.pretrained else _load_checkpoint(spec)
    model, output, config, dataset, source, norm, defenses = loaded
    mean, std = norm.mean, norm.std
    if config.num_classes != dataset.num_classes and dataset.name != "imagenet":
        raise UserError(f"-c/--num_classes {config.num_classes} does not match {dataset.name}, "
                        f"which has {dataset.num_classes} classes")
    defenses = defenses + _deployment_defenses(spec.defenses)
    model.to(device).eval()
    output.to(device)

    def calibration():
        from utils.data import load_split_tensors, normalize_images

        images, _ = load_split_tensors(dataset.name, spec.data.data_dir, split="train",
                                       download=spec.data.download, workers=spec.data.workers,
                                       max_images=spec.calibration_images, seed=spec.seed)
        return [normalize_images(images[i:i + 64], mean, std) for i in range(0, len(images), 64)]

    model, eval_model, label = _attack_format(model, config, spec.number_format, calibration,
                                              device)
    if spec.fault is not None:
        try:
            check_applies(spec.fault, model)  # only now is the attacked format known
        except ValueError as e:
            raise UserError(f"fault model: {e}") from None
    deployed = [d for d in defenses if d.stage == "deployment"]
    if deployed:
        from defenses.deployment import DefendedModel

        for d in deployed:
            try:
                d.protect(model)
            except ValueError as e:  # e.g. a code for another bit width, a float format
                raise UserError(f"--defense {d.label()}: {e}") from None
        eval_model = DefendedModel(eval_model if eval_model is not None else model, model,
                                   deployed)
    return AttackTarget(model, output, config, dataset, source, mean, std, label, eval_model,
                        spec.data, spec.fault, defenses, norm.name)


def _flags_error(e: Exception) -> UserError:
    return UserError((e.args[0] if isinstance(e, KeyError) and e.args else str(e)))


def _load_pretrained(spec: TargetSpec):
    from models.factory import build_model
    from models.loading import load_weights
    from models.pretrained import torchvision_state_dict
    from utils.data import get_dataset_info, named_normalization

    if spec.checkpoint:
        raise UserError("give either --pretrained or --checkpoint, not both")
    dataset = get_dataset_info(spec.dataset or "imagenet")
    if dataset.name != "imagenet":
        raise UserError(f"--pretrained uses torchvision's ImageNet weights; --dataset "
                        f"{dataset.name} does not fit them (use --dataset imagenet)")
    try:
        config = spec.model.resolve(dataset.num_classes)
    except (KeyError, ValueError) as e:
        raise _flags_error(e) from None
    if config.ocm or config.num_classes != 1000:
        raise UserError("--pretrained models are vanilla 1000-class ImageNet classifiers: "
                        "drop --ocm and -c")
    try:
        state = torchvision_state_dict(config.arch)
        model, output = build_model(config)
        load_weights(model, state)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    try:
        norm = named_normalization(dataset, "dataset" if spec.normalization == "auto"
                                   else spec.normalization)
    except ValueError as e:
        raise UserError(f"--normalization: {e}") from None
    return model, output, config, dataset, f"torchvision:{config.arch}", norm, []


def _load_checkpoint(spec: TargetSpec):
    from utils.checkpoint import (checkpoint_config, checkpoint_defenses,
                                  checkpoint_normalization, load_checkpoint,
                                  model_from_checkpoint)
    from utils.data import get_dataset_info

    if not spec.checkpoint:
        raise UserError("no model to attack: give --checkpoint PATH (or --outdir holding "
                        "model_best.pth.tar, or --pretrained)")
    path = spec.checkpoint
    ckpt = load_checkpoint(path, trust=spec.trust_checkpoint, verify=spec.verify_checkpoint)
    stored = checkpoint_config(ckpt)
    dataset = get_dataset_info(spec.dataset or ckpt.get("dataset") or "cifar10")
    try:
        config = spec.model.resolve(dataset.num_classes, stored, source=path)
    except (KeyError, ValueError) as e:
        raise _flags_error(e) from None
    model, output = model_from_checkpoint(ckpt, config, path)
    try:
        norm = checkpoint_normalization(ckpt, dataset, spec.normalization)
    except ValueError as e:
        raise UserError(f"--normalization: {e}") from None
    return model, output, config, dataset, path, norm, checkpoint_defenses(ckpt, config)


def _deployment_defenses(specs: tuple[str, ...]) -> list:
    """The deployment-time defenses named on the command line (one line for a bad name, a bad
    parameter, or a training-time defense, which only training can give a model)."""
    from defenses import parse_defense

    out = []
    for text in specs:
        try:
            defense = parse_defense(text)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"--defense {text}: "
                            f"{e.args[0] if isinstance(e, KeyError) else e}") from None
        if defense.stage != "deployment":
            raise UserError(f"--defense {text} is a training-time defense: train the model with "
                            f"main.py --defense {text}; an attack takes deployment-time ones")
        out.append(defense)
    return out


def _attack_format(model: nn.Module, config: ModelConfig, name: str, calibration, device):
    """``(attacked model, eval model or None, format label)`` for the number format ``name``."""
    from models import to_integer
    from models.formats import (DeployedModel, from_ao, plain_layers, quantize_per_channel,
                                to_float_format)
    from models.quantization import quant_layers

    if name == "trained":
        if config.bits == FLOAT_BITS:
            return to_float_format(model, "fp32"), None, "fp32"
        return to_integer(model), None, ""
    if quant_layers(model):
        plain_layers(model)  # the float weights the quantized layers were trained with
    if name in FLOAT_FORMAT_NAMES:
        return to_float_format(model, name), None, name
    # torch-int8: PyTorch's per-channel post-training quantization, attacked through its twin
    if torch.device(device).type != "cpu":
        raise UserError("--format torch-int8 runs PyTorch's quantized kernels, which are "
                        "CPU-only: add --device cpu")
    model = model.cpu().eval()
    ao_model = quantize_per_channel(model, calibration())
    twin = from_ao(ao_model, model)
    return twin, DeployedModel(twin, ao_model), "torch-int8"
