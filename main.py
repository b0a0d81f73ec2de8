r"""Train, resume, evaluate and finetune quantized networks, with or without the defenses.

Examples:
  python main.py --dataset cifar10 --arch resnet20_quan --bits 8 --outdir runs/r20_vanilla
  python main.py --dataset cifar10 --arch resnet20_quan --bits 8 --ocm --code_length 16 \
      --output_act tanh --outdir runs/r20_ocm16
  python main.py --resume runs/r20_ocm16/checkpoint.pth.tar
  python main.py --eval runs/r20_ocm16/model_best.pth.tar
  python main.py --dataset imagenet --arch resnet50_quan --finetune --ft_path vanilla.pth.tar \
      --ocm --code_length 1024 --output_act tanh --outdir runs/r50_ocm1024
  torchrun --nproc_per_node=4 main.py --dataset imagenet --data_dir /data/imagenet \
      --arch resnet50_quan --amp --channels-last --outdir runs/r50      # 4 GPUs, one node
Defaults follow the papers' recipe (docs/algorithms.md section 4).

Several processes (torchrun, DistributedDataParallel): -b/--batch is the global batch (each
of the W processes takes B/W samples of every step), so a recipe keeps its meaning on any
number of GPUs; evaluation is sharded and its counts summed; only rank 0 writes logs,
TensorBoard, log.csv and checkpoints; BatchNorm keeps plain DDP semantics (batch statistics
per process, running statistics of rank 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time

import torch
import torch.nn as nn

from utils import distributed
from utils.checkpoint import (checkpoint_config, load_checkpoint, make_checkpoint,
                              model_from_checkpoint, save_checkpoint)
from utils.cli import (add_data_args, add_model_args, add_runtime_args, check_number,
                       check_output_dir, check_runtime_args, runtime_device, explicit_dests,
                       resolve_dataset, resolve_model_config, run, setup_logging)
from utils.data import build_loaders
from utils.errors import UserError
from utils.schedules import LRSchedule, parse_schedule
from utils.training import MixupConfig, build_optimizer, evaluate, train_one_epoch

log = logging.getLogger("main")

# Flags whose value a resumed run takes from the checkpoint unless given again.
# (Not the run folder: a resumed run writes next to the checkpoint it was given.)
TRAINING_FLAGS = ("epochs", "batch", "opt", "lr", "momentum", "nesterov", "schedule", "gammas",
                  "warmup", "weight_decay", "clustering", "lambda_coeff", "mixup", "mixup_alpha",
                  "manifold_mixup", "manifold_mixup_alpha", "seed", "data_dir", "amp")
# What a training run writes into its folder (--overwrite replaces a finished run's).
RUN_FILES = ("checkpoint.pth.tar", "model_best.pth.tar", "log.csv", "args.json", "train.log")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
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
    t.add_argument("--clustering", "-pc", action="store_true",
                   help="piecewise weight clustering defense (He et al. 2020)")
    t.add_argument("--lambda_coeff", "-lam", type=float, default=1e-3,
                   help="piecewise clustering strength (default 1e-3; 5e-4 for ResNet-50)")
    t.add_argument("--mixup", action="store_true", help="input mixup")
    t.add_argument("--mixup-alpha", "--mixup_alpha", dest="mixup_alpha", type=float, default=1.0,
                   help="mixup Beta(alpha, alpha) (default 1)")
    t.add_argument("--manifold-mixup", "--manifold_mixup", dest="manifold_mixup",
                   action="store_true", help="manifold mixup (hidden states)")
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


def validate_training_args(args) -> tuple[LRSchedule, MixupConfig | None]:
    for name in ("epochs", "batch"):
        check_number(getattr(args, name), f"--{name}", minimum=1)
    check_number(args.test_batch, "--test_batch", minimum=1)
    check_number(args.lr, "--lr", above=0)
    check_number(args.momentum, "--momentum", minimum=0)
    check_number(args.weight_decay, "-wd/--weight-decay", minimum=0)
    check_number(args.warmup, "--warmup", minimum=0)
    check_number(args.lambda_coeff, "--lambda_coeff", minimum=0)
    check_number(args.mixup_alpha, "--mixup-alpha", above=0)
    check_number(args.manifold_mixup_alpha, "--manifold-mixup-alpha", above=0)
    for gamma in args.gammas or []:
        check_number(gamma, "--gammas", above=0)
    if args.mixup and args.manifold_mixup:
        raise UserError("choose one of --mixup and --manifold-mixup")
    try:
        kind, milestones = parse_schedule(args.schedule)
        gammas = args.gammas if args.gammas is not None else [0.1] * len(milestones)
        schedule = LRSchedule(args.lr, args.epochs, kind, milestones, gammas, args.warmup)
    except ValueError as e:
        raise UserError(str(e)) from None
    mixup = None
    if args.mixup:
        mixup = MixupConfig(args.mixup_alpha)
    elif args.manifold_mixup:
        mixup = MixupConfig(args.manifold_mixup_alpha, manifold=True)
    return schedule, mixup


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


def _checkpoint_path(value: str, outdir: str | None, default_name: str, flag: str) -> str:
    if value:
        return value
    if not outdir:
        raise UserError(f"{flag} needs a checkpoint path (or --outdir holding {default_name})")
    return os.path.join(outdir, default_name)


def _main(args, explicit: set[str]) -> int:
    check_runtime_args(args)
    modes = [m for m in ("eval", "resume") if getattr(args, m) is not None]
    if args.finetune:
        modes.append("finetune")
    if len(modes) > 1:
        raise UserError(f"choose one of --eval, --resume and --finetune (got {', '.join(modes)})")
    if args.ft_path and not args.finetune:
        raise UserError("--ft_path is only used with --finetune")
    device = runtime_device(args)
    if distributed.launched_by_torchrun() and args.eval is None:
        device = distributed.init_distributed(device)  # one process (and GPU) per rank
    torch.manual_seed(args.seed)  # model initialisation (and finetuning's new final layer)

    # 1. The checkpoint we start from, if any, and the model it describes.
    ckpt, ckpt_path = None, None
    if args.eval is not None:
        ckpt_path = _checkpoint_path(args.eval, args.outdir, "model_best.pth.tar", "--eval")
    elif args.resume is not None:
        ckpt_path = _checkpoint_path(args.resume, args.outdir, "checkpoint.pth.tar", "--resume")
    elif args.finetune:
        if not args.ft_path:
            raise UserError("--finetune needs --ft_path (the checkpoint to start from)")
        ckpt_path = args.ft_path
        if os.path.isdir(ckpt_path):  # the original scripts pass the run folder
            ckpt_path = os.path.join(ckpt_path, "model_best.pth.tar")
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    stored = checkpoint_config(ckpt) if ckpt else None

    if args.resume is not None and stored is not None:  # continue with the run's own flags
        for name, value in (ckpt.get("args") or {}).items():
            if name in TRAINING_FLAGS and name not in explicit:
                setattr(args, name, value)
    dataset = resolve_dataset(args, ckpt.get("dataset") if ckpt else None)

    if args.finetune:
        # The new model takes its flags; what they leave out comes from the source model.
        base = stored
        if base is not None:
            for dest in ("arch", "bits"):
                value = getattr(args, dest)
                if dest in explicit and value != getattr(base, dest):
                    raise UserError(f"--{dest} {value} does not match {ckpt_path}, which has "
                                    f"{dest}={getattr(base, dest)}")
                setattr(args, dest, getattr(base, dest))
        config = resolve_model_config(args, explicit, dataset.num_classes, None)
        if base is not None:  # the backbone keeps the function it was trained with
            config.layout = base.layout
        model, output = model_from_checkpoint(ckpt, config, ckpt_path, skip_final=True)
        start_epoch, best_acc = 0, 0.0
    else:
        config = resolve_model_config(args, explicit, dataset.num_classes, stored,
                                      source=ckpt_path or "the checkpoint")
        if ckpt is not None:
            model, output = model_from_checkpoint(ckpt, config, ckpt_path)
        else:
            from models.factory import build_model
            model, output = build_model(config)
        start_epoch = int(ckpt.get("epoch", 0)) if (ckpt and args.resume is not None) else 0
        best_acc = float(ckpt.get("best_acc", ckpt.get("best_acc1", 0.0))) if (ckpt and args.resume is not None) else 0.0
    if config.num_classes != dataset.num_classes and dataset.name != "imagenet":
        raise UserError(f"-c/--num_classes {config.num_classes} does not match {dataset.name}, "
                        f"which has {dataset.num_classes} classes")
    model.to(device)
    output.to(device)

    if args.eval is not None:
        return run_eval(args, model, output, dataset, device, ckpt, ckpt_path)

    apply_recipe_defaults(args, dataset, args.finetune, config.ocm)
    schedule, mixup = validate_training_args(args)
    if args.resume is not None:
        stored_opt = (ckpt.get("args") or {}).get("opt")
        if stored_opt and args.opt != stored_opt:
            raise UserError(f"{ckpt_path} was trained with --opt {stored_opt}; its optimizer "
                            f"state cannot continue as --opt {args.opt}: drop --opt (or start "
                            f"a new run)")
    outdir = args.outdir or (os.path.dirname(ckpt_path) or "." if args.resume is not None
                             else default_outdir(dataset, config))
    check_output_dir(outdir, "--outdir")
    same_run = (args.resume is not None and os.path.isdir(outdir)
                and os.path.samefile(os.path.dirname(ckpt_path) or ".", outdir))
    if not same_run:
        check_new_run_folder(outdir, args.overwrite)
    history = list(ckpt.get("history") or []) if (ckpt and args.resume is not None) else []
    if args.resume is not None and start_epoch >= args.epochs:
        raise UserError(f"{ckpt_path} already finished {start_epoch} of {args.epochs} epochs: "
                        f"raise -e/--epochs to train longer")
    if args.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp uses bfloat16, which {device} does not support: drop --amp")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    train_loader, test_loader, _ = build_loaders(
        dataset.name, args.data_dir, args.batch, device, workers=args.workers,
        download=args.download, seed=args.seed, test_batch_size=args.test_batch,
        rank=distributed.rank(), world_size=distributed.world_size(), memory_format=memory_format)
    model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, args.opt, args.lr, args.momentum, args.weight_decay,
                                args.nesterov)
    if args.resume is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{ckpt_path}: its optimizer state does not fit --opt {args.opt} "
                            f"({e}); resume with the run's own optimizer") from None

    args.outdir = outdir
    train_model = wrap_for_training(model, device, args.compile)
    if not same_run and distributed.is_main():  # what passed check_new_run_folder may go
        clear_run_folder(outdir)
    return train(args, model, output, config, dataset, optimizer, schedule, mixup,
                 train_loader, test_loader, start_epoch, best_acc, outdir, train_model,
                 history)


def wrap_for_training(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """The module the training loop calls: ``model`` inside DistributedDataParallel (under
    torchrun) and ``torch.compile`` (``--compile``). Checkpoints and evaluation use ``model``
    itself, so no ``module.`` or ``_orig_mod.`` prefix reaches a state dict."""
    wrapped = model
    if distributed.is_distributed():
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        wrapped = torch.compile(wrapped)
    return wrapped


def _is_compile_error(e: BaseException) -> bool:
    """An exception raised by torch.compile's machinery (dynamo, inductor, the C++ compiler)."""
    return any(type(x).__module__.startswith(("torch._dynamo", "torch._inductor"))
               for x in (e, e.__cause__) if x is not None)


def run_eval(args, model, output, dataset, device, ckpt, ckpt_path) -> int:
    batch = args.test_batch or (256 if dataset.name != "imagenet" else 128)
    _, test_loader, _ = build_loaders(dataset.name, args.data_dir, batch, device,
                                      workers=args.workers, download=args.download,
                                      seed=args.seed, test_batch_size=batch)
    stats = evaluate(model, output, test_loader, progress=args.progress, description="test")
    result = {"checkpoint": ckpt_path, "dataset": dataset.name, "epoch": ckpt.get("epoch"),
              "top1": round(stats["top1"], 4), "top5": round(stats["top5"], 4),
              "loss": round(stats["loss"], 6), "n": stats["n"]}
    print(f"{ckpt_path}: top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  "
          f"loss {stats['loss']:.4f}  ({stats['n']} test images)")
    print(json.dumps(result))
    return 0


LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5",
              "best_acc", "seconds"]
TB_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


def _write_log_csv(path: str, rows: list[dict]) -> None:
    """``log.csv`` holding exactly ``rows`` (written next to it, then renamed: atomic)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        out.writeheader()
        out.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rows_of_old_log(path: str, epochs: int) -> list[dict]:
    """The rows of the first ``epochs`` epochs of an existing ``log.csv`` (checkpoints written
    before the history was stored in them)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit()
                and int(r["epoch"]) <= epochs]


def _log_tb(writer, row: dict) -> None:
    for key in TB_KEYS:
        writer.add_scalar(key.replace("_", "/", 1) if "_" in key else key, float(row[key]),
                          int(row["epoch"]))


def _log_epoch(row: dict, epochs: int, note: str = "") -> None:
    log.info("epoch %3d/%d  lr %.2e  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%% "
             "(best %.2f%%)  %.1fs%s", int(row["epoch"]), epochs, float(row["lr"]),
             float(row["train_loss"]), float(row["train_acc"]), float(row["test_loss"]),
             float(row["test_acc"]), float(row["best_acc"]), float(row["seconds"]), note)


def train(args, model, output, config, dataset, optimizer, schedule, mixup, train_loader,
          test_loader, start_epoch, best_acc, outdir, train_model=None, history=None) -> int:
    """The epoch loop. ``train_model`` is what the training step calls (``model`` wrapped by
    :func:`wrap_for_training`); only rank 0 writes files, every rank trains and evaluates.

    ``history`` holds the log rows of the ``start_epoch`` finished epochs (stored in every
    checkpoint): a resumed run rewrites ``log.csv`` and the last TensorBoard point from it, so
    a kill at any moment, between the checkpoint writes included, loses no row and leaves no
    duplicate, and removes the temporary files such a kill left behind."""
    train_model = model if train_model is None else train_model
    history = list(history or [])
    if not distributed.is_main():
        return _train_loop(args, model, output, config, dataset, optimizer, schedule, mixup,
                           train_loader, test_loader, start_epoch, best_acc, outdir,
                           train_model, None, history)
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(outdir, exist_ok=True)
    for name in os.listdir(outdir):  # left by a kill during an atomic write
        if (name.startswith(".tmp-") and name.endswith(".pth.tar")) or name == "log.csv.tmp":
            os.remove(os.path.join(outdir, name))
    csv_path = os.path.join(outdir, "log.csv")
    if start_epoch and not history:
        history = _rows_of_old_log(csv_path, start_epoch)
    _write_log_csv(csv_path, history)
    setup_logging(os.path.join(outdir, "train.log"))
    with open(os.path.join(outdir, "args.json"), "w") as f:
        json.dump({"argv": sys.argv, **vars(args), "model_config": config.to_dict(),
                   "world_size": distributed.world_size()}, f, indent=1)
    world = distributed.world_size()
    log.info("%s %s on %s: %d/%d train/test images, %s%s, start epoch %d",
             "resuming" if start_epoch else "training", config.arch, dataset.name,
             train_loader.dataset_size, test_loader.dataset_size, next(model.parameters()).device,
             f" x {world} processes ({args.batch // world} images each per step)"
             if world > 1 else "", start_epoch)
    # Events at steps >= start_epoch are dropped, then the last finished epoch's point is
    # written again from the history (a kill may have come before or after it was written).
    writer = SummaryWriter(os.path.join(outdir, "tb"), purge_step=start_epoch or None)
    if start_epoch and history:
        _log_tb(writer, history[-1])
        _log_epoch(history[-1], args.epochs, "  (from the checkpoint)")
    try:
        return _train_loop(args, model, output, config, dataset, optimizer, schedule, mixup,
                           train_loader, test_loader, start_epoch, best_acc, outdir,
                           train_model, writer, history)
    finally:
        writer.close()


def _train_loop(args, model, output, config, dataset, optimizer, schedule, mixup, train_loader,
                test_loader, start_epoch, best_acc, outdir, train_model, writer, history) -> int:
    main_proc = distributed.is_main()
    csv_path = os.path.join(outdir, "log.csv")
    ckpt_file = os.path.join(outdir, "checkpoint.pth.tar")
    best_file = os.path.join(outdir, "model_best.pth.tar")
    stored_args = {k: v for k, v in vars(args).items() if k in TRAINING_FLAGS or k == "dataset"}
    lambda_coeff = args.lambda_coeff if args.clustering else 0.0
    finished = start_epoch  # epochs whose checkpoint is on disk
    try:
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            # Everything random in an epoch derives from (seed, epoch): exact resume.
            torch.manual_seed(args.seed * 1_000_003 + epoch)
            train_loader.set_epoch(epoch)
            try:
                tr = train_one_epoch(train_model, output, train_loader, optimizer, schedule,
                                     epoch, lambda_coeff=lambda_coeff, mixup=mixup,
                                     seed=args.seed, progress=args.progress and main_proc,
                                     amp=args.amp)
            except Exception as e:
                if args.compile and _is_compile_error(e):
                    raise UserError(f"--compile failed on this machine ({type(e).__name__}: "
                                    f"{_first_line(e)}); train without --compile") from None
                raise
            te = evaluate(model, output, test_loader)
            is_best = te["top1"] > best_acc
            best_acc = max(best_acc, te["top1"])
            row = {"epoch": epoch + 1, "lr": tr["lr"], "train_loss": round(tr["loss"], 6),
                   "train_acc": round(tr["top1"], 4), "test_loss": round(te["loss"], 6),
                   "test_acc": round(te["top1"], 4), "test_top5": round(te["top5"], 4),
                   "best_acc": round(best_acc, 4), "seconds": round(time.time() - t0, 2)}
            history.append(row)
            if not main_proc:
                finished = epoch + 1
                continue
            state = make_checkpoint(model, config, output, dataset.name, dataset.mean,
                                    dataset.std, epoch=epoch + 1, best_acc=best_acc,
                                    test_acc=te["top1"], optimizer=optimizer.state_dict(),
                                    args=stored_args, history=history)
            # model_best first: a kill between the two writes leaves checkpoint.pth.tar one
            # epoch behind, and the resumed run redoes that epoch and writes both again.
            if is_best:
                save_checkpoint(state, best_file)
            save_checkpoint(state, ckpt_file)
            finished = epoch + 1
            with open(csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
            _log_tb(writer, row)
            writer.flush()
            _log_epoch(row, args.epochs)
    except KeyboardInterrupt:
        if main_proc:
            launcher = "torchrun ... main.py" if distributed.is_distributed() else "python main.py"
            log.info("interrupted; %s holds %d finished epoch(s) of %d: continue with  %s "
                     "--resume %s", ckpt_file, finished, args.epochs, launcher, ckpt_file)
        return 130
    except FloatingPointError as e:
        raise UserError(str(e)) from None
    distributed.barrier()  # rank 0 has written the last checkpoint before anyone leaves
    if main_proc:
        log.info("done: best test accuracy %.2f%% (%s)", best_acc, best_file)
    return 0


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
