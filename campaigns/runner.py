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

import logging
import os
import time

from utils import distributed as dist
from .results import (ATTACK, KEY, MERGED, JsonlResults, read_records, results_files,
                      write_jsonl)

log = logging.getLogger(__name__)

# results_files and read_records (each key once, the first occurrence wins) live in
# campaigns/results.py, shared with the report; they are imported here for the campaign's callers.


def merge_results(results_dir: str, order: list[str] | None = None) -> list[dict]:
    """Fold the rank files into ``results.jsonl`` (atomic replace, then the rank files go);
    returns every record, those whose key is in ``order`` in that order (the campaign's), so
    that the file does not depend on which process ran what. Call from one process only, when
    no other one writes."""
    records = read_records(results_dir)
    if order is not None:
        rank = {key: i for i, key in enumerate(order)}
        records = sorted(records, key=lambda r: rank.get(r[KEY], len(rank)))
    files = results_files(results_dir)
    merged = os.path.join(results_dir, MERGED)
    if any(p != merged for p in files):
        write_jsonl(merged, records)
        for path in files:
            if path != merged:
                os.remove(path)
    return records


def start_campaign_folder(results_dir: str, campaign_file: str, campaign: dict,
                          overwrite: bool = False) -> bool:
    """Create the folder (``overwrite``: first remove what a campaign wrote there), log to
    ``attack.log`` (rank r > 0: ``attack.rank<r>.log``) and, on rank 0, record the campaign's
    settings. Returns True on rank 0 (the one that reports)."""
    from .results import clear_campaign, write_campaign

    main_rank = dist.is_main()
    if overwrite:
        if main_rank:
            clear_campaign(results_dir)
        dist.barrier()
    log_to(results_dir)
    if main_rank:
        write_campaign(campaign_file, campaign)
    return main_rank


def log_to(results_dir: str) -> None:
    """Log (also) to the campaign's ``attack.log`` (rank r > 0: ``attack.rank<r>.log``),
    appending."""
    from utils.logs import setup_logging

    os.makedirs(results_dir, exist_ok=True)
    setup_logging(os.path.join(results_dir, "attack.log" if dist.is_main()
                               else f"attack.rank{dist.rank()}.log"))


class CampaignResults:
    """This process's view of a campaign folder: what is done, where to append, its share.

    Offers what the campaign runners need of :class:`campaigns.results.JsonlResults`:
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


def open_campaign(results_dir: str, campaign: dict, keys, overwrite: bool = False
                  ) -> CampaignResults:
    """Check ``results_dir`` against ``campaign`` (:func:`campaigns.results.check_campaign`: raises
    a :class:`~utils.errors.UserError` before anything is written), then create it, log to
    it, record the settings and return this process's view of it."""
    from .results import check_campaign

    campaign_file = check_campaign(results_dir, campaign, keys, overwrite)
    dist.barrier()  # every rank has read the folder before rank 0 writes its campaign.json
    start_campaign_folder(results_dir, campaign_file, campaign, overwrite)
    return CampaignResults(results_dir)


class CampaignRunner:
    """Drives any registered attack (:class:`attacks.base.Attack`) over a campaign's items.

    A progress bar over this process's share of ``items`` (those not done, round-robin among
    the ranks); per item: ``attack.reset()`` (the clean model), ``attack.run_item(item)``, the
    record (``key``, ``attack``, the item's fields, ``seconds``) appended and pushed to disk at
    once, one log line (``attack.describe``) and TensorBoard points (``attack.scalars``); Ctrl-C
    keeps every finished record (exit status 130, the same command continues); then every rank
    waits and rank 0 merges the results, writes ``summary.csv`` (``attack.summary``) and prints
    the summary table.

    Args:
        results: the folder (:func:`open_campaign`).
        attack: the attack, built on its target.
        items: the whole campaign, in order; each has a ``key``.
        progress: show the bar (rank 0 only).
        todo: the items this process runs (default: its round-robin share of those not done,
            :meth:`CampaignResults.share`); a caller that shares work over several campaigns
            (the defenses x attacks matrix) gives them.
    """

    def __init__(self, results: CampaignResults, attack, items: list, progress: bool = True,
                 todo: list | None = None):
        from tqdm import tqdm

        self.results, self.attack = results, attack
        self.keys = [it.key for it in items]
        self.todo = results.share(items) if todo is None else list(todo)
        self.main_rank = dist.is_main()
        self.bar = tqdm(total=len(self.todo), desc=attack.noun, dynamic_ncols=True,
                        disable=not (progress and self.main_rank))
        self.writer = None
        if attack.scalars:
            from torch.utils.tensorboard import SummaryWriter

            sub = "tb" if self.main_rank else f"tb/rank{dist.rank()}"
            self.writer = SummaryWriter(os.path.join(results.results_dir, sub))

    def announce(self, what: str) -> None:
        """Log the campaign's first line: ``what`` (the attack, the model, its clean accuracy),
        then how many items there are, done and to run here, and where the results go."""
        world = dist.world_size()
        done = len(self.results.done() & set(self.keys))
        log.info("%s; %d %s, %d done, %d to run%s; results in %s", what, len(self.keys),
                 self.attack.noun.split()[-1], done, len(self.todo),
                 f" by rank {dist.rank()} of {world}" if world > 1 else "",
                 self.results.results_dir)

    def run_items(self) -> list[dict]:
        """Run this process's share, appending each record as it ends; returns the new ones.
        The attacked model is back to its clean weights afterwards (also after an error)."""
        try:
            return [self.run_item(item) for item in self.todo]
        finally:
            self.attack.reset()
            self.attack.on_step = None

    def run_item(self, item) -> dict:
        """Attack one item from the clean model; its record is appended before returning."""
        attack = self.attack
        attack.on_step = lambda step, info: self.bar.set_postfix(step=step, **info)
        attack.reset()
        t0 = time.time()
        fields = attack.run_item(item)
        record = {KEY: item.key, ATTACK: attack.name, **fields,
                  "seconds": round(time.time() - t0, 3)}
        self.results.append(record)
        self._log(record)
        return record

    def close(self) -> None:
        """The attacked model back to its clean weights; the TensorBoard log closed."""
        self.attack.reset()
        self.attack.on_step = None
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def _log(self, record: dict) -> None:
        if self.writer is not None:
            n = len(self.results.records)
            for name in self.attack.scalars:
                if record.get(name) is not None:
                    self.writer.add_scalar(f"{self.attack.name}/{name}", record[name], n)
            self.writer.flush()
        self.bar.update(1)
        log.info("%s", self.attack.describe(record))

    def run(self) -> int:
        """Run the share, then (rank 0) merge, summarize and print; returns the exit status."""
        from .results import format_table, write_csv

        try:
            self.run_items()
        except KeyboardInterrupt:
            self.bar.close()
            log.info("interrupted: %d of %d %s are in %s; run the same command again to "
                     "continue", len(self.results.records), len(self.keys),
                     self.attack.noun.split()[-1], self.results.results_dir)
            return 130
        finally:
            self.bar.close()
            if self.writer is not None:
                self.writer.close()
        records = self.results.finish()  # every rank done; rank 0 merges the results files
        if records is None:
            return 0
        keys = set(self.keys)
        records = [r for r in records if r[KEY] in keys]
        rows = self.attack.summary(records)
        write_csv(os.path.join(self.results.results_dir, "summary.csv"), rows)
        print(format_table(rows, ["metric", "mean", "std", "n"]))
        print(f"{self.attack.closing(records)}; results: "
              f"{os.path.join(self.results.results_dir, MERGED)}")
        return 0
