"""The paper's table and the supplement's figures from attack result folders (docs/algorithms.md sections 6-9).

A *model folder* is a training run folder (``main.py --outdir``) holding the attack results the
attack scripts write beside the checkpoint by default:

- ``attack_tbfa/results.jsonl`` (and ``results.rank<r>.jsonl`` of a multi-process campaign not
  yet merged): stealthy T-BFA, one line per experiment (docs/algorithms.md section 7); with
  ``--curve-every 1`` each line has ``curve`` = [{iterations, asr, asr_src, pa_acc}, ...];
- ``attack_talbf/results.jsonl``: stealthy TA-LBF, one line per attacked sample (docs/algorithms.md section 8);
- any other campaign folder below it (``campaign.json`` + ``results.jsonl``) of a registered
  attack (:mod:`attacks.base`): BFA and random flips (docs/algorithms.md section 6), e.g.
  ``attack_bfa/``, ``attack_bfa_random/`` or ``attack_bfa/seed1/``, one line per repetition;
  an attack registered later gets a table of its own (its ``columns``) with no edit here;
- BFA runs of earlier versions (``profile.csv`` + ``summary.json``) read as one repetition.

Records of earlier versions read with this version's field names
(:func:`campaigns.results.upgrade_record`).

:func:`load_model` reads one folder with :func:`campaigns.results.read_records` (read-only: a
corrupt line is reported with its file and line number and skipped, never rewritten; a key found
in several results files counts once, the first occurrence winning); the record fields read are
named in campaigns/results.py (:data:`~campaigns.results.TBFA`, :data:`~campaigns.results.TALBF`).
:func:`table_rows` gives one row per model (mean and sample std over experiments, published
values of docs/algorithms.md section 9 beside ours); :func:`asr_budget_curve` is the
supplement's Figure 1 statistic and :func:`write_report` writes everything::

    from campaigns.report import load_model, write_report, PUBLISHED
    models = [load_model("vanilla", "runs/paper/cifar10/vanilla"),
              load_model("ocm16", "runs/paper/cifar10/ocm16")]
    report = write_report(models, "runs/paper/cifar10/report", published=PUBLISHED["cifar10"])
    report.missing, report.figures     # what was missing; {png path: lines drawn}
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field

from attacks import attack_class, list_attacks
from utils.errors import UserError

from .results import (ATTACK, BFA, CURVE, KEY, MERGED, TBFA, mean_std, read_records,
                      record_attack, results_files, successful, upgrade_record, write_csv)

log = logging.getLogger(__name__)

# docs/algorithms.md section 9: 8-bit ResNet-20 on CIFAR-10, from the supplement (sections 5 and 6). Keys are
# the model labels the scripts use; a metric the paper does not give is absent.
PUBLISHED = {
    "cifar10": {
        "vanilla": {"tbfa_pa_acc": 84.38},
        "pc": {"tbfa_pa_acc": 76.78},
        "ocm16": {"tbfa_iterations": 95.7, "tbfa_pa_acc": 53.22, "talbf_bits_changed": 31.1,
                  "talbf_pa_acc": 86.5},
        "ocm64": {"tbfa_iterations": 281.8, "tbfa_pa_acc": 46.39},
        "ocm16_pc": {"tbfa_pa_acc": 47.88},
        "mixup": {"tbfa_iterations": 28.9, "tbfa_pa_acc": 68.2, "talbf_bits_changed": 5.7,
                  "talbf_pa_acc": 89.5},
        "manifold_mixup": {"tbfa_iterations": 52.3, "tbfa_pa_acc": 67.5,
                           "talbf_bits_changed": 7.6,
                           "talbf_pa_acc": 86.6},
    },
}

# Names as the paper prints them; other labels are shown as given.
DISPLAY_NAMES = {
    "vanilla": "vanilla", "pc": "piecewise clustering", "ocm16": "OCM16", "ocm64": "OCM64",
    "ocm16_pc": "OCM16 + PC", "mixup": "mixup", "manifold_mixup": "manifold mixup",
    "ocm128": "OCM128", "ocm256": "OCM256", "ocm1024": "OCM1024", "ocm2048": "OCM2048",
    "binarized": "binarized",
}

TBFA_DIR, TALBF_DIR = "attack_tbfa", "attack_talbf"

# The paper table's two column groups and the untargeted attacks of the BFA table; a campaign of
# any other registered attack gets a table of its own (its class's ``columns``).
PAPER_ATTACKS = ("tbfa", "talbf")
FLIP_ATTACKS = ("bfa", "random")


def _columns(name: str) -> tuple:
    """``(column key, metric, heading)`` of a registered attack's report columns."""
    return tuple((f"{name}_{metric}", metric, head) for metric, head in attack_class(name).columns)


# (column key, field of the records, heading) of the main table, in order; the fields are
# defined (and what each counts said) in campaigns/results.py and the classes of attacks/.
TBFA_METRICS, TALBF_METRICS = _columns("tbfa"), _columns("talbf")


def display_name(label: str) -> str:
    """The paper's name of a label; ``LABEL@TAG`` (the same model in another setting, e.g.
    ``vanilla@page``) shows as LABEL's name: the setting itself is read from the results."""
    base = label.split("@", 1)[0] or label
    return DISPLAY_NAMES.get(base, base)


# ---------------------------------------------------------------------------------------------
# Reading result folders (never writing them)
# ---------------------------------------------------------------------------------------------

@dataclass
class BFARun:
    """One BFA or random-flip repetition: ``accuracy[f]`` = test accuracy (%) after ``f``
    flipped bits (from the record's profile)."""

    folder: str
    attack: str                 # "bfa" or "random"
    clean_accuracy: float
    accuracy: list[float]
    bits_flipped: int
    iterations: int
    stopped_by: str
    number_format: str = ""     # the attacked weights' format ("" in records before it)
    fault: str = "none"         # the fault model's label (utils.faults.FaultModel.label)

    @classmethod
    def from_record(cls, record: dict, folder: str) -> "BFARun":
        clean = float(record[BFA.clean_acc])
        acc = {0: clean}
        for row in record.get(BFA.profile) or []:
            acc[int(row["flip"])] = float(row["accuracy"])
        curve, value = [], clean
        for f_ in range(max(acc) + 1):  # a missing count (multi-bit iteration) keeps the last
            value = acc.get(f_, value)
            curve.append(value)
        return cls(folder, record_attack(record) or "bfa", clean, curve,
                   int(record.get(BFA.bits_flipped, max(acc))),
                   int(record.get(BFA.iterations, max(acc))), str(record.get(BFA.stopped_by, "?")),
                   str(record.get(BFA.number_format) or ""),
                   fault_label(record.get(BFA.fault_model)))


def fault_label(fault: dict | None) -> str:
    """Short name of a recorded fault model (``none`` for an unconstrained attack)."""
    from utils.faults import FaultModel

    try:
        return FaultModel.from_dict(fault).label() if fault else "none"
    except (TypeError, ValueError):
        return "unknown"


def read_legacy_bfa_run(folder: str, problems: list[str]) -> dict | None:
    """A BFA run of an earlier version (``summary.json`` + ``profile.csv``, before BFA had
    campaigns) as a record of this version, or None when unreadable (said in ``problems``)."""
    summary_path = os.path.join(folder, "summary.json")
    if not os.path.exists(summary_path):
        problems.append(f"{folder}: profile.csv without summary.json (a run of an earlier "
                        f"version still going, or killed): run skipped")
        log.warning("%s", problems[-1])
        return None
    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        float(summary["clean_accuracy"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{summary_path}: unreadable BFA summary ({type(e).__name__}), run skipped")
        log.warning("%s", problems[-1])
        return None
    path, profile = os.path.join(folder, "profile.csv"), []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            try:
                profile.append({"flip": int(row["flip"]), "accuracy": float(row["accuracy"])})
            except (KeyError, TypeError, ValueError):
                problems.append(f"{path}:{number}: corrupt profile row skipped")
                log.warning("%s", problems[-1])
    last = max([0] + [r["flip"] for r in profile])
    kind = summary.get("attack") or ("random" if "random" in folder else "bfa")
    return upgrade_record({
        KEY: "r0", ATTACK: kind, BFA.clean_acc: float(summary["clean_accuracy"]),
        "bit_flips": summary.get("bit_flips", last), BFA.iterations: summary.get("iterations", last),
        BFA.stopped_by: summary.get("stopped_by", "?"),
        BFA.number_format: summary.get("number_format") or "",
        BFA.fault_model: summary.get("fault_model"), BFA.profile: profile})


@dataclass
class ModelResults:
    """Everything found in one model folder; ``missing`` says what was not there."""

    label: str
    folder: str
    records: dict = field(default_factory=dict)   # attack name -> [(results folder, record)]
    dataset: str | None = None
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tbfa_setting: str = ""      # the T-BFA campaign's format / fault model when not the default

    def of(self, attack: str) -> list[dict]:
        """The records of one registered attack found in the folder."""
        return [r for _, r in self.records.get(attack, [])]

    @property
    def tbfa(self) -> list[dict]:
        return self.of("tbfa")

    @property
    def talbf(self) -> list[dict]:
        return self.of("talbf")

    @property
    def bfa(self) -> list[BFARun]:
        """The BFA and random-flip repetitions, as curves."""
        return [BFARun.from_record(r, where) for name in FLIP_ATTACKS
                for where, r in self.records.get(name, [])]

    @property
    def name(self) -> str:
        """The paper's name of the label, with the T-BFA campaign's number format and fault
        model when they are not the defaults, e.g. ``Vanilla [1/page]``."""
        return display_name(self.label) + (f" [{self.tbfa_setting}]" if self.tbfa_setting else "")

    def clean_acc(self) -> tuple[float, float]:
        """Clean test accuracy of the integer-mode model, as the attack scripts measured it."""
        for name in list(PAPER_ATTACKS) + [n for n in self.records if n not in PAPER_ATTACKS]:
            values = [r["clean_acc"] for r in self.of(name) if r.get("clean_acc") is not None]
            if values:
                return mean_std(values)
        return float("nan"), float("nan")


def _campaign(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "campaign.json"), encoding="utf-8") as f:
            settings = json.load(f)
        return settings if isinstance(settings, dict) else {}
    except (OSError, ValueError):
        return {}


def _campaign_dataset(folder: str) -> str | None:
    return _campaign(folder).get("dataset")


def _campaign_setting(folder: str) -> str:
    """``"<format>, <fault model>"`` of a campaign, the defaults left out ("" for both)."""
    settings = _campaign(folder)
    parts = [settings["number_format"]] if settings.get("number_format") else []
    if settings.get("fault"):
        parts.append(fault_label(settings["fault"]))
    return ", ".join(parts)


ATTACKS = tuple(list_attacks())


def _add(m: ModelResults, where: str, records: list[dict], default: str | None) -> None:
    for r in records:
        name = record_attack(r) or default
        if name is not None:
            m.records.setdefault(name, []).append((where, r))


def _read_paper_attacks(m: ModelResults, dirs: dict, expect) -> None:
    """T-BFA and TA-LBF: their records from their folder only (``--tbfa-dir``, ...)."""
    for name in PAPER_ATTACKS:
        cls = attack_class(name)
        results_dir = os.path.join(m.folder, dirs.get(name) or cls.results_dir)
        path = os.path.join(results_dir, MERGED)
        if not results_files(results_dir):
            if name in expect:
                m.missing.append(f"{m.label}: no {cls.noun.split()[0]} results ({path}; run "
                                 f"attack_{name}.py --checkpoint ...)")
            continue
        records = read_records(results_dir, m.problems)
        _add(m, results_dir, records, name)
        m.dataset = m.dataset or _campaign_dataset(results_dir)
        if name == "tbfa":
            m.tbfa_setting = _campaign_setting(results_dir)
        if not records:
            m.missing.append(f"{m.label}: {path} holds no complete {cls.noun.split()[0]} result")


def _walk_other_attacks(m: ModelResults, skip: set[str]) -> None:
    """Every other campaign folder below the model folder (any registered attack, e.g.
    ``attack_bfa/``, ``attack_bfa_random/``, ``attack_bfa/seed1/``) and BFA runs of earlier
    versions (``profile.csv`` + ``summary.json``)."""
    for root, dirs, files in os.walk(m.folder):
        dirs.sort()
        if os.path.abspath(root) in skip:
            continue
        if results_files(root):
            records = read_records(root, m.problems)
            default = _campaign(root).get(ATTACK)
            _add(m, root, [r for r in records
                           if (record_attack(r) or default) not in PAPER_ATTACKS], default)
            m.dataset = m.dataset or _campaign_dataset(root)
        elif "profile.csv" in files:
            record = read_legacy_bfa_run(root, m.problems)
            if record is not None:
                _add(m, root, [record], "bfa")


def load_model(label: str, folder: str, tbfa_dir: str = TBFA_DIR, talbf_dir: str = TALBF_DIR,
               expect: tuple = ATTACKS, curves: bool = True) -> ModelResults:
    """Read the results of every registered attack in one model folder (see the module
    docstring); T-BFA or TA-LBF of ``expect`` without results is listed in ``missing``, and so
    are T-BFA results without per-flip curves when ``curves`` (the figures) are wanted."""
    m = ModelResults(label, folder)
    if not os.path.isdir(folder):
        m.missing.append(f"{label}: folder {folder} does not exist")
        return m
    dirs = {"tbfa": tbfa_dir, "talbf": talbf_dir}
    _read_paper_attacks(m, dirs, expect)
    if curves and m.tbfa and not any(r.get(TBFA.curve) for r in m.tbfa):
        m.missing.append(f"{label}: the T-BFA results have no per-flip curves (run "
                         f"attack_tbfa.py with --curve-every 1): Figures 1 and 2 leave it out")
    _walk_other_attacks(m, {os.path.abspath(os.path.join(folder, d)) for d in dirs.values()})
    return m


def parse_model_specs(specs: list[str], base: str | None = None) -> list[tuple[str, str]]:
    """``["label=folder", ...]`` as pairs; a relative folder is taken relative to ``base``."""
    pairs, seen = [], set()
    for spec in specs:
        label, sep, folder = spec.partition("=")
        label, folder = label.strip(), folder.strip()
        if not sep or not label or not folder:
            raise UserError(f"model {spec!r} is not LABEL=FOLDER (e.g. ocm16=runs/paper/ocm16)")
        if label in seen:
            raise UserError(f"model label {label!r} is given twice: labels must be unique")
        seen.add(label)
        if base is not None and not os.path.isabs(folder):
            folder = os.path.join(base, folder)
        pairs.append((label, folder))
    return pairs


def read_models_file(path: str) -> list[tuple[str, str]]:
    """A manifest: one ``label=folder`` per line (``#`` comments; folders relative to it)."""
    from utils.textfiles import read_text

    try:
        text = read_text(path, "the models file")
    except ValueError as e:
        raise UserError(str(e)) from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    return parse_model_specs([ln for ln in lines if ln],
                             base=os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------------------------------------
# The table (docs/algorithms.md section 9)
# ---------------------------------------------------------------------------------------------

def table_rows(models: list[ModelResults], published: dict | None = None) -> list[dict]:
    """One row per model: ``<key>_mean``, ``<key>_std``, ``<key>_n`` for the clean accuracy and
    every metric of T-BFA and TA-LBF, ``<key>_paper`` where ``published`` has the value.

    T-BFA: mean and sample std over experiments. TA-LBF: ASR over every attack, PA-ACC and
    # bit-flips over the successful ones (docs/algorithms.md section 8,
    :func:`campaigns.results.talbf_summary`)."""
    rows = []
    for m in models:
        row = {"model": m.label, "name": m.name}
        row["clean_acc_mean"], row["clean_acc_std"] = m.clean_acc()
        row["tbfa_n"] = len(m.tbfa)
        row["talbf_n"], row["talbf_successes"] = len(m.talbf), len(successful(m.talbf))
        for name, metrics in (("tbfa", TBFA_METRICS), ("talbf", TALBF_METRICS)):
            stats = summary_stats(name, m.of(name))
            for key, metric, _ in metrics:
                row[f"{key}_mean"], row[f"{key}_std"] = stats[metric]
        for key in ("tbfa_iterations", "tbfa_pa_acc", "talbf_bits_changed", "talbf_pa_acc"):
            value = (published or {}).get(m.label, {}).get(key)
            row[f"{key}_paper"] = value if value is not None else ""
        rows.append(row)
    return rows


def summary_stats(name: str, records: list[dict]) -> dict:
    """``metric -> (mean, std)`` by the attack's own summary rule (:meth:`Attack.summary`:
    e.g. TA-LBF's PA-ACC over its successful attacks only, docs/algorithms.md section 8)."""
    cls = attack_class(name)
    stats = {r["metric"]: (r["mean"], r["std"]) for r in cls.summary(records)}
    for metric, _ in cls.columns:
        stats.setdefault(metric, mean_std([r.get(metric) for r in records]))
    return stats


def _pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.2f} ± {std:.2f}"


def format_markdown_table(rows: list[dict], published: bool = True) -> str:
    """The paper-style table: ours as mean ± std, the published value in the column after."""
    heads = ["model", "clean %", "T-BFA exp."]
    for group, metrics in (("T-BFA", TBFA_METRICS), ("TA-LBF", TALBF_METRICS)):
        if group == "TA-LBF":
            heads.append("TA-LBF attacks")
        for key, _, head in metrics:
            heads.append(f"{group} {head}")
            if published and key != f"{group.lower().replace('-', '')}_asr":
                heads.append("paper")
    lines = ["| " + " | ".join(heads) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
    for r in rows:
        cells = [r["name"], _pm(r["clean_acc_mean"], r["clean_acc_std"]), str(r["tbfa_n"])]
        for group, metrics in (("tbfa", TBFA_METRICS), ("talbf", TALBF_METRICS)):
            if group == "talbf":
                cells.append(str(r["talbf_n"]))
            for key, _, _ in metrics:
                cells.append(_pm(r[f"{key}_mean"], r[f"{key}_std"]))
                if published and key != f"{group}_asr":
                    paper = r.get(f"{key}_paper", "")
                    cells.append("–" if paper == "" else f"{paper:g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bfa_rows(models: list[ModelResults]) -> list[dict]:
    """One row per model and attack kind (BFA, random flips): runs, accuracies, flips."""
    rows = []
    for m in models:
        groups = sorted({(r.attack, r.number_format, r.fault) for r in m.bfa},
                        key=lambda g: (g[0] != "bfa", g[1], g[2] != "none", g[2]))
        for kind, number_format, fault in groups:
            runs = [r for r in m.bfa if (r.attack, r.number_format, r.fault) ==
                    (kind, number_format, fault)]
            row = {"model": m.label, "name": m.name, "attack": kind, "runs": len(runs),
                   "number_format": number_format, "fault": fault}
            for key, values in (("clean_acc", [r.clean_accuracy for r in runs]),
                                ("final_acc", [r.accuracy[-1] for r in runs]),
                                ("bits_flipped", [r.bits_flipped for r in runs]),
                                ("iterations", [r.iterations for r in runs])):
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
            stops = {}
            for r in runs:
                stops[r.stopped_by] = stops.get(r.stopped_by, 0) + 1
            row["stopped_by"] = ", ".join(f"{v} {k}" for k, v in sorted(stops.items()))
            rows.append(row)
    return rows


def format_markdown_bfa(rows: list[dict]) -> str:
    heads = ["model", "weights", "fault model", "attack", "runs", "clean %", "after attack %",
             "# bit-flips (bits flipped)", "stopped by"]
    lines = ["| " + " | ".join(heads) + " |", "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], r.get("number_format") or "–", r.get("fault", "none"),
            "BFA" if r["attack"] == "bfa" else "random flips", str(r["runs"]),
            _pm(r["clean_acc_mean"], r["clean_acc_std"]),
            _pm(r["final_acc_mean"], r["final_acc_std"]),
            _pm(r["bits_flipped_mean"], r["bits_flipped_std"]), r["stopped_by"]]) + " |")
    return "\n".join(lines)


def other_rows(models: list[ModelResults]) -> list[dict]:
    """One row per model and registered attack outside the paper and BFA tables: its number of
    records and its ``columns`` (mean, std) by its own summary rule (:func:`summary_stats`)."""
    rows = []
    for m in models:
        for name in sorted(set(m.records) - set(PAPER_ATTACKS) - set(FLIP_ATTACKS)):
            records = m.of(name)
            row = {"model": m.label, "name": m.name, "attack": name, "n": len(records)}
            stats = summary_stats(name, records)
            for metric, _ in attack_class(name).columns:
                row[f"{metric}_mean"], row[f"{metric}_std"] = stats[metric]
            rows.append(row)
    return rows


def format_markdown_other(rows: list[dict]) -> str:
    """One table per attack (its columns differ): model, records, the attack's columns."""
    out = []
    for name in dict.fromkeys(r["attack"] for r in rows):
        cls = attack_class(name)
        heads = ["model", "attack", cls.noun.split()[-1]] + [h for _, h in cls.columns]
        lines = ["| " + " | ".join(heads) + " |",
                 "|---|---|" + "---:|" * (len(heads) - 2)]
        for r in (r for r in rows if r["attack"] == name):
            lines.append("| " + " | ".join([r["name"], name, str(r["n"])] + [
                _pm(r[f"{m}_mean"], r[f"{m}_std"]) for m, _ in cls.columns]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------------------------
# The curves (supplement Figures 1 and 2, the BFA accuracy curve)
# ---------------------------------------------------------------------------------------------

def value_at_budget(record: dict, budget: int, metric: str) -> float | None:
    """``metric`` of a T-BFA experiment when the attacker may flip at most ``budget`` bits.

    The attack is deterministic, so this is its curve at ``min(budget, iterations)``: an attack
    that stopped earlier keeps its final value. With ``--curve-every K > 1`` the last recorded
    point at or before that count is used."""
    curve = record.get(TBFA.curve) or []
    limit = min(budget, int(record.get(TBFA.iterations, budget)))
    value = None
    for point in curve:
        if point.get(CURVE.iterations, 0) > limit:
            break
        if point.get(metric) is not None:
            value = float(point[metric])
    return value


def budget_curve(records: list[dict], budgets: list[int], metric: str
                 ) -> tuple[list[float], list[float]]:
    """Mean and sample std over experiments of :func:`value_at_budget` for every budget."""
    with_curve = [r for r in records if r.get(TBFA.curve)]
    means, stds = [], []
    for b in budgets:
        m, s = mean_std([value_at_budget(r, b, metric) for r in with_curve])
        means.append(m)
        stds.append(s)
    return means, stds


def asr_budget_curve(records: list[dict], budgets: list[int]) -> tuple[list[float], list[float]]:
    """Supplement Figure 1: T-BFA ASR (on D_rest) against the maximum allowed # bit-flips."""
    return budget_curve(records, budgets, CURVE.asr)


def bfa_curve(runs: list[BFARun]) -> tuple[list[float], list[float]]:
    """Mean and std over runs of the test accuracy after 0, 1, 2, ... flipped bits (a run that
    stopped keeps its last accuracy)."""
    length = max(len(r.accuracy) for r in runs)
    means, stds = [], []
    for f_ in range(length):
        m, s = mean_std([r.accuracy[min(f_, len(r.accuracy) - 1)] for r in runs])
        means.append(m)
        stds.append(s)
    return means, stds


def _pyplot():
    """matplotlib's pyplot with the Agg backend, or None (with a one-line warning)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: figures skipped (pip install matplotlib)")
        return None
    return plt


def _band_plot(plt, series: list[tuple[str, list, list, list, str]], band: float, xlabel: str,
               ylabel: str, title: str, path: str) -> int:
    """One line per entry of ``series`` (name, x, mean, std, line style) with a shaded
    mean ± band * std; returns the number of lines drawn."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.6, 4.2), dpi=100)
    colors = {}
    for name, xs, means, stds, style in series:
        base = name.split(" (")[0]
        color = colors.setdefault(base, f"C{len(colors) % 10}")
        ax.plot(xs, means, style, color=color, label=name, linewidth=1.6)
        lo = [m - band * s for m, s in zip(means, stds)]
        hi = [m + band * s for m, s in zip(means, stds)]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if series:  # outside the axes, so that it hides no curve
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    lines = len(ax.get_lines())
    tmp = path + ".tmp.png"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return lines


def plot_tbfa_curves(models: list[ModelResults], metric: str, path: str, band: float = 0.25,
                     max_flips: int | None = None, title: str = "") -> int | None:
    """Figure 1 (``metric="asr"``) or Figure 2 (``"pa_acc"``): one line per model with curves;
    returns the number of lines drawn, or None without matplotlib or without any curve."""
    with_curves = [m for m in models if any(r.get(TBFA.curve) for r in m.tbfa)]
    if not with_curves:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    top = max(int(r.get(TBFA.iterations, 0)) for m in with_curves for r in m.tbfa
              if r.get(TBFA.curve))
    top = min(top, max_flips) if max_flips else top
    budgets = list(range(0, max(top, 1) + 1))
    series = []
    for m in with_curves:
        means, stds = budget_curve(m.tbfa, budgets, metric)
        n = sum(1 for r in m.tbfa if r.get(TBFA.curve))
        series.append((f"{m.name} ({n})", budgets, means, stds, "-"))
    ylabel = {CURVE.asr: "stealthy T-BFA ASR (%)", CURVE.pa_acc: "PA-ACC (%)"}.get(metric, metric)
    xlabel = ("maximum allowed number of bit-flips (T-BFA iterations)" if metric == CURVE.asr
              else "number of bit-flips (T-BFA iterations)")
    return _band_plot(plt, series, band, xlabel, ylabel,
                      title + f"\n(mean over experiments, their number in brackets; "
                              f"shading ±{band:g} std)", path)


def plot_bfa_curves(models: list[ModelResults], path: str, band: float = 0.25,
                    max_flips: int | None = None, title: str = "") -> int | None:
    """Test accuracy against the number of flipped bits: BFA solid, random flips dashed, one
    color per model; returns the number of lines drawn (None: nothing to draw / no matplotlib)."""
    series = []
    for m in models:
        for kind, style, what in (("bfa", "-", "BFA"), ("random", "--", "random")):
            runs = [r for r in m.bfa if r.attack == kind]
            if not runs:
                continue
            means, stds = bfa_curve(runs)
            if max_flips:
                means, stds = means[:max_flips + 1], stds[:max_flips + 1]
            series.append((f"{m.name} ({what}, {len(runs)})", list(range(len(means))), means,
                           stds, style))
    if not series:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    return _band_plot(plt, series, band, "number of bit-flips (bits flipped)", "test accuracy (%)",
                      title + f"\n(mean over runs, their number in brackets; shading "
                              f"±{band:g} std)", path)


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------

FIG1, FIG2, FIG_BFA = "fig1_asr_vs_max_flips.png", "fig2_pa_acc_vs_flips.png", "fig_bfa_accuracy.png"


@dataclass
class Report:
    out_dir: str
    files: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)     # png path -> lines drawn
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    markdown: str = ""


def write_report(models: list[ModelResults], out_dir: str, published: dict | None = None,
                 band: float = 0.25, max_flips: int | None = None, title: str = "",
                 figures: bool = True, attacks: tuple = ATTACKS) -> Report:
    """Write ``table.md``/``table.csv`` (docs/algorithms.md section 9 layout; when ``attacks``
    has tbfa or talbf), ``bfa_table.md``/``.csv`` when there are BFA runs,
    ``attacks_table.md``/``.csv`` for the other registered attacks, the figures as PNG and
    ``report.md`` (all of it, plus what was missing)."""
    if not models:
        raise UserError("no models to report on: give LABEL=FOLDER arguments or --models-file")
    os.makedirs(out_dir, exist_ok=True)
    rep = Report(out_dir)
    for m in models:
        rep.missing += m.missing
        rep.problems += m.problems
    table = ""
    if "tbfa" in attacks or "talbf" in attacks:
        rows = table_rows(models, published)
        table = format_markdown_table(rows, published=bool(published))
        _write_table(rep, "table", table, rows)
    if "bfa" in attacks:
        without = [m.label for m in models if not m.bfa and os.path.isdir(m.folder)]
        if without:
            rep.missing.append(f"no BFA or random-flip run (a campaign folder from "
                               f"attack_bfa.py) for {', '.join(without)}")
    sections = [("## Untargeted BFA and random flips", "bfa_table", format_markdown_bfa,
                 bfa_rows(models)),
                ("## Other attacks", "attacks_table", format_markdown_other, other_rows(models))]
    sections = [(head, _write_table(rep, stem, fmt(rows), rows)) for head, stem, fmt, rows
                in sections if rows]
    if figures:
        _draw_figures(rep, models, attacks, band, max_flips, f"{title}: " if title else "")
    rep.markdown = _markdown(rep, title, published, table, sections)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(rep.markdown)
    rep.files.append(os.path.join(out_dir, "report.md"))
    for msg in rep.missing:
        log.warning("missing: %s", msg)
    return rep


def _write_table(rep: Report, stem: str, markdown: str, rows: list[dict]) -> str:
    """``<stem>.md`` and ``<stem>.csv`` in the report folder; returns the markdown."""
    with open(os.path.join(rep.out_dir, stem + ".md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    write_csv(os.path.join(rep.out_dir, stem + ".csv"), rows)
    rep.files += [os.path.join(rep.out_dir, stem + ".md"), os.path.join(rep.out_dir, stem + ".csv")]
    return markdown


def _draw_figures(rep: Report, models, attacks, band, max_flips, prefix: str) -> None:
    plots = []
    if "tbfa" in attacks:
        plots += [(FIG1, lambda p: plot_tbfa_curves(models, CURVE.asr, p, band, max_flips,
                                                    prefix + "stealthy T-BFA ASR")),
                  (FIG2, lambda p: plot_tbfa_curves(models, CURVE.pa_acc, p, band,
                                                    max_flips, prefix + "PA-ACC during T-BFA"))]
    if "bfa" in attacks:
        plots.append((FIG_BFA, lambda p: plot_bfa_curves(models, p, band, None,
                                                         prefix + "BFA and random flips")))
    for fname, fn in plots:
        path = os.path.join(rep.out_dir, fname)
        lines = fn(path)
        if lines is not None:
            rep.figures[path] = lines
            rep.files.append(path)
        else:
            rep.missing.append(f"{fname} not drawn (no per-flip data, or no matplotlib)")


def _markdown(rep: Report, title: str, published, table: str, sections) -> str:
    md = [f"# {title or 'Bit-flip attack results'}", "",
          "Mean ± sample standard deviation over experiments (T-BFA) or attacks (TA-LBF: ASR "
          "over all attacks, PA-ACC and # bit-flips over the successful ones)."
          + (" `paper`: the published value (docs/algorithms.md section 9, 8-bit ResNet-20 on CIFAR-10)."
             if published else ""),
          "# bit-flips: T-BFA attack iterations (one bit each, the papers' count); TA-LBF bits "
          "changed in the final layer (Hamming distance to the clean codes); BFA bits flipped.",
          "More bit-flips and a lower PA-ACC at the end of the attack mean a more robust model.",
          ""] + ([table, ""] if table else [])
    for head, markdown in sections:
        md += [head, "", markdown, ""]
    for path in rep.figures:
        md += [f"![{os.path.basename(path)}]({os.path.basename(path)})", ""]
    if rep.missing or rep.problems:
        md += ["## Missing or skipped", ""] + [f"- {x}" for x in rep.missing + rep.problems] + [""]
    return "\n".join(md)


def datasets_of(models: list[ModelResults]) -> set[str]:
    return {m.dataset for m in models if m.dataset}
