r"""Paper-style report from attack result folders: the table of docs/algorithms.md section 9 (clean accuracy,
ASR, PA-ACC, # bit-flips for stealthy T-BFA and TA-LBF, mean +- std, published values beside
ours), the BFA table, and the supplement's figures as PNG (Figure 1: T-BFA ASR against the
maximum allowed number of bit-flips; Figure 2: PA-ACC against the number of bit-flips; the BFA
and random-flip accuracy curves).

Each model is LABEL=FOLDER, FOLDER being its training run folder with the attack scripts'
default result folders inside (attack_tbfa/, attack_talbf/, attack_bfa*/). Labels vanilla, pc,
ocm16, ocm64, ocm16_pc, mixup, manifold_mixup get the paper's names and published values.
Nothing is written into the model folders: an --out that is, or lies inside, a model folder or
a folder holding a campaign (campaign.json, results.jsonl) is refused. A corrupt results line is
named (file:line) and skipped; what is missing is listed, and everything that can be written is.

Examples:
  python report.py vanilla=runs/paper/cifar10/vanilla ocm16=runs/paper/cifar10/ocm16 \
      --out runs/paper/cifar10/report
  python report.py --models-file models.txt --out report/ --published none
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cli.args import (ArgumentParser, check_input_file, check_number, check_paths, run,
                      setup_logging)
from utils.errors import UserError
from campaigns.results import MERGED
from campaigns.report import (ATTACKS, PUBLISHED, datasets_of, load_model, parse_model_specs,
                          read_models_file, write_report)

log = logging.getLogger("report")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="LABEL=FOLDER",
                   help="a model's label and its run folder (the order is the table's)")
    p.add_argument("--models-file", default=None, metavar="FILE",
                   help="more models, one LABEL=FOLDER per line (folders relative to the file)")
    p.add_argument("--out", required=True, help="folder for the tables, figures and report.md")
    p.add_argument("--published", default="auto",
                   help=f"published values to show beside ours: {', '.join(PUBLISHED)}, none, "
                        f"or auto (those of the results' data set when there are any; default)")
    p.add_argument("--band", type=float, default=0.25,
                   help="shaded band of the figures, in standard deviations (0.25, as the "
                        "supplement)")
    p.add_argument("--max-flips", type=int, default=None,
                   help="x-axis limit of Figures 1 and 2 (default: the longest attack)")
    p.add_argument("--title", default="", help="title of the report and the figures")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--attacks", default="tbfa,talbf,bfa",
                   help="the attacks to report on, comma-separated (tbfa,talbf,bfa; default all): "
                        "results of the others are not expected")
    p.add_argument("--tbfa-dir", default="attack_tbfa",
                   help="T-BFA results folder inside each model folder (attack_tbfa)")
    p.add_argument("--talbf-dir", default="attack_talbf",
                   help="TA-LBF results folder inside each model folder (attack_talbf)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    setup_logging()
    check_number(args.band, "--band", minimum=0)
    check_number(args.max_flips, "--max-flips", minimum=1)
    pairs, attacks = model_folders(args), attack_kinds(args.attacks)
    check_paths(*script_paths(args, pairs))
    models = [load_model(label, folder, args.tbfa_dir, args.talbf_dir, expect=attacks,
                         curves=not args.no_figures) for label, folder in pairs]
    report = write_report(models, args.out, published=published_values(args.published, models),
                          band=args.band, max_flips=args.max_flips, title=args.title,
                          figures=not args.no_figures, attacks=attacks)
    print(report.markdown)
    for path, lines in report.figures.items():
        log.info("figure %s (%d lines)", path, lines)
    log.info("report in %s (%d files%s)", args.out, len(report.files),
             f"; {len(report.missing)} things missing, see report.md" if report.missing else "")
    return 0


def model_folders(args) -> list[tuple[str, str]]:
    """``(label, folder)`` of the positional LABEL=FOLDER arguments, then ``--models-file``."""
    if args.models_file:
        check_input_file(args.models_file, "--models-file")
    pairs = parse_model_specs(args.models)
    if args.models_file:
        pairs += read_models_file(args.models_file)
    labels = [label for label, _ in pairs]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise UserError(f"model label(s) {', '.join(sorted(dup))} given twice: labels must be unique")
    if not pairs:
        raise UserError("no models: give LABEL=FOLDER arguments (e.g. ocm16=runs/paper/ocm16) "
                        "or --models-file")
    return pairs


def script_paths(args, pairs: list[tuple[str, str]]) -> tuple[list, list]:
    """``(inputs, outputs)`` as :func:`cli.args.check_paths` takes them: the model folders,
    the models file and every results folder at or above ``--out`` (a folder holding
    ``campaign.json`` or ``results.jsonl``) are read, so ``--out`` can lie in none of them."""
    inputs = [(f"the folder of model {label}", folder, "folder") for label, folder in pairs]
    inputs += [("--models-file", args.models_file, "file")]
    inputs += [("the results folder", folder, "folder")
               for folder in results_folders_above(args.out)]
    return inputs, [("--out", args.out, "folder")]


def results_folders_above(path: str) -> list[str]:
    """The folders at or above ``path`` that hold a campaign's ``campaign.json`` or
    ``results.jsonl`` (the results of an attack, which the report only reads)."""
    found, probe = [], os.path.realpath(path)
    while True:
        if any(os.path.exists(os.path.join(probe, n)) for n in ("campaign.json", MERGED)):
            found.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            return found
        probe = parent


def attack_kinds(text: str) -> tuple[str, ...]:
    attacks = tuple(a.strip() for a in text.split(",") if a.strip())
    if not attacks or any(a not in ATTACKS for a in attacks):
        raise UserError(f"--attacks {text!r}: use a comma-separated subset of "
                        f"{','.join(ATTACKS)}")
    return attacks


def published_values(choice: str, models) -> dict | None:
    """The published numbers beside ours: ``auto`` (the one data set of the models), a data
    set's name, or ``none``."""
    if choice == "auto":
        found = datasets_of(models)
        return PUBLISHED.get(next(iter(found))) if len(found) == 1 else None
    if choice == "none":
        return None
    if choice in PUBLISHED:
        return PUBLISHED[choice]
    raise UserError(f"--published {choice!r}: use one of {', '.join(PUBLISHED)}, none or auto")


def cli() -> None:
    """Console-script entry point (``pip install -e .``)."""
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
