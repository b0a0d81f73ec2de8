"""Attack campaigns shared among processes, resumable with any number of them.

``torchrun --nproc_per_node=K attack_tbfa.py ...`` (or ``attack_talbf.py``) starts K copies
of the script; each joins the process group (:mod:`utils.distributed`), and
:class:`CampaignResults` gives each its share of the experiments not yet done:

- the done set is read once, by rank 0, from every results file of the folder and sent to the
  others, so every rank sees the same list (no rank starts writing before all have it);
- the remaining experiments, in campaign order, go round-robin to the ranks: no two ranks run
  the same experiment;
- rank ``r`` appends to ``results.rank<r>.jsonl`` (a single process to ``results.jsonl``), one
  line per finished experiment, so no two processes write the same file;
- at the end, after every rank has finished, rank 0 merges all files into ``results.jsonl``
  (written atomically, then the rank files are removed) and writes the summary.

A campaign interrupted with K processes and resumed with J (1 included) reads every file that
is there, so each experiment still runs exactly once; a key found twice (a merge cut short
between its two steps) counts once.
"""

from __future__ import annotations

import glob
import json
import os
import re

from . import distributed as dist
from .results import JsonlResults

MERGED = "results.jsonl"
_RANK_FILE = re.compile(r"results\.rank(\d+)\.jsonl$")


def results_files(results_dir: str) -> list[str]:
    """``results.jsonl`` then the rank files by rank, those that exist."""
    merged = os.path.join(results_dir, MERGED)
    ranked = []
    for path in glob.glob(os.path.join(results_dir, "results.rank*.jsonl")):
        m = _RANK_FILE.search(os.path.basename(path))
        if m:
            ranked.append((int(m.group(1)), path))
    return ([merged] if os.path.exists(merged) else []) + [p for _, p in sorted(ranked)]


def read_records(results_dir: str) -> list[dict]:
    """Every record of the folder, each key once (first occurrence wins). Lines cut short by a
    crash are dropped from their file (see :class:`utils.results.JsonlResults`)."""
    seen, records = set(), []
    for path in results_files(results_dir):
        for record in JsonlResults(path).records:
            if record["key"] not in seen:
                seen.add(record["key"])
                records.append(record)
    return records


def merge_results(results_dir: str) -> list[dict]:
    """Fold the rank files into ``results.jsonl`` (atomic replace, then the rank files go);
    returns every record. Call from one process only, when no other one writes."""
    records = read_records(results_dir)
    files = results_files(results_dir)
    merged = os.path.join(results_dir, MERGED)
    if any(p != merged for p in files):
        tmp = merged + ".tmp"
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, merged)
        for path in files:
            if path != merged:
                os.remove(path)
    return records


def start_campaign_folder(results_dir: str, campaign_file: str, campaign: dict,
                          overwrite: bool = False) -> bool:
    """Create the folder (``overwrite``: first remove what a campaign wrote there), log to
    ``attack.log`` (rank r > 0: ``attack.rank<r>.log``) and, on rank 0, record the campaign's
    settings. Returns True on rank 0 (the one that reports)."""
    from .logs import setup_logging
    from .results import clear_campaign, write_campaign

    main_rank = dist.is_main()
    if overwrite:
        if main_rank:
            clear_campaign(results_dir)
        dist.barrier()
    os.makedirs(results_dir, exist_ok=True)
    setup_logging(os.path.join(results_dir, "attack.log" if main_rank
                               else f"attack.rank{dist.rank()}.log"))
    if main_rank:
        write_campaign(campaign_file, campaign)
    return main_rank


class CampaignResults:
    """This process's view of a campaign folder: what is done, where to append, its share.

    Offers what the campaign runners need of :class:`utils.results.JsonlResults`:
    ``done()``, ``append(record)``, ``records`` (the done ones, then this process's new ones)
    and ``path`` (the file this process writes).
    """

    def __init__(self, results_dir: str):
        self.results_dir = results_dir
        self.rank, self.world = dist.rank(), dist.world_size()
        os.makedirs(results_dir, exist_ok=True)
        records = read_records(results_dir) if self.rank == 0 else None
        self.records: list[dict] = dist.broadcast_object(records)
        self._done = {r["key"] for r in self.records}
        name = MERGED if self.world == 1 else f"results.rank{self.rank}.jsonl"
        self.path = os.path.join(results_dir, name)
        self._own = JsonlResults(self.path)

    def done(self) -> set[str]:
        return set(self._done)

    def share(self, items: list, key=lambda item: item.key) -> list:
        """The items (in campaign order) this process runs: those not done, round-robin."""
        todo = [it for it in items if key(it) not in self._done]
        return todo[self.rank::self.world]

    def append(self, record: dict) -> None:
        self._own.append(record)
        self.records.append(record)
        self._done.add(record["key"])

    def finish(self) -> list[dict] | None:
        """Wait for every process; rank 0 merges the files and returns every record (None on
        the other ranks)."""
        dist.barrier()
        if self.rank != 0:
            return None
        return merge_results(self.results_dir)
