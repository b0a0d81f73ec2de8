r"""The attacked model of one campaign item, as a checkpoint (docs/algorithms.md section 13).

Every record of attack_tbfa.py, attack_talbf.py and attack_bfa.py lists the bits its attack
flipped; this script loads the model the campaign attacked (its campaign.json), flips the same
bits in the same order (checking each value before the flip and the final Hamming distance
against the record) and writes the result as a checkpoint of this tool, which main.py --eval
and the attack scripts read. It never overwrites a file without --overwrite.

Examples:
  python rebuild_attacked.py --results runs/r20/attack_tbfa --key s3-t4-r0 --out s3t4.pth.tar
  python main.py --eval s3t4.pth.tar --data_dir data       # the attacked model's accuracy
  python rebuild_attacked.py --results runs/r20/attack_bfa --key r0 --out bfa_r0.pth.tar
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from campaigns.attacked import rebuild_attacked, save_attacked
from cli.args import ArgumentParser, add_runtime_args, check_output_file, in_process_group, run
from utils.errors import UserError

log = logging.getLogger("rebuild_attacked")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="a campaign's results folder")
    p.add_argument("--key", required=True, help="the item's key (a record's 'key')")
    p.add_argument("--out", required=True, help="the checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_runtime_args(p)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if not os.path.isdir(args.results):
        raise UserError(f"--results {args.results} is not a folder")
    check_output_file(args.out, "--out")
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} exists: choose another path, or add --overwrite")
    if os.path.realpath(os.path.dirname(os.path.abspath(args.out))).startswith(
            os.path.realpath(args.results)):
        raise UserError(f"--out {args.out} lies inside --results {args.results}: write the "
                        f"checkpoint elsewhere")
    return in_process_group(args, _main)


def _main(args, device) -> int:
    target, record = rebuild_attacked(args.results, args.key, device)
    source = os.path.realpath(target.source) if os.path.exists(target.source) else None
    if source is not None and source == os.path.realpath(args.out):
        raise UserError(f"--out {args.out} is the checkpoint the campaign attacked: write the "
                        f"attacked model elsewhere")
    save_attacked(target, record, args.results, args.out)
    print(f"{args.out}: {target.describe()} after {record['key']} "
          f"({record.get('bits_changed')} bits changed)")
    return 0


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
