"""The epoch loop of a training run: train, evaluate, checkpoint and log every epoch.

``main.py`` parses its flags into a :class:`TrainRun` and calls :func:`train`; nothing here
reads the command line. What a run folder receives (rank 0 only, under torchrun):
``checkpoint.pth.tar`` every epoch, ``model_best.pth.tar`` on a new best test accuracy (written
first, both atomically), ``log.csv`` (one row per epoch, :data:`LOG_FIELDS`), TensorBoard
events in ``tb/``, ``args.json`` and ``train.log``.

Exact resume: everything random in epoch ``e`` derives from ``(seed, e)``, and every checkpoint
holds the log rows of its finished epochs, so a run killed at any moment and resumed from its
checkpoint writes the same checkpoints, ``log.csv`` and TensorBoard points as one never killed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from . import distributed
from .checkpoint import make_checkpoint, save_checkpoint
from .errors import UserError
from .logs import setup_logging
from .schedules import LRSchedule
from .training import evaluate, train_one_epoch

if TYPE_CHECKING:
    from defenses import Defense
    from models.factory import ModelConfig

    from .data import DatasetInfo

log = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5",
              "best_acc", "seconds"]
TB_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


class CompileError(UserError):
    """``torch.compile`` could not build the training step on this machine."""


@dataclass
class TrainRun:
    """One training run: the objects the epoch loop drives and the numbers it needs.

    ``train_model`` is what the training step calls (``model`` wrapped by
    :func:`wrap_for_training`; ``None``: ``model`` itself); checkpoints and evaluation use
    ``model``. ``defenses``: every defense of the model (:mod:`defenses`), recorded in each
    checkpoint and in ``args.json``; the epoch loop asks the training-time ones for their parts
    (loss terms, data mixing). ``history`` holds the log rows of the ``start_epoch`` finished
    epochs (a resumed run's checkpoint stores them). ``stored_args`` goes into every checkpoint
    as its ``args``, ``run_args`` into ``args.json`` (followed by ``model_config``,
    ``defenses`` and ``world_size``)."""

    model: nn.Module
    output: nn.Module
    config: ModelConfig
    dataset: DatasetInfo
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    train_loader: object
    test_loader: object
    outdir: str
    epochs: int
    seed: int
    batch: int  # the global batch (the start line names each process's share)
    defenses: list[Defense] = field(default_factory=list)
    progress: bool = True
    amp: bool = False
    compiled: bool = False  # train_model is torch.compile'd: its failures raise CompileError
    train_model: nn.Module | None = None
    start_epoch: int = 0
    best_acc: float = 0.0
    history: list[dict] = field(default_factory=list)
    stored_args: dict = field(default_factory=dict)
    run_args: dict = field(default_factory=dict)
    resume_command: str = "python main.py"  # what the interrupt message says to run again


def wrap_for_training(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """The module the training loop calls: ``model`` inside DistributedDataParallel (under
    torchrun) and ``torch.compile`` (``compile_model``). Checkpoints and evaluation use
    ``model`` itself, so no ``module.`` or ``_orig_mod.`` prefix reaches a state dict."""
    wrapped = model
    if distributed.is_distributed():
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        wrapped = torch.compile(wrapped)
    return wrapped


def train(run: TrainRun) -> int:
    """Train epochs ``start_epoch`` to ``epochs``: 0 when done, 130 when interrupted (Ctrl-C).

    Every rank trains and evaluates, only rank 0 writes files. A resumed run rewrites
    ``log.csv`` and the last TensorBoard point from ``history``, so a kill at any moment,
    between the checkpoint writes included, loses no row and leaves no duplicate, and removes
    the temporary files such a kill left behind. Raises :class:`~utils.errors.UserError` when
    the loss diverges, :class:`CompileError` when ``torch.compile`` fails."""
    history = list(run.history or [])
    if not distributed.is_main():
        return _EpochLoop(run, None, history).run_epochs()
    from torch.utils.tensorboard import SummaryWriter

    history = _prepare_run_folder(run, history)
    # Events at steps >= start_epoch are dropped, then the last finished epoch's point is
    # written again from the history (a kill may have come before or after it was written).
    writer = SummaryWriter(os.path.join(run.outdir, "tb"), purge_step=run.start_epoch or None)
    if run.start_epoch and history:
        _log_tb(writer, history[-1])
        _log_epoch(history[-1], run.epochs, "  (from the checkpoint)")
    try:
        return _EpochLoop(run, writer, history).run_epochs()
    finally:
        writer.close()


def _prepare_run_folder(run: TrainRun, history: list[dict]) -> list[dict]:
    """Rank 0 before the first epoch: temporary files gone, ``log.csv`` holding the finished
    epochs' rows (returned), logging to ``train.log``, ``args.json``, the start line."""
    outdir = run.outdir
    os.makedirs(outdir, exist_ok=True)
    for name in os.listdir(outdir):  # left by a kill during an atomic write
        if (name.startswith(".tmp-") and name.endswith(".pth.tar")) or name == "log.csv.tmp":
            os.remove(os.path.join(outdir, name))
    csv_path = os.path.join(outdir, "log.csv")
    if run.start_epoch and not history:
        history = _rows_of_old_log(csv_path, run.start_epoch)
    _write_log_csv(csv_path, history)
    setup_logging(os.path.join(outdir, "train.log"))
    world = distributed.world_size()
    with open(os.path.join(outdir, "args.json"), "w") as f:
        json.dump({**run.run_args, "model_config": run.config.to_dict(),
                   "defenses": [d.to_dict() for d in run.defenses], "world_size": world},
                  f, indent=1)
    log.info("%s %s on %s: %d/%d train/test images, %s%s, start epoch %d",
             "resuming" if run.start_epoch else "training", run.config.arch, run.dataset.name,
             run.train_loader.dataset_size, run.test_loader.dataset_size,
             next(run.model.parameters()).device,
             f" x {world} processes ({run.batch // world} images each per step)"
             if world > 1 else "", run.start_epoch)
    return history


class _EpochLoop:
    """The epochs of one run on one rank; ``writer`` is rank 0's TensorBoard writer."""

    def __init__(self, run: TrainRun, writer, history: list[dict]):
        self.run, self.writer, self.history = run, writer, history
        self.main_proc = distributed.is_main()
        self.train_model = run.model if run.train_model is None else run.train_model
        self.best_acc = run.best_acc
        self.training_defenses = [d for d in run.defenses if d.stage == "training"]
        self.finished = run.start_epoch  # epochs whose checkpoint is on disk
        self.csv_path = os.path.join(run.outdir, "log.csv")
        self.ckpt_file = os.path.join(run.outdir, "checkpoint.pth.tar")
        self.best_file = os.path.join(run.outdir, "model_best.pth.tar")

    def run_epochs(self) -> int:
        run = self.run
        try:
            for epoch in range(run.start_epoch, run.epochs):
                self._epoch(epoch)
        except KeyboardInterrupt:
            if self.main_proc:
                log.info("interrupted; %s holds %d finished epoch(s) of %d: continue with  %s "
                         "--resume %s", self.ckpt_file, self.finished, run.epochs,
                         run.resume_command, self.ckpt_file)
            return 130
        except FloatingPointError as e:
            raise UserError(str(e)) from None
        distributed.barrier()  # rank 0 has written the last checkpoint before anyone leaves
        if self.main_proc:
            log.info("done: best test accuracy %.2f%% (%s)", self.best_acc, self.best_file)
        return 0

    def _epoch(self, epoch: int) -> None:
        run = self.run
        t0 = time.time()
        # Everything random in an epoch derives from (seed, epoch): exact resume.
        torch.manual_seed(run.seed * 1_000_003 + epoch)
        run.train_loader.set_epoch(epoch)
        tr = self._train_epoch(epoch)
        te = evaluate(run.model, run.output, run.test_loader)
        is_best = te["top1"] > self.best_acc
        self.best_acc = max(self.best_acc, te["top1"])
        row = {"epoch": epoch + 1, "lr": tr["lr"], "train_loss": round(tr["loss"], 6),
               "train_acc": round(tr["top1"], 4), "test_loss": round(te["loss"], 6),
               "test_acc": round(te["top1"], 4), "test_top5": round(te["top5"], 4),
               "best_acc": round(self.best_acc, 4), "seconds": round(time.time() - t0, 2)}
        self.history.append(row)
        if self.main_proc:
            self._write_epoch(epoch, row, te["top1"], is_best)
        else:
            self.finished = epoch + 1

    def _train_epoch(self, epoch: int) -> dict:
        run = self.run
        try:
            return train_one_epoch(self.train_model, run.output, run.train_loader, run.optimizer,
                                   run.schedule, epoch, defenses=self.training_defenses,
                                   seed=run.seed,
                                   progress=run.progress and self.main_proc, amp=run.amp)
        except Exception as e:
            if run.compiled and _is_compile_error(e):
                raise CompileError(f"--compile failed on this machine ({type(e).__name__}: "
                                   f"{_first_line(e)}); train without --compile") from None
            raise

    def _write_epoch(self, epoch: int, row: dict, test_acc: float, is_best: bool) -> None:
        """Rank 0: the epoch's checkpoints, its ``log.csv`` row and TensorBoard point."""
        run = self.run
        state = make_checkpoint(run.model, run.config, run.output, run.dataset.name,
                                run.dataset.mean, run.dataset.std, epoch=epoch + 1,
                                best_acc=self.best_acc, test_acc=test_acc,
                                defenses=run.defenses, optimizer=run.optimizer.state_dict(),
                                args=run.stored_args, history=self.history)
        # model_best first: a kill between the two writes leaves checkpoint.pth.tar one
        # epoch behind, and the resumed run redoes that epoch and writes both again.
        if is_best:
            save_checkpoint(state, self.best_file)
        save_checkpoint(state, self.ckpt_file)
        self.finished = epoch + 1
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
        _log_tb(self.writer, row)
        self.writer.flush()
        _log_epoch(row, run.epochs)


def _write_log_csv(path: str, rows: list[dict]) -> None:
    """``log.csv`` holding exactly ``rows`` (written next to it, then renamed: atomic)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        out.writeheader()
        out.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rows_of_old_log(path: str, epochs: int) -> list[dict]:
    """The rows of the first ``epochs`` epochs of an existing ``log.csv`` (checkpoints written
    before the history was stored in them)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit()
                and int(r["epoch"]) <= epochs]


def _log_tb(writer, row: dict) -> None:
    for key in TB_KEYS:
        writer.add_scalar(key.replace("_", "/", 1) if "_" in key else key, float(row[key]),
                          int(row["epoch"]))


def _log_epoch(row: dict, epochs: int, note: str = "") -> None:
    log.info("epoch %3d/%d  lr %.2e  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%% "
             "(best %.2f%%)  %.1fs%s", int(row["epoch"]), epochs, float(row["lr"]),
             float(row["train_loss"]), float(row["train_acc"]), float(row["test_loss"]),
             float(row["test_acc"]), float(row["best_acc"]), float(row["seconds"]), note)


def _is_compile_error(e: BaseException) -> bool:
    """An exception raised by torch.compile's machinery (dynamo, inductor, the C++ compiler)."""
    return any(type(x).__module__.startswith(("torch._dynamo", "torch._inductor"))
               for x in (e, e.__cause__) if x is not None)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
