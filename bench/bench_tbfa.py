r"""T-BFA cost: one progressive-search iteration and one whole experiment, ours against plain.

Part 1, one iteration (docs/algorithms.md sections 5 and 7) on an 8-bit ResNet-20 with |D_src| = |D_aux| =
500 CIFAR-sized images (the paper's CIFAR-10 protocol), timed over several iterations of one
attack, three ways in the same run:

- ``reference``: the plain search written here the obvious way: backward of the D_src loss,
  then per quantized layer the best bit by the first-order rule, flip it, a full forward of
  D_src + D_aux, undo; keep the best layer. The baseline of the ratios.
- ``ours-plain``: :class:`utils.bitsearch.ProgressiveBitSearch` with ``incremental=False``
  (the library's full-forward path);
- ``ours``: the library's default: each trial re-runs the network only from the flipped layer
  on, from activations cached by the clean forward (:mod:`models.incremental`).

The three start from the same weights and must choose the same bit on every iteration (the
``same flips`` column).

Part 2, one whole experiment (:meth:`attacks.tbfa.TBFA.run`, incremental vs plain search,
ASR checks after every flip and the clean/final test-set metrics included) up to
``--experiment-iters`` flips (the success stop is disabled so both run to the cap), same
flips required.

The model is randomly initialised (BatchNorm statistics from a few training-mode batches) and
the images are random: the cost of an iteration does not depend on what the weights learnt.

Examples:
  python -m bench.bench_tbfa                       # 500 + 500 images, 5 iterations
  python -m bench.bench_tbfa --device cuda --n 500 --iters 10
  python -m bench.bench_tbfa --quick               # seconds: small sets, 2 iterations
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


from attacks import tbfa as T
from attacks.common import EvalSet
from models import build_output, get_model, quant_layers, to_integer
from utils.bitsearch import MINIMIZE, AttackLoss, ProgressiveBitSearch
from utils.device import resolve_device
from campaigns.results import format_table


# ---------------------------------------------------------------------------------------------
# The plain reference search, written the obvious way
# ---------------------------------------------------------------------------------------------

def reference_step(model, output, x_src, t_src, x_both, attack_loss):
    """One iteration: gradient of the D_src loss, one full forward per layer's trial flip."""
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "n_bits")]
    for _, layer in layers:
        layer.weight.grad = None
    output.loss(model(x_src), t_src).backward()
    best = None
    for name, layer in layers:
        n = layer.n_bits
        g = layer.weight.grad.reshape(-1)
        flat = layer.weight.data.view(-1)
        codes = flat.round().long()
        unsigned = codes % (2 ** n)
        bits = torch.stack([(unsigned >> (n - 1 - k)) & 1 for k in range(n)], dim=1)
        base = torch.tensor([-(2 ** (n - 1))] + [2 ** (n - 1 - k) for k in range(1, n)])
        change = (1 - 2 * bits) * base * g[:, None]     # first-order loss change per bit
        score = -change.reshape(-1)                     # T-BFA lowers the loss
        top = int(score.argmax())
        if float(score[top]) > 0:
            index, bit = top // n, top % n
        else:  # no bit lowers the loss: the public code's arbitrary bit
            index, bit = int(g.abs().argmax()), 0
        before = flat[index].clone()
        pattern = (int(before.round()) % (2 ** n)) ^ (1 << (n - 1 - bit))  # N-bit two's compl.
        value = pattern - 2 ** n if pattern >= 2 ** (n - 1) else pattern
        flat[index] = value
        with torch.no_grad():
            loss = float(attack_loss())
        flat[index] = before
        if best is None or loss < best[0]:
            best = (loss, name, layer, index, value)
    _, name, layer, index, value = best
    layer.weight.data.view(-1)[index] = value
    return name, index


def make_model(arch: str, classes: int, device, seed: int):
    torch.manual_seed(seed)
    model = get_model(arch, num_outputs=classes).to(device)
    model.train()
    with torch.no_grad():  # BatchNorm statistics of random data
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32, device=device))
    return to_integer(model.eval())


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def bench_iteration(args, device):
    """Seconds per iteration of the three searches, and whether their flips agree."""
    model = make_model(args.arch, 10, device, args.seed)
    output = build_output(10).to(device)
    clean = {n: layer.weight.detach().clone() for n, layer in quant_layers(model)}
    gen = torch.Generator().manual_seed(args.seed)
    x_src = torch.randn(args.n, 3, 32, 32, generator=gen).to(device)
    x_aux = torch.randn(args.n, 3, 32, 32, generator=gen).to(device)
    y_aux = torch.randint(10, (args.n,), generator=gen).to(device)
    t_src = torch.full((args.n,), 1, device=device)
    x_both = torch.cat([x_src, x_aux])
    loss_fn = (lambda out: output.loss(out[:args.n], t_src) + output.loss(out[args.n:], y_aux))
    attack_loss = AttackLoss(model, x_both, loss_fn)

    def reset():
        for n, layer in quant_layers(model):
            layer.weight.data.copy_(clean[n])

    rows, flips = [], {}
    for variant in ("reference", "ours-plain", "ours"):
        reset()
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in quant_layers(model):
            layer.weight.requires_grad_(True)
        search = None if variant == "reference" else ProgressiveBitSearch(
            model, MINIMIZE, incremental=(variant == "ours"))
        chosen, seconds = [], []
        for _ in range(args.iters):
            if search is None:
                dt, flip = timed(lambda: reference_step(model, output, x_src, t_src, x_both,
                                                        attack_loss), device)
            else:
                grad = lambda: (output.loss(model(x_src), t_src), None)  # noqa: E731
                dt, step = timed(lambda: search.step(grad, attack_loss), device)
                flip = (step.flips[0].layer, step.flips[0].index)
            chosen.append(flip)
            seconds.append(dt)
        flips[variant] = chosen
        # the first iteration of "ours" also primes the cache: report the steady state too
        rows.append({"part": "iteration", "variant": variant,
                     "s/iter": sum(seconds) / len(seconds),
                     "s/iter (after 1st)": sum(seconds[1:]) / max(1, len(seconds) - 1)})
    reset()
    return rows, flips


def bench_experiment(args, device):
    """One whole T-BFA experiment, incremental vs plain search."""
    model = make_model(args.arch, 10, device, args.seed)
    output = build_output(10).to(device)
    clean = {n: layer.weight.detach().clone() for n, layer in quant_layers(model)}
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_test = args.test_size
    images = torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n_test) % 10
    data = EvalSet(images, labels, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), device)
    sets = T.draw_sets(labels, 0, args.n, args.n, seed=args.seed)
    rows, results = [], {}
    for variant, incremental in (("ours-plain", False), ("ours", True)):
        for n, layer in quant_layers(model):
            layer.weight.data.copy_(clean[n])
        # success can never fire (an untrained model may predict the target everywhere):
        # both variants run to the cap unless no bit is left
        cfg = T.TBFAConfig(max_iters=args.experiment_iters,
                           incremental=incremental, success_threshold=101.0,
                           oscillation_by_layer=True)
        dt, res = timed(lambda: T.TBFA(model, output, cfg).run(data, sets, 0, 1), device)
        results[variant] = res
        rows.append({"part": "experiment", "variant": variant, "s": dt, "flips": res.iterations,
                     "s/flip": dt / max(1, res.iterations)})
    return rows, results


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20_quan", help="registry name (resnet20_quan)")
    p.add_argument("--n", type=int, default=500, help="|D_src| = |D_aux| (500)")
    p.add_argument("--iters", type=int, default=5, help="timed search iterations (5)")
    p.add_argument("--experiment-iters", type=int, default=10,
                   help="flip cap of the whole experiment (10; 0 skips part 2)")
    p.add_argument("--test-size", type=int, default=10000, help="test images of part 2 (10000)")
    p.add_argument("--quick", action="store_true",
                   help="seconds: |D| = 16, 2 iterations, a 3-flip experiment on 200 images")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda[:i] (cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.n, args.iters, args.experiment_iters, args.test_size = 16, 2, 3, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows, flips = bench_iteration(args, device)
    base = rows[0]["s/iter (after 1st)"]
    same = {v: flips[v] == flips["reference"] for v in flips}
    for r in rows:
        r["ratio"] = r["s/iter (after 1st)"] / base
        r["same flips"] = "yes" if same[r["variant"]] else "NO"
    print(f"One T-BFA iteration: {args.arch}, |D_src| = |D_aux| = {args.n}, {args.iters} "
          f"iterations, {device}, {torch.get_num_threads()} thread(s)")
    print(format_table(rows, ["variant", "s/iter", "s/iter (after 1st)", "ratio", "same flips"],
                       floatfmt="{:.3f}"))
    ok = all(same.values())
    if args.experiment_iters > 0:
        erows, results = bench_experiment(args, device)
        same_exp = results["ours"].flips == results["ours-plain"].flips
        for r in erows:
            r["ratio"] = r["s"] / erows[0]["s"]
            r["same flips"] = "yes" if same_exp else "NO"
        print(f"\nOne whole T-BFA experiment (cap {args.experiment_iters} flips, "
              f"{args.test_size} test images)")
        print(format_table(erows, ["variant", "s", "flips", "s/flip", "ratio", "same flips"],
                           floatfmt="{:.3f}"))
        ok = ok and same_exp
    if not ok:
        print("error: the searches chose different flips", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
