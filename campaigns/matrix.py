"""The defenses x attacks matrix: every defense under every attack and fault model, on one
protocol (docs/algorithms.md section 14; ``evaluate_defenses.py`` is its command).

A *row* is a defended model: a checkpoint (its training-time defenses are in it: OCM, piecewise
clustering, binarization) plus deployment-time defenses applied to it. A *column* is an attack
spec (``NAME[:key=value,...]``, :func:`attacks.base.create_attack`) under a named fault model
(:data:`utils.faults.FAULT_PRESETS`). Each *cell* is a campaign of the one runner
(:class:`campaigns.runner.CampaignRunner`) in ``<out>/cells/<row>/<attack>@<fault>/``: records
appended as items end, resumable after a kill, shared among torchrun processes. The cell's
outcome is its attack's :meth:`attacks.base.Attack.outcome` (ASR, PA-ACC and the flip count
named for what it counts, mean and spread). Per row, the worst case over the columns is the
number a paper should quote: the fewest flips among cells whose ASR reaches ``success_asr``,
and the highest PA-ACC among those.

Outputs (rank 0, atomically): ``matrix.csv`` (one line per cell), ``defenses.csv`` (one line per
row: clean accuracy, its cost against the baseline, stored bits per weight, inference time
against the same model undefended, the worst case), ``matrix.md`` and ``matrix.png`` (a
heatmap of flips, annotated with ASR).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace

import torch

from attacks.base import NotApplicable, Protocol, attack_class, attack_label, create_attack
from attacks.common import EvalSet
from attacks.target import AttackTarget, TargetSpec, build_target
from models.bits import bit_layers
from utils import distributed as dist
from utils.faults import fault_preset
from utils.specs import parse_spec

from .results import read_records, write_csv
from .runner import CampaignResults, CampaignRunner, log_to, merge_results, open_campaign

log = logging.getLogger(__name__)

# What defines a cell's campaign (its campaign.json): a folder holds one.
CELL_KEYS = ("attack", "spec", "row", "source", "defenses", "fault", "protocol", "settings",
             "dataset", "normalization")
SUCCESS_ASR = 90.0


@dataclass(frozen=True)
class DefenseRow:
    """One defended model: ``checkpoint`` plus deployment-time ``defenses`` (specs)."""

    name: str
    checkpoint: str
    defenses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    row: DefenseRow
    attack: str   # canonical spec (attacks.base.attack_label)
    fault: str    # a FAULT_PRESETS name

    @property
    def column(self) -> str:
        return f"{self.attack} @ {self.fault}"

    @property
    def folder(self) -> str:
        return os.path.join("cells", self.row.name, f"{_safe(self.attack)}@{self.fault}")


def _safe(text: str) -> str:
    """A spec as a folder name: ``tbfa_adaptive:loss=margin`` -> ``tbfa_adaptive.loss-margin``."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "-", text.replace(":", ".", 1).replace(",", "."))


@dataclass
class MatrixSpec:
    """Everything that defines a matrix (checked by :meth:`check` before anything runs)."""

    rows: list[DefenseRow]
    attacks: list[str]
    faults: list[str] = field(default_factory=lambda: ["none"])
    protocol: Protocol = field(default_factory=Protocol)
    target: TargetSpec = field(default_factory=TargetSpec)  # data, dataset, normalization...
    baseline: str | None = None   # the undefended row (default: the first)
    success_asr: float = SUCCESS_ASR
    all_pairs: bool = False       # no protocol.pairs: the data set's whole protocol

    def check(self) -> "MatrixSpec":
        """Raise ValueError for a spec that cannot run: no rows, a row name twice or unfit for
        a folder, an unknown baseline, attack, parameter, fault model or defense; returns the
        spec with canonical attack labels."""
        from defenses import parse_defense

        if not self.rows:
            raise ValueError("give at least one model (NAME=CHECKPOINT)")
        names = [r.name for r in self.rows]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"model name {n!r} is given twice: give each row its own name")
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", n):
                raise ValueError(f"model name {n!r}: use letters, digits and _ . + - only")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the models "
                             f"({', '.join(names)})")
        for row in self.rows:
            for d in row.defenses:
                defense = parse_defense(d)
                if defense.stage != "deployment":
                    raise ValueError(f"{defense.name} is a training-time defense: it is in the "
                                     f"checkpoint; only deployment-time defenses are added")
        if not self.attacks:
            raise ValueError("give at least one attack")
        labels = [attack_label(a) for a in self.attacks]
        for a in labels:
            if labels.count(a) > 1:
                raise ValueError(f"attack {a} is given twice")
        for f in self.faults:
            fault_preset(f)
        if len(set(self.faults)) < len(self.faults):
            raise ValueError("a fault model is given twice")
        return replace(self, attacks=labels)

    def with_pairs(self, num_classes: int, dataset: str) -> "MatrixSpec":
        """The spec with its targeted pairs checked against ``num_classes``; without given
        pairs, the data set's protocol (:func:`attacks.tbfa.protocol_pairs`), all of it with
        ``all_pairs``, else every second source with target s+1 (0:1, 2:3, ...: 5 pairs on
        10 classes, the quick start's)."""
        from attacks.tbfa import PROTOCOLS, protocol_pairs

        pairs = self.protocol.pairs
        for s, t in pairs:
            if not (0 <= s < num_classes and 0 <= t < num_classes) or s == t:
                raise ValueError(f"pair {s}:{t}: the classes must differ and lie in "
                                 f"0..{num_classes - 1}")
        if not pairs:
            every = protocol_pairs(PROTOCOLS.get(dataset, {"classes": num_classes})["classes"])
            pairs = tuple(every if self.all_pairs else every[1::4])
        return replace(self, protocol=replace(self.protocol, pairs=tuple(pairs)))

    @property
    def baseline_row(self) -> DefenseRow:
        name = self.baseline or self.rows[0].name
        return next(r for r in self.rows if r.name == name)

    def cells(self) -> list[Cell]:
        """Row-major: every row, every attack, every fault model."""
        return [Cell(r, a, f) for r in self.rows for a in self.attacks for f in self.faults]


def cell_target(spec: MatrixSpec, row: DefenseRow, fault: str, device) -> AttackTarget:
    """A fresh target for one cell (an attack may change its model, e.g. emit pre-activation
    outputs): the row's checkpoint and defenses under the cell's fault model."""
    return build_target(replace(spec.target, checkpoint=row.checkpoint,
                                defenses=tuple(spec.target.defenses) + row.defenses,
                                fault=fault_preset(fault)), device)


@dataclass
class CellPlan:
    """An opened cell: its campaign folder, every item, and the items not yet done."""

    results: CampaignResults
    items: list
    todo: list


class MatrixRunner:
    """Runs the cells of ``spec`` into ``out_dir`` (module docstring)."""

    _runs = 0  # matrices run in this process: each shares out its items with its own counter

    def __init__(self, spec: MatrixSpec, out_dir: str, device, progress: bool = True,
                 test_batch: int = 500):
        self.spec, self.out_dir, self.device = spec, out_dir, torch.device(device)
        self.progress, self.test_batch = progress, test_batch
        self._splits: dict[str, tuple] = {}

    # -- before anything is written ------------------------------------------------------------
    def prepare(self) -> None:
        """Build every row's target (checkpoints, defenses, data) and check every fault model
        against it, and resolve the targeted pairs (:meth:`MatrixSpec.with_pairs`, on the
        first row's classes): errors are raised here, before any file is written."""
        from utils.errors import UserError

        first = None
        for row in self.spec.rows:
            for fault in self.spec.faults:
                target = cell_target(self.spec, row, fault, self.device)
            self._split(row, target)
            first = first or target
        try:
            self.spec = self.spec.with_pairs(int(first.config.num_classes), first.dataset.name)
        except ValueError as e:
            raise UserError(str(e)) from None

    def _split(self, row: DefenseRow, target: AttackTarget) -> tuple:
        if row.name not in self._splits:
            self._splits[row.name] = target.load_test_split()
        return self._splits[row.name]

    # -- the cells -----------------------------------------------------------------------------
    def run(self) -> int:
        """Run every item not yet done, of every cell; write the tables. 130 when interrupted
        (every finished item is kept; the same command continues).

        First every process opens every cell's campaign (:meth:`open_cell`: its folder, what
        is done); then the items still to run, of all cells (those with the fewest items
        first), go one at a time to whichever process is free
        (:class:`utils.distributed.WorkCounter`), so that no process waits at a cell's end for
        another one; each process appends its records to the cells' rank files, and after the
        last item rank 0 merges them, in the campaign's order. A record does not depend on
        the process that ran it (each item's draws are seeded by its key)."""
        from tqdm import tqdm

        main_rank = dist.is_main()
        if main_rank:
            os.makedirs(self.out_dir, exist_ok=True)
            _write_json(os.path.join(self.out_dir, "matrix.json"), self.describe())
        cells = self.spec.cells()
        plans = [self.open_cell(cell) for cell in cells]
        # The cells with the fewest items first (theirs are the longest: a BFA run against a
        # T-BFA experiment against a TA-LBF sample), so that the last items are short and no
        # process finishes long before the others.
        order = sorted((i for i, plan in enumerate(plans) if plan),
                       key=lambda i: len(plans[i].items))
        todo = [(i, item) for i in order for item in plans[i].todo]
        counter = dist.WorkCounter(f"matrix-{MatrixRunner._runs}")
        MatrixRunner._runs += 1
        busy = {i for i, _ in todo}
        bar = tqdm(total=len(cells), initial=len(cells) - len(busy), desc="cells",
                   dynamic_ncols=True,
                   disable=not (self.progress and main_rank))
        running: tuple[int, CampaignRunner] | None = None
        started: set[int] = set()
        try:
            while (n := counter.next()) < len(todo):
                i, item = todo[n]
                if running is None or running[0] != i:
                    if running is not None:
                        running[1].close()
                    running = (i, self.cell_runner(cells[i], plans[i]))
                    if i not in started:  # cells started here (the others' show at the end)
                        started.add(i)
                        bar.update(1)
                    bar.set_postfix_str(f"{cells[i].row.name}: {cells[i].column}")
                running[1].run_item(item)
        except KeyboardInterrupt:
            bar.close()
            log.info("interrupted: finished items are kept in %s; run the same command again "
                     "to continue", self.out_dir)
            return 130
        finally:
            if running is not None:
                running[1].close()
        bar.update(len(cells) - bar.n)
        bar.close()
        for row in self.spec.rows[dist.rank()::dist.world_size()]:
            self.row_info(row)  # each process measures its share of the rows
        dist.barrier()  # every process's items are done
        if main_rank:
            for plan in plans:
                if plan:
                    merge_results(plan.results.results_dir, [it.key for it in plan.items])
            for row in self.spec.rows:
                self.row_info(row)
            paths = write_matrix(self.out_dir, self.spec)
            print(open(paths["md"], encoding="utf-8").read())
            print("matrix: " + ", ".join(paths[k] for k in ("md", "csv", "defenses", "png",
                                                            "curves")
                                         if paths.get(k)))
        return 0

    def _cell_attack(self, cell: Cell):
        """``(target, attack)`` of the cell, built afresh (the attack changes its model)."""
        target = cell_target(self.spec, cell.row, cell.fault, self.device)
        images, labels = self._split(cell.row, target)
        data = EvalSet(images, labels, target.mean, target.std, self.device, self.test_batch)
        return target, create_attack(cell.attack, target, data, self.spec.protocol)

    def open_cell(self, cell: Cell) -> "CellPlan | None":
        """Open the cell's campaign (every process, in the same order): its items and those not
        done. None, with a note in the cell's folder, when there is nothing to run: the attack
        does not apply to the row (``not_applicable.json``), or it is another column's attack
        on this row (``same_as.json``: :attr:`attacks.base.Attack.same_as`)."""
        folder = os.path.join(self.out_dir, cell.folder)
        try:
            target, attack = self._cell_attack(cell)
        except NotApplicable as e:
            if dist.is_main():
                os.makedirs(folder, exist_ok=True)
                _write_json(os.path.join(folder, "not_applicable.json"), {"reason": str(e)})
            return None
        same = attack.same_as and attack_label(attack.same_as)
        if same and same in self.spec.attacks and same != cell.attack:
            if dist.is_main():
                os.makedirs(folder, exist_ok=True)
                _write_json(os.path.join(folder, "same_as.json"), {
                    "same_as": same, "reason": f"{cell.attack} is {same} on {cell.row.name} "
                    f"({target.describe()}): the same objective and search"})
            return None
        items = attack.plan(self.spec.protocol)
        results = open_campaign(folder, self.cell_settings(cell, target, attack), CELL_KEYS)
        done = results.done()
        return CellPlan(results, items, [it for it in items if it.key not in done])

    def cell_runner(self, cell: Cell, plan: "CellPlan") -> CampaignRunner:
        """The cell's attack, built afresh, in a runner appending to the cell's folder (and
        logging to its ``attack.log``)."""
        target, attack = self._cell_attack(cell)
        log_to(plan.results.results_dir)
        log.info("%s on %s: %s; %d %s, %d done; results in %s", cell.column, cell.row.name,
                 target.describe(), len(plan.items), attack.noun.split()[-1],
                 len(plan.items) - len(plan.todo), plan.results.results_dir)
        return CampaignRunner(plan.results, attack, plan.items, progress=False, todo=[])

    def cell_settings(self, cell: Cell, target: AttackTarget, attack) -> dict:
        return {"attack": attack.name, "spec": cell.attack, "row": cell.row.name,
                "source": target.source, "defenses": target.deployment_record(),
                "fault": cell.fault, "protocol": self.spec.protocol.to_dict(),
                "settings": attack.settings(), "dataset": target.dataset.name,
                "normalization": target.normalization_record(),
                "number_format": target.number_format or None}

    # -- per row: accuracy and overheads, measured once ----------------------------------------
    def row_info(self, row: DefenseRow) -> dict:
        """Clean accuracy, stored bits per weight, inference time against the same model
        without its deployment-time defenses; measured once, kept in ``rows/<name>.json``."""
        path = os.path.join(self.out_dir, "rows", f"{row.name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        target = cell_target(self.spec, row, "none", self.device)
        images, labels = self._split(row, target)
        data = EvalSet(images, labels, target.mean, target.std, self.device, self.test_batch)
        evaluated = target.eval_model or target.model
        info = {"name": row.name, "checkpoint": row.checkpoint, "defenses": list(row.defenses),
                "describe": target.describe(),
                "clean_acc": data.accuracy(evaluated, target.output),
                "bits_per_weight": stored_bits_per_weight(target),
                "inference_ratio": (inference_ratio(target, data) if row.defenses else 1.0)}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_json(path, info)
        return info

    def describe(self) -> dict:
        s = self.spec
        return {"rows": [vars(r) | {"defenses": list(r.defenses)} for r in s.rows],
                "attacks": s.attacks, "faults": s.faults, "protocol": s.protocol.to_dict(),
                "baseline": s.baseline_row.name, "success_asr": s.success_asr}


def stored_bits_per_weight(target: AttackTarget) -> float:
    """Bits stored per weight of the attacked layers: the format's, or with deployment-time
    defenses what they store (:meth:`defenses.base.DeploymentDefense.memory_per_weight`:
    codewords, signatures)."""
    layers = bit_layers(target.model)
    total = sum(l.weight.numel() for _, l in layers)
    plain = sum(l.weight.numel() * getattr(l, "n_bits", l.bit_format.n_bits)
                for _, l in layers) / max(total, 1)
    extra = 0.0
    for d in target.defenses:
        if d.stage == "deployment":
            defended, undefended = d.memory_per_weight(target.model)
            extra += defended - undefended
    return plain + extra


@torch.inference_mode()
def inference_ratio(target: AttackTarget, data: EvalSet, images: int = 1000,
                    repeats: int = 3) -> float:
    """Time of a forward pass over ``images`` test images through the defenses' check, over the
    same without it (the faster of ``repeats`` runs each, in this process)."""
    x = data.inputs(torch.arange(min(images, len(data)), device=data.device))
    plain, defended = target.model, target.eval_model or target.model

    def best(model) -> float:
        model.eval()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(x), data.batch_size):
                model(x[i:i + data.batch_size])
            times.append(time.perf_counter() - t0)
        return min(times)

    best(plain)  # warm-up
    return best(defended) / best(plain)


# ---------------------------------------------------------------------------------------------
# Reading the cells and writing the tables
# ---------------------------------------------------------------------------------------------

def cell_outcome(out_dir: str, cell: Cell) -> dict | None:
    """The cell's outcome (:meth:`attacks.base.Attack.outcome`), ``{"applicable": False}``, or
    None when it has no records yet; a cell whose attack is another column's on this row
    (``same_as.json``) has that cell's outcome, with ``same_as`` naming it."""
    folder = os.path.join(out_dir, cell.folder)
    if os.path.exists(os.path.join(folder, "not_applicable.json")):
        return {"applicable": False}
    same = os.path.join(folder, "same_as.json")
    if os.path.exists(same):
        with open(same, encoding="utf-8") as f:
            other = json.load(f)["same_as"]
        o = cell_outcome(out_dir, replace(cell, attack=other))
        return o and {**o, "same_as": other}
    if not os.path.isdir(folder):
        return None
    records = read_records(folder)
    if not records:
        return None
    name, _ = parse_spec(cell.attack)
    return {"applicable": True, **attack_class(name).outcome(records)}


def worst_case(outcomes: list[tuple[Cell, dict]], success_asr: float) -> dict:
    """Fewest flips among the cells whose ASR reaches ``success_asr`` and the highest PA-ACC
    among them (None when no attack succeeds)."""
    ok = [(c, o) for c, o in outcomes if o and o.get("applicable")
          and _num(o.get("asr")) is not None and o["asr"] >= success_asr
          and _num(o.get("flips")) is not None]
    out = {"worst_flips": None, "worst_flips_cell": None, "worst_pa_acc": None,
           "worst_pa_acc_cell": None, "successful_cells": len(ok)}
    if ok:
        c, o = min(ok, key=lambda co: co[1]["flips"])
        out["worst_flips"], out["worst_flips_cell"] = o["flips"], c.column
        with_pa = [(c, o) for c, o in ok if _num(o.get("pa_acc")) is not None]
        if with_pa:
            c, o = max(with_pa, key=lambda co: co[1]["pa_acc"])
            out["worst_pa_acc"], out["worst_pa_acc_cell"] = o["pa_acc"], c.column
    return out


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def matrix_tables(out_dir: str, spec: MatrixSpec) -> tuple[list[dict], list[dict]]:
    """``(cells, rows)``: one dict per cell and one per row (with its worst case)."""
    rows_info = {}
    for row in spec.rows:
        path = os.path.join(out_dir, "rows", f"{row.name}.json")
        with open(path, encoding="utf-8") as f:
            rows_info[row.name] = json.load(f)
    base_acc = rows_info[spec.baseline_row.name]["clean_acc"]
    cells, rows = [], []
    for row in spec.rows:
        outcomes = []
        for cell in (c for c in spec.cells() if c.row == row):
            o = cell_outcome(out_dir, cell)
            outcomes.append((cell, o))
            entry = {"model": row.name, "attack": cell.attack, "fault": cell.fault}
            if o is None or not o.get("applicable"):
                entry["status"] = "not run" if o is None else "not applicable"
            else:
                entry["status"] = "done"
                entry.update({k: v for k, v in o.items() if k != "applicable"})
            cells.append(entry)
        info = rows_info[row.name]
        rows.append({"model": row.name, "checkpoint": row.checkpoint,
                     "defenses": " ".join(row.defenses), "clean_acc": info["clean_acc"],
                     "clean_cost": base_acc - info["clean_acc"],
                     "bits_per_weight": info["bits_per_weight"],
                     "inference_ratio": info["inference_ratio"],
                     **worst_case(outcomes, spec.success_asr)})
    return cells, rows


def _fmt(mean, std=None, digits: int = 1) -> str:
    if _num(mean) is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if _num(std) is not None else "")


def format_matrix(cells: list[dict], rows: list[dict], spec: MatrixSpec) -> str:
    """The markdown of ``matrix.md``: the defenses with their cost and worst case, then the
    flips (with ASR) and the PA-ACC of every cell."""
    by = {(c["model"], c["attack"], c["fault"]): c for c in cells}
    lines = [f"Worst case per defense: the fewest flips among the attacks with ASR >= "
             f"{spec.success_asr:g} %, and the highest PA-ACC among them.", "",
             "| model | defenses | clean % | cost (points) | bits/weight | inference x | "
             "worst-case flips | by | worst-case PA-ACC % | by |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['defenses'] or '—'} | {r['clean_acc']:.2f} | "
                     f"{r['clean_cost']:+.2f} | {r['bits_per_weight']:.2f} | "
                     f"{r['inference_ratio']:.2f} | {_fmt(r['worst_flips'])} | "
                     f"{r['worst_flips_cell'] or '—'} | {_fmt(r['worst_pa_acc'], digits=2)} | "
                     f"{r['worst_pa_acc_cell'] or '—'} |")
    counts = sorted({f"{c['attack'].split(':')[0]}: {c['count']}" for c in cells
                     if c.get("count")})
    for fault in spec.faults:  # one pair of tables per fault model, a column per attack
        for title, show in (("flips, mean ± std (ASR %)", _flips_cell),
                            ("PA-ACC %, mean ± std", _pa_cell)):
            lines += ["", f"**{title}; fault model {fault}**", "",
                      "| model | " + " | ".join(spec.attacks) + " |",
                      "|---|" + "---:|" * len(spec.attacks)]
            for r in rows:
                lines.append(f"| {r['model']} | " + " | ".join(
                    show(by.get((r["model"], a, fault))) for a in spec.attacks) + " |")
    lines += ["", "Flips count: " + "; ".join(counts) + " (iterations: one bit each; "
              "bits_changed: Hamming distance to the clean weights; bits_flipped: to chance "
              "accuracy, over the runs that reached it)."]
    if any(c.get("same_as") for c in cells):
        lines += ["", "= NAME: on this model the attack is NAME (the same objective and "
                  "search, nothing of a defense to adapt to): NAME's cell, run once."]
    return "\n".join(lines) + "\n"


def _flips_cell(c: dict | None) -> str:
    if c is None or c["status"] != "done":
        return "n/a" if c and c["status"] == "not applicable" else "—"
    return (f"{_fmt(c['flips'], c['flips_std'])} ({_fmt(c['asr'], digits=0)})"
            + _same_mark(c))


def _pa_cell(c: dict | None) -> str:
    if c is None or c["status"] != "done":
        return "n/a" if c and c["status"] == "not applicable" else "—"
    return _fmt(c.get("pa_acc"), c.get("pa_acc_std"), digits=2) + _same_mark(c)


def _same_mark(c: dict) -> str:
    return f" = {c['same_as'].split(':')[0]}" if c.get("same_as") else ""


def write_matrix(out_dir: str, spec: MatrixSpec) -> dict:
    """Write matrix.csv, defenses.csv, matrix.md and matrix.png; returns their paths."""
    cells, rows = matrix_tables(out_dir, spec)
    paths = {"csv": os.path.join(out_dir, "matrix.csv"),
             "defenses": os.path.join(out_dir, "defenses.csv"),
             "md": os.path.join(out_dir, "matrix.md")}
    write_csv(paths["csv"], [_flat(c) for c in cells])
    write_csv(paths["defenses"], rows)
    _write_text(paths["md"], format_matrix(cells, rows, spec))
    png = heatmap(cells, rows, spec, os.path.join(out_dir, "matrix.png"))
    if png:
        paths["png"] = png
        paths["curves"] = success_figure(out_dir, spec, os.path.join(out_dir,
                                                                     "success_vs_flips.png"))
    return paths


_CELL_FIELDS = ("model", "attack", "fault", "status", "n", "asr", "asr_std", "pa_acc",
                "pa_acc_std", "count", "flips", "flips_std", "same_as")


def _flat(c: dict) -> dict:
    return {k: c.get(k) for k in _CELL_FIELDS}


def heatmap(cells: list[dict], rows: list[dict], spec: MatrixSpec, path: str) -> str | None:
    """Flips per cell (log colour scale; grey: not run or not applicable), annotated with the
    flips and the ASR; None without matplotlib."""
    from .report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np

    columns = [(a, f) for a in spec.attacks for f in spec.faults]
    by = {(c["model"], c["attack"], c["fault"]): c for c in cells}
    grid = np.full((len(rows), len(columns)), np.nan)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(columns), 2.4 + 0.5 * len(rows)))
    for i, r in enumerate(rows):
        for j, (a, f) in enumerate(columns):
            c = by.get((r["model"], a, f))
            if c and c["status"] == "done" and _num(c.get("flips")) is not None:
                grid[i, j] = math.log10(max(c["flips"], 1.0))
                text = f"{c['flips']:.1f}\n{c['asr']:.0f}%"
            elif c and c["status"] == "done":
                text = f"none\n{c['asr']:.0f}%"   # no item succeeded
            else:
                text = "n/a" if c and c["status"] == "not applicable" else "—"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black",
                    bbox={"facecolor": "white", "alpha": 0.6, "pad": 1, "linewidth": 0})
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([f"{a}\n@{f}" for a, f in columns], rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["model"] for r in rows], fontsize=8)
    fig.colorbar(image, ax=ax, label="log10 flips", shrink=0.8)
    ax.set_title("flips per cell (ASR below; more flips = harder to attack)", fontsize=9)
    return _save_figure(plt, fig, path)


def success_curves(out_dir: str, spec: MatrixSpec, row: DefenseRow, fault: str = "none"
                   ) -> list[tuple[str, list[int], list[float]]]:
    """Per attack on ``row`` under ``fault``: ``(attack, k, % of items that succeeded with at
    most k flips)`` for k = 0 .. the largest count (the OCM supplement's Figure 1 as a
    cumulative success rate)."""
    curves = []
    for attack in spec.attacks:
        folder = os.path.join(out_dir, Cell(row, attack, fault).folder)
        records = read_records(folder) if os.path.isdir(folder) else []
        if not records:
            continue
        cls = attack_class(parse_spec(attack)[0])
        counts = sorted(r[cls.count] for r in records if cls.succeeded(r)
                        and r.get(cls.count) is not None)
        top = max([r.get(cls.count) or 0 for r in records] + [1])
        ks = list(range(0, top + 1))
        curves.append((attack, ks, [100.0 * sum(c <= k for c in counts) / len(records)
                                    for k in ks]))
    return curves


def success_figure(out_dir: str, spec: MatrixSpec, path: str) -> str | None:
    """One panel per row: the success rate against the flips, a line per attack (fault model
    ``none``); None without matplotlib."""
    from .report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    n = len(spec.rows)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False, sharey=True)
    colour = {a: f"C{i % 10}" for i, a in enumerate(spec.attacks)}  # one per attack, every panel
    drawn: dict[str, object] = {}
    for ax, row in zip(axes[0], spec.rows):
        for attack, ks, rate in success_curves(out_dir, spec, row):
            drawn[attack], = ax.step(ks, rate, where="post", label=attack, linewidth=1.2,
                                     color=colour[attack])
        ax.set_title(row.name, fontsize=9)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("bit-flips (each attack's count)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("succeeded within k flips (%)", fontsize=8)
    if drawn:
        names = [a for a in spec.attacks if a in drawn]
        fig.legend([drawn[a] for a in names], names, loc="lower center", ncol=len(names),
                   fontsize=7, frameon=False)
    return _save_figure(plt, fig, path, rect=(0, 0.08, 1, 1))


def _save_figure(plt, fig, path: str, rect=(0, 0, 1, 1)) -> str:
    """``fig`` as a PNG at ``path`` (its axes laid out within ``rect``), written atomically;
    returns the path."""
    fig.tight_layout(rect=rect)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1) + "\n")
