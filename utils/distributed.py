"""Multi-process training with ``torch.distributed``, launched by ``torchrun``.

One home for the process-group plumbing: ``torchrun --nproc_per_node=K main.py ...`` sets the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR/PORT``);
:func:`init_distributed` reads them, picks the backend (``nccl`` for CUDA, ``gloo`` for the
CPU) and the process's device (``cuda:LOCAL_RANK`` on a GPU machine). Without torchrun (no
``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper answers as for a single process, so the same
code runs with and without it.

The helpers never hard-code a device: collectives run on the tensors' own device (gloo needs
CPU tensors, nccl CUDA ones; :func:`all_reduce_sum` moves them when needed).
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger(__name__)

__all__ = ["env_world_size", "launched_by_torchrun", "init_distributed", "is_distributed",
           "world_size", "rank", "local_rank", "is_main", "barrier", "all_reduce_sum",
           "broadcast_object", "cleanup", "backend_for"]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE > 1``)."""
    return env_world_size() > 1


def is_distributed() -> bool:
    """True once a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1


def rank() -> int:
    return dist.get_rank() if (dist.is_available() and dist.is_initialized()) else 0


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 without torchrun)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs and writes files."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def process_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda`` (with or without index) becomes ``cuda:LOCAL_RANK``
    under torchrun, one GPU per process; CPU stays CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    lr = local_rank()
    count = torch.cuda.device_count()
    if device.index not in (None, lr) and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise UserError(f"--device {device} with torchrun: each process takes the GPU of its "
                        f"LOCAL_RANK; pass --device cuda (or auto), or limit the GPUs with "
                        f"CUDA_VISIBLE_DEVICES")
    if lr >= count:
        raise UserError(f"LOCAL_RANK {lr} has no GPU: this node has {count}; start torchrun "
                        f"with --nproc_per_node={count} or fewer")
    return torch.device("cuda", lr)


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> torch.device:
    """Join the torchrun process group (when launched by torchrun) and return this process's
    device. Idempotent; a no-op returning ``device`` for a single process."""
    device = torch.device(device)
    if not launched_by_torchrun():
        return device
    if not dist.is_available():
        raise UserError("torchrun started several processes but this PyTorch build has no "
                        "torch.distributed support")
    device = process_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = backend_for(device)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **kwargs)
        log.debug("rank %d/%d joined the %s process group on %s", rank(), world_size(),
                  backend, device)
    return device


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place, and return it (unchanged for one process).

    gloo reduces CPU tensors and nccl CUDA tensors: a tensor on the other kind of device makes
    the round trip.
    """
    if not is_distributed():
        return tensor
    want_cuda = dist.get_backend() == "nccl"
    if want_cuda == (tensor.device.type == "cuda"):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(torch.device("cuda", torch.cuda.current_device()) if want_cuda else "cpu")
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every process (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class WorkCounter:
    """Hands out 0, 1, 2, ... across the processes, each number once: whoever is free takes
    the next item of a list every process holds the same (the process group's key-value
    store's atomic add). One process counts alone; without a store, each process takes every
    world-size-th number (round-robin). ``name`` tells two counters of one run apart."""

    def __init__(self, name: str):
        self.key = f"work-counter/{name}"
        self._store = _default_store() if is_distributed() else None
        self._next, self._stride = (0, 1) if self._store is not None else (rank(),
                                                                            world_size())

    def next(self) -> int:
        if self._store is not None:
            return int(self._store.add(self.key, 1)) - 1
        n, self._next = self._next, self._next + self._stride
        return n


def _default_store():
    """The process group's store (torchrun's rendezvous store), or None where this PyTorch
    does not expose it."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return None


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
