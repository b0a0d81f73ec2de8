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


def check_campaign(results_dir: str, campaign: dict, keys) -> str:
    """Refuse a results folder that holds a campaign with other settings; returns the path of
    its ``campaign.json`` (written by :func:`write_campaign` once everything is valid)."""
    from .errors import UserError

    path = os.path.join(results_dir, "campaign.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        diff = [k for k in keys if before.get(k) != campaign.get(k)]
        if diff:
            raise UserError(f"{results_dir} holds a campaign with other settings "
                            f"({', '.join(diff)} differ): use another --results folder")
    return path


def write_campaign(path: str, campaign: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(campaign, f, indent=1)
