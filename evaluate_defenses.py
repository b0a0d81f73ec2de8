r"""The defenses x attacks matrix: every defended model under every attack and fault model, on
one protocol (docs/algorithms.md section 14).

Each cell (model x attack x fault model) is a campaign of the one runner in
<out>/cells/<model>/<attack>@<fault>/: its records are appended as they end, running the same
command again continues (also after a kill), and torchrun shares every cell's items among its
processes. At the end: <out>/matrix.md (printed), matrix.csv, defenses.csv and matrix.png.

Examples:
  python evaluate_defenses.py --out runs/matrix --dataset digits \
      --model vanilla=runs/quickstart/vanilla/model_best.pth.tar \
      --model ocm16=runs/quickstart/ocm16/model_best.pth.tar \
      --attacks tbfa tbfa_adaptive:loss=margin,scores=preact talbf bfa \
      --faults none page 0to1
  # a deployment-time defense as a row of its own, on the vanilla checkpoint:
  python evaluate_defenses.py ... --model radar=runs/v/model_best.pth.tar \
      --deploy radar=radar:group_size=16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from attacks.base import Protocol, list_attacks
from campaigns.matrix import SUCCESS_ASR, DefenseRow, MatrixRunner, MatrixSpec
from cli.args import (ArgumentParser, add_checkpoint_safety_args, add_data_args,
                      add_runtime_args, check_number, check_paths, check_runtime_args,
                      in_process_group, run)
from utils.errors import UserError
from utils.faults import FAULT_PRESETS


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("the matrix")
    m.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=CKPT",
                   help="a row: a name and its checkpoint (repeatable; the first is the "
                        "undefended baseline unless --baseline)")
    m.add_argument("--deploy", action="append", default=[], metavar="NAME=DEFENSE",
                   help="a deployment-time defense (NAME[:key=value,...]) on row NAME "
                        "(repeatable)")
    m.add_argument("--baseline", default=None, help="the undefended row (default: the first)")
    m.add_argument("--attacks", nargs="+", required=True, metavar="SPEC",
                   help=f"attacks, NAME[:key=value,...] (registered: {', '.join(list_attacks())})")
    m.add_argument("--faults", nargs="+", default=["none"], metavar="NAME",
                   help=f"fault models: {', '.join(FAULT_PRESETS)} (default: none)")
    m.add_argument("--success-asr", type=float, default=SUCCESS_ASR,
                   help=f"ASR (%%) at which an attack counts for the worst case ({SUCCESS_ASR:g})")
    m.add_argument("--out", required=True, help="the matrix folder (cells, tables)")
    a = p.add_argument_group("protocol, shared by every attack")
    a.add_argument("--pairs", default=None,
                   help="targeted pairs source:target,... (default: every second source of "
                        "the data set's protocol, s -> s+1: 0:1,2:3,... 5 pairs on 10 classes)")
    a.add_argument("--all-pairs", action="store_true",
                   help="the data set's whole protocol (20 pairs on 10 classes)")
    a.add_argument("--reps", type=int, default=1, help="T-BFA repetitions per pair (1)")
    a.add_argument("--n-src", type=int, default=None, help="|D_src| (protocol's)")
    a.add_argument("--n-aux", type=int, default=None, help="|D_aux| (protocol's)")
    a.add_argument("--iters", type=int, default=200, help="T-BFA iteration cap (200)")
    a.add_argument("--talbf-samples", type=int, default=5, help="TA-LBF attacks (5)")
    a.add_argument("--bfa-reps", type=int, default=1, help="untargeted runs (1)")
    a.add_argument("--bfa-batch", type=int, default=128, help="BFA attack batch (128)")
    a.add_argument("--bfa-iters", type=int, default=100, help="BFA iteration cap (100)")
    a.add_argument("--break-acc", type=float, default=None,
                   help="BFA stops at this test accuracy (default: chance + 1 point)")
    a.add_argument("--test_batch", type=int, default=None,
                   help="evaluation batch (default: 500 on a GPU; 64 on the CPU, where small "
                        "batches run faster, up to 1.7x on one thread)")
    add_data_args(p)
    add_checkpoint_safety_args(p.add_argument_group("checkpoints"))
    add_runtime_args(p)
    p.set_defaults(seed=1)
    return p


def _pairs(args) -> tuple:
    """``--pairs`` as a tuple of (source, target); () for the protocol's default."""
    if args.pairs:
        try:
            return tuple(tuple(int(v) for v in item.split(":")) for item in args.pairs.split(","))
        except ValueError:
            raise UserError(f"--pairs takes source:target pairs like 0:1,2:3; got "
                            f"{args.pairs!r}") from None
    return ()  # the attack's default below, once the data set is known


def build_spec(args) -> MatrixSpec:
    """The :class:`MatrixSpec` of the flags (UserError for anything that cannot run)."""
    from attacks.target import DataSpec, TargetSpec

    rows = []
    for text in args.models:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model takes NAME=CHECKPOINT, got {text!r}")
        rows.append(DefenseRow(name, path))
    for text in args.deploy:
        name, sep, defense = text.partition("=")
        idx = [i for i, r in enumerate(rows) if r.name == name]
        if not sep or not idx:
            raise UserError(f"--deploy takes NAME=DEFENSE with NAME a --model row, got {text!r}")
        r = rows[idx[0]]
        rows[idx[0]] = DefenseRow(r.name, r.checkpoint, r.defenses + (defense,))
    for flag, value, low in (("--reps", args.reps, 1), ("--iters", args.iters, 1),
                             ("--talbf-samples", args.talbf_samples, 1),
                             ("--bfa-reps", args.bfa_reps, 1), ("--bfa-batch", args.bfa_batch, 1),
                             ("--bfa-iters", args.bfa_iters, 1), ("--n-src", args.n_src, 1),
                             ("--n-aux", args.n_aux, 1), ("--test_batch", args.test_batch, 1)):
        check_number(value, flag, minimum=low)
    if args.pairs and args.all_pairs:
        raise UserError("give --pairs or --all-pairs, not both")
    protocol = Protocol(pairs=_pairs(args), reps=args.reps,
                        n_src=args.n_src, n_aux=args.n_aux, iters=args.iters,
                        samples=args.talbf_samples, bfa_reps=args.bfa_reps,
                        bfa_batch=args.bfa_batch, bfa_iters=args.bfa_iters,
                        break_acc=args.break_acc, seed=args.seed)
    target = TargetSpec(dataset=args.dataset,
                        data=DataSpec(args.data_dir, args.download, args.workers),
                        seed=args.seed, normalization=args.normalization,
                        trust_checkpoint=args.trust_checkpoint,
                        verify_checkpoint=args.verify_checkpoint)
    try:
        return MatrixSpec(rows, list(args.attacks), list(args.faults), protocol, target,
                          args.baseline, args.success_asr, args.all_pairs).check()
    except (KeyError, ValueError) as e:
        raise UserError(str(e).strip("'\"")) from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    check_runtime_args(args)
    spec = build_spec(args)
    check_paths([(f"--model {r.name}", r.checkpoint, "file") for r in spec.rows],
                [("--out", args.out, "folder")])
    # the processes share the items of all cells and meet once, at the end: one may finish its
    # share hours before another on a large matrix
    return in_process_group(args, lambda a, device: _main(a, spec, device),
                            timeout_s=7 * 24 * 3600.0)


def _main(args, spec: MatrixSpec, device) -> int:
    batch = args.test_batch or (500 if torch.device(device).type == "cuda" else 64)
    runner = MatrixRunner(spec, args.out, device, args.progress, batch)
    runner.prepare()  # every checkpoint, defense, fault model and pair checked: nothing written
    return runner.run()


def cli() -> None:
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
