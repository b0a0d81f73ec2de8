"""Command-line plumbing shared by ``main.py`` and the attack scripts.

The model and data flags (compatible with the original repositories' scripts), the rule that
turns flags plus an optional checkpoint into a :class:`ModelConfig`, and :func:`run`, which
turns a :class:`UserError` into ``error: <one line>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from models import list_models
from models.bits import FLOAT_BITS
from models.factory import ModelConfig
from models.ocm import LEGACY_SEED
from models.registry import default_bits

from utils.data import get_dataset_info, list_datasets
from utils.device import resolve_device
from utils.logs import setup_logging  # noqa: F401 (the scripts import it from here)
from utils.errors import UserError

log = logging.getLogger("bitflip")

DEFAULT_CODE_LENGTH = 16  # the original main.py's default for --code_length

# Flags that describe the model: given explicitly, they must agree with a checkpoint.
MODEL_FLAGS = {"arch": "arch", "bits": "bits", "ocm": "ocm", "code_length": "code_length",
               "output_act": "output_act", "num_classes": "num_classes"}


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data_dir", "--data-dir", default="data",
                   help="folder holding cifar-10-batches-py/, cifar-100-python/ or ImageNet "
                        "train/ and val/ (default: data)")
    g.add_argument("--dataset", default=None,
                   help=f"one of {', '.join(list_datasets())} (case-insensitive; default: "
                        f"the checkpoint's, else cifar10)")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR-10/100 with torchvision when missing (needs internet)")
    g.add_argument("--workers", type=int, default=4,
                   help="data-loading processes for ImageNet (default: 4)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (defaults: from the checkpoint when there is one)")
    g.add_argument("--arch", "-a", default=None,
                   help=f"architecture (default resnet20_quan): {', '.join(list_models())}")
    g.add_argument("--bits", type=int, default=None,
                   help="weight bits, 2-16, 1 for binarized, or 32 for a float (unquantized) "
                        "model (default: 8)")
    g.add_argument("-c", "--num_classes", type=int, default=None,
                   help="number of classes (default: the data set's)")
    g.add_argument("--ocm", action="store_true", default=None,
                   help="output code matching head (needs --code_length and --output_act tanh)")
    g.add_argument("--code_length", "-cl", type=int, default=None,
                   help="OCM code length L, a power of two >= classes + 1 (default 16; 64, "
                        "1024, ... as in the papers)")
    g.add_argument("--output_act", choices=("linear", "tanh"), default=None,
                   help="activation after the last layer (tanh for OCM; default linear)")
    g.add_argument("--codebook_seed", type=int, default=LEGACY_SEED,
                   help="seed of the legacy OCM codebook shuffle, for checkpoints that do not "
                        "store their codebook (default: 1, as the published ones)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i> (default: auto)")
    g.add_argument("--gpu", default=None,
                   help="the original scripts' GPU id: -1 means --device cpu, i means cuda:i")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no tqdm progress bars")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of PyTorch (default: its own choice, the number of "
                        "cores). CPU results depend on it: give the same number to repeat a "
                        "run bit for bit on another machine")


def device_spec(args) -> str:
    """``--device``, or the original scripts' ``--gpu`` id when that is given instead."""
    if getattr(args, "gpu", None) is not None and args.device == "auto":
        gpu = str(args.gpu).split(",")[0].strip()
        return "cpu" if gpu == "-1" else f"cuda:{gpu}"
    return args.device


def runtime_device(args):
    """Apply ``--threads`` and return the device of ``--device`` / ``--gpu``."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return resolve_device(device_spec(args))


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options that appear on the command line ``argv``."""
    given = set()
    for action in parser._actions:  # argparse keeps no public record of what was given
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                given.add(action.dest)
    return given


# ---------------------------------------------------------------------------------------------
# Checks of user input, made before anything is written (each failure: one UserError line)
# ---------------------------------------------------------------------------------------------

def check_number(value, flag: str, minimum=None, maximum=None, above=None) -> None:
    """``value`` must be a finite number with ``minimum <= value <= maximum`` and
    ``value > above`` (each bound optional); ``None`` (flag not given) passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise UserError(f"{flag} must be at least {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise UserError(f"{flag} must be greater than {above:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise UserError(f"{flag} must be at most {maximum:g}, got {value:g}")


def _blocking_file(path: str) -> str | None:
    """The first existing non-folder among ``path`` and its parents, if any."""
    probe = os.path.abspath(path)
    while True:
        if os.path.exists(probe) and not os.path.isdir(probe):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def check_output_dir(path: str, flag: str) -> None:
    """``path`` can be (or already is) a folder this run writes into."""
    blocker = _blocking_file(path)
    if blocker == os.path.abspath(path):
        raise UserError(f"{flag} {path} is a file, not a folder: give a folder path")
    if blocker is not None:
        raise UserError(f"{flag} {path} cannot be created: {blocker} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {existing}")


def check_output_file(path: str, flag: str) -> None:
    """``path`` is a file this run writes: not a folder, in a folder that exists."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    blocker = _blocking_file(folder)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {folder}")


def check_input_file(path: str, flag: str) -> None:
    """``path`` is an existing, readable file."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give the file inside it")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path}: no permission to read it")


def check_runtime_args(args) -> None:
    """The flags of :func:`add_runtime_args` and :func:`add_data_args`."""
    check_number(getattr(args, "seed", None), "--seed", minimum=0, maximum=2 ** 32 - 1)
    check_number(getattr(args, "workers", None), "--workers", minimum=0)
    check_number(getattr(args, "threads", None), "--threads", minimum=1)
    check_number(getattr(args, "codebook_seed", None), "--codebook_seed", minimum=0,
                 maximum=2 ** 32 - 1)


def resolve_dataset(args, stored: str | None):
    """The data set's info: ``--dataset``, else the checkpoint's, else cifar10."""
    return get_dataset_info(args.dataset or stored or "cifar10")


def resolve_model_config(args, explicit: set[str], num_classes_default: int,
                         stored: ModelConfig | None, source: str = "the checkpoint"
                         ) -> ModelConfig:
    """Model config from the flags and, when given, a checkpoint's stored config.

    With a stored config, flags given on the command line must agree with it (the error says
    which differs); otherwise defaults fill what the flags leave out.
    """
    if stored is not None:
        for dest, field in MODEL_FLAGS.items():
            value = getattr(args, dest)
            if dest in explicit and value is not None and value != getattr(stored, field):
                flag = "-c/--num_classes" if dest == "num_classes" else f"--{dest}"
                raise UserError(f"{flag} {value} does not match {source}, which has "
                                f"{field}={getattr(stored, field)}: drop the flag or use the "
                                f"right checkpoint")
        return stored
    arch = args.arch or "resnet20_quan"
    if arch not in list_models():
        raise UserError(f"unknown architecture {arch!r}; valid: {', '.join(list_models())}")
    ocm = bool(args.ocm)
    config = ModelConfig(
        arch=arch,
        num_classes=args.num_classes if args.num_classes is not None else num_classes_default,
        bits=args.bits if args.bits is not None else default_bits(arch),
        output_act=args.output_act or "linear",
        ocm=ocm,
        code_length=(DEFAULT_CODE_LENGTH if args.code_length is None else args.code_length)
        if ocm else None,
        codebook_seed=args.codebook_seed,
    )
    try:
        return config.validate()
    except (KeyError, ValueError) as e:
        raise UserError(str(e).strip("'\"")) from None


def run(main_fn, argv=None, error_log: "callable | None" = None) -> int:
    """Call ``main_fn(argv)``; a UserError becomes one line on stderr and exit status 2."""
    try:
        return main_fn(argv) or 0
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Attack scripts: the attacked model
# ---------------------------------------------------------------------------------------------

def add_attack_model_args(parser: argparse.ArgumentParser) -> None:
    """Data and model flags of the attack scripts, plus where the model comes from."""
    add_data_args(parser)
    add_model_args(parser)
    g = parser.add_argument_group("attacked model")
    g.add_argument("--checkpoint", default=None,
                   help="checkpoint to attack (default: <outdir>/model_best.pth.tar)")
    g.add_argument("--outdir", default=None,
                   help="the original scripts' model folder, holding model_best.pth.tar")
    g.add_argument("--pretrained", action="store_true",
                   help="attack torchvision's ImageNet weights (resnet18/34/50_quan, "
                        "mobilenet_v2_quan) quantized after training to --bits")


@dataclass
class AttackTarget:
    """The model an attack script works on, in integer mode on its device."""

    model: nn.Module
    output: nn.Module
    config: ModelConfig
    dataset: object            # utils.data.DatasetInfo
    source: str                # checkpoint path, or "torchvision:<name>"
    mean: tuple
    std: tuple
    number_format: str = ""    # the attacked weights' format (ATTACK_FORMATS; "" = as trained)
    eval_model: nn.Module | None = None  # where accuracy is measured (torch-int8: the torch.ao
    #                                      model with the codes written back), None: ``model``

    def describe(self) -> str:
        """``<source> (<arch>, <bits>-bit[, OCM<n>][, as <format>])``, as the attack logs name
        the model."""
        c = self.config
        bits = "float" if c.bits == FLOAT_BITS else f"{c.bits}-bit"
        return (f"{self.source} ({c.arch}, {bits}{f', OCM{c.code_length}' if c.ocm else ''}"
                f"{f', as {self.number_format}' if self.number_format else ''})")

    def load_test_split(self, args) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split of the model's data set as uint8 images and labels (``--data_dir``,
        ``--download``, ``--workers``); labels the model cannot output are refused."""
        from utils.data import load_split_tensors

        images, labels = load_split_tensors(self.dataset.name, args.data_dir, "test",
                                            download=args.download, workers=args.workers)
        if int(labels.max()) >= self.config.num_classes:
            raise UserError(f"the test set has labels up to {int(labels.max())} but the model "
                            f"has {self.config.num_classes} classes")
        return images, labels


# ---------------------------------------------------------------------------------------------
# Attack scripts: the attacked number format and the fault model
# ---------------------------------------------------------------------------------------------

# --format: the weights' number format during the attack (docs/algorithms.md section 1b).
ATTACK_FORMATS = ("trained", "fp32", "bf16", "fp16", "torch-int8")


def add_format_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("number format of the attacked weights")
    g.add_argument("--format", default="trained", choices=ATTACK_FORMATS,
                   help="trained (default): as the model was trained (N-bit per-layer codes, fp32 "
                        "for --bits 32 models; --pretrained: quantized to --bits); fp32, bf16, "
                        "fp16: the float weights in that IEEE format; torch-int8: quantized per "
                        "channel to int8 by PyTorch's own tools (torch.ao, CPU only), accuracy "
                        "measured on that model with the flipped codes written back")
    g.add_argument("--calibration_images", type=int, default=512,
                   help="torch-int8: training images that calibrate the activation ranges "
                        "(default: 512, a seeded draw)")


def add_fault_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fault model: which flips are possible (default: every flip)")
    g.add_argument("--fault-bits", default=None, metavar="BITS",
                   help="bit positions that may flip, 0 = MSB: e.g. 0 (only the MSB), 1-7 (no "
                        "MSB), 0,3-5")
    g.add_argument("--fault-direction", default="any", choices=("any", "0to1", "1to0"),
                   help="only 0 -> 1 or only 1 -> 0 flips (default: any)")
    g.add_argument("--fault-profile", default=None, metavar="FILE",
                   help="vulnerability profile: lines '<byte offset> <bit 0-7, 0 = LSB> "
                        "<0to1|1to0>'; only those cells flip, each in its direction (offsets "
                        "in the weight layout of docs/algorithms.md section 5b)")
    g.add_argument("--one-flip-per-page", action="store_true",
                   help="at most one flip per memory page of the weights as stored")
    g.add_argument("--page-bytes", type=int, default=4096,
                   help="page size for --one-flip-per-page (default: 4096)")
    g.add_argument("--flip-budget", type=int, default=None, metavar="N",
                   help="at most N flips in the whole attack (per experiment for T-BFA)")


def fault_model_from_args(args):
    """The :class:`utils.faults.FaultModel` the flags describe (None when unconstrained);
    raises UserError for a bad value or an unreadable profile, before anything is written."""
    from utils.faults import FaultModel, parse_bit_positions, read_profile

    try:
        positions = (parse_bit_positions(args.fault_bits) if args.fault_bits is not None
                     else None)
        profile = None
        if args.fault_profile is not None:
            check_input_file(args.fault_profile, "--fault-profile")
            read_profile(args.fault_profile)  # a malformed file fails here, with its line
            profile = os.path.abspath(args.fault_profile)
        fault = FaultModel(bit_positions=positions, direction=args.fault_direction,
                           profile=profile, one_per_page=args.one_flip_per_page,
                           page_bytes=args.page_bytes, budget=args.flip_budget)
    except ValueError as e:
        raise UserError(f"fault model: {e}") from None
    return None if fault.unconstrained else fault


def _attack_format(model: nn.Module, config: ModelConfig, name: str, calibration, device):
    """``(attacked model, eval model or None, format label)`` for ``--format name``."""
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
    if name in ("fp32", "bf16", "fp16"):
        return to_float_format(model, name), None, name
    # torch-int8: PyTorch's per-channel post-training quantization, attacked through its twin
    if torch.device(device).type != "cpu":
        raise UserError("--format torch-int8 runs PyTorch's quantized kernels, which are "
                        "CPU-only: add --device cpu")
    model = model.cpu().eval()
    ao_model = quantize_per_channel(model, calibration())
    twin = from_ao(ao_model, model)
    return twin, DeployedModel(twin, ao_model), "torch-int8"


def load_attack_target(args, explicit: set[str], device) -> AttackTarget:
    """Build the attacked model from ``--checkpoint``/``--outdir`` or ``--pretrained``, load its
    weights, move it to ``device`` and put it in the ``--format`` it is attacked in: integer
    mode by default (docs/algorithms.md sections 1 and 1b)."""
    from models.factory import build_model
    from models.loading import load_weights
    from models.pretrained import torchvision_state_dict

    from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint

    if args.pretrained:
        if args.checkpoint:
            raise UserError("give either --pretrained or --checkpoint, not both")
        dataset = resolve_dataset(args, "imagenet")
        if dataset.name != "imagenet":
            raise UserError(f"--pretrained uses torchvision's ImageNet weights; --dataset "
                            f"{dataset.name} does not fit them (use --dataset imagenet)")
        config = resolve_model_config(args, explicit, dataset.num_classes, None)
        if config.ocm or config.num_classes != 1000:
            raise UserError("--pretrained models are vanilla 1000-class ImageNet classifiers: "
                            "drop --ocm and -c")
        try:
            state = torchvision_state_dict(config.arch)
            model, output = build_model(config)
            load_weights(model, state)
        except (ValueError, RuntimeError) as e:
            raise UserError(str(e)) from None
        source = f"torchvision:{config.arch}"
        mean, std = dataset.mean, dataset.std
    else:
        path = args.checkpoint or (os.path.join(args.outdir, "model_best.pth.tar")
                                   if args.outdir else None)
        if not path:
            raise UserError("no model to attack: give --checkpoint PATH (or --outdir holding "
                            "model_best.pth.tar, or --pretrained)")
        ckpt = load_checkpoint(path)
        stored = checkpoint_config(ckpt)
        dataset = resolve_dataset(args, ckpt.get("dataset"))
        config = resolve_model_config(args, explicit, dataset.num_classes, stored, source=path)
        model, output = model_from_checkpoint(ckpt, config, path)
        norm = ckpt.get("normalization") or {}
        mean = tuple(norm.get("mean", dataset.mean))
        std = tuple(norm.get("std", dataset.std))
        source = path
    if config.num_classes != dataset.num_classes and dataset.name != "imagenet":
        raise UserError(f"-c/--num_classes {config.num_classes} does not match {dataset.name}, "
                        f"which has {dataset.num_classes} classes")
    model.to(device).eval()
    output.to(device)
    fmt = getattr(args, "format", "trained")

    def calibration():
        from utils.data import load_split_tensors, normalize_images

        images, _ = load_split_tensors(dataset.name, args.data_dir, split="train",
                                       download=args.download, workers=args.workers,
                                       max_images=args.calibration_images, seed=args.seed)
        return [normalize_images(images[i:i + 64], mean, std)
                for i in range(0, len(images), 64)]

    model, eval_model, label = _attack_format(model, config, fmt, calibration, device)
    return AttackTarget(model, output, config, dataset, source, mean, std, label, eval_model)
