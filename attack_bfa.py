r"""Untargeted bit-flip attack (BFA) on a quantized model, or the random-flip baseline (docs/algorithms.md section 6).

A campaign of --avgs runs (default 1), run r seeded --seed + r: its attack batch is
--attack_sample_size training images drawn with that seed, labelled with the model's own
predictions. Each iteration flips the bit(s) the progressive bit search finds (or one random
bit with --random_bfa) and evaluates the whole test split; a run stops when the test accuracy
falls to --break_acc or after --n_iter iterations. Every flipped bit is logged as it happens
(<results>/attack.log); each finished run is appended to <results>/results.jsonl with its whole
profile (every flipped bit, the accuracy after it), and the same command again continues the
campaign (torchrun shares the runs among processes, as for T-BFA). At the end: the summary
table, <results>/summary.csv and TensorBoard scalars in <results>/tb.

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
import logging
import os
import sys

import torch

from attacks.bfa import BFA, AttackBatch, RandomFlips, Repetition, Stopping, plan_repetitions
from attacks.common import EvalSet
from campaigns.runner import CampaignRunner, open_campaign
from cli.args import (ArgumentParser, add_attack_model_args, add_fault_args, add_format_args,
                      add_runtime_args, check_number, check_paths, check_runtime_args,
                      explicit_dests, fault_model_from_args, in_process_group,
                      load_attack_target, model_path, run)
from utils.data import (file_digest, load_split_tensors, read_attack_batch, read_index_list,
                        write_attack_batch)
from utils.distributed import is_main
from utils.errors import DataError, UserError

log = logging.getLogger("attack_bfa")

# --break_acc defaults of the BFA papers: just above chance on CIFAR-10, 0.2 % on ImageNet;
# other data sets get chance level + 1 point.
BREAK_ACC = {"cifar10": 11.0, "imagenet": 0.2}


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_attack_model_args(p)
    add_format_args(p)
    add_fault_args(p)
    a = p.add_argument_group("attack (flags of the BFA repository)")
    a.add_argument("--avgs", type=int, default=1,
                   help="runs, each with its own seed (--seed + r) and attack batch (default 1)")
    a.add_argument("--attack-batch", "--attack_batch", dest="attack_batch", default=None,
                   metavar="FILE",
                   help="the exact attack batch instead of a draw: a torch file {\"data\": images "
                        "(uint8 pixels, or float inputs already normalized) [N, C, H, W], "
                        "\"target\": labels [N]}, as every run saves its own "
                        "(<results>/attack_batch.r<rep>.pt) and the public run's "
                        "attack_batch_seed2.pt")
    a.add_argument("--attack-indices", "--attack_indices", dest="attack_indices", default=None,
                   metavar="FILE",
                   help="the attack batch as training-split positions: a JSON list of integers "
                        "(labelled with the model's own predictions)")
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
                   help="replace the results already in --results (a campaign with other "
                        "settings, or a run of an earlier version) instead of refusing the folder")
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


# What a BFA run of an earlier version (before campaigns) wrote into its results folder.
LEGACY_FILES = ("profile.csv", "summary.json")

# Most runs of a campaign (--avgs): the papers average 5; beyond this it is a typo.
MAX_AVGS = 10000

# Settings that define a campaign: a results folder holds one campaign.
CAMPAIGN_KEYS = ("attack", "source", "dataset", "config", "seed", "n_iter", "break_acc", "k_top",
                 "attack_sample_size", "max_bits_per_layer", "public_binary_mask",
                 "public_random_stream", "augment_attack_batch", "number_format", "fault",
                 "defenses", "pinned_batch", "normalization")


def check_numbers(args, given: set[str] = frozenset()) -> None:
    """Reject impossible numeric flags and combinations before anything is loaded or written
    (``given``: the flags on the command line)."""
    for flag in ("n_iter", "attack_sample_size", "k_top", "test_batch", "calibration_images",
                 "avgs"):
        check_number(getattr(args, flag), f"--{flag}", minimum=1)
    check_number(args.avgs, "--avgs", maximum=MAX_AVGS)
    if args.max_bits_per_layer < 0:
        raise UserError(f"--max_bits_per_layer must be at least 1 (or 0: no bound), got "
                        f"{args.max_bits_per_layer}")
    check_number(args.break_acc, "--break_acc", maximum=100)  # negative: never stop early
    check_runtime_args(args)
    if args.attack_batch and args.attack_indices:
        raise UserError("give either --attack-batch or --attack-indices, not both")
    if (args.attack_batch or args.attack_indices) and "attack_sample_size" in given:
        flag = "--attack-batch" if args.attack_batch else "--attack-indices"
        raise UserError(f"{flag} gives the attack batch, so --attack_sample_size would be "
                        f"ignored: drop one of them")
    if (args.attack_batch or args.attack_indices) and args.avgs > 1 and not args.random_bfa:
        raise UserError("a pinned attack batch makes every BFA run the same: drop --avgs (or "
                        "draw the batches: drop --attack-batch / --attack-indices)")


def check_legacy_folder(results: str, overwrite: bool) -> None:
    """A folder holding a BFA run of an earlier version (``summary.json``, no campaign) is never
    mixed with a campaign: refused, or with ``--overwrite`` its files are removed."""
    present = [n for n in LEGACY_FILES if os.path.exists(os.path.join(results, n))]
    if not present or os.path.exists(os.path.join(results, "campaign.json")):
        return
    if not overwrite:
        raise UserError(f"--results {results} already holds an attack run of an earlier version "
                        f"({', '.join(present)}): choose another --results folder, or add "
                        f"--overwrite to replace it")
    for name in present:
        os.remove(os.path.join(results, name))


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


def default_results_dir(args) -> str:
    """``<checkpoint folder>/attack_bfa`` (``attack_bfa_random``), ``runs/...`` for
    ``--pretrained``."""
    name = "attack_bfa_random" if args.random_bfa else "attack_bfa"
    if args.pretrained:
        return os.path.join("runs", name)
    return os.path.join(os.path.dirname(model_path(args)), name)


def script_paths(args) -> tuple[list, list]:
    """``(inputs, outputs)`` of this command, as :func:`cli.args.check_paths` takes them."""
    inputs = [("--checkpoint", model_path(args), "file"),
              ("--fault-profile", args.fault_profile, "file"),
              ("--attack-batch", args.attack_batch, "file"),
              ("--attack-indices", args.attack_indices, "file")]
    return inputs, [("--results", args.results, "folder")]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_numbers(args, explicit_dests(parser, argv))  # checked before the folder exists
    args.fault = fault_model_from_args(args)
    if args.results is None:  # an empty --results is refused, never the default
        args.results = default_results_dir(args)
    check_paths(*script_paths(args))
    return in_process_group(args, _main)


def _main(args, device) -> int:
    torch.manual_seed(args.seed)
    target = load_attack_target(args, device)
    apply_defaults(args, target.dataset)
    test_x, test_y = target.load_test_split()
    results_dir = args.results
    batches = AttackBatches(args, target, results_dir)  # the data and any pinned batch are read
    eval_set = EvalSet(test_x, test_y, target.mean, target.std, device,
                       batch_size=args.test_batch)
    attack = build_attack(args, target, eval_set, batches)
    items = plan_repetitions(args.avgs, args.seed)
    # Everything is valid: from here on, files are written.
    if is_main():
        check_legacy_folder(results_dir, args.overwrite)
    results = open_campaign(results_dir, campaign_settings(args, target, batches), CAMPAIGN_KEYS,
                            args.overwrite)
    attack.on_flip, attack.on_batch = log_flip, batches.save
    runner = CampaignRunner(results, attack, items, args.progress)
    runner.announce(f"{'random bit-flips' if args.random_bfa else 'BFA'} on "
                    f"{target.describe()}, {target.dataset.name}: {args.attack_sample_size} "
                    f"attack images per run, {len(test_y)} test images, {device}, fault model: "
                    f"{args.fault.label() if args.fault else 'none'}")
    return runner.run()


def campaign_settings(args, target, batches: "AttackBatches") -> dict:
    """What defines the campaign (``campaign.json``; a results folder holds one)."""
    return {"attack": "random" if args.random_bfa else "bfa", "source": target.source,
            "dataset": target.dataset.name, "config": target.config.to_dict(),
            "seed": args.seed, "n_iter": args.n_iter, "break_acc": args.break_acc,
            "k_top": args.k_top, "attack_sample_size": args.attack_sample_size,
            "max_bits_per_layer": args.max_bits_per_layer,
            "public_binary_mask": args.public_binary_mask,
            "public_random_stream": args.public_random_stream,
            "augment_attack_batch": args.augment_attack_batch,
            "number_format": target.number_format or None,
            "fault": args.fault.to_dict() if args.fault else None,
            "test_batch": args.test_batch, "avgs": args.avgs,
            "defenses": target.deployment_record(), "pinned_batch": batches.pinned_record(),
            "normalization": target.normalization_record()}


def log_flip(row) -> None:
    log.info("iter %d flip %d: %s[%d] bit %d: %s -> %s | loss %.4f | test acc %.2f%% "
             "(drop %.2f) | bits changed %d", row.iteration, row.flip, row.layer, row.index,
             row.bit, _value(row.before), _value(row.after), row.loss, row.accuracy,
             row.accuracy_drop, row.bits_changed)


class AttackBatches:
    """Each run's attack batch (:class:`attacks.bfa.AttackBatch`): ``--attack_sample_size``
    training images drawn with the run's seed (augmented with ``--augment_attack_batch``), or
    the pinned batch of ``--attack-batch`` / ``--attack-indices``; :meth:`save` writes the one a
    run used to ``<results>/attack_batch.r<rep>.pt``, so that any run can be repeated exactly.
    Everything is read (and checked) here, before anything is written."""

    def __init__(self, args, target, results_dir: str):
        self.args, self.dataset, self.results_dir = args, target.dataset, results_dir
        self.pinned: AttackBatch | None = None
        try:
            if args.attack_batch:
                images, labels, indices = read_attack_batch(args.attack_batch,
                                                            self.dataset.image_size)
                self._check_labels(labels, target.config.num_classes)
                self.pinned = AttackBatch(images, labels, {
                    "file": os.path.abspath(args.attack_batch),
                    "sha256": file_digest(args.attack_batch), "indices": indices})
            elif args.attack_indices:
                indices = read_index_list(args.attack_indices)
                self.pinned = AttackBatch(self._load(indices=indices), None, {
                    "indices_file": os.path.abspath(args.attack_indices), "indices": indices})
            else:
                self(Repetition(0, args.seed))  # the data can be read: fail here if not
        except (DataError, ValueError) as e:
            raise UserError(str(e)) from None

    def _check_labels(self, labels, num_classes: int) -> None:
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise UserError(f"--attack-batch {self.args.attack_batch}: labels outside the "
                            f"model's {num_classes} classes")

    def _load(self, **pick) -> torch.Tensor:
        a = self.args
        images, _ = load_split_tensors(self.dataset.name, a.data_dir, split="train",
                                       download=a.download, workers=a.workers, **pick)
        if len(images) == 0:
            raise UserError(f"{self.dataset.name} in {a.data_dir} has no training images to "
                            f"attack with")
        return images

    def __call__(self, item: Repetition) -> AttackBatch:
        if self.pinned is not None:
            return self.pinned
        a, seed = self.args, item.seed
        images = self._load(max_images=a.attack_sample_size, seed=seed)
        if a.augment_attack_batch:
            if self.dataset.name == "imagenet":
                raise UserError("--augment_attack_batch needs a 32x32 data set: the public "
                                "ImageNet augmentation (RandomResizedCrop) needs the original "
                                "images")
            images = augment_like_public_training(images, torch.Generator().manual_seed(seed))
        return AttackBatch(images, None, {"seed": seed, "augmented": a.augment_attack_batch})

    def pinned_record(self) -> dict | None:
        """The pinned batch as the campaign records it (None: drawn per run)."""
        if self.pinned is None:
            return None
        return {k: v for k, v in self.pinned.origin.items() if k != "indices"}

    def save(self, item: Repetition, batch: AttackBatch, labels: torch.Tensor) -> None:
        """The run's batch with the labels it is attacked with (``--attack-batch`` reads it)."""
        name = f"attack_batch.r{item.rep}.pt"
        write_attack_batch(os.path.join(self.results_dir, name), batch.images, labels,
                           batch.origin.get("indices"))
        batch.origin["saved"] = name


def build_attack(args, target, eval_set, batches: AttackBatches):
    """:class:`BFA` with the search flags, or :class:`RandomFlips` (``--random_bfa``), under
    ``args.fault`` (None: every flip), running its campaign items on ``eval_set``."""
    campaign = dict(data=eval_set, attack_batch=batches,
                    stopping=Stopping(args.n_iter, args.break_acc),
                    number_format=target.number_format)
    try:
        if args.random_bfa:
            return RandomFlips(target.model, target.output, seed=args.seed,
                               python_random=args.public_random_stream, fault=args.fault,
                               eval_model=target.eval_model, **campaign)
        return BFA(target.model, target.output, k_top=args.k_top,
                   incremental=not args.plain_search,
                   max_bits_per_layer=args.max_bits_per_layer or None,
                   public_binary_mask=args.public_binary_mask, fault=args.fault,
                   eval_model=target.eval_model, **campaign)
    except ValueError as e:
        raise UserError(str(e)) from None


def _value(v) -> str:
    """A stored value for the log: an integer code as is, a float in 6 significant digits."""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
