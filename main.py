r"""Train, resume, evaluate and finetune quantized networks, with or without the defenses.

Examples:
  python main.py --dataset cifar10 --arch resnet20_quan --bits 8 --outdir runs/r20_vanilla
  python main.py --dataset cifar10 --arch resnet20_quan --bits 8 --ocm --code_length 16 \
      --output_act tanh --outdir runs/r20_ocm16
  python main.py --dataset cifar10 --arch resnet20_quan --defense ocm:code_length=16 \
      --defense clustering:lambda_coeff=1e-3 --outdir runs/r20_ocm16_pc
  python main.py --resume runs/r20_ocm16/checkpoint.pth.tar
  python main.py --eval runs/r20_ocm16/model_best.pth.tar
  python main.py --dataset imagenet --arch resnet50_quan --finetune --ft_path vanilla.pth.tar \
      --ocm --code_length 1024 --output_act tanh --outdir runs/r50_ocm1024
  torchrun --nproc_per_node=4 main.py --dataset imagenet --data_dir /data/imagenet \
      --arch resnet50_quan --amp --channels-last --outdir runs/r50      # 4 GPUs, one node
Defaults follow the papers' recipe (docs/algorithms.md section 4). Defenses are components
given by name (--defense, docs/algorithms.md section 11); the published flags --ocm,
--clustering, --mixup and --manifold-mixup are aliases that add the same component.

Several processes (torchrun, DistributedDataParallel): -b/--batch is the global batch (each
of the W processes takes B/W samples of every step), so a recipe keeps its meaning on any
number of GPUs; evaluation is sharded and its counts summed; only rank 0 writes logs,
TensorBoard, log.csv and checkpoints; BatchNorm keeps plain DDP semantics (batch statistics
per process, running statistics of rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from defenses import (check_defenses, config_defenses, list_defenses, parse_defense,
                      switch_defenses)
from utils import distributed
from utils.checkpoint import (checkpoint_config, checkpoint_normalization, load_checkpoint,
                              model_from_checkpoint)
from cli.args import (MODEL_FLAGS, ArgumentParser, add_checkpoint_safety_args, add_data_args,
                      add_model_args, add_runtime_args, check_number, check_paths,
                      check_runtime_args, explicit_dests, resolve_dataset, resolve_model_config,
                      run, runtime_device)
from utils.data import build_loaders
from utils.errors import UserError
from utils.schedules import LRSchedule, parse_schedule
from utils.trainer import TrainRun, train, wrap_for_training
from utils.training import build_optimizer, evaluate

if TYPE_CHECKING:
    from defenses import Defense
    from models.factory import ModelConfig
    from utils.data import DatasetInfo

# Flags whose value a resumed run takes from the checkpoint unless given again.
# (Not the run folder: a resumed run writes next to the checkpoint it was given.)
TRAINING_FLAGS = ("epochs", "batch", "opt", "lr", "momentum", "nesterov", "schedule", "gammas",
                  "warmup", "weight_decay", "defense", "clustering", "lambda_coeff", "mixup",
                  "mixup_alpha", "manifold_mixup", "manifold_mixup_alpha", "seed", "data_dir",
                  "amp")
# What a training run writes into its folder (--overwrite replaces a finished run's).
RUN_FILES = ("checkpoint.pth.tar", "model_best.pth.tar", "log.csv", "args.json", "train.log")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    add_model_args(p)
    g = p.add_argument_group("mode")
    g.add_argument("--eval", nargs="?", const="", default=None, metavar="CKPT",
                   help="evaluate a checkpoint on the test set (default CKPT: "
                        "<outdir>/model_best.pth.tar)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue an interrupted run (default CKPT: <outdir>/checkpoint.pth.tar);"
                        " training flags not given again are taken from it")
    g.add_argument("--finetune", action="store_true",
                   help="start from --ft_path, keep every weight but the final layer and "
                        "re-initialise that one (e.g. with --ocm --code_length L)")
    g.add_argument("--ft_path", default=None,
                   help="checkpoint to finetune (ours or published), or its run folder")
    add_checkpoint_safety_args(g)
    g.add_argument("--outdir", default=None,
                   help="run folder for checkpoints and logs (default: runs/<dataset>_<arch>...;"
                        " with --resume: the checkpoint's folder)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the training run already in --outdir (without it such a "
                        "folder is refused)")
    t = p.add_argument_group("training (defaults: docs/algorithms.md section 4)")
    t.add_argument("-e", "--epochs", type=int, default=None,
                   help="epochs (default 160; 60 when finetuning)")
    t.add_argument("-b", "--batch", type=int, default=None,
                   help="batch size (default 128 for 32x32 data, 256 for ImageNet)")
    t.add_argument("--test_batch", type=int, default=None, help="evaluation batch size")
    t.add_argument("--opt", choices=("sgd", "adam", "adamw"), default=None,
                   help="optimizer (default sgd; adam when finetuning)")
    t.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default 0.1 for sgd, 1e-3 for adam)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    t.add_argument("--schedule", nargs="+", default=None, metavar="S",
                   help="step (the papers' rule: /10 at 50%% and 75%% of the epochs), cosine, "
                        "constant, or milestone epochs as in the BFA scripts (80 120)")
    t.add_argument("--gammas", type=float, nargs="+", default=None,
                   help="factor per milestone of --schedule (default 0.1 each)")
    t.add_argument("--warmup", type=float, default=0.0,
                   help="epochs of linear learning-rate warm-up (default 0)")
    t.add_argument("-wd", "--weight-decay", "--weight_decay", dest="weight_decay", type=float,
                   default=None, help="weight decay (default 5e-4 CIFAR cross-entropy; 1e-4 "
                                      "ImageNet and OCM; 0 when finetuning)")
    t.add_argument("--defense", action="append", default=None, metavar="NAME[:key=value,...]",
                   help=f"a defense by name with its parameters, repeatable (docs/algorithms.md "
                        f"section 11): {', '.join(list_defenses())}; e.g. --defense "
                        f"ocm:code_length=64 --defense clustering:lambda_coeff=5e-4. The flags "
                        f"--ocm, --clustering, --mixup and --manifold-mixup are its aliases")
    t.add_argument("--clustering", "-pc", action="store_true",
                   help="piecewise weight clustering defense (He et al. 2020); alias of "
                        "--defense clustering:lambda_coeff=<--lambda_coeff>")
    t.add_argument("--lambda_coeff", "-lam", type=float, default=1e-3,
                   help="piecewise clustering strength (default 1e-3; 5e-4 for ResNet-50)")
    t.add_argument("--mixup", action="store_true",
                   help="input mixup; alias of --defense mixup:alpha=<--mixup-alpha>")
    t.add_argument("--mixup-alpha", "--mixup_alpha", dest="mixup_alpha", type=float, default=1.0,
                   help="mixup Beta(alpha, alpha) (default 1)")
    t.add_argument("--manifold-mixup", "--manifold_mixup", dest="manifold_mixup",
                   action="store_true", help="manifold mixup (hidden states); alias of --defense "
                                             "manifold_mixup:alpha=<--manifold-mixup-alpha>")
    t.add_argument("--manifold-mixup-alpha", "--manifold_mixup_alpha",
                   dest="manifold_mixup_alpha", type=float, default=2.0,
                   help="manifold mixup Beta(alpha, alpha) (default 2)")
    s = p.add_argument_group("speed (the quantizer stays exact with each of them)")
    s.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the training forward; quantized weights are still "
                        "computed in float32 (kept by --resume)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the training model (checkpoints store the plain "
                        "module; evaluation runs uncompiled)")
    s.add_argument("--channels-last", "--channels_last", dest="channels_last",
                   action="store_true",
                   help="channels-last memory format for model and batches (its effect on "
                        "the step time: bench/README.md)")
    add_runtime_args(p)
    return p


def apply_recipe_defaults(args, dataset, finetune: bool, ocm: bool) -> None:
    """Fill the training flags left unset with the papers' recipe (docs/algorithms.md section 4)."""
    imagenet = dataset.name == "imagenet"
    if args.epochs is None:
        args.epochs = 60 if finetune else 160
    if args.batch is None:
        args.batch = 256 if imagenet else 128
    if args.opt is None:
        args.opt = "adam" if finetune else "sgd"
    if args.lr is None:
        args.lr = 0.1 if args.opt == "sgd" else 1e-3
    if args.weight_decay is None:
        args.weight_decay = 0.0 if finetune else (1e-4 if (imagenet or ocm) else 5e-4)


def validate_training_args(args) -> LRSchedule:
    """The numbers of the training flags, checked; the learning-rate schedule they describe.
    (The defense flags are checked with the defenses: :func:`requested_defenses`.)"""
    for name in ("epochs", "batch"):
        check_number(getattr(args, name), f"--{name}", minimum=1)
    check_number(args.test_batch, "--test_batch", minimum=1)
    check_number(args.lr, "--lr", above=0)
    check_number(args.momentum, "--momentum", minimum=0)
    check_number(args.weight_decay, "-wd/--weight-decay", minimum=0)
    check_number(args.warmup, "--warmup", minimum=0)
    for gamma in args.gammas or []:
        check_number(gamma, "--gammas", above=0)
    try:
        kind, milestones = parse_schedule(args.schedule)
        gammas = args.gammas if args.gammas is not None else [0.1] * len(milestones)
        return LRSchedule(args.lr, args.epochs, kind, milestones, gammas, args.warmup)
    except ValueError as e:
        raise UserError(str(e)) from None


def requested_defenses(args) -> list[Defense]:
    """The defenses the flags ask for: each ``--defense`` in the order given, then those the
    published flags stand for (--clustering, --mixup, --manifold-mixup; the OCM head of --ocm
    comes with the model config, :func:`model_defenses`). Checked as one model's."""
    check_number(args.lambda_coeff, "--lambda_coeff", minimum=0)
    check_number(args.mixup_alpha, "--mixup-alpha", above=0)
    check_number(args.manifold_mixup_alpha, "--manifold-mixup-alpha", above=0)
    if args.mixup and args.manifold_mixup:
        raise UserError("choose one of --mixup and --manifold-mixup")
    defenses = [_parsed_defense(spec) for spec in args.defense or []]
    try:
        defenses += switch_defenses(vars(args))
        check_defenses(defenses)
    except ValueError as e:
        raise UserError(str(e)) from None
    return defenses


def _parsed_defense(spec: str) -> Defense:
    try:
        return parse_defense(spec)
    except KeyError as e:  # an unknown name: the message lists the registered ones
        raise UserError(f"--defense {spec}: {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"--defense {spec}: {e}") from None


def configure_model(config: ModelConfig, defenses: list[Defense], given: dict,
                    stored: bool, source: str) -> ModelConfig:
    """``config`` as the training defenses need it (:meth:`TrainingDefense.configure`: the OCM
    head), validated. A ``stored`` config (a checkpoint's) must already be what they ask for;
    a model flag in ``given`` (``{dest: value}`` of those on the command line) must not say
    otherwise."""
    for defense in (d for d in defenses if d.stage == "training"):
        new = defense.configure(config)
        for dest, name in MODEL_FLAGS.items():
            before, after = getattr(config, name), getattr(new, name)
            if after == before:
                continue
            if stored:
                raise UserError(f"--defense {defense.label()} does not match {source}, which "
                                f"has {name}={before}: drop it or use the right checkpoint")
            if dest in given and given[dest] != after:
                raise UserError(f"--defense {defense.label()} sets {name}={after}, but --{dest} "
                                f"says {given[dest]}: give the model's {name} once")
        try:
            config = new.validate()
        except (KeyError, ValueError) as e:
            raise UserError(f"--defense {defense.label()}: {str(e).strip(chr(39))}") from None
    return config


def model_defenses(config: ModelConfig, requested: list[Defense]) -> list[Defense]:
    """Every defense of the model: the OCM head its config describes (--ocm, a checkpoint's
    config) unless a --defense gives it, then the requested ones."""
    names = {d.name for d in requested}
    return [d for d in config_defenses(config) if d.name not in names] + requested


def check_new_run_folder(outdir: str, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless ``--overwrite``."""
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(outdir, f))]
    if not present or overwrite:
        return
    if not {"checkpoint.pth.tar", "model_best.pth.tar"} & set(present) and _own_args(outdir):
        return  # a run of ours killed before its first epoch ended: nothing to lose
    detail = ", ".join(present)
    ckpt = os.path.join(outdir, "checkpoint.pth.tar")
    if os.path.exists(ckpt):
        try:
            state = load_checkpoint(ckpt)
            epochs = (state.get("args") or {}).get("epochs")
            detail = (f"epoch {state.get('epoch')}" + (f" of {epochs}" if epochs else "")
                      + f", best test accuracy {state.get('best_acc', 0):.2f}%")
        except UserError:
            pass
    raise UserError(f"--outdir {outdir} already holds a training run ({detail}): continue it "
                    f"with --resume {ckpt}, choose another --outdir, or add --overwrite to "
                    f"replace it")


def _own_args(outdir: str) -> bool:
    try:
        with open(os.path.join(outdir, "args.json")) as f:
            return "model_config" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def clear_run_folder(outdir: str) -> None:
    """Before a new run: remove what an earlier run wrote there (``--overwrite``, or a run of
    ours that never finished an epoch), and nothing else of the folder."""
    for name in RUN_FILES:
        path = os.path.join(outdir, name)
        if os.path.exists(path):
            os.remove(path)
    if os.path.isdir(os.path.join(outdir, "tb")):
        shutil.rmtree(os.path.join(outdir, "tb"))


def default_outdir(dataset, config) -> str:
    name = f"{dataset.name}_{config.arch}_{config.bits}bit"
    if config.ocm:
        name += f"_ocm{config.code_length}"
    return os.path.join("runs", name)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv)
    try:
        return _main(args, explicit)
    finally:
        distributed.cleanup()


def _main(args, explicit: set[str]) -> int:
    check_runtime_args(args)
    _check_modes(args)
    check_paths(*run_paths(args, args.outdir if args.eval is None else None))
    device = runtime_device(args)
    if distributed.launched_by_torchrun() and args.eval is None:
        device = distributed.init_distributed(device)  # one process (and GPU) per rank
    torch.manual_seed(args.seed)  # model initialisation (and finetuning's new final layer)
    start = resolve_start(args, explicit)
    start.model.to(device)
    start.output.to(device)
    if args.eval is not None:
        return run_eval(args, start.model, start.output, start.dataset, device, start.ckpt,
                        start.ckpt_path)
    return train(prepare_training(args, start, device))


def _check_modes(args) -> None:
    modes = [m for m in ("eval", "resume") if getattr(args, m) is not None]
    if args.finetune:
        modes.append("finetune")
    if len(modes) > 1:
        raise UserError(f"choose one of --eval, --resume and --finetune (got {', '.join(modes)})")
    if args.ft_path and not args.finetune:
        raise UserError("--ft_path is only used with --finetune")
    if args.normalization != "auto" and args.eval is None:
        raise UserError("--normalization applies to --eval and the attack scripts; training "
                        "normalizes with the data set's own values (stored in the checkpoint)")


@dataclass
class Start:
    """What a run starts from: the checkpoint (if any), the data set, the model and its
    defenses, and for ``--resume`` the finished epochs, best test accuracy and log rows of the
    run it continues."""

    ckpt: dict | None
    ckpt_path: str | None
    dataset: DatasetInfo
    config: ModelConfig
    model: nn.Module
    output: nn.Module
    defenses: list[Defense] = field(default_factory=list)
    start_epoch: int = 0
    best_acc: float = 0.0
    history: list[dict] = field(default_factory=list)


def _checkpoint_path(value: str, outdir: str | None, default_name: str, flag: str) -> str:
    if value:
        return value
    if not outdir:
        raise UserError(f"{flag} needs a checkpoint path (or --outdir holding {default_name})")
    return os.path.join(outdir, default_name)


def _start_checkpoint_path(args) -> tuple[str | None, str | None]:
    """The flag and path of the checkpoint a run starts from (--eval, --resume, --finetune's
    --ft_path), or ``(None, None)`` for a new run."""
    if args.eval is not None:
        return "--eval", _checkpoint_path(args.eval, args.outdir, "model_best.pth.tar", "--eval")
    if args.resume is not None:
        return "--resume", _checkpoint_path(args.resume, args.outdir, "checkpoint.pth.tar",
                                            "--resume")
    if args.finetune:
        if not args.ft_path:
            raise UserError("--finetune needs --ft_path (the checkpoint to start from)")
        if os.path.isdir(args.ft_path):  # the original scripts pass the run folder
            return "--ft_path", os.path.join(args.ft_path, "model_best.pth.tar")
        return "--ft_path", args.ft_path
    return None, None


def run_paths(args, outdir: str | None) -> tuple[list, list]:
    """``(inputs, outputs)`` of this run, as :func:`cli.args.check_paths` takes them: the
    checkpoint it starts from and the run folder (``outdir``; None: not known yet, or
    --eval). --resume's checkpoint in its own run folder is the run's state, which the run goes
    on writing: it is no input there."""
    flag, path = _start_checkpoint_path(args)
    if flag == "--resume" and (outdir is None or os.path.realpath(outdir) ==
                               os.path.realpath(os.path.dirname(path) or ".")):
        flag = None
    return [(flag, path if flag else None, "file")], [("--outdir", outdir, "folder")]


def _start_checkpoint(args) -> tuple[dict | None, str | None]:
    """The checkpoint of --eval, --resume or --finetune (loaded on the CPU) and its path."""
    _, ckpt_path = _start_checkpoint_path(args)
    if not ckpt_path:
        return None, None
    return load_checkpoint(ckpt_path, map_location="cpu", trust=args.trust_checkpoint,
                           verify=args.verify_checkpoint), ckpt_path


def resolve_start(args, explicit: set[str]) -> Start:
    """The checkpoint we start from, if any, and the model it describes. ``--resume`` takes
    the training flags not given again from the checkpoint (into ``args``)."""
    ckpt, ckpt_path = _start_checkpoint(args)
    stored = checkpoint_config(ckpt) if ckpt else None
    if args.resume is not None and stored is not None:  # continue with the run's own flags
        for name, value in (ckpt.get("args") or {}).items():
            if name in TRAINING_FLAGS and name not in explicit:
                setattr(args, name, value)
    requested = requested_defenses(args)
    dataset = resolve_dataset(args, ckpt.get("dataset") if ckpt else None)
    args.dataset = dataset.name  # what the checkpoints record: the data set used
    build = _finetuned_model if args.finetune else _model
    config, model, output = build(args, explicit, dataset, ckpt, ckpt_path, stored, requested)
    if config.num_classes != dataset.num_classes and dataset.name != "imagenet":
        raise UserError(f"-c/--num_classes {config.num_classes} does not match {dataset.name}, "
                        f"which has {dataset.num_classes} classes")
    start = Start(ckpt, ckpt_path, dataset, config, model, output,
                  defenses=model_defenses(config, requested))
    if ckpt and args.resume is not None:
        start.start_epoch = int(ckpt.get("epoch", 0))
        start.best_acc = float(ckpt.get("best_acc", ckpt.get("best_acc1", 0.0)))
        start.history = list(ckpt.get("history") or [])
    return start


def _given_model_flags(args, explicit: set[str]) -> dict:
    return {dest: getattr(args, dest) for dest in MODEL_FLAGS if dest in explicit}


def _finetuned_model(args, explicit, dataset, ckpt, ckpt_path, base, defenses):
    """--finetune: the new model takes its flags and defenses (e.g. the OCM head); what they
    leave out comes from the source model, whose weights it keeps all but the final layer of."""
    if base is not None:
        for dest in ("arch", "bits"):
            value = getattr(args, dest)
            if dest in explicit and value != getattr(base, dest):
                raise UserError(f"--{dest} {value} does not match {ckpt_path}, which has "
                                f"{dest}={getattr(base, dest)}")
            setattr(args, dest, getattr(base, dest))
    config = resolve_model_config(args, explicit, dataset.num_classes, None)
    config = configure_model(config, defenses, _given_model_flags(args, explicit), False, "")
    if base is not None:  # the backbone keeps the function it was trained with
        config.layout = base.layout
    model, output = model_from_checkpoint(ckpt, config, ckpt_path, skip_final=True)
    return config, model, output


def _model(args, explicit, dataset, ckpt, ckpt_path, stored, defenses):
    """The checkpoint's model (--eval, --resume) or a new one: the config its flags and
    defenses describe."""
    source = ckpt_path or "the checkpoint"
    config = resolve_model_config(args, explicit, dataset.num_classes, stored, source=source)
    config = configure_model(config, defenses, _given_model_flags(args, explicit),
                             stored is not None, source)
    if ckpt is not None:
        model, output = model_from_checkpoint(ckpt, config, ckpt_path)
    else:
        from models.factory import build_model
        model, output = build_model(config)
    return config, model, output


def prepare_training(args, start: Start, device: torch.device) -> TrainRun:
    """Recipe defaults, checks, the run folder, loaders and optimizer: the run to train.
    Nothing is written before every check has passed."""
    apply_recipe_defaults(args, start.dataset, args.finetune, start.config.ocm)
    schedule = validate_training_args(args)
    stored_opt = (start.ckpt.get("args") or {}).get("opt") if args.resume is not None else None
    if stored_opt and args.opt != stored_opt:
        raise UserError(f"{start.ckpt_path} was trained with --opt {stored_opt}; its optimizer "
                        f"state cannot continue as --opt {args.opt}: drop --opt (or start "
                        f"a new run)")
    outdir, same_run = _training_outdir(args, start)
    if args.resume is not None and start.start_epoch >= args.epochs:
        raise UserError(f"{start.ckpt_path} already finished {start.start_epoch} of "
                        f"{args.epochs} epochs: raise -e/--epochs to train longer")
    if args.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp uses bfloat16, which {device} does not support: drop --amp")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    train_loader, test_loader, _ = build_loaders(
        start.dataset.name, args.data_dir, args.batch, device, workers=args.workers,
        download=args.download, seed=args.seed, test_batch_size=args.test_batch,
        rank=distributed.rank(), world_size=distributed.world_size(), memory_format=memory_format)
    start.model.to(memory_format=memory_format)
    optimizer = _optimizer(args, start)
    args.outdir = outdir
    train_model = wrap_for_training(start.model, device, args.compile)
    if not same_run and distributed.is_main():  # what passed check_new_run_folder may go
        clear_run_folder(outdir)
    return _train_run(args, start, optimizer, schedule, train_loader, test_loader, train_model)


def _training_outdir(args, start: Start) -> tuple[str, bool]:
    """The run folder (checked, refused if it holds another run) and whether it is the folder
    of the checkpoint that --resume continues."""
    outdir = args.outdir or (os.path.dirname(start.ckpt_path) or "." if args.resume is not None
                             else default_outdir(start.dataset, start.config))
    check_paths(*run_paths(args, outdir))
    same_run = (args.resume is not None and os.path.isdir(outdir)
                and os.path.samefile(os.path.dirname(start.ckpt_path) or ".", outdir))
    if not same_run:
        check_new_run_folder(outdir, args.overwrite)
    return outdir, same_run


def _optimizer(args, start: Start) -> torch.optim.Optimizer:
    """The optimizer of --opt; --resume restores its state from the checkpoint."""
    optimizer = build_optimizer(start.model, args.opt, args.lr, args.momentum,
                                args.weight_decay, args.nesterov)
    if args.resume is not None and start.ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(start.ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{start.ckpt_path}: its optimizer state does not fit --opt "
                            f"{args.opt} ({e}); resume with the run's own optimizer") from None
    return optimizer


def _train_run(args, start: Start, optimizer, schedule, train_loader, test_loader,
               train_model) -> TrainRun:
    """The flags the epoch loop needs, as a :class:`TrainRun`."""
    return TrainRun(
        model=start.model, output=start.output, config=start.config, dataset=start.dataset,
        optimizer=optimizer, schedule=schedule, train_loader=train_loader,
        test_loader=test_loader, outdir=args.outdir, epochs=args.epochs, seed=args.seed,
        batch=args.batch, defenses=start.defenses, progress=args.progress, amp=args.amp,
        compiled=args.compile, train_model=train_model,
        start_epoch=start.start_epoch, best_acc=start.best_acc, history=start.history,
        stored_args={k: v for k, v in vars(args).items()
                     if k in TRAINING_FLAGS or k == "dataset"},
        run_args={"argv": sys.argv, **vars(args)},
        resume_command="torchrun ... main.py" if distributed.is_distributed()
        else "python main.py")


def run_eval(args, model, output, dataset, device, ckpt, ckpt_path) -> int:
    """Test accuracy of the checkpoint, its inputs normalized as ``--normalization`` says
    (the BFA repository's for its checkpoints by default; docs/algorithms.md section 10)."""
    batch = args.test_batch or (256 if dataset.name != "imagenet" else 128)
    try:
        norm = checkpoint_normalization(ckpt, dataset, args.normalization)
    except ValueError as e:
        raise UserError(f"--normalization: {e}") from None
    _, test_loader, _ = build_loaders(dataset.name, args.data_dir, batch, device,
                                      workers=args.workers, download=args.download,
                                      seed=args.seed, test_batch_size=batch, normalization=norm)
    stats = evaluate(model, output, test_loader, progress=args.progress, description="test")
    result = {"checkpoint": ckpt_path, "dataset": dataset.name, "epoch": ckpt.get("epoch"),
              "normalization": norm.to_dict(),
              "top1": round(stats["top1"], 4), "top5": round(stats["top5"], 4),
              "loss": round(stats["loss"], 6), "n": stats["n"]}
    print(f"{ckpt_path}: top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  "
          f"loss {stats['loss']:.4f}  ({stats['n']} test images)")
    print(json.dumps(result))
    return 0


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
