r"""Cost of an adaptive attack's iteration against the paper attack's, on the same OCM model
(docs/algorithms.md section 14).

One progressive-search iteration of T-BFA (the default incremental search, |D_src| = |D_aux| =
``--n`` CIFAR-sized images, gradient from D_src as the paper attack) and of BFA (``--n``
attack images, multi-bit retry), on an 8-bit OCM16 ResNet-20, with the paper's loss (L1 to the
codeword: the baseline of the ratios) and with each decoded-score objective of
:class:`attacks.objectives.DecodedObjective` (``ce`` / ``margin`` on the ``tanh`` outputs or on
the pre-activations). Every variant starts from the same clean codes and runs ``--iters``
iterations; rounds are interleaved and the median seconds per iteration is reported. The
objective adds one ``[batch, L] x [L, classes]`` product to each loss evaluation; the trial
forwards, which dominate, are the paper attack's. TA-LBF: ``--talbf-iters`` outer ADMM
iterations of the first batch of its (k, gamma) search on the same model's final layer (64
features, ``--n`` D_aux samples), the paper's BCE gradient against the decoded-score one
(:class:`attacks.talbf.TALBFAdaptive`).

Examples:
  python -m bench.bench_adaptive                 # 500 + 500 images, 5 iterations, 3 rounds
  python -m bench.bench_adaptive --device cuda --n 500 --iters 10
  python -m bench.bench_adaptive --quick         # seconds: small sets, 2 iterations
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from attacks.objectives import DecodedObjective
from campaigns.results import format_table
from models import build_output, get_model, to_integer
from models.bits import restore, snapshot
from utils.bitsearch import MAXIMIZE, MINIMIZE, AttackLoss, ProgressiveBitSearch
from utils.device import resolve_device

VARIANTS = ("paper (L1)", "ce", "margin", "ce, preact", "margin, preact")


def build(device, n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = get_model("resnet20_quan", 16, 8, output_act="tanh").to(device)
    head = build_output(10, True, 16).to(device)
    model.train()
    with torch.no_grad():  # BatchNorm statistics from a few batches
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32, device=device))
    to_integer(model.eval())
    g = torch.Generator().manual_seed(seed + 1)
    x_src = torch.randn(n, 3, 32, 32, generator=g).to(device)
    x_aux = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y_aux = torch.randint(0, 10, (n,), generator=g).to(device)
    return model, head, x_src, x_aux, y_aux


def objective(variant: str, head, model, untargeted: bool):
    """The loss interface of ``variant``; the model emits z for the pre-activation ones."""
    model.output_act = "tanh"
    if variant == "paper (L1)":
        return head
    loss, _, scores = variant.partition(", ")
    obj = DecodedObjective(head, loss, scores or "tanh", untargeted=untargeted)
    obj.emit_preactivation(model)
    return obj


def time_variant(kind, variant, model, head, clean, data, iters, device) -> float:
    """Seconds per iteration of ``iters`` search steps from the clean codes."""
    x_src, x_aux, y_aux = data
    restore(model, clean)
    out = objective(variant, head, model, untargeted=kind == "bfa")
    if kind == "tbfa":
        ns = len(x_src)
        x_both = torch.cat([x_src, x_aux])
        t_src = torch.full((ns,), 3, dtype=torch.int64, device=device)
        search = ProgressiveBitSearch(model, MINIMIZE)
        loss = AttackLoss(model, x_both, lambda o: out.loss(o[:ns], t_src)
                          + out.loss(o[ns:], y_aux))

        def gradient_loss():
            return out.loss(model(x_src), t_src), None
    else:
        with torch.no_grad():
            y = out.predict(model(x_src))
        search = ProgressiveBitSearch(model, MAXIMIZE, multi_bit_retry=True,
                                      skip_inadmissible=True)
        loss = AttackLoss(model, x_src, lambda o: out.loss(o, y))

        def gradient_loss():
            value = loss()
            return value, float(value.detach())
    search.step(gradient_loss, loss)  # warm-up: tracing, caches, first allocation
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        search.step(gradient_loss, loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def time_talbf(variant: str, model, head, data, iters: int, device) -> float:
    """Seconds per outer ADMM iteration of TA-LBF (``variant``: paper or an adaptive loss)."""
    from attacks.talbf import TALBF, FinalLayer, TALBFAdaptive, TALBFConfig

    x_src, x_aux, y_aux = data
    with torch.no_grad():
        features = model.forward_features(x_aux)
    model.output_act = "tanh"
    layer = FinalLayer.from_model(model)
    config = TALBFConfig(ext_max_iters=iters, min_ext_iters=iters, max_search_k=1)
    labels = y_aux
    if variant == "paper (L1)":
        attack = TALBF(layer, head, features, labels, config)
    else:
        loss, _, scores = variant.partition(", ")
        attack = TALBFAdaptive(layer, head, features, labels, config, loss=loss,
                               scores=scores or "tanh")
    aux = torch.arange(1, min(len(labels), 65), device=device)
    target = (int(labels[0]) + 1) % 10
    problem = attack.problem(0, target, aux)
    runs = attack.config.search_order()[:8]
    attack.admm(problem, runs[:1])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    attack.admm(problem, runs)
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
    p.add_argument("--talbf-iters", type=int, default=50,
                   help="TA-LBF outer ADMM iterations timed (default 50)")
    p.add_argument("--searches", nargs="+", choices=("tbfa", "bfa", "talbf"),
                   default=["tbfa", "bfa", "talbf"], help="which attacks to time (all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="16 images, 2 iterations, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.iters, args.rounds, args.talbf_iters = 16, 2, 1, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, head, *data = build(device, args.n)
    clean = snapshot(model)
    rows = []
    for kind in [k for k in ("tbfa", "bfa") if k in args.searches]:
        times = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                times[v].append(time_variant(kind, v, model, head, clean, data, args.iters,
                                             device))
        base = statistics.median(times[VARIANTS[0]])
        for v in VARIANTS:
            t = statistics.median(times[v])
            rows.append({"search": "T-BFA" if kind == "tbfa" else "BFA", "loss": v,
                         "s / iteration": f"{t:.4f}", "cost vs paper": f"{t / base:.2f}x"})
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds if "talbf" in args.searches else 0):
        for v in VARIANTS:
            restore(model, clean)
            times[v].append(time_talbf(v, model, head, data, args.talbf_iters, device))
    base = statistics.median(times[VARIANTS[0]]) if times[VARIANTS[0]] else None
    for v in VARIANTS if base else ():
        t = statistics.median(times[v])
        rows.append({"search": "TA-LBF", "loss": v if v != VARIANTS[0] else "paper (BCE)",
                     "s / iteration": f"{t:.4f}", "cost vs paper": f"{t / base:.2f}x"})
    restore(model, clean)
    model.output_act = "tanh"
    print(f"Adaptive objectives, OCM16 ResNet-20 8-bit, {args.n} + {args.n} images, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds of "
          f"{args.iters} iterations")
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
