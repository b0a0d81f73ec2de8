"""A battery of bad inputs for every script (main.py, attack_bfa.py, attack_tbfa.py,
attack_talbf.py, report.py). Each must end with exit status 2 and exactly one stderr line
``error: ...`` that names the problem (the case's expected words), with no traceback, and change
no file in the folders involved: the checkpoint's folder, the data, the input files and the
outputs' folders (every file's bytes, and every file's and folder's size and modification time;
the command runs in a scratch current directory that is compared too).

The classes of bad input (README, "Bad input ends with one line"):

- ``flag``: argparse's own errors (unknown flag, bad value, missing value, abbreviations);
- ``overlap``: an output that is, or lies inside, an input or another output (also through a
  symlink, ``..`` or a hard link), an input inside an output folder, report.py writing into a
  model or results folder;
- ``setting``: a setting that cannot mean what it says (bit positions outside the attacked
  format, a page size that is not a power of two or without the page rule, empty, malformed
  or misplaced profiles, duplicate attacks, flags that ``--sets`` or a pinned batch makes
  meaningless, absurd counts);
- ``state``: damaged state and odd paths (campaign.json of the wrong shape, a results path of
  the wrong kind, huge or negative indices, text that is not UTF-8, paths under /proc, /sys or
  /dev, names that are not UTF-8, empty paths, NUL characters).

Everything runs in-process on an untrained 8-bit ResNet-20 and 20-image CIFAR-format data and
fails before any training or attack step, so the battery takes well under a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attack_bfa
import attack_talbf
import attack_tbfa
import main as main_script
import report as report_script
from cli.args import run
from fakedata import make_cifar10
from models.factory import ModelConfig, build_model
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.data import get_dataset_info

SCRIPTS = {"tbfa": attack_tbfa, "talbf": attack_talbf, "bfa": attack_bfa, "main": main_script,
           "report": report_script}
NOT_UTF8 = os.fsdecode(b"r\xff\xfe")  # a valid Linux name that is not UTF-8
HUGE = 10 ** 30

# The fake CIFAR-10 test split (tests/fakedata.py) has label (3 j) mod 10 at position j:
# class 3 at 1 and 11, class 5 at 5 and 15, class 0 at 0 and 10.
GOOD_SETS = {"source": 3, "target": 5, "src": [1], "rest": [11], "aux": [5]}
GOOD_ATTACK = {"target": 3, "idx": 0, "aux_idx": [1, 2, 4, 5]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The data, an untrained 8-bit ResNet-20 checkpoint of ours (its own folder), and a
    folder of files that earlier runs left (a results folder with campaign.json)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    make_cifar10(root / "data")
    (root / "run").mkdir()
    torch.manual_seed(0)
    config = ModelConfig("resnet20_quan", 10)
    model, output = build_model(config)
    info = get_dataset_info("cifar10")
    state = make_checkpoint(model, config, output, "cifar10", info.mean, info.std, epoch=1)
    save_checkpoint(state, str(root / "run" / "model_best.pth.tar"))
    save_checkpoint(state, str(root / "run" / "checkpoint.pth.tar"))
    return root


@dataclass
class Ws:
    """What a case builds its command from: the shared workspace and its own scratch folder."""

    root: Path
    tmp: Path

    @property
    def ckpt(self) -> str:
        return str(self.root / "run" / "model_best.pth.tar")

    @property
    def data(self) -> str:
        return str(self.root / "data")

    def file(self, name: str, content: str | bytes | object) -> str:
        """A file in the scratch folder: text, bytes, or an object written as JSON."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    def results(self, **files) -> str:
        """A results folder in the scratch folder holding ``files`` (name -> content; a
        content of None makes a folder of that name)."""
        for name, content in files.items():
            if content is None:
                (self.tmp / "res" / name).mkdir(parents=True)
            else:
                self.file(f"res/{name}", content)
        (self.tmp / "res").mkdir(exist_ok=True)
        return str(self.tmp / "res")

    def sets(self, **changes) -> str:
        return self.file("sets.json", {"experiments": [{**GOOD_SETS, **changes}]})

    def attacks(self, *lines) -> str:
        return self.file("attacks.jsonl", "".join(json.dumps(x) + "\n" for x in lines))


def _with_default(argv: list, flag: str, value: str) -> list:
    return argv if flag in argv else argv + [flag, value]


def tbfa(w: Ws, *extra, plan: bool = True) -> list:
    """attack_tbfa.py on one tiny experiment (``plan``; off for --sets cases)."""
    argv = ["--checkpoint", w.ckpt, "--data_dir", w.data, "--device", "cpu", "--no-progress",
            "--iters", "1", *extra]
    if plan and "--sets" not in extra:
        argv += ["--pairs", "3:5", "--n-src", "1", "--n-aux", "1"]
    return _with_default(argv, "--results", str(w.tmp / "results"))


def talbf(w: Ws, *extra) -> list:
    argv = ["--checkpoint", w.ckpt, "--data_dir", w.data, "--device", "cpu", "--no-progress",
            "--n-attacks", "1", "--n_aux", "4", "--max-search-k", "1", *extra]
    return _with_default(argv, "--results", str(w.tmp / "results"))


def bfa(w: Ws, *extra, sample: bool = True) -> list:
    argv = ["--checkpoint", w.ckpt, "--data_dir", w.data, "--device", "cpu", "--no-progress",
            "--n_iter", "1", *extra]
    if sample:
        argv += ["--attack_sample_size", "4"]
    return _with_default(argv, "--results", str(w.tmp / "results"))


def train(w: Ws, *extra) -> list:
    argv = ["--data_dir", w.data, "--device", "cpu", "--no-progress", "-e", "1", *extra]
    return _with_default(argv, "--outdir", str(w.tmp / "run"))


def report(w: Ws, *extra) -> list:
    return _with_default([f"m={w.root / 'run'}", *extra], "--out", str(w.tmp / "report"))


def _link(w: Ws, name: str, target: str) -> str:
    os.symlink(target, w.tmp / name)
    return str(w.tmp / name)


def _hard_link(w: Ws, name: str, target: str) -> str:
    os.link(target, w.tmp / name)
    return str(w.tmp / name)


# (class, script, argv builder, words the error line must hold)
CASES = {
    # -- flag errors: argparse's own, one line each ----------------------------------------------
    "tbfa iters not a number": ("flag", "tbfa", lambda w: tbfa(w, "--iters", "x"), "invalid int"),
    "tbfa unknown flag": ("flag", "tbfa", lambda w: tbfa(w, "--no-such-flag"), "unrecognized"),
    "tbfa abbreviated flag": ("flag", "tbfa", lambda w: tbfa(w, "--res", "x"), "unrecognized"),
    "tbfa avgs missing value": ("flag", "tbfa", lambda w: tbfa(w, "--avgs"), "expected one"),
    "talbf numerics choice": ("flag", "talbf", lambda w: talbf(w, "--numerics", "fast"),
                              "invalid choice"),
    "talbf format flag it lacks": ("flag", "talbf", lambda w: talbf(w, "--format", "fp16"),
                                   "unrecognized"),
    "talbf init-k not a number": ("flag", "talbf", lambda w: talbf(w, "--init-k", "big"),
                                  "invalid float"),
    "bfa n_iter missing value": ("flag", "bfa", lambda w: bfa(w, "--n_iter"), "expected one"),
    "bfa format choice": ("flag", "bfa", lambda w: bfa(w, "--format", "int3"), "invalid choice"),
    "bfa direction choice": ("flag", "bfa", lambda w: bfa(w, "--fault-direction", "up"),
                             "invalid choice"),
    "main opt choice": ("flag", "main", lambda w: train(w, "--opt", "rmsprop"), "invalid choice"),
    "main epochs not a number": ("flag", "main", lambda w: train(w, "-e", "ten"), "invalid int"),
    "main abbreviated flag": ("flag", "main", lambda w: train(w, "--resum", "x"), "unrecognized"),
    "report out missing": ("flag", "report", lambda w: [f"m={w.root / 'run'}"], "required"),
    "report band not a number": ("flag", "report", lambda w: report(w, "--band", "wide"),
                                 "invalid float"),

    # -- outputs onto inputs or onto each other -----------------------------------------------
    "tbfa save-sets is the checkpoint": (
        "overlap", "tbfa", lambda w: tbfa(w, "--save-sets", w.ckpt), "--checkpoint"),
    "tbfa save-sets is --sets": (
        "overlap", "tbfa", lambda w: tbfa(w, "--sets", w.sets(), "--save-sets", w.sets()),
        "--sets"),
    "tbfa save-sets is the checkpoint through a symlink": (
        "overlap", "tbfa", lambda w: tbfa(w, "--save-sets", _link(w, "s.json", w.ckpt)),
        "--checkpoint"),
    "tbfa save-sets is the checkpoint through ..": (
        "overlap", "tbfa", lambda w: tbfa(w, "--save-sets", str(w.root / "run" / ".." / "run" /
                                                                  "model_best.pth.tar")),
        "--checkpoint"),
    "tbfa save-sets is a hard link of the checkpoint": (
        "overlap", "tbfa", lambda w: tbfa(w, "--save-sets", _hard_link(w, "h.json", w.ckpt)),
        "--checkpoint"),
    "tbfa save-sets is the profile": (
        "overlap", "tbfa", lambda w: tbfa(w, "--fault-profile", w.file("p.txt", "0 0 0to1\n"),
                                          "--save-sets", str(w.tmp / "p.txt")), "--fault-profile"),
    "tbfa save-sets inside the results folder": (
        "overlap", "tbfa", lambda w: tbfa(w, "--results", w.results(), "--save-sets",
                                          str(w.tmp / "res" / "s.json")), "--results"),
    "tbfa results folder holds the checkpoint": (
        "overlap", "tbfa", lambda w: tbfa(w, "--results", str(w.root / "run")), "--checkpoint"),
    "tbfa results folder holds the sets": (
        "overlap", "tbfa", lambda w: tbfa(w, "--sets", w.sets(), "--results", str(w.tmp)),
        "--sets"),
    "tbfa results inside the checkpoint folder's symlink": (
        "overlap", "tbfa", lambda w: tbfa(w, "--results", _link(w, "rl", str(w.root / "run"))),
        "--checkpoint"),
    "talbf save-attacks is the checkpoint": (
        "overlap", "talbf", lambda w: talbf(w, "--save-attacks", w.ckpt), "--checkpoint"),
    "talbf save-attacks is the attacks file": (
        "overlap", "talbf", lambda w: talbf(w, "--attacks-file", w.attacks(GOOD_ATTACK),
                                            "--save-attacks", str(w.tmp / "attacks.jsonl")),
        "--attacks-file"),
    "talbf save-attack-info is the attack list": (
        "overlap", "talbf", lambda w: talbf(w, "--attack_info", w.file("l.txt", "3 0\n"),
                                            "--save-attack-info", str(w.tmp / "l.txt")),
        "--attack_info"),
    "talbf two outputs to one file": (
        "overlap", "talbf", lambda w: talbf(w, "--save-attacks", str(w.tmp / "o.jsonl"),
                                            "--save-attack-info", str(w.tmp / "o.jsonl")),
        "--save-attacks"),
    "talbf save-attacks into the checkpoint through a folder symlink": (
        "overlap", "talbf", lambda w: talbf(w, "--save-attacks", os.path.join(
            _link(w, "dl", str(w.root / "run")), "model_best.pth.tar")), "--checkpoint"),
    "talbf results folder holds the attacks file": (
        "overlap", "talbf", lambda w: talbf(w, "--attacks-file", w.attacks(GOOD_ATTACK),
                                            "--results", str(w.tmp)), "--attacks-file"),
    "talbf save-attacks inside the results folder": (
        "overlap", "talbf", lambda w: talbf(w, "--results", w.results(), "--save-attacks",
                                            str(w.tmp / "res" / "a.jsonl")), "--results"),
    "talbf results is the checkpoint": (
        "overlap", "talbf", lambda w: talbf(w, "--results", w.ckpt), "is a file"),
    "bfa results folder holds the pinned batch": (
        "overlap", "bfa", lambda w: bfa(w, "--attack-batch", w.file("r/attack_batch.r0.pt", "x"),
                                        "--results", str(w.tmp / "r"), sample=False),
        "--attack-batch"),
    "bfa results folder holds the indices": (
        "overlap", "bfa", lambda w: bfa(w, "--attack-indices", w.file("i.json", [0, 1]),
                                        "--results", str(w.tmp), sample=False), "--attack-indices"),
    "bfa results folder holds the published checkpoint": (
        "overlap", "bfa", lambda w: ["--outdir", str(w.root / "run"), "--data_dir", w.data,
                                     "--device", "cpu", "--results", str(w.root / "run")],
        "--checkpoint"),
    "bfa results folder holds the profile": (
        "overlap", "bfa", lambda w: bfa(w, "--fault-profile", w.file("p/p.txt", "0 0 0to1\n"),
                                        "--results", str(w.tmp / "p")), "--fault-profile"),
    "bfa results is the checkpoint's folder under another name": (
        "overlap", "bfa", lambda w: bfa(w, "--results", str(w.root / "data" / ".." / "run")),
        "--checkpoint"),
    "main finetune into the source's folder": (
        "overlap", "main", lambda w: train(w, "--finetune", "--ft_path", w.ckpt, "--outdir",
                                           str(w.root / "run")), "--ft_path"),
    "main finetune from a run folder into it": (
        "overlap", "main", lambda w: train(w, "--finetune", "--ft_path", str(w.root / "run"),
                                           "--outdir", str(w.root / "run")), "--ft_path"),
    "main resume into a folder above the run": (
        "overlap", "main", lambda w: ["--resume", str(w.root / "run" / "checkpoint.pth.tar"),
                                      "--outdir", str(w.root), "--device", "cpu"], "--resume"),
    "report out is a model folder": (
        "overlap", "report", lambda w: report(w, "--out", str(w.root / "run")), "model m"),
    "report out inside a model folder": (
        "overlap", "report", lambda w: report(w, "--out", str(w.root / "run" / "report")),
        "model m"),
    "report out is a model folder through a symlink": (
        "overlap", "report", lambda w: report(w, "--out", _link(w, "ml", str(w.root / "run"))),
        "model m"),
    "report out is a model folder of the models file": (
        "overlap", "report", lambda w: ["--models-file", w.file("models.txt", "a=run\n"), "--out",
                                        str(w.tmp / "run")], "model a"),
    "report out is a results folder": (
        "overlap", "report", lambda w: report(w, "--out", w.results(**{"campaign.json": {}})),
        "results folder"),
    "report out inside a results folder": (
        "overlap", "report", lambda w: report(w, "--out", os.path.join(
            w.results(**{"results.jsonl": ""}), "report")), "results folder"),
    "report out is the models file": (
        "overlap", "report", lambda w: ["--models-file", w.file("models.txt", "a=x\n"), "--out",
                                        str(w.tmp / "models.txt")], "is a file"),

    # -- settings that cannot mean what they say -----------------------------------------------
    "bfa fault bit 8 of int8 codes": (
        "setting", "bfa", lambda w: bfa(w, "--fault-bits", "8"), "int8 values have bits 0-7"),
    "tbfa fault bits 4-9 of int8 codes": (
        "setting", "tbfa", lambda w: tbfa(w, "--fault-bits", "4-9"), "bit position(s) 8-9"),
    "talbf fault bits outside int8": (
        "setting", "talbf", lambda w: talbf(w, "--fault-bits", "8"), "int8 values have bits 0-7"),
    "talbf page bytes without one flip per page": (
        "setting", "talbf", lambda w: talbf(w, "--page-bytes", "64"), "--page-bytes is the page"),
    "bfa fault bit 16 of fp16 values": (
        "setting", "bfa", lambda w: bfa(w, "--format", "fp16", "--fault-bits", "0,16"),
        "fp16 values have bits 0-15"),
    "bfa fault bits beyond every format": (
        "setting", "bfa", lambda w: bfa(w, "--fault-bits", "0-40"), "beyond every number format"),
    "bfa fault bits huge": (
        "setting", "bfa", lambda w: bfa(w, "--fault-bits", f"0-{HUGE}"), "beyond every"),
    "bfa fault bits reversed": ("setting", "bfa", lambda w: bfa(w, "--fault-bits", "3-1"),
                                "empty bit range"),
    "bfa fault bits words": ("setting", "bfa", lambda w: bfa(w, "--fault-bits", "msb"),
                             "numbers or ranges"),
    "bfa fault bits empty": ("setting", "bfa", lambda w: bfa(w, "--fault-bits", ""),
                             "numbers or ranges"),
    "bfa page size without the page rule": (
        "setting", "bfa", lambda w: bfa(w, "--page-bytes", "4096"), "--one-flip-per-page"),
    "tbfa page size without the page rule": (
        "setting", "tbfa", lambda w: tbfa(w, "--page-bytes", "512"), "--one-flip-per-page"),
    "bfa page size 3000": (
        "setting", "bfa", lambda w: bfa(w, "--one-flip-per-page", "--page-bytes", "3000"),
        "power of two"),
    "bfa page size 0": (
        "setting", "bfa", lambda w: bfa(w, "--one-flip-per-page", "--page-bytes", "0"),
        "--page-bytes"),
    "bfa page size 2": (
        "setting", "bfa", lambda w: bfa(w, "--one-flip-per-page", "--page-bytes", "2"),
        "--page-bytes"),
    "bfa page size 2**40": (
        "setting", "bfa", lambda w: bfa(w, "--one-flip-per-page", "--page-bytes", str(2 ** 40)),
        "--page-bytes"),
    "bfa empty profile": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file("p.txt", "")), "no cells"),
    "bfa profile of comments only": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file("p.txt", "# a\n\n# b\n")),
        "no cells"),
    "bfa profile with a header line": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file(
            "p.txt", "offset,bit,direction\n0 0 0to1\n")), "p.txt:1"),
    "bfa profile with bit 9 on line 3": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file(
            "p.txt", "0 0 0to1\n# c\n5 9 1to0\n")), "p.txt:3"),
    "bfa profile with an extra field": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file("p.txt", "0 0 0to1 x\n")),
        "p.txt:1"),
    "bfa profile with a bad direction": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file("p.txt", "0 0 up\n")),
        "p.txt:1"),
    "bfa profile with a negative offset": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file("p.txt", "-4 0 0to1\n")),
        "p.txt:1"),
    "bfa profile outside the weights": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", w.file(
            "p.txt", f"{10 ** 9} 0 0to1\n{HUGE} 3 1to0\n")), "none of the 2 cells"),
    "tbfa profile outside the weights": (
        "setting", "tbfa", lambda w: tbfa(w, "--fault-profile", w.file(
            "p.txt", f"{10 ** 9} 0 0to1\n")), "none of the 1 cells"),
    "bfa profile missing": (
        "setting", "bfa", lambda w: bfa(w, "--fault-profile", str(w.tmp / "none.txt")),
        "file not found"),
    "bfa flip budget 0": ("setting", "bfa", lambda w: bfa(w, "--flip-budget", "0"), "budget"),
    "talbf the same attack twice in the attacks file": (
        "setting", "talbf", lambda w: talbf(w, "--attacks-file", w.attacks(
            GOOD_ATTACK, {**GOOD_ATTACK, "target": 4}, GOOD_ATTACK)),
        "line 3 repeats the attack of line 1"),
    "talbf the same attack twice in the attack list": (
        "setting", "talbf", lambda w: talbf(w, "--attack_info", w.file("l.txt",
                                                                       "3 0\n4 0\n3.0 0\n")),
        "line 3 repeats the attack of line 1"),
    "tbfa sets with pairs": (
        "setting", "tbfa", lambda w: tbfa(w, "--sets", w.sets(), "--pairs", "3:5", plan=False),
        "--pairs"),
    "tbfa sets with avgs": (
        "setting", "tbfa", lambda w: tbfa(w, "--sets", w.sets(), "--avgs", "2"), "--avgs"),
    "tbfa sets with n-src and n-aux": (
        "setting", "tbfa", lambda w: tbfa(w, "--sets", w.sets(), "--n-src", "1", "--n-aux", "1"),
        "--n-src and --n-aux"),
    "tbfa sets with source range": (
        "setting", "tbfa", lambda w: tbfa(w, "--sets", w.sets(), "--source_start", "2"),
        "--source_start"),
    "tbfa sets repeating an experiment": (
        "setting", "tbfa", lambda w: tbfa(w, "--sets", w.file("s.json", {"experiments": [
            GOOD_SETS, {**GOOD_SETS, "rep": 0}]})), "repeats"),
    "tbfa pairs repeated": (
        "setting", "tbfa", lambda w: tbfa(w, "--pairs", "3:5,3:5", plan=False), "twice"),
    "tbfa source_end beyond the classes": (
        "setting", "tbfa", lambda w: tbfa(w, "--source_end", "40", "--n-src", "1", "--n-aux", "1",
                                          plan=False), "--source_end 40"),
    "tbfa avgs absurd": ("setting", "tbfa", lambda w: tbfa(w, "--avgs", str(HUGE)), "--avgs"),
    "bfa avgs absurd": ("setting", "bfa", lambda w: bfa(w, "--avgs", "100000"), "--avgs"),
    "bfa pinned indices with a sample size": (
        "setting", "bfa", lambda w: bfa(w, "--attack-indices", w.file("i.json", [0, 1])),
        "--attack_sample_size"),
    "bfa pinned batch with a sample size": (
        "setting", "bfa", lambda w: bfa(w, "--attack-batch", w.file("b.pt", "x")),
        "--attack_sample_size"),
    "main normalization in training": (
        "setting", "main", lambda w: train(w, "--normalization", "bfa"), "--normalization"),

    # -- damaged campaign state, huge or negative indices, undecodable text, odd paths ----------
    "tbfa campaign.json a list": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(**{"campaign.json": [1, 2]})),
        "a list"),
    "tbfa campaign.json a string": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(
            **{"campaign.json": '"tbfa"'})), "a string"),
    "tbfa campaign.json null": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(**{"campaign.json": "null"})),
        "null"),
    "tbfa campaign.json a number": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(**{"campaign.json": "7"})),
        "a number"),
    "tbfa campaign.json cut short": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(**{"campaign.json": '{"a": '})),
        "unreadable campaign.json"),
    "tbfa campaign.json not UTF-8": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(
            **{"campaign.json": b'{"a": "\xff"}'})), "unreadable campaign.json"),
    "tbfa campaign.json a folder": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(**{"campaign.json": None})),
        "campaign.json as a folder"),
    "tbfa results.jsonl a folder": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(**{"results.jsonl": None})),
        "results.jsonl as a folder"),
    "tbfa results.jsonl a folder, with --overwrite": (
        "state", "tbfa", lambda w: tbfa(w, "--overwrite", "--results", w.results(
            **{"campaign.json": {}, "results.jsonl": None})), "results.jsonl as a folder"),
    "tbfa rank file a folder": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(
            **{"results.rank1.jsonl": None})), "results.rank1.jsonl as a folder"),
    "tbfa tb a file": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(**{"tb": "x"})), "tb as a file"),
    "tbfa results.jsonl not UTF-8": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(
            **{"campaign.json": {}, "results.jsonl": b'{"key": "\xff"}\n'})), "not UTF-8"),
    "tbfa foreign results": (
        "state", "tbfa", lambda w: tbfa(w, "--results", w.results(
            **{"results.jsonl": '{"id": 1}\n'})), "without a campaign.json"),
    "talbf campaign.json a list": (
        "state", "talbf", lambda w: talbf(w, "--results", w.results(**{"campaign.json": []})),
        "a list"),
    "talbf results.jsonl not UTF-8": (
        "state", "talbf", lambda w: talbf(w, "--results", w.results(
            **{"campaign.json": {}, "results.jsonl": b"\xfe\n"})), "not UTF-8"),
    "bfa campaign.json a string": (
        "state", "bfa", lambda w: bfa(w, "--results", w.results(**{"campaign.json": '"x"'})),
        "a string"),
    "bfa results.jsonl a folder": (
        "state", "bfa", lambda w: bfa(w, "--results", w.results(**{"results.jsonl": None})),
        "results.jsonl as a folder"),
    "tbfa sets index huge": (
        "state", "tbfa", lambda w: tbfa(w, "--sets", w.sets(src=[HUGE])), "outside the test set"),
    "tbfa sets index negative": (
        "state", "tbfa", lambda w: tbfa(w, "--sets", w.sets(aux=[-1])), "outside the test set"),
    "tbfa sets class huge": (
        "state", "tbfa", lambda w: tbfa(w, "--sets", w.sets(target=HUGE)), "out of range"),
    "tbfa sets pa index huge": (
        "state", "tbfa", lambda w: tbfa(w, "--sets", w.sets(pa=[HUGE])), "outside the test set"),
    "tbfa sets a list": ("state", "tbfa", lambda w: tbfa(w, "--sets", w.file("s.json", [1])),
                         "not a pinned-sets file"),
    "tbfa sets null": ("state", "tbfa", lambda w: tbfa(w, "--sets", w.file("s.json", "null")),
                       "not a pinned-sets file"),
    "tbfa sets not UTF-8": (
        "state", "tbfa", lambda w: tbfa(w, "--sets", w.file("s.json", b"\xff{}")), "not UTF-8"),
    "tbfa pairs class huge": (
        "state", "tbfa", lambda w: tbfa(w, "--pairs", f"3:{HUGE}", plan=False), "out of range"),
    "talbf attacks idx huge": (
        "state", "talbf", lambda w: talbf(w, "--attacks-file", w.attacks(
            {**GOOD_ATTACK, "idx": HUGE})), "outside the test set"),
    "talbf attacks aux huge": (
        "state", "talbf", lambda w: talbf(w, "--attacks-file", w.attacks(
            {**GOOD_ATTACK, "aux_idx": [1, 2, 4, HUGE]})), "outside the test set"),
    "talbf attacks target negative": (
        "state", "talbf", lambda w: talbf(w, "--attacks-file", w.attacks(
            {**GOOD_ATTACK, "target": -1})), "target class -1"),
    "talbf attacks not UTF-8": (
        "state", "talbf", lambda w: talbf(w, "--attacks-file", w.file("a.jsonl", b"\xff\n")),
        "not UTF-8"),
    "talbf attack list index huge": (
        "state", "talbf", lambda w: talbf(w, "--attack_info", w.file("l.txt", f"3 {HUGE}\n")),
        "outside the test set"),
    "talbf attack list target negative": (
        "state", "talbf", lambda w: talbf(w, "--attack_info", w.file("l.txt", "-1 0\n")),
        "target class -1"),
    "talbf attack list not UTF-8": (
        "state", "talbf", lambda w: talbf(w, "--attack_info", w.file("l.txt", b"3 0\n\xff 1\n")),
        "not UTF-8"),
    "bfa attack indices huge": (
        "state", "bfa", lambda w: bfa(w, "--attack-indices", w.file("i.json", [0, HUGE]),
                                      sample=False), "outside"),
    "bfa attack indices negative": (
        "state", "bfa", lambda w: bfa(w, "--attack-indices", w.file("i.json", [-1]),
                                      sample=False), "non-negative"),
    "bfa attack indices not UTF-8": (
        "state", "bfa", lambda w: bfa(w, "--attack-indices", w.file("i.json", b"[\xff]"),
                                      sample=False), "not a JSON list"),
    "bfa profile not UTF-8": (
        "state", "bfa", lambda w: bfa(w, "--fault-profile", w.file("p.txt", b"0 0 0to1\n\xff\n")),
        "not UTF-8"),
    "report models file not UTF-8": (
        "state", "report", lambda w: ["--models-file", w.file("m.txt", b"a=x\n\xff=y\n"), "--out",
                                      str(w.tmp / "report")], "not UTF-8"),
    "report models file with a NUL in a folder": (
        "state", "report", lambda w: ["--models-file", w.file("m.txt", "a=x\0y\n"), "--out",
                                      str(w.tmp / "report")], "NUL"),
    "tbfa results under /proc": (
        "state", "tbfa", lambda w: tbfa(w, "--results", "/proc/bitflip_test/r"), "/proc"),
    "bfa results under /sys": ("state", "bfa", lambda w: bfa(w, "--results", "/sys/bitflip_r"),
                               "/sys"),
    "talbf save-attacks under /proc": (
        "state", "talbf", lambda w: talbf(w, "--save-attacks", "/proc/self/bitflip.jsonl"),
        "/proc"),
    "tbfa save-sets to /dev/null": (
        "state", "tbfa", lambda w: tbfa(w, "--save-sets", "/dev/null"), "/dev"),
    "main outdir under /proc": ("state", "main", lambda w: train(w, "--outdir", "/proc/bitflip"),
                                "/proc"),
    "report out under /sys": ("state", "report", lambda w: report(w, "--out", "/sys/bitflip"),
                              "/sys"),
    "tbfa results name not UTF-8": (
        "state", "tbfa", lambda w: tbfa(w, "--results", os.path.join(str(w.tmp), NOT_UTF8)),
        "not valid UTF-8"),
    "talbf save-attacks name not UTF-8": (
        "state", "talbf", lambda w: talbf(w, "--save-attacks", os.path.join(str(w.tmp), NOT_UTF8)),
        "not valid UTF-8"),
    "bfa results name not UTF-8": (
        "state", "bfa", lambda w: bfa(w, "--results", os.path.join(str(w.tmp), NOT_UTF8, "r")),
        "not valid UTF-8"),
    "main outdir name not UTF-8": (
        "state", "main", lambda w: train(w, "--outdir", os.path.join(str(w.tmp), NOT_UTF8)),
        "not valid UTF-8"),
    "report out name not UTF-8": (
        "state", "report", lambda w: report(w, "--out", os.path.join(str(w.tmp), NOT_UTF8)),
        "not valid UTF-8"),
    "tbfa checkpoint name not UTF-8": (
        "state", "tbfa", lambda w: tbfa(w, "--checkpoint", _link(w, NOT_UTF8, w.ckpt)),
        "not valid UTF-8"),
    "tbfa results empty path": ("state", "tbfa", lambda w: tbfa(w, "--results", ""), "empty"),
    "report out empty path": ("state", "report", lambda w: report(w, "--out", ""), "empty"),
    "bfa results is a file": (
        "state", "bfa", lambda w: bfa(w, "--results", w.file("f", "x")), "is a file"),
    "main outdir under a file": (
        "state", "main", lambda w: train(w, "--outdir", os.path.join(w.file("f", "x"), "run")),
        "is a file"),
    "main eval of a missing checkpoint": (
        "state", "main", lambda w: ["--eval", str(w.tmp / "none.pth.tar"), "--data_dir", w.data,
                                    "--device", "cpu"], "not found"),
}


def snapshot(*roots) -> dict:
    """Every file and folder below ``roots``: kind, size, modification time, and the bytes'
    SHA-256 of a file (the target of a symlink)."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for path in [folder] + [os.path.join(folder, n) for n in dirs + files]:
                st = os.lstat(path)
                entry = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
                if stat.S_ISREG(st.st_mode):
                    entry += (hashlib.sha256(Path(path).read_bytes()).hexdigest(),)
                elif stat.S_ISLNK(st.st_mode):
                    entry += (os.readlink(path),)
                state[path] = entry
    return state


def test_the_battery_is_large_and_covers_every_class_and_script():
    assert len(CASES) >= 100
    assert {kind for kind, *_ in CASES.values()} == {"flag", "overlap", "setting", "state"}
    assert {script for _, script, *_ in CASES.values()} == set(SCRIPTS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, workspace, tmp_path, monkeypatch, capsys, one_thread):
    _, script, build, expected = CASES[case]
    w = Ws(workspace, tmp_path / "case")
    w.tmp.mkdir()
    argv = build(w)
    monkeypatch.chdir(w.tmp)  # a relative default path would land here, and be seen
    before = snapshot(workspace, w.tmp)
    rc = run(SCRIPTS[script].main, argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in captured.err + captured.out
    assert expected in err, err
    assert snapshot(workspace, w.tmp) == before
