r"""Cost of a constrained bit search against the unconstrained one (docs/algorithms.md section 5b).

One progressive-search iteration of T-BFA (the default search: incremental trial forwards,
|D_src| = |D_aux| = ``--n`` CIFAR-sized images) and of BFA (``--n`` attack images, the
multi-bit retry allowed) on an 8-bit ResNet-20, timed under each fault model in the same
process: ``none`` (no fault model: the baseline of the ratios), one flip per 4 KiB page,
``0to1`` only, no MSB, a vulnerability profile covering 10 % of the cells, and all of them
together. Every variant starts from the same clean codes and runs ``--iters`` iterations;
the rounds are interleaved and the median seconds per iteration is reported.

The fault model adds, per layer and iteration, one admissibility mask over the ``[weights,
bits]`` candidates (the size of the first-order scores the search computes anyway), and after
each kept flip one page mark; the trial forwards, which dominate, are unchanged.

Examples:
  python -m bench.bench_faults                  # 500 + 500 images, 5 iterations, 3 rounds
  python -m bench.bench_faults --device cuda --n 500 --iters 10
  python -m bench.bench_faults --quick          # seconds: small sets, 2 iterations
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from models import build_output, get_model, to_integer
from models.bits import restore, snapshot
from utils.bitsearch import MAXIMIZE, MINIMIZE, AttackLoss, ProgressiveBitSearch
from utils.device import resolve_device
from utils.faults import FaultModel, FaultState, MemoryLayout
from campaigns.results import format_table


def write_profile(path: str, model, fraction: float, seed: int = 0) -> None:
    """A random vulnerability profile: ``fraction`` of the weights' bit cells, random
    directions (the file format of :func:`utils.faults.read_profile`)."""
    total = MemoryLayout(model).total_bytes
    rng = np.random.default_rng(seed)
    n = int(total * 8 * fraction)
    cells = rng.choice(total * 8, size=n, replace=False)
    dirs = rng.integers(1, 3, size=n)
    with open(path, "w") as f:
        for c, d in zip(cells.tolist(), dirs.tolist()):
            f.write(f"{c // 8} {c % 8} {'0to1' if d == 1 else '1to0'}\n")


def fault_models(profile: str) -> dict[str, FaultModel | None]:
    return {
        "none": None,
        "1/page": FaultModel(one_per_page=True),
        "0to1": FaultModel(direction="0to1"),
        "no MSB": FaultModel(bit_positions=tuple(range(1, 8))),
        "profile 10%": FaultModel(profile=profile),
        "all": FaultModel(bit_positions=tuple(range(1, 8)), direction="0to1",
                          profile=profile, one_per_page=True, budget=10 ** 6),
    }


def build(device, n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = get_model("resnet20_quan", 10, 8).to(device)
    output = build_output(10, False).to(device)
    model.train()
    with torch.no_grad():  # BatchNorm statistics from a few batches
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32, device=device))
    to_integer(model.eval())
    g = torch.Generator().manual_seed(seed + 1)
    x_src = torch.randn(n, 3, 32, 32, generator=g).to(device)
    x_aux = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y_aux = torch.randint(0, 10, (n,), generator=g).to(device)
    return model, output, x_src, x_aux, y_aux


def time_variant(kind, model, output, clean, fault, data, iters, device) -> float:
    """Seconds per iteration of ``iters`` search steps from the clean codes under ``fault``."""
    x_src, x_aux, y_aux = data
    restore(model, clean)
    if kind == "tbfa":
        ns = len(x_src)
        x_both = torch.cat([x_src, x_aux])
        t_src = torch.full((ns,), 3, dtype=torch.int64, device=device)
        search = ProgressiveBitSearch(model, MINIMIZE)
        loss = AttackLoss(model, x_both, lambda out: output.loss(out[:ns], t_src)
                          + output.loss(out[ns:], y_aux))

        def gradient_loss():
            return output.loss(model(x_src), t_src), None
    else:
        with torch.no_grad():
            y = model(x_src).argmax(1)
        search = ProgressiveBitSearch(model, MAXIMIZE, multi_bit_retry=True,
                                      skip_inadmissible=True)
        loss = AttackLoss(model, x_src, lambda out: output.loss(out, y))

        def gradient_loss():
            value = loss()
            return value, float(value.detach())
    search.faults = FaultState(model, fault) if fault is not None else None
    search.step(gradient_loss, loss)  # warm-up: tracing, caches, first allocation
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        search.step(gradient_loss, loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=500, help="images per set (default 500)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="16 images, 2 iterations, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.iters, args.rounds = 16, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, output, *data = build(device, args.n)
    clean = snapshot(model)
    with tempfile.TemporaryDirectory() as tmp:
        profile = os.path.join(tmp, "profile.txt")
        write_profile(profile, model, 0.10)
        variants = fault_models(profile)
        rows = []
        for kind in ("tbfa", "bfa"):
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fault in variants.items():
                    times[name].append(time_variant(kind, model, output, clean, fault, data,
                                                    args.iters, device))
            base = statistics.median(times["none"])
            for name in variants:
                t = statistics.median(times[name])
                rows.append({"search": "T-BFA" if kind == "tbfa" else "BFA",
                             "fault model": name, "s / iteration": f"{t:.4f}",
                             "cost vs none": f"{t / base:.2f}x"})
    restore(model, clean)
    print(f"Constrained bit search, ResNet-20 8-bit, {args.n} + {args.n} images, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds of "
          f"{args.iters} iterations")
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
