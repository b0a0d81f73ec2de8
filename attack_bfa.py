r"""Untargeted bit-flip attack (BFA) on a quantized model, or the random-flip baseline (docs/algorithms.md section 6).

The attack batch is --attack_sample_size training images labelled with the model's own
predictions. Each iteration flips the bit(s) the progressive bit search finds (or one random
bit with --random_bfa) and evaluates the whole test split; the attack stops when the test
accuracy falls to --break_acc or after --n_iter iterations. Each flipped bit is appended to
<results>/profile.csv as soon as its iteration ends; <results>/summary.json and TensorBoard
scalars in <results>/tb complete the record (a folder holding an earlier run is refused
unless --overwrite is given).

Examples:
  python attack_bfa.py --checkpoint runs/r20/model_best.pth.tar --data_dir data
  python attack_bfa.py --checkpoint runs/r20/model_best.pth.tar --data_dir data --random_bfa
  python attack_bfa.py --outdir resnet20_quan8_OCM16/ --data_dir data --dataset cifar10 \
      --arch resnet20_quan --bits 8 --ocm --code_length 16 --output_act tanh   # published
  python attack_bfa.py --pretrained --arch resnet18_quan --dataset imagenet \
      --data_dir /data/imagenet --k_top 10
  python attack_bfa.py --pretrained --arch resnet18_quan --dataset imagenet \
      --data_dir /data/imagenet --format fp32          # the float weights, not quantized
  python attack_bfa.py --checkpoint runs/float/model_best.pth.tar --format torch-int8 \
      --device cpu --one-flip-per-page --fault-direction 0to1   # PyTorch int8, a fault model
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
from tqdm.contrib.logging import logging_redirect_tqdm

from attacks.bfa import BFA, PROFILE_FIELDS, RandomFlips
from attacks.common import EvalSet
from cli.args import (add_attack_model_args, add_fault_args, add_format_args, add_runtime_args,
                       check_number, check_output_dir, check_runtime_args, explicit_dests,
                       fault_model_from_args, load_attack_target, run, runtime_device,
                       setup_logging)
from utils.data import load_split_tensors
from utils.errors import UserError

log = logging.getLogger("attack_bfa")

# --break_acc defaults of the BFA papers: just above chance on CIFAR-10, 0.2 % on ImageNet;
# other data sets get chance level + 1 point.
BREAK_ACC = {"cifar10": 11.0, "imagenet": 0.2}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_attack_model_args(p)
    add_format_args(p)
    add_fault_args(p)
    a = p.add_argument_group("attack (flags of the BFA repository)")
    a.add_argument("--attack_sample_size", type=int, default=128,
                   help="training images in the attack batch, a seeded random draw "
                        "(default: 128)")
    a.add_argument("--n_iter", type=int, default=None,
                   help="most attack iterations (default: 100 on 32x32 data sets, 20 on "
                        "ImageNet)")
    a.add_argument("--k_top", type=int, default=None,
                   help="only the k weights per layer with the largest gradient are "
                        "candidates (default: all weights)")
    a.add_argument("--plain-search", action="store_true",
                   help="score every trial flip with a full forward pass (same flips, slower; "
                        "default: re-run the network from the flipped layer on)")
    a.add_argument("--max_bits_per_layer", type=int, default=32,
                   help="most bits per layer the multi-bit retry flips together when no single "
                        "flip raises the loss (default: 32; 0: no bound, as the public code)")
    a.add_argument("--random_bfa", action="store_true",
                   help="random-flip baseline: a uniformly chosen layer, weight and bit per "
                        "iteration")
    a.add_argument("--break_acc", type=float, default=None,
                   help="stop when the test accuracy (%%) falls to this (default: 11 on "
                        "CIFAR-10, 0.2 on ImageNet, else 100/classes + 1)")
    a.add_argument("--results", default=None, metavar="DIR",
                   help="results folder (default: <checkpoint folder>/attack_bfa, or "
                        "attack_bfa_random with --random_bfa; runs/attack_bfa[_random] with "
                        "--pretrained)")
    a.add_argument("--test_batch", type=int, default=None,
                   help="evaluation batch size (default: 256; 128 on ImageNet)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --results (without it such a folder is "
                        "refused)")
    pub = p.add_argument_group("public-code behaviours (attacks/bfa.py lists the differences)")
    pub.add_argument("--public_binary_mask", action="store_true",
                     help="binarized layers: choose their candidate bits with the public code's "
                          "inverted 1-bit gradient mask (flips that lower the loss to first "
                          "order)")
    pub.add_argument("--public_random_stream", action="store_true",
                     help="--random_bfa: draw with Python's random seeded by --seed, as the "
                          "public code (same seed, same bits)")
    pub.add_argument("--augment_attack_batch", action="store_true",
                     help="apply the public training augmentation to the attack batch (horizontal "
                          "flip, then a random crop with 4-pixel zero padding; 32x32 data sets)")
    # The BFA repository's spellings of the same settings (BFA_*.sh pass these).
    s = p.add_argument_group("BFA repository spellings")
    s.add_argument("--resume", dest="checkpoint", default=argparse.SUPPRESS, metavar="CKPT",
                   help="same as --checkpoint")
    s.add_argument("--save_path", dest="results", default=argparse.SUPPRESS, metavar="DIR",
                   help="same as --results")
    s.add_argument("--test_batch_size", dest="test_batch", type=int,
                   default=argparse.SUPPRESS, help="same as --test_batch")
    s.add_argument("--data_path", dest="data_dir", default=argparse.SUPPRESS,
                   help="same as --data_dir")
    s.add_argument("--manualSeed", dest="seed", type=int, default=argparse.SUPPRESS,
                   help="same as --seed")
    s.add_argument("--enable_bfa", action="store_true", help="accepted and ignored: this "
                                                             "script always attacks")
    add_runtime_args(p)
    return p


# What a run writes into its results folder (--overwrite replaces an earlier run's).
RESULT_FILES = ("profile.csv", "summary.json", "attack.log")


def check_numbers(args) -> None:
    """Reject impossible numeric flags and paths before anything is loaded or written."""
    for flag in ("n_iter", "attack_sample_size", "k_top", "test_batch", "calibration_images"):
        check_number(getattr(args, flag), f"--{flag}", minimum=1)
    if args.max_bits_per_layer < 0:
        raise UserError(f"--max_bits_per_layer must be at least 1 (or 0: no bound), got "
                        f"{args.max_bits_per_layer}")
    check_number(args.break_acc, "--break_acc", maximum=100)  # negative: never stop early
    check_runtime_args(args)
    if args.results:
        check_output_dir(args.results, "--results")


def check_results_folder(results: str, overwrite: bool) -> None:
    """A finished run's results (a ``summary.json`` of a run that was not interrupted) are
    never replaced without ``--overwrite``; an interrupted or killed run's are."""
    summary = os.path.join(results, "summary.json")
    if overwrite or not os.path.exists(summary):
        return
    try:
        with open(summary) as f:
            stopped_by = json.load(f).get("stopped_by")
    except (OSError, ValueError, AttributeError):
        stopped_by = None
    if stopped_by != "interrupted":
        raise UserError(f"--results {results} already holds an attack run (summary.json, "
                        f"stopped by {stopped_by or 'unknown'}): choose another --results "
                        f"folder, or add --overwrite to replace it")


def apply_defaults(args, dataset) -> None:
    """Fill the attack flags left unset with the BFA papers' settings for ``dataset``."""
    imagenet = dataset.name == "imagenet"
    if args.n_iter is None:
        args.n_iter = 20 if imagenet else 100
    if args.break_acc is None:
        args.break_acc = BREAK_ACC.get(dataset.name, 100.0 / dataset.num_classes + 1.0)
    if args.test_batch is None:
        args.test_batch = 128 if imagenet else 256


def augment_like_public_training(images: torch.Tensor, generator: torch.Generator,
                                 padding: int = 4) -> torch.Tensor:
    """The public training transform on uint8 images ``[N, 3, H, W]``: ``RandomHorizontalFlip``
    then ``RandomCrop(H, padding=4)`` (zero padding), one draw per image from ``generator``.

    The public BFA takes its attack batch from its training loader, so its attack images carry
    this augmentation (``--augment_attack_batch``)."""
    n, _, h, w = images.shape
    out = images.clone()
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    padded = torch.nn.functional.pad(out, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    for i in range(n):
        out[i] = padded[i, :, top[i]:top[i] + h, left[i]:left[i] + w]
    return out


def default_results_dir(args, source: str) -> str:
    name = "attack_bfa_random" if args.random_bfa else "attack_bfa"
    if args.pretrained:
        return os.path.join("runs", name)
    return os.path.join(os.path.dirname(source), name)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv)

    # 1. Everything that can be wrong, checked before the results folder exists.
    check_numbers(args)
    fault = fault_model_from_args(args)
    device = runtime_device(args)
    torch.manual_seed(args.seed)
    target = load_attack_target(args, explicit, device)
    dataset = target.dataset
    apply_defaults(args, dataset)
    attack_x, test_x, test_y = load_images(args, dataset)
    results = args.results or default_results_dir(args, target.source)
    args.results = results
    check_output_dir(results, "--results")
    check_results_folder(results, args.overwrite)
    eval_set = EvalSet(test_x, test_y, target.mean, target.std, device,
                       batch_size=args.test_batch)
    attack = build_attack(args, target, fault)

    # 2. The attack, recorded as it goes (replacing an interrupted run, or with --overwrite).
    clear_results_folder(results)
    os.makedirs(results, exist_ok=True)
    setup_logging(os.path.join(results, "attack.log"))
    log.info("%s on %s, %s: %d attack images from the training split, %d test images, %s, "
             "fault model: %s", "random bit-flips" if args.random_bfa else "BFA",
             target.describe(), dataset.name, len(attack_x), len(test_y), device,
             fault.label() if fault else "none")
    return attack_and_record(args, argv, attack, attack_x, eval_set, target, results)


def load_images(args, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attack batch (``--attack_sample_size`` seeded training images, augmented with
    ``--augment_attack_batch``) and the test split, as uint8 images (and test labels)."""
    attack_x, _ = load_split_tensors(dataset.name, args.data_dir, split="train",
                                     download=args.download, workers=args.workers,
                                     max_images=args.attack_sample_size, seed=args.seed)
    test_x, test_y = load_split_tensors(dataset.name, args.data_dir, split="test",
                                        download=args.download, workers=args.workers)
    if len(attack_x) == 0 or len(test_y) == 0:
        raise UserError(f"{dataset.name} in {args.data_dir} has no "
                        f"{'training' if len(attack_x) == 0 else 'test'} images to attack with")
    if args.augment_attack_batch:
        if dataset.name == "imagenet":
            raise UserError("--augment_attack_batch needs a 32x32 data set: the public ImageNet "
                            "augmentation (RandomResizedCrop) needs the original images")
        attack_x = augment_like_public_training(
            attack_x, torch.Generator().manual_seed(args.seed))
    return attack_x, test_x, test_y


def build_attack(args, target, fault=None):
    """:class:`BFA` with the search flags, or :class:`RandomFlips` (``--random_bfa``), under
    the fault model ``fault`` (None: every flip)."""
    try:
        if args.random_bfa:
            return RandomFlips(target.model, target.output, seed=args.seed,
                               python_random=args.public_random_stream, fault=fault,
                               eval_model=target.eval_model)
        return BFA(target.model, target.output, k_top=args.k_top,
                   incremental=not args.plain_search,
                   max_bits_per_layer=args.max_bits_per_layer or None,
                   public_binary_mask=args.public_binary_mask, fault=fault,
                   eval_model=target.eval_model)
    except ValueError as e:
        raise UserError(str(e)) from None


def clear_results_folder(results: str) -> None:
    """``--overwrite``: remove what an earlier run wrote there (nothing else)."""
    for name in RESULT_FILES:
        if os.path.exists(os.path.join(results, name)):
            os.remove(os.path.join(results, name))
    if os.path.isdir(os.path.join(results, "tb")):
        shutil.rmtree(os.path.join(results, "tb"))


class ProfileRecorder:
    """Writes the attack profile as it grows: a ``profile.csv`` row and TensorBoard points per
    flipped bit (flushed at once, so an interrupted run keeps every flip), a log line each."""

    def __init__(self, results: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(results, "tb"), purge_step=0)  # replaces old
        self.file = open(os.path.join(results, "profile.csv"), "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=PROFILE_FIELDS)
        self.csv.writeheader()
        self.file.flush()

    def _points(self, step: int, accuracy: float, loss: float, hamming: int) -> None:
        for name, value in (("test_acc", accuracy), ("loss", loss), ("hamming", hamming)):
            self.writer.add_scalar(f"attack/{name}", value, step)
        self.writer.flush()

    def on_start(self, result) -> None:
        self._points(0, result.clean_accuracy, result.clean_loss, 0)
        log.info("clean: test accuracy %.2f%%, attack loss %.4f", result.clean_accuracy,
                 result.clean_loss)

    def on_flip(self, row) -> None:
        d = row.as_dict()
        for key in ("accuracy", "accuracy_drop"):
            d[key] = round(d[key], 4)
        d["loss"] = round(d["loss"], 6)
        self.csv.writerow(d)
        self.file.flush()
        self._points(row.flip, row.accuracy, row.loss, row.hamming)
        log.info("iter %d flip %d: %s[%d] bit %d: %s -> %s | loss %.4f | test acc %.2f%% "
                 "(drop %.2f) | hamming %d", row.iteration, row.flip, row.layer, row.index,
                 row.bit, _value(row.before), _value(row.after), row.loss, row.accuracy,
                 row.accuracy_drop, row.hamming)

    def close(self) -> None:
        self.file.close()
        self.writer.close()


def _value(v) -> str:
    """A stored value for the log: an integer code as is, a float in 6 significant digits."""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def attack_and_record(args, argv, attack, attack_x, eval_set, target, results) -> int:
    """Run the attack, recording every flip (:class:`ProfileRecorder`), then ``summary.json``
    (also after Ctrl-C: ``stopped_by`` says ``interrupted``, exit status 130)."""
    t0 = time.time()
    recorder = ProfileRecorder(results)
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            result = attack.run(attack_x, eval_set, args.n_iter, break_acc=args.break_acc,
                                on_flip=recorder.on_flip, on_start=recorder.on_start,
                                progress=args.progress)
        status = 0
    except KeyboardInterrupt:
        result = attack.result
        if result is not None:
            result.stopped_by = "interrupted"
        status = 130
    finally:
        recorder.close()
    if result is not None and target.number_format:
        result.number_format = target.number_format  # e.g. torch-int8, not just int8
    summary = {
        "attack": "random" if args.random_bfa else "bfa",
        "source": target.source,
        "dataset": target.dataset.name,
        "model_config": target.config.to_dict(),
        **(result.to_dict(exclude=("profile",)) if result is not None
           else {"stopped_by": "interrupted"}),
        "n_iter": args.n_iter, "break_acc": args.break_acc, "k_top": args.k_top,
        "seconds": round(time.time() - t0, 2),
        "argv": list(argv), "flags": vars(args),
    }
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if result is not None:
        print_summary(args, result, results)
    if status:
        log.info("interrupted: %s holds the flips made so far", results)
    return status


def print_summary(args, result, results) -> None:
    reasons = {"break_acc": f"test accuracy <= --break_acc {args.break_acc:g}%",
               "n_iter": f"--n_iter {args.n_iter} reached", "interrupted": "interrupted",
               "budget": f"--flip-budget {args.flip_budget} spent",
               "no_admissible": "no admissible flip left"}
    lines = [
        f"{'random bit-flips' if args.random_bfa else 'BFA'} summary",
        f"  clean accuracy   {result.clean_accuracy:.2f}%  ({result.test_images} test images)",
        f"  final accuracy   {result.final_accuracy:.2f}%  (drop {result.accuracy_drop:.2f} "
        f"points)",
        f"  iterations       {result.iterations}  (stopped: "
        f"{reasons.get(result.stopped_by, result.stopped_by)})",
        f"  bit-flips        {result.bit_flips}  (Hamming distance {result.hamming_distance})",
        f"  attack loss      {result.clean_loss:.4f} -> {result.final_loss:.4f}  "
        f"({result.attack_images} attack images)",
        f"  weights          {result.number_format}",
        f"  fault model      {_fault_label(result.fault_model)}"
        + (f"  ({result.fault_violations} inadmissible flips on the final weights)"
           if result.fault_model else ""),
        f"  results          {results}: profile.csv, summary.json, tb/",
    ]
    for line in lines:
        log.info("%s", line)


def _fault_label(fault: dict | None) -> str:
    from utils.faults import FaultModel

    return FaultModel.from_dict(fault).label() if fault else "none (every flip allowed)"


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
