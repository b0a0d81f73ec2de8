r"""Stealthy TA-LBF campaigns on a trained checkpoint (Bai et al., ICLR 2021; docs/algorithms.md section 8).

Each attack flips bits of the final layer so that one test sample is classified as a target
class, searching the bit budget k (5, 10, ... 6 values) and the trade-off gamma (100, 50, ...
8 values) per sample; the OCM paper's protocol is 1000 attacks on CIFAR-10, each class the
target of 100 source images of other classes. The penultimate features of the whole test set
are computed once. Each finished attack is appended to <results>/results.jsonl at once;
running the same command again continues where it stopped. At the end: ASR, PA-ACC and the
number of flipped bits (mean and std over the successful attacks) as a table and as
<results>/summary.csv.

Examples:
  python attack_talbf.py --checkpoint runs/r20_ocm16/model_best.pth.tar --data_dir data
  python attack_talbf.py --outdir resnet20_quan8_OCM16/ --dataset CIFAR10 --arch resnet20_quan \
      --bits 8 --ocm --code_length 16 --output_act tanh --attack_info cifar_attack_info.txt
  python attack_talbf.py --checkpoint ckpt.pth.tar --fault-direction 0to1   # a fault model
  python attack_talbf.py --checkpoint runs/quickstart/ocm16/model_best.pth.tar --n-attacks 10 \
      --save-attacks attacks.jsonl     # the attacks with their D_aux, to repeat them exactly
  python attack_talbf.py --checkpoint runs/quickstart/ocm16/model_best.pth.tar \
      --attacks-file attacks.jsonl     # one JSON object per line: target, idx, aux_idx
  torchrun --nproc_per_node=4 attack_talbf.py --checkpoint ckpt.pth.tar --device cuda
      # the attacks shared among 4 GPUs; resume with any number of processes
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import torch

from attacks.common import EvalSet
from attacks.talbf import (NUMERICS, TALBF, TALBFConfig, attack_list_digest,
                           check_attack_info, format_attack_info, generate_attack_list,
                           items_from_pinned, read_attack_info, with_drawn_aux)
from attacks.talbf_file import check_attacks, read_attacks_file, write_attacks_file
from campaigns.runner import CampaignRunner, open_campaign
from utils.distributed import is_main
from cli.args import (ArgumentParser, add_attack_model_args, add_fault_args, add_runtime_args,
                      check_number, check_paths, check_runtime_args, fault_model_from_args,
                      in_process_group, load_attack_target, model_path, run)
from utils.errors import UserError
from utils.textfiles import read_text
from campaigns.results import default_results_dir

log = logging.getLogger("attack_talbf")

# Settings that define a campaign: a results folder holds one campaign.
CAMPAIGN_KEYS = ("source", "dataset", "config", "talbf", "seed", "fault", "defenses",
                 "normalization")
# TA-LBF options that change the speed only (not part of the campaign).
SPEED_ONLY = ("gamma_batch", "k_batch")


def _flag(group, names: list[str], dest: str, kind, default, text: str) -> None:
    group.add_argument(*names, dest=dest, type=kind, default=default,
                       help=f"{text} ({default:g})" if kind is not str else text)


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_attack_model_args(p)
    add_fault_args(p)
    d = TALBFConfig()
    a = p.add_argument_group("TA-LBF search and lp-box ADMM (defaults: docs/algorithms.md section 8)")
    _flag(a, ["--init-k", "--init_k"], "init_k", float, d.init_k, "first bit budget k")
    _flag(a, ["--init-lam", "--init_lam", "--init-gamma", "--init_gamma"], "init_gamma", float,
          d.init_gamma, "first trade-off gamma (lambda in the public code)")
    _flag(a, ["--max-search-k", "--max_search_k"], "max_search_k", int, d.max_search_k,
          "k values tried, doubling")
    _flag(a, ["--max-search-lam", "--max_search_lam"], "max_search_gamma", int,
          d.max_search_gamma, "gamma values tried per k, halving")
    _flag(a, ["--n_aux", "--n-aux"], "n_aux", int, d.n_aux,
          "|D_aux|: test samples drawn at random for each attack")
    for i in (1, 2, 3):
        _flag(a, [f"--initial-rho{i}", f"--initial_rho{i}"], f"rho{i}", float,
              getattr(d, f"rho{i}"), f"initial ADMM penalty rho{i}")
    for i in (1, 2, 3):
        _flag(a, [f"--max-rho{i}", f"--max_rho{i}"], f"max_rho{i}", float,
              getattr(d, f"max_rho{i}"), f"largest rho{i}")
    _flag(a, ["--rho-fact", "--rho_fact"], "rho_fact", float, d.rho_fact,
          "penalty growth per outer iteration")
    _flag(a, ["--inn-lr", "--inn_lr"], "inn_lr", float, d.inn_lr, "step size of the inner loop")
    _flag(a, ["--ext-max-iters", "--ext_max_iters"], "ext_max_iters", int, d.ext_max_iters,
          "outer ADMM iterations at most")
    _flag(a, ["--inn-max-iters", "--inn_max_iters"], "inn_max_iters", int, d.inn_max_iters,
          "gradient steps per outer iteration")
    _flag(a, ["--stop-threshold", "--stop_threshold"], "stop_threshold", float,
          d.stop_threshold, "ADMM stops when max(|b-y1|,|b-y2|)/|b| falls to this")
    _flag(a, ["--gamma-batch", "--gamma_batch"], "gamma_batch", int, d.gamma_batch,
          "gamma runs per batch (0 = all of one k; speed only)")
    _flag(a, ["--k-batch", "--k_batch"], "k_batch", int, d.k_batch,
          "k values per batch (0 = all; speed only, >1 pays off on a GPU)")
    a.add_argument("--numerics", choices=NUMERICS, default="public",
                   help="floating-point behaviour: 'public' (default) as the public code: "
                        "sphere projection and its dual in float64, a try whose target "
                        "probability underflows in log(softmax) ends in NaN, success and "
                        "PA-ACC decided by softmax + topk (OCM: 2 sigmoid(2z) - 1); "
                        "'stable': float32, a log-softmax that never underflows, the model's "
                        "own decoding")
    lst = p.add_argument_group("attack list")
    lst.add_argument("--attack_info", "--attack-info", default=None, metavar="FILE",
                     help="the public list format: one 'target_class test_index' per line "
                          "(default: generated from --seed)")
    lst.add_argument("--n-attacks", "--n_attacks", dest="n_attacks", type=int, default=None,
                     help="attacks to run (default 1000 generated; with --attack_info the "
                          "first N lines, default all). Attack i targets class i mod C")
    lst.add_argument("--correct-only", action="store_true",
                     help="generate the list from correctly classified source samples only")
    lst.add_argument("--save-attack-info", default=None, metavar="FILE",
                     help="write the list used, in the public format")
    lst.add_argument("--attacks-file", "--attacks_file", dest="attacks_file", default=None,
                     metavar="FILE",
                     help="attacks with pinned D_aux, run in file order: JSON lines, one "
                          'object per attack, {"target": T, "idx": I, "aux_idx": [...]} '
                          "(--n_aux test indices, in the order to use; the attacked image "
                          "is appended after them). Replaces --attack_info and the generated "
                          "list")
    lst.add_argument("--save-attacks", "--save_attacks", dest="save_attacks", default=None,
                     metavar="FILE",
                     help="write the attacks of this run with their D_aux in the "
                          "--attacks-file format, to repeat the run exactly")
    lst.add_argument("--overwrite", action="store_true",
                     help="replace the results already in --results (a campaign with other "
                          "settings, or files of another tool) instead of refusing the folder")
    lst.add_argument("--results", default=None,
                     help="results folder (default: <checkpoint folder>/attack_talbf)")
    lst.add_argument("--test_batch", "-b", "--batch", dest="test_batch", type=int, default=500,
                     help="batch size of the feature computation (500)")
    add_runtime_args(p)
    p.set_defaults(seed=1)  # the public attack script's default
    return p


def talbf_config(args) -> TALBFConfig:
    """The TA-LBF config of the flags; every bad value is a UserError naming its flag."""
    names = {"init_k": "--init-k", "init_gamma": "--init-lam", "max_search_gamma":
             "--max-search-lam", "n_aux": "--n_aux", "rho1": "--initial-rho1",
             "rho2": "--initial-rho2", "rho3": "--initial-rho3"}
    values = {}
    for f in TALBFConfig.__dataclass_fields__:
        if not hasattr(args, f):
            continue
        v = getattr(args, f)
        flag = names.get(f, "--" + f.replace("_", "-"))
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{flag} must be a finite number, got {v}")
        values[f] = v
    minimum = {"max_search_k": 1, "max_search_gamma": 1, "n_aux": 1, "ext_max_iters": 1,
               "inn_max_iters": 1, "gamma_batch": 0, "k_batch": 0}
    for f, v in values.items():
        flag = names.get(f, "--" + f.replace("_", "-"))
        if f in minimum:
            if v < minimum[f]:
                raise UserError(f"{flag} must be at least {minimum[f]}, got {v}")
        elif f == "stop_threshold":
            if v < 0:
                raise UserError(f"{flag} must not be negative, got {v:g}")
        elif v <= 0:
            what = {"init_k": "a bit budget k", "init_gamma": "a trade-off gamma"}.get(f, flag)
            raise UserError(f"{flag} must be positive ({what} of {v:g} makes no sense)")
    return TALBFConfig(**values).with_numerics(getattr(args, "numerics", "public")).validate()


def main(argv=None) -> int:
    args, cfg, given = parse_and_check(argv)
    return in_process_group(args, lambda args, device: _main(args, cfg, given, device))


def _main(args, cfg: TALBFConfig, given, device) -> int:
    torch.manual_seed(args.seed)
    target = load_attack_target(args, device)
    images, labels = checked_test_split(target, cfg)
    data = EvalSet(images, labels, target.mean, target.std, device, batch_size=args.test_batch)
    del images
    listed = listed_attacks(args, given, labels, target.config.num_classes)
    attack = TALBF.from_model(target.model, target.output, data, cfg, args.seed,  # features
                              fault=target.fault)
    items, attack_list = listed or generated_attacks(args, labels, target.config.num_classes,
                                                     attack)
    attack_list.update(n_attacks=len(items), sha256=attack_list_digest(items))
    campaign = campaign_settings(args, target, cfg, attack_list)
    # Everything is valid: from here on, files are written.
    results = open_campaign(args.results, campaign, CAMPAIGN_KEYS, args.overwrite)
    if args.save_attack_info and is_main():
        with open(args.save_attack_info, "w", encoding="utf-8") as f:
            f.write(format_attack_info(items))
    if args.save_attacks and is_main():
        write_attacks_file(args.save_attacks, with_drawn_aux(attack, items, args.seed))
    runner = CampaignRunner(results, attack, items, args.progress)
    runner.announce(f"TA-LBF on {target.describe()}: clean test accuracy "
                    f"{attack.clean_accuracy():.2f}% (final layer on the cached features)")
    return runner.run()


def checked_test_split(target, cfg: TALBFConfig) -> tuple:
    """The test split, once the target is known to be one TA-LBF can attack."""
    if not hasattr(target.model.final_layer(), "step_size"):
        raise UserError(f"TA-LBF's relaxation needs a final layer of N-bit codes with one step "
                        f"per layer; {target.describe()} is a float model: attack it with "
                        f"attack_bfa.py or attack_tbfa.py (--format lists the number formats)")
    if target.deployment_record():
        raise UserError("TA-LBF attacks the final layer on cached features, which no "
                        "deployment-time defense checks: attack a model with --defense with "
                        "attack_bfa.py or attack_tbfa.py")
    images, labels = target.load_test_split()
    if cfg.n_aux > len(labels) - 1:
        raise UserError(f"--n_aux {cfg.n_aux} is larger than the test set allows: it has "
                        f"{len(labels)} samples, {len(labels) - 1} besides the attacked one")
    return images, labels


def campaign_settings(args, target, cfg: TALBFConfig, attack_list: dict) -> dict:
    """What defines the campaign. An attack is defined by its key (position, target, index)
    and these settings, so one folder can hold attacks of several lists (a longer list,
    another file)."""
    return {"attack": "talbf", "source": target.source, "dataset": target.dataset.name,
            "config": target.config.to_dict(),
            "talbf": {k: v for k, v in cfg.to_dict().items() if k not in SPEED_ONLY},
            "seed": args.seed, "attack_list": attack_list,
            # None without a fault model, so that campaigns written before it resume
            "fault": target.fault.to_dict() if target.fault else None,
            "defenses": target.deployment_record(),
            "normalization": target.normalization_record()}


def parse_and_check(argv) -> tuple:
    """Parse and check the flags before anything is loaded: ``(args, config, given)``, ``given`` the read ``--attacks-file`` (a list) or ``--attack_info`` entries
    (a tuple ``(entries,)``), or None."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    cfg = talbf_config(args)
    check_number(args.n_attacks, "--n-attacks", minimum=1)
    check_number(args.test_batch, "--test_batch", minimum=1)
    check_runtime_args(args)
    args.fault = fault_model_from_args(args)
    if args.results is None:  # an empty --results is refused, never the default
        args.results = default_results_dir(model_path(args), args.pretrained, "attack_talbf")
    check_paths(*script_paths(args))
    if args.attacks_file and args.attack_info:
        raise UserError("give either --attacks-file or --attack_info, not both")
    if args.correct_only and (args.attacks_file or args.attack_info):
        flag = "--attacks-file" if args.attacks_file else "--attack_info"
        raise UserError(f"--correct-only selects sources of a generated list; it does not "
                        f"apply to {flag}")
    given = None
    if args.attacks_file:
        try:
            given = read_attacks_file(args.attacks_file, n_aux=cfg.n_aux)
        except ValueError as e:
            raise UserError(str(e)) from None
    elif args.attack_info:
        given = (_read_attack_info(args.attack_info),)
    return args, cfg, given


def script_paths(args) -> tuple[list, list]:
    """``(inputs, outputs)`` of this command, as :func:`cli.args.check_paths` takes them."""
    inputs = [("--checkpoint", model_path(args), "file"),
              ("--fault-profile", args.fault_profile, "file"),
              ("--attacks-file", args.attacks_file, "file"),
              ("--attack_info", args.attack_info, "file")]
    outputs = [("--results", args.results, "folder"),
               ("--save-attacks", args.save_attacks, "file"),
               ("--save-attack-info", args.save_attack_info, "file")]
    return inputs, outputs


def _read_attack_info(path: str) -> list:
    try:
        return read_attack_info(read_text(path, "the attack list"), name=path)
    except ValueError as e:
        raise UserError(str(e)) from None


def listed_attacks(args, given, labels, num_classes: int) -> tuple[list, dict] | None:
    """The attacks of ``--attacks-file`` / ``--attack_info`` (the first ``--n-attacks``),
    checked against the test set, and how the campaign names their list; None if neither."""
    if given is None:
        return None
    try:
        if isinstance(given, tuple):
            items = check_attack_info(given[0], labels, num_classes, name=args.attack_info)
            attack_list = {"file": os.path.abspath(args.attack_info)}
        else:
            check_attacks(given, len(labels), labels, num_classes, name=args.attacks_file)
            items = items_from_pinned(given)
            attack_list = {"attacks_file": os.path.abspath(args.attacks_file)}
    except ValueError as e:
        raise UserError(str(e)) from None
    return (items[:args.n_attacks] if args.n_attacks is not None else items), attack_list


def generated_attacks(args, labels, num_classes: int, attack: TALBF) -> tuple[list, dict]:
    """The seeded attack list of the protocol (``--n-attacks``, ``--correct-only``)."""
    eligible = attack.clean_correct if args.correct_only else None
    try:
        items = generate_attack_list(labels, num_classes, args.n_attacks or 1000, args.seed,
                                     eligible)
    except ValueError as e:
        raise UserError(str(e)) from None
    return items, {"generated_seed": args.seed, "correct_only": args.correct_only}


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
