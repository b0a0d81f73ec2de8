r"""Stealthy targeted bit-flip attack (T-BFA) campaigns on a trained checkpoint (docs/algorithms.md section 7).

By default the OCM paper's protocol: CIFAR-10 every class is a source twice (t = s-1, s+1),
5 repetitions = 100 experiments, |D_src| = |D_aux| = 500; CIFAR-100 and ImageNet classes 0..49,
500 experiments, 50 / 25 samples. Each finished experiment is appended to
<results>/results.jsonl at once; running the same command again continues where it stopped.

Examples:
  python attack_tbfa.py --checkpoint runs/r20_ocm16/model_best.pth.tar --data_dir data
  python attack_tbfa.py --outdir resnet20_quan8_OCM16/ --dataset CIFAR10 --arch resnet20_quan \
      --bits 8 --ocm --code_length 16 --output_act tanh        # a published checkpoint
  python attack_tbfa.py --checkpoint ckpt.pth.tar --pairs 3:5,1:2 --avgs 2 --curve-every 5
  python attack_tbfa.py --checkpoint ckpt.pth.tar --one-flip-per-page   # a fault model
  torchrun --nproc_per_node=4 attack_tbfa.py --checkpoint ckpt.pth.tar --device cuda
      # the campaign's experiments shared among 4 GPUs; resume with any number of processes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from attacks.common import EvalSet
from attacks.tbfa import (PROTOCOLS, TBFA, TBFAConfig, default_set_size, plan_experiments,
                          plan_pinned, protocol_pairs)
from campaigns.runner import CampaignRunner, open_campaign
from utils.distributed import is_main
from cli.args import (ArgumentParser, add_attack_model_args, add_fault_args, add_format_args,
                      add_runtime_args, check_number, check_paths, check_runtime_args,
                      explicit_dests, fault_model_from_args, in_process_group,
                      load_attack_target, model_path, run)
from utils.errors import UserError
from utils.textfiles import read_text
from campaigns.results import default_results_dir

log = logging.getLogger("attack_tbfa")

# Most repetitions per pair (--avgs): the protocol's 5, with room; beyond it a typo.
MAX_AVGS = 10000

# Settings that define a campaign: a results folder holds one campaign.
CAMPAIGN_KEYS = ("source", "dataset", "config", "n_src", "n_aux", "seed", "full_gradient",
                 "oscillation_by_layer", "stop_on_src_only", "iters", "sets_file",
                 "number_format", "fault", "defenses", "normalization")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_attack_model_args(p)
    add_format_args(p)
    add_fault_args(p)
    a = p.add_argument_group("T-BFA protocol (defaults: the paper's)")
    a.add_argument("--iters", type=int, default=5000, help="max bit flips per experiment (5000)")
    a.add_argument("--source_start", type=int, default=0, help="first source class (0)")
    a.add_argument("--source_end", type=int, default=None,
                   help="one past the last source class (10 on CIFAR-10, 50 on CIFAR-100 and "
                        "ImageNet, all classes elsewhere)")
    a.add_argument("--avgs", type=int, default=5, help="repetitions per pair (5)")
    a.add_argument("--pairs", default=None,
                   help="explicit source:target pairs instead of the protocol's, e.g. 3:5,1:2")
    a.add_argument("--n-src", "--n_src", dest="n_src", type=int, default=None,
                   help="|D_src| = |D_rest| (500 CIFAR-10, 50 CIFAR-100, 25 ImageNet; half "
                        "the smallest class elsewhere)")
    a.add_argument("--n-aux", "--n_aux", dest="n_aux", type=int, default=None,
                   help="|D_aux| (same defaults as --n-src)")
    a.add_argument("--sets", default=None, metavar="JSON",
                   help="pinned sets: {\"experiments\": [{\"source\", \"target\", \"rep\", "
                        "\"src\", \"rest\", \"aux\"}, ...]} with test-set indices")
    a.add_argument("--save-sets", default=None, metavar="JSON",
                   help="write the drawn sets in the --sets format (to repeat them exactly)")
    a.add_argument("--full-gradient", action="store_true",
                   help="gradient of the whole objective (paper); default: D_src term only, "
                        "as both public implementations")
    a.add_argument("--stop-on-src-only", action="store_true",
                   help="success only when every D_src sample is classified as the target "
                        "(paper); default: D_src or D_rest, as the public code")
    a.add_argument("--oscillation-by-layer", action="store_true",
                   help="oscillation stop also compares the layer (default: only the index "
                        "within the layer, as the public code)")
    a.add_argument("--plain-search", action="store_true",
                   help="score every trial flip with a full forward pass (same flips, slower; "
                        "default: re-run the network from the flipped layer on)")
    a.add_argument("--flip-log", action="store_true",
                   help="accepted for compatibility: every record lists its flips (layer, index, "
                        "bit, values, loss), from which rebuild_attacked.py rebuilds the model")
    a.add_argument("--curve-every", type=int, default=0, metavar="K",
                   help="store ASR and PA-ACC every K flips (supplement Figures 1 and 2)")
    a.add_argument("--results", default=None,
                   help="results folder (default: <checkpoint folder>/attack_tbfa); the same "
                        "command again continues the campaign in it")
    a.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --results (a campaign with other "
                        "settings, or files of another tool) instead of refusing the folder")
    a.add_argument("--test_batch", "-b", "--batch", dest="test_batch", type=int, default=500,
                   help="evaluation batch size (500)")
    add_runtime_args(p)
    p.set_defaults(seed=1)  # the public attack script's default
    return p


def parse_pairs(text: str, num_classes: int) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        try:
            s, t = (int(v) for v in item.split(":"))
        except ValueError:
            raise UserError(f"--pairs takes source:target pairs like 3:5,1:2; got {item!r}") from None
        if (s, t) in pairs:
            raise UserError(f"--pairs names {s}:{t} twice: give each pair once (--avgs sets "
                            f"the repetitions)")
        pairs.append((s, t))
    return pairs


def check_pairs(pairs, num_classes: int) -> None:
    for s, t in pairs:
        for c in (s, t):
            if not 0 <= c < num_classes:
                raise UserError(f"class index {c} is out of range: the model has {num_classes} "
                                f"classes (0..{num_classes - 1})")
        if s == t:
            raise UserError(f"source and target are both {s}: a targeted attack needs two "
                            f"different classes")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for flag, value, minimum in (("--iters", args.iters, 1), ("--avgs", args.avgs, 1),
                                 ("--test_batch", args.test_batch, 1),
                                 ("--curve-every", args.curve_every, 0),
                                 ("--n-src", args.n_src, 1), ("--n-aux", args.n_aux, 1),
                                 ("--source_start", args.source_start, 0),
                                 ("--source_end", args.source_end, 1),
                                 ("--calibration_images", args.calibration_images, 1)):
        check_number(value, flag, minimum=minimum)
    check_number(args.avgs, "--avgs", maximum=MAX_AVGS)
    check_runtime_args(args)
    check_pinned_flags(args, explicit_dests(parser, argv))
    args.fault = fault_model_from_args(args)
    if args.results is None:  # an empty --results is refused, never the default
        args.results = default_results_dir(model_path(args), args.pretrained, "attack_tbfa")
    check_paths(*script_paths(args))
    return in_process_group(args, _main)


def check_pinned_flags(args, given: set[str]) -> None:
    """``--sets`` pins the experiments: the flags that would choose them mean nothing with it."""
    if not args.sets:
        return
    unused = [flag for dest, flag in (("pairs", "--pairs"), ("avgs", "--avgs"),
                                      ("n_src", "--n-src"), ("n_aux", "--n-aux"),
                                      ("source_start", "--source_start"),
                                      ("source_end", "--source_end")) if dest in given]
    if unused:
        raise UserError(f"--sets pins the experiments (pairs, repetitions and sets), so "
                        f"{', '.join(unused)} would be ignored: drop {' and '.join(unused)}, or "
                        f"drop --sets")


def script_paths(args) -> tuple[list, list]:
    """``(inputs, outputs)`` of this command, as :func:`cli.args.check_paths` takes them."""
    inputs = [("--checkpoint", model_path(args), "file"),
              ("--fault-profile", args.fault_profile, "file"), ("--sets", args.sets, "file")]
    outputs = [("--results", args.results, "folder"), ("--save-sets", args.save_sets, "file")]
    return inputs, outputs


def _main(args, device) -> int:
    torch.manual_seed(args.seed)
    target = load_attack_target(args, device)
    images, labels = target.load_test_split()
    experiments, n_src, n_aux = plan_from_args(args, labels, target)
    # Everything is valid: from here on, files are written.
    results = open_campaign(args.results, campaign_settings(args, target, n_src, n_aux),
                            CAMPAIGN_KEYS, args.overwrite)
    if args.save_sets and is_main():
        with open(args.save_sets, "w", encoding="utf-8") as f:
            json.dump({"experiments": [{"source": e.source, "target": e.target, "rep": e.rep,
                                        **e.sets.to_dict()} for e in experiments]}, f)
    data = EvalSet(images, labels, target.mean, target.std, device, batch_size=args.test_batch)
    del images
    config = TBFAConfig(max_iters=args.iters, full_gradient=args.full_gradient,
                        incremental=not args.plain_search,
                        oscillation_by_layer=args.oscillation_by_layer,
                        stop_on_rest=not args.stop_on_src_only, curve_every=args.curve_every, fault=args.fault)
    attack = TBFA(target.model, target.output, config, target.eval_model, data,
                  target.number_format)
    runner = CampaignRunner(results, attack, experiments, args.progress)
    runner.announce(f"T-BFA on {target.describe()}: clean test accuracy "
                    f"{attack.clean_accuracy():.2f}%")
    return runner.run()


def plan_from_args(args, labels: torch.Tensor, target) -> tuple[list, int | None, int | None]:
    """The experiments (pinned sets of ``--sets``, or ``--pairs``/the protocol's pairs times
    ``--avgs`` with seeded sets) and the set sizes (None when pinned)."""
    num_classes = target.config.num_classes
    if args.sets:
        try:
            text = read_text(args.sets, "the pinned-sets file")
        except ValueError as e:
            raise UserError(str(e)) from None
        try:
            entries = json.loads(text)["experiments"]
            experiments = plan_pinned(labels, entries, num_classes)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{args.sets} is not a pinned-sets file ({type(e).__name__}: {e}); "
                            f"expected {{\"experiments\": [{{\"source\", \"target\", \"src\", "
                            f"\"rest\", \"aux\"}}]}}") from None
        except ValueError as e:
            raise UserError(f"{args.sets}: {e}") from None
        check_pairs([(e.source, e.target) for e in experiments], num_classes)
        return experiments, None, None
    name = target.dataset.name
    if args.pairs:
        pairs = parse_pairs(args.pairs, num_classes)
    else:
        protocol = PROTOCOLS.get(name, {"classes": num_classes})
        if args.source_end is not None and args.source_end > protocol["classes"]:
            raise UserError(f"--source_end {args.source_end} lies beyond the protocol's "
                            f"{protocol['classes']} source classes of {name}: give at most "
                            f"{protocol['classes']} (or --pairs)")
        pairs = protocol_pairs(protocol["classes"], args.source_start, args.source_end)
        if not pairs:
            raise UserError(f"no source classes in [{args.source_start}, {args.source_end})")
    check_pairs(pairs, num_classes)
    default_n = default_set_size(name, labels, num_classes)
    n_src, n_aux = args.n_src or default_n, args.n_aux or default_n
    try:
        return plan_experiments(labels, pairs, args.avgs, n_src, n_aux, args.seed), n_src, n_aux
    except ValueError as e:
        raise UserError(str(e)) from None


def campaign_settings(args, target, n_src, n_aux) -> dict:
    """What defines the campaign (``campaign.json``; a results folder holds one)."""
    return {"attack": "tbfa", "source": target.source, "dataset": target.dataset.name,
            "config": target.config.to_dict(), "n_src": n_src, "n_aux": n_aux,
            "seed": args.seed, "full_gradient": args.full_gradient,
            "oscillation_by_layer": args.oscillation_by_layer,
            "stop_on_src_only": args.stop_on_src_only, "iters": args.iters,
            "sets_file": os.path.abspath(args.sets) if args.sets else None,
            # None for the defaults, so that campaigns written before these settings resume
            "number_format": target.number_format or None,
            "fault": args.fault.to_dict() if args.fault else None,
            "defenses": target.deployment_record(),
            "normalization": target.normalization_record()}


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
