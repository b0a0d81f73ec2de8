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
import torch

from attacks.target import AttackTarget, DataSpec, TargetSpec, build_target
from models.bits import ATTACK_FORMATS
from models import list_models
from models.factory import ModelConfig, ModelFlags
from models.ocm import LEGACY_SEED

from utils.data import get_dataset_info, list_datasets
from utils.device import resolve_device
from utils.logs import setup_logging  # noqa: F401 (the scripts import it from here)
from utils.errors import UserError

log = logging.getLogger("bitflip")

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
    g.add_argument("--normalization", default="auto", choices=("auto", "dataset", "bfa"),
                   help="input normalization to evaluate and attack a checkpoint with: auto "
                        "(default: the one our checkpoints store; the BFA repository's for its "
                        "checkpoints; else the data set's own), dataset, or bfa (mean "
                        "(125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255 on CIFAR-10)")


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


def add_checkpoint_safety_args(group) -> None:
    """``--trust-checkpoint`` and ``--no-verify-checkpoint``: what loading a checkpoint may
    skip (:func:`utils.checkpoint.load_checkpoint`); both off by default."""
    group.add_argument("--trust-checkpoint", "--trust_checkpoint", dest="trust_checkpoint",
                       action="store_true",
                       help="load a checkpoint that pickles objects beyond tensors, plain "
                            "values, numpy arrays and the published scripts' types (refused by "
                            "default): runs the file's code: only for files you trust")
    group.add_argument("--no-verify-checkpoint", "--no_verify_checkpoint",
                       dest="verify_checkpoint", action="store_false",
                       help="load a checkpoint of ours whose tensors no longer match the digest "
                            "stored with them (refused by default): for deliberate "
                            "experiments, e.g. a model whose bits were changed on purpose")


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


def in_process_group(args, body, timeout_s: float = 1800.0) -> int:
    """``body(args, device)`` on the device of ``--device`` / ``--gpu``; under torchrun in the
    process group (one GPU per rank; a collective waits at most ``timeout_s``), which it leaves
    afterwards, also after an error."""
    from utils.distributed import cleanup, init_distributed

    try:
        return body(args, init_distributed(runtime_device(args), timeout_s))
    finally:
        cleanup()


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' flag parser: a flag error (unknown flag, bad value, missing argument) is a
    :class:`UserError`, so that :func:`run` prints it as the one line ``error: ...`` (exit status
    2) like every other bad input, instead of argparse's usage block. Abbreviated flags are
    off: ``--res`` never silently means ``--results``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} ({self.prog} --help lists the flags)")


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


def _shown(path: str) -> str:
    """``path`` as a message can show it: a name that is not UTF-8 with its bytes escaped."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# The kernel's views of the system (not places for files): nothing is written below them.
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")
VIRTUAL_EXCEPTIONS = ("/dev/shm",)  # a RAM disk: files are written there


def _check_path_text(path: str, flag: str) -> None:
    """``path`` can be used and shown: not empty, no NUL, valid UTF-8 (a name in another
    encoding could be opened but not logged, printed or recorded, and would fail half-way)."""
    if path == "":
        raise UserError(f"{flag} is an empty path: give a path")
    if "\0" in path:
        raise UserError(f"{flag} {path!r} holds a NUL character: give a path")
    try:
        os.path.abspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} {_shown(path)}: the path is not valid UTF-8 (a name in another "
                        f"encoding, which the logs and results cannot record): rename it") from None


def _check_writable_place(path: str, flag: str) -> None:
    """Nothing is written under the kernel's virtual file systems (/proc, /sys, /dev)."""
    real = os.path.realpath(path)
    for root in VIRTUAL_ROOTS:
        if _within(real, root) and not any(_within(real, x) for x in VIRTUAL_EXCEPTIONS):
            raise UserError(f"{flag} {path} lies in {root}, the kernel's view of the system, "
                            f"where no files can be written: give a path on a disk")


def check_output_dir(path: str, flag: str) -> None:
    """``path`` can be (or already is) a folder this run writes into."""
    _check_path_text(path, flag)
    blocker = _blocking_file(path)
    if blocker == os.path.abspath(path):
        raise UserError(f"{flag} {path} is a file, not a folder: give a folder path")
    if blocker is not None:
        raise UserError(f"{flag} {path} cannot be created: {blocker} is a file, not a folder")
    _check_writable_place(path, flag)
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {existing}")


def check_output_file(path: str, flag: str) -> None:
    """``path`` is a file this run writes: not a folder, in a folder that exists."""
    _check_path_text(path, flag)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    blocker = _blocking_file(folder)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist (create it first)")
    _check_writable_place(path, flag)
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path} is not a regular file (a device, pipe or socket): "
                        f"give a file path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {folder}")


def check_input_file(path: str, flag: str) -> None:
    """``path`` is an existing, readable file."""
    _check_path_text(path, flag)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give the file inside it")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path}: no permission to read it")


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both absolute, normalized)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same(a: str, b: str) -> bool:
    """Two paths name one file: the same real path, or (both existing) the same inode, as
    a hard link is."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _overlap(out: tuple, other: tuple, other_is_output: bool) -> str | None:
    """How the output ``out`` collides with ``other`` (an input, or another output), as the
    end of an error line; None when they are apart. Each is ``(flag, path, kind)``."""
    (_, path, kind), (o_flag, o_path, o_kind) = out, other
    role = "writes" if other_is_output else "reads"
    real, o_real = os.path.realpath(path), os.path.realpath(o_path)
    if _same(path, o_path):
        return f"is {o_flag} {o_path} (the {o_kind} this command also {role})"
    if _within(real, o_real):
        return f"lies inside {o_flag} {o_path} (a folder this command also {role})"
    if kind == "folder" and _within(o_real, real) and (other_is_output or o_kind == "file"):
        return (f"holds {o_flag} {o_path} (which this command also {role}), and this command "
                f"writes into it")
    return None


def check_paths(inputs: list[tuple], outputs: list[tuple]) -> None:
    """Every path a command reads (``inputs``) and writes (``outputs``), checked together
    before anything is written; each is ``(flag, path or None, kind)``, kind ``"file"`` or
    ``"folder"`` (a path of None: flag not given). Each path must be usable (valid UTF-8; an
    input file that exists; an output in a place where it can be written, never under /proc,
    /sys or /dev). Then no output may be, or lie inside, an input or another output, and no
    input file may lie inside an output folder: a command never writes over what it reads,
    nor two things to one place. Real paths are compared, so symlinks, ``..`` and hard links
    count. The one home of these rules: every script calls it (input folders are only
    compared: a missing one is each reader's own matter)."""
    inputs = [p for p in inputs if p[1] is not None]
    outputs = [p for p in outputs if p[1] is not None]
    for flag, path, kind in inputs:
        _check_path_text(path, flag)
        if kind == "file":
            check_input_file(path, flag)
    for flag, path, kind in outputs:
        (check_output_file if kind == "file" else check_output_dir)(path, flag)
    for i, out in enumerate(outputs):
        pairs = [(out, p, False) for p in inputs]
        pairs += [pair for p in outputs[:i] for pair in ((out, p, True), (p, out, True))]
        for a, b, b_is_output in pairs:
            problem = _overlap(a, b, b_is_output)
            if problem:
                raise UserError(f"{a[0]} {a[1]} {problem}: give {a[0]} another path")


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
    """Model config from the flags and, when given, a checkpoint's stored config
    (:meth:`models.factory.ModelFlags.resolve`): with a stored config, flags given on the
    command line must agree with it (the error says which differs); otherwise defaults fill
    what the flags leave out."""
    given = {dest: getattr(args, dest) for dest in MODEL_FLAGS
             if stored is None or dest in explicit}
    flags = ModelFlags(**given, codebook_seed=args.codebook_seed)
    try:
        return flags.resolve(num_classes_default, stored, source)
    except (KeyError, ValueError) as e:
        raise UserError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from None


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
    g.add_argument("--defense", dest="defenses", action="append", default=None,
                   metavar="NAME[:KEY=VALUE,...]",
                   help="a deployment-time defense in front of the attacked model (repeatable; "
                        "its training-time defenses come from the checkpoint); "
                        "docs/algorithms.md section 11")
    add_checkpoint_safety_args(g)


# ---------------------------------------------------------------------------------------------
# Attack scripts: the attacked number format and the fault model
# ---------------------------------------------------------------------------------------------



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
    g.add_argument("--page-bytes", type=int, default=None,
                   help="page size for --one-flip-per-page, a power of two (default: 4096)")
    g.add_argument("--flip-budget", type=int, default=None, metavar="N",
                   help="at most N flips in the whole attack (per experiment for T-BFA)")


def fault_model_from_args(args):
    """The :class:`utils.faults.FaultModel` the flags describe (None when unconstrained);
    raises UserError for a bad value, a setting without effect (``--page-bytes`` without
    ``--one-flip-per-page``) or a malformed or empty profile, before anything is written. What
    depends on the model (bit positions inside its format, profile cells inside its weights)
    is checked once it is loaded (:func:`attacks.target.build_target`)."""
    from utils.faults import PAGE_BYTES, FaultModel, parse_bit_positions, read_profile

    if args.page_bytes is not None and not args.one_flip_per_page:
        raise UserError("--page-bytes is the page of --one-flip-per-page, which is not given: "
                        "add --one-flip-per-page, or drop --page-bytes")
    check_number(args.page_bytes, "--page-bytes", minimum=4, maximum=2 ** 30)
    try:
        positions = (parse_bit_positions(args.fault_bits) if args.fault_bits is not None
                     else None)
        profile = None
        if args.fault_profile is not None:
            check_input_file(args.fault_profile, "--fault-profile")
            read_profile(args.fault_profile)  # a malformed or empty file fails here
            profile = os.path.abspath(args.fault_profile)
        fault = FaultModel(bit_positions=positions, direction=args.fault_direction,
                           profile=profile, one_per_page=args.one_flip_per_page,
                           page_bytes=args.page_bytes or PAGE_BYTES, budget=args.flip_budget)
    except ValueError as e:
        raise UserError(f"fault model: {e}") from None
    return None if fault.unconstrained else fault


def model_path(args) -> str | None:
    """The checkpoint the attack scripts' flags name: ``--checkpoint``, else
    ``<--outdir>/model_best.pth.tar`` (the original scripts' way); None with ``--pretrained``.
    Raises UserError when there is no model, or two."""
    if args.pretrained:
        if args.checkpoint:
            raise UserError("give either --pretrained or --checkpoint, not both")
        return None
    if args.checkpoint:
        return args.checkpoint
    if args.outdir:
        return os.path.join(args.outdir, "model_best.pth.tar")
    raise UserError("no model to attack: give --checkpoint PATH (or --outdir holding "
                    "model_best.pth.tar, or --pretrained)")


def target_spec(args) -> TargetSpec:
    """The :class:`attacks.target.TargetSpec` of the attack scripts' flags (checked: a bad
    fault model or profile is a UserError here, before anything is loaded)."""
    flags = ModelFlags(arch=args.arch, bits=args.bits, num_classes=args.num_classes,
                       ocm=args.ocm, code_length=args.code_length, output_act=args.output_act,
                       codebook_seed=args.codebook_seed)
    checkpoint = model_path(args)
    fault = args.fault if hasattr(args, "fault") else (
        fault_model_from_args(args) if hasattr(args, "fault_bits") else None)
    return TargetSpec(checkpoint=checkpoint,
                      pretrained=args.pretrained, model=flags, dataset=args.dataset,
                      data=DataSpec(args.data_dir, args.download, args.workers),
                      number_format=getattr(args, "format", "trained"),
                      calibration_images=getattr(args, "calibration_images", 512),
                      seed=args.seed, fault=fault, defenses=tuple(args.defenses or ()),
                      normalization=args.normalization,
                      trust_checkpoint=getattr(args, "trust_checkpoint", False),
                      verify_checkpoint=getattr(args, "verify_checkpoint", True))


def load_attack_target(args, device) -> AttackTarget:
    """The attack scripts' target: :func:`attacks.target.build_target` of :func:`target_spec`."""
    return build_target(target_spec(args), device)
