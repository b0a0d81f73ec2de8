"""Result records: their fields, the JSON-lines files that hold them, and summary tables.

The one module that writes and reads the records of the attack campaigns (attack_tbfa.py,
attack_talbf.py), for the campaigns themselves (:mod:`campaigns.runner`) and for the report
(:mod:`campaigns.report`, report.py):

- :data:`TBFA`, :data:`CURVE` and :data:`TALBF` name the fields of a record that summaries
  and the report read (the records themselves are written by attacks/tbfa.py and
  attacks/talbf.py; a field is never renamed, so that files of earlier versions keep reading);
- a long campaign appends one line per finished experiment (:class:`JsonlResults`) and flushes
  it to disk at once; running the same command again reads the file, skips the experiments
  already there and goes on. A line cut short by a crash is ignored (and reported as
  ``file:line``), never fatal;
- :func:`read_jsonl` is the one parser of such a file (it never modifies it);
  :func:`read_records` reads a results folder (``results.jsonl``, then the rank files of a
  multi-process campaign not yet merged), each key once, the first occurrence winning;
- :func:`summarize`, :func:`talbf_summary` (the TA-LBF rule of docs/algorithms.md section 8)
  and :func:`write_csv` make the summary tables.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The fields of a record
# ---------------------------------------------------------------------------------------------

KEY = "key"  # every record: the item's id, unique in a campaign (resume skips keys found)
ATTACK = "attack"  # every record: the registered name of the attack that wrote it

# The counts of flips, each named for what it counts, the same in every attack's records,
# tables and figures (a record holds those that apply to its attack):
COUNTS = {
    "iterations": "attack iterations (T-BFA: one bit each, the papers' '# bit-flips'; BFA: "
                  "one or more bits each)",
    "bits_flipped": "bits the attack flipped in the stored weights (codeword bits under "
                    "DeepNcode), a bit flipped twice counted twice (BFA)",
    "bits_changed": "bits that differ from the clean model at the end (the Hamming distance; "
                    "TA-LBF's '# bit-flips')",
}


@dataclass(frozen=True)
class TBFAFields:
    """A stealthy T-BFA record, one experiment (docs/algorithms.md section 7): the fields read."""

    key: str = KEY                # "s<source>-t<target>-r<repetition>"
    clean_acc: str = "clean_acc"  # test accuracy (%) of the clean integer-mode model
    asr: str = "asr"              # % of D_rest classified as the target class, at the stop
    asr_src: str = "asr_src"      # % of D_src classified as the target class, at the stop
    pa_acc: str = "pa_acc"        # PA-ACC: % accuracy on D_pa, every sample counted
    iterations: str = "iterations"      # attack iterations, one bit each ("# bit-flips")
    bits_changed: str = "bits_changed"  # bits that differ from the clean model at the stop
    curve: str = "curve"          # with --curve-every K: a list of :class:`CurveFields` points


@dataclass(frozen=True)
class CurveFields:
    """One point of a T-BFA record's ``curve`` (supplement Figures 1 and 2)."""

    iterations: str = "iterations"  # attack iterations so far (0: the clean model)
    asr: str = "asr"              # % of D_rest classified as the target class
    asr_src: str = "asr_src"      # % of D_src classified as the target class (not at 0)
    pa_acc: str = "pa_acc"        # % accuracy on D_pa


@dataclass(frozen=True)
class TALBFFields:
    """A stealthy TA-LBF record, one attacked sample (docs/algorithms.md section 8): the fields
    read."""

    key: str = KEY                # "<position>-t<target>-i<index>" (+ a digest of a pinned D_aux)
    clean_acc: str = "clean_acc"  # test accuracy (%) of the clean integer-mode model
    success: str = "success"      # x_s is classified as the target class after the attack
    asr: str = "asr"              # 100 on success, else 0: its mean over attacks is the ASR
    pa_acc: str = "pa_acc"        # % accuracy on the test set without x_s and D_aux, attacked
    bits_changed: str = "bits_changed"  # bits changed in the final layer (Hamming distance)
    converged: str = "converged"  # the successful run met the ADMM stop test


@dataclass(frozen=True)
class BFAFields:
    """An untargeted BFA or random-flip record, one repetition (docs/algorithms.md section 6)."""

    key: str = KEY                  # "r<repetition>"
    clean_acc: str = "clean_acc"    # test accuracy (%) before the first flip
    final_acc: str = "final_acc"    # test accuracy (%) at the stop
    iterations: str = "iterations"  # attack iterations
    bits_flipped: str = "bits_flipped"  # bits flipped (more than iterations after retries)
    bits_changed: str = "bits_changed"  # Hamming distance to the clean codes at the stop
    stopped_by: str = "stopped_by"  # break_acc | n_iter | budget | no_admissible
    number_format: str = "number_format"  # the attacked weights' format, e.g. int8
    fault_model: str = "fault_model"      # utils.faults.FaultModel.to_dict() or None
    profile: str = "profile"        # every flipped bit (attacks.bfa.PROFILE_FIELDS), in order


TBFA, CURVE, TALBF, BFA = TBFAFields(), CurveFields(), TALBFFields(), BFAFields()

# Names of earlier versions, per attack: records written before the counts had their own names
# read as if written now (the files are never rewritten for it).
OLD_NAMES = {
    "tbfa": {"n_flips": TBFA.iterations, "hamming": TBFA.bits_changed},
    "talbf": {"n_flips": TALBF.bits_changed},
    "bfa": {"bit_flips": BFA.bits_flipped, "hamming_distance": BFA.bits_changed},
}


def record_attack(record: dict) -> str | None:
    """The attack that wrote ``record``: its ``attack`` field, else (a record of an earlier
    version) told by the fields only that attack writes."""
    if record.get(ATTACK):
        return str(record[ATTACK])
    if "stop_reason" in record:
        return "tbfa"
    if "tries" in record or "success" in record:
        return "talbf"
    if "stopped_by" in record:
        return "bfa"
    return None


def upgrade_record(record: dict) -> dict:
    """``record`` with the field names of this version (:data:`OLD_NAMES`; a T-BFA curve's
    ``flips`` is ``iterations``; TA-LBF tries' ``n_flips`` is ``bits_changed``); a record of
    this version is returned as it is."""
    attack = record_attack(record)
    renames = OLD_NAMES.get("bfa" if attack == "random" else attack, {})
    if not any(old in record for old in renames) and ATTACK in record:
        return record
    out = {renames.get(k, k): v for k, v in record.items() if not (k in renames and
                                                                   renames[k] in record)}
    if attack is not None:
        out.setdefault(ATTACK, attack)
    if attack == "tbfa" and isinstance(out.get(TBFA.curve), list):
        out[TBFA.curve] = [{(CURVE.iterations if k == "flips" else k): v for k, v in p.items()}
                           if isinstance(p, dict) else p for p in out[TBFA.curve]]
    if attack == "talbf" and isinstance(out.get("tries"), list):
        out["tries"] = [{("bits_changed" if k == "n_flips" else k): v for k, v in t.items()}
                        if isinstance(t, dict) else t for t in out["tries"]]
    return out


# ---------------------------------------------------------------------------------------------
# Results files and folders
# ---------------------------------------------------------------------------------------------

MERGED = "results.jsonl"  # a campaign's results (rank r of several processes: RANK_FILE)
RANK_FILE = r"results\.rank(\d+)\.jsonl"


def read_jsonl(path: str, problems: list[str] | None = None, keyed: bool = False) -> list[dict]:
    """The JSON objects of ``path``, one per line (blank lines skipped). A line that is not a
    JSON object (``keyed``: an object with a ``key``), e.g. one cut short by a crash, is
    reported as ``file:line`` (logged, and appended to ``problems``) and skipped. The file is
    never modified: reading is safe while a campaign appends, and for the report."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                if keyed and KEY not in record:
                    raise ValueError(f"no {KEY!r}")
            except ValueError as e:
                msg = f"{path}:{number}: corrupt results line skipped ({str(e)[:80]})"
                log.warning("%s", msg)
                if problems is not None:
                    problems.append(msg)
                continue
            records.append(record)
    return records


def write_jsonl(path: str, records: list[dict]) -> None:
    """``records`` as the whole of ``path``, one line each, written atomically (a crash leaves
    the old file or the new one) and pushed to disk."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def results_files(results_dir: str) -> list[str]:
    """``results.jsonl`` then the rank files (``results.rank<r>.jsonl``) by rank number, those
    that exist as files (a campaign refuses a folder of another kind under these names:
    :func:`check_campaign`)."""
    merged = os.path.join(results_dir, MERGED)
    ranked = []
    if os.path.isdir(results_dir):
        for name in os.listdir(results_dir):
            m = re.fullmatch(RANK_FILE, name)
            if m:
                ranked.append((int(m.group(1)), os.path.join(results_dir, name)))
    return [p for p in [merged] + [p for _, p in sorted(ranked)] if os.path.isfile(p)]


def read_records(results_dir: str, problems: list[str] | None = None) -> list[dict]:
    """Every record of a results folder, reading :func:`results_files` in their order, each
    ``key`` once: the first occurrence wins. A campaign never runs a done experiment again, so a
    key is found twice only when a merge was cut short between writing ``results.jsonl`` and
    removing the rank files, and both copies are the same record. Corrupt lines and lines
    without a key are reported and skipped (:func:`read_jsonl`); no file is modified."""
    seen, records = set(), []
    for path in results_files(results_dir):
        for record in read_jsonl(path, problems, keyed=True):
            if record[KEY] not in seen:
                seen.add(record[KEY])
                records.append(upgrade_record(record))
    return records


def _unterminated(path: str) -> bool:
    """``path`` is not empty and its last line has no newline (a write cut just before it)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class JsonlResults:
    """``path`` holds one JSON object per line, each with a unique ``key``."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[dict] = []
        if os.path.exists(path):
            self._read()

    def _read(self) -> None:
        problems: list[str] = []
        self.records = read_jsonl(self.path, problems, keyed=True)
        # rewrite without the broken lines, every line ended, so that appends stay line-aligned
        if problems or _unterminated(self.path):
            if problems:
                log.warning("%s: %d broken line(s) removed (interrupted write?); those "
                            "experiments will run again", self.path, len(problems))
            write_jsonl(self.path, self.records)

    def done(self) -> set[str]:
        return {r[KEY] for r in self.records}

    def append(self, record: dict) -> None:
        """Write ``record`` as one line and push it to disk before returning."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        line = json.dumps(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1, as ``torch.std``); NaNs are skipped."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def summarize(records: list[dict], metrics: list[str]) -> list[dict]:
    """One row per metric: ``metric, mean, std, n``."""
    rows = []
    for m in metrics:
        mean, std = mean_std([r.get(m) for r in records])
        rows.append({"metric": m, "mean": mean, "std": std,
                     "n": sum(1 for r in records if r.get(m) is not None)})
    return rows


def successful(records: list[dict]) -> list[dict]:
    """The TA-LBF records of successful attacks."""
    return [r for r in records if r.get(TALBF.success)]


def talbf_summary(records: list[dict], metrics: Sequence[str] = (TALBF.pa_acc, TALBF.bits_changed)
                  ) -> list[dict]:
    """The TA-LBF rule (docs/algorithms.md section 8) as :func:`summarize` rows: ``asr`` over
    every attack, then each of ``metrics`` over the successful attacks only (a failed attack
    has no attacked model to score)."""
    return summarize(records, [TALBF.asr]) + summarize(successful(records), list(metrics))


def write_csv(path: str, rows: list[dict]) -> None:
    """``rows`` as UTF-8 CSV (floats in full precision, the columns of the first row), written
    atomically; nothing is written without rows."""
    if not rows:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def format_table(rows: list[dict], columns: list[str], floatfmt: str = "{:.2f}") -> str:
    """A plain-text table for the terminal."""
    def fmt(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def default_results_dir(source: str, pretrained: bool, name: str) -> str:
    """``<checkpoint folder>/<name>``, or ``runs/<name>`` for torchvision's weights."""
    base = "runs" if pretrained else os.path.dirname(os.path.abspath(source))
    return os.path.join(base, name)


# What a campaign writes into its results folder (``--overwrite`` removes these, nothing else).
CAMPAIGN_FILES = ("campaign.json", MERGED, "summary.csv", "attack.log")
CAMPAIGN_PATTERNS = (RANK_FILE, r"attack\.rank\d+\.log", r"results(\.rank\d+)?\.jsonl\.tmp")


def _campaign_leftovers(results_dir: str) -> list[str]:
    if not os.path.isdir(results_dir):
        return []
    return sorted(n for n in os.listdir(results_dir)
                  if n in CAMPAIGN_FILES or n == "tb"
                  or any(re.fullmatch(p, n) for p in CAMPAIGN_PATTERNS))


def _same_setting(key: str, before, now) -> bool:
    if key == "normalization" and before is None and isinstance(now, dict):
        # recorded since the BFA repository's normalization became a choice: before it every
        # campaign used the checkpoint's own or the data set's
        return now.get("name") in ("checkpoint", "dataset")
    if key == "config" and isinstance(before, dict) and isinstance(now, dict):
        from models.factory import ModelConfig  # a config stored before a field existed
        return ModelConfig.from_dict(before).to_dict() == now
    return before == now


def check_campaign(results_dir: str, campaign: dict, keys, overwrite: bool = False) -> str:
    """Refuse a results folder that holds a campaign with other settings, a damaged one (a
    ``campaign.json`` that is not a JSON object, results that are not UTF-8 text), or results
    this tool's campaigns did not write (no ``campaign.json``), unless ``overwrite``: then what
    a campaign writes is removed from it. A campaign's file that is a folder (or its ``tb``
    folder a file) is refused even then: it is not the campaign's to remove. Returns the path
    of its ``campaign.json`` (written by :func:`write_campaign` once everything is valid)."""
    from utils.errors import UserError

    path = os.path.join(results_dir, "campaign.json")
    wrong = _wrong_kind(results_dir)
    if wrong:
        raise UserError(f"{results_dir} holds {wrong}, where a campaign keeps its own: move it "
                        f"away, or use another --results folder")
    problem = _campaign_problem(results_dir, campaign, keys)
    if problem is not None and not overwrite:
        raise UserError(f"{results_dir} holds {problem}: use another --results folder, or add "
                        f"--overwrite to replace them")
    return path


def _wrong_kind(results_dir: str) -> str | None:
    """A name a campaign writes, present as another kind of thing (a folder ``results.jsonl``,
    a file ``tb``), described; None if all is well."""
    for name in _campaign_leftovers(results_dir):
        target = os.path.join(results_dir, name)
        folder = name == "tb"
        if os.path.isdir(target) != folder or not (folder or os.path.isfile(target)):
            return f"{name} as a {'file' if folder else 'folder or special file'}"
    return None


def _campaign_problem(results_dir: str, campaign: dict, keys) -> str | None:
    """Why the folder cannot take ``campaign`` as it is (other settings, a damaged
    ``campaign.json`` or results, foreign results), or None."""
    path = os.path.join(results_dir, "campaign.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError) as e:
            return f"an unreadable campaign.json ({type(e).__name__})"
        if not isinstance(before, dict):
            kind = {list: "a list", str: "a string", type(None): "null", bool: "true/false"}
            return (f"a damaged campaign.json ({kind.get(type(before), 'a number')}, not a JSON "
                    f"object)")
        undecodable = [os.path.basename(p) for p in results_files(results_dir)
                       if not _utf8_lines(p)]
        if undecodable:
            return f"results that are not UTF-8 text ({', '.join(undecodable)})"
        diff = [k for k in keys if not _same_setting(k, before.get(k), campaign.get(k))]
        if diff:
            return f"a campaign with other settings ({', '.join(diff)} differ)"
    elif any(n.startswith("results") for n in _campaign_leftovers(results_dir)):
        return "results without a campaign.json (not written by this tool's campaigns)"
    return None


def _utf8_lines(path: str) -> bool:
    """Every ended line of ``path`` is UTF-8 text (a last line without its newline may be cut
    anywhere by a crash, inside a character too: resuming drops it)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data[:data.rfind(b"\n") + 1].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def clear_campaign(results_dir: str) -> None:
    """``--overwrite``: remove what a campaign writes into ``results_dir`` (nothing else)."""
    import shutil

    for name in _campaign_leftovers(results_dir):
        target = os.path.join(results_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        else:
            os.remove(target)


def write_campaign(path: str, campaign: dict) -> None:
    """Write ``campaign.json`` atomically (another process may be reading it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(campaign, f, indent=1)
    os.replace(tmp, path)
