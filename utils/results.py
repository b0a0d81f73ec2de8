"""Append-only JSON-lines results that survive crashes, and summary tables.

A long campaign appends one line per finished experiment and flushes it to disk at once;
running the same command again reads the file, skips the experiments already there and goes
on. A line cut short by a crash is ignored (and reported), never fatal.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re

log = logging.getLogger(__name__)


class JsonlResults:
    """``path`` holds one JSON object per line, each with a unique ``key``."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[dict] = []
        if os.path.exists(path):
            self._read()

    def _read(self) -> None:
        good, bad = [], 0
        with open(self.path) as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "key" not in record:
                    raise ValueError("no key")
            except ValueError:
                bad += 1
                log.warning("%s:%d is not a complete result line (interrupted write?); "
                            "that experiment will run again", self.path, number)
                continue
            good.append(record)
        self.records = good
        if bad:  # rewrite without the broken lines so that appends stay line-aligned
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                for record in good:
                    f.write(json.dumps(record) + "\n")
            os.replace(tmp, self.path)

    def done(self) -> set[str]:
        return {r["key"] for r in self.records}

    def append(self, record: dict) -> None:
        """Write ``record`` as one line and push it to disk before returning."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        line = json.dumps(record)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


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


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
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
CAMPAIGN_FILES = ("campaign.json", "results.jsonl", "summary.csv", "attack.log")
CAMPAIGN_PATTERNS = (r"results\.rank\d+\.jsonl", r"attack\.rank\d+\.log", r"results\.jsonl\.tmp")


def _campaign_leftovers(results_dir: str) -> list[str]:
    if not os.path.isdir(results_dir):
        return []
    return sorted(n for n in os.listdir(results_dir)
                  if n in CAMPAIGN_FILES or n == "tb"
                  or any(re.fullmatch(p, n) for p in CAMPAIGN_PATTERNS))


def _same_setting(key: str, before, now) -> bool:
    if key == "config" and isinstance(before, dict) and isinstance(now, dict):
        from models.factory import ModelConfig  # a config stored before a field existed
        return ModelConfig.from_dict(before).to_dict() == now
    return before == now


def check_campaign(results_dir: str, campaign: dict, keys, overwrite: bool = False) -> str:
    """Refuse a results folder that holds a campaign with other settings, or results this
    tool's campaigns did not write (no ``campaign.json``), unless ``overwrite``: then what a
    campaign writes is removed from it. Returns the path of its ``campaign.json`` (written by
    :func:`write_campaign` once everything is valid)."""
    from .errors import UserError

    path = os.path.join(results_dir, "campaign.json")
    leftovers = _campaign_leftovers(results_dir)
    problem = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                before = json.load(f)
        except (OSError, ValueError) as e:
            before, problem = None, f"an unreadable campaign.json ({type(e).__name__})"
        if before is not None:
            diff = [k for k in keys if not _same_setting(k, before.get(k), campaign.get(k))]
            if diff:
                problem = f"a campaign with other settings ({', '.join(diff)} differ)"
    elif any(n.startswith("results") for n in leftovers):
        problem = "results without a campaign.json (not written by this tool's campaigns)"
    if problem is None:
        return path
    if not overwrite:
        raise UserError(f"{results_dir} holds {problem}: use another --results folder, or add "
                        f"--overwrite to replace them")
    return path


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(campaign, f, indent=1)
