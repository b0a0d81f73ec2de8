r"""Time per TA-LBF attack (docs/algorithms.md section 8): ours against a plain sequential implementation.

Three variants attack the same samples (same D_aux) of each checkpoint, in the same run:

- ``ours``: :class:`attacks.talbf.TALBF` (the 8 gamma runs of a k batched, analytic gradients);
- ``ours-seq``: the same engine one gamma at a time (``gamma_batch=1``);
- ``sequential``: the obvious tensor implementation, written here: one (k, gamma) run at a
  time, the loss through autograd and torch's loss functions (the public code's structure,
  without its copies to NumPy). This is the baseline of the ratios.

Prints one table (seconds per attack, ratio to ``sequential``, and whether each attack ended
with the same success, k, gamma and bit count as ``sequential``).

Examples:
  python -m bench.bench_talbf                       # runs/quickstart/{vanilla,ocm16}, 3 attacks
  python -m bench.bench_talbf --checkpoints a.pth.tar b.pth.tar --attacks 5
  python -m bench.bench_talbf --quick               # seconds; a synthetic layer if no checkpoint
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F


from attacks.talbf import (FinalLayer, TALBF, TALBFConfig, aux_seed,
                           generate_attack_list)
from models import bits as bitlib
from campaigns.results import format_table

DEFAULT_CHECKPOINTS = [os.path.join("runs", "quickstart", m, "model_best.pth.tar")
                       for m in ("vanilla", "ocm16")]


# ---------------------------------------------------------------------------------------------
# The plain sequential variant
# ---------------------------------------------------------------------------------------------

def sequential_run(attack: TALBF, index: int, target: int, aux: torch.Tensor, k: float,
                   gamma: float, cfg: TALBFConfig):
    """One (k, gamma) lp-box ADMM run, written the obvious way. Returns a dict: ``nan`` (b
    became NaN: the run failed), ``success``, ``bits_changed``, ``bits`` (rounded), ``relaxed`` (b
    before rounding, ``[out, in, N]``), ``iters`` and ``converged``."""
    layer = attack.layer
    rows = torch.cat([aux, torch.tensor([index], device=aux.device)])
    x = attack.features[rows]
    y_aux = attack.labels[aux]
    base = bitlib.bit_values(layer.n_bits, dtype=torch.float32, device=x.device)
    b0 = layer.bits().float()
    b0_flat = b0.reshape(-1)
    n = b0_flat.numel()
    b = b0.clone().requires_grad_(True)
    z1, z2, z3 = torch.zeros(n, device=x.device), torch.zeros(n, device=x.device), 0.0
    rho1, rho2, rho3 = cfg.rho1, cfg.rho2, cfg.rho3
    if attack.ocm:
        codes01 = (attack.output.codebook.to(x.device) + 1) / 2
    for ext in range(cfg.ext_max_iters):
        bf = b.detach().reshape(-1)
        y1 = torch.clamp(bf + z1 / rho1, 0, 1)
        v = bf + z2 / rho2 - 0.5
        y2 = math.sqrt(n) / 2 * v / torch.norm(v) + 0.5
        y3 = max(0.0, float(-torch.norm(bf - b0_flat) ** 2 + k - z3 / rho3))
        for _ in range(cfg.inn_max_iters):
            w = (bitlib.bit_offset(layer.n_bits) + (b * base).sum(-1)) * layer.step
            out = F.linear(x, w, layer.bias)
            if attack.ocm:
                p = torch.sigmoid(2 * out)
                l1 = F.binary_cross_entropy(p[-1], codes01[target])
                l2 = F.binary_cross_entropy(p[:-1], codes01[y_aux])
            else:
                l1 = -torch.log_softmax(out[-1], dim=0)[target]
                l2 = F.cross_entropy(out[:-1], y_aux)
            bb = b.reshape(-1)
            budget = torch.norm(bb - b0_flat) ** 2 - k + y3
            l3 = z1 @ (bb - y1) + z2 @ (bb - y2) + z3 * budget
            l4 = rho1 / 2 * torch.norm(bb - y1) ** 2 + rho2 / 2 * torch.norm(bb - y2) ** 2 \
                + rho3 / 2 * budget ** 2
            loss = l1 + gamma * l2 + l3 + l4
            (grad,) = torch.autograd.grad(loss, b)
            with torch.no_grad():
                b -= cfg.inn_lr * grad
        bf = b.detach().reshape(-1)
        if torch.isnan(bf).any():
            return {"nan": True, "success": False, "relaxed": b.detach(), "iters": ext + 1}
        z1 = z1 + rho1 * (bf - y1)
        z2 = z2 + rho2 * (bf - y2)
        z3 = z3 + rho3 * float(torch.norm(bf - b0_flat) ** 2 - k + y3)
        rho1 = min(cfg.rho_fact * rho1, cfg.max_rho1)
        rho2 = min(cfg.rho_fact * rho2, cfg.max_rho2)
        rho3 = min(cfg.rho_fact * rho3, cfg.max_rho3)
        crit = max(float(torch.norm(bf - y1)), float(torch.norm(bf - y2))) / max(
            float(torch.norm(bf)), 2.2204e-16)
        converged = crit <= cfg.stop_threshold and ext > cfg.min_ext_iters
        if converged:
            break
    bits = (b.detach() > 0.5).to(torch.uint8)
    codes = layer.codes_from_bits(bits)
    success = int(attack.predict(attack.features[index:index + 1], codes)[0]) == target
    return {"nan": False, "success": success, "bits_changed": int((bits.float() != b0).sum()),
            "bits": bits, "relaxed": b.detach(), "iters": ext + 1,
            "converged": converged}


def sequential_attack(attack: TALBF, index: int, target: int, aux: torch.Tensor,
                      cfg: TALBFConfig) -> dict:
    """The search over k and gamma, one run at a time; the first success wins."""
    for k, gamma in cfg.search_order():
        res = sequential_run(attack, index, target, aux, k, gamma, cfg)
        if res["success"]:
            return {"success": True, "k": k, "gamma": gamma, "bits_changed": res["bits_changed"]}
    return {"success": False, "k": None, "gamma": None, "bits_changed": None}


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------

def load_target(path: str, device):
    """(name, FinalLayer, output, features, labels) of a checkpoint on the digits test set (or
    the data set it was trained on, when its files are at hand)."""
    from attacks.common import EvalSet
    from attacks.talbf import compute_features
    from attacks.target import DataSpec, TargetSpec, build_target

    target = build_target(TargetSpec(checkpoint=path,
                                     data=DataSpec(os.environ.get("DATA_DIR", "data"))), device)
    images, labels = target.load_test_split()
    data = EvalSet(images, labels, target.mean, target.std, device)
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return (name, FinalLayer.from_model(target.model), target.output,
            compute_features(target.model, data), data.labels)


def synthetic_target(ocm: bool, device, seed: int = 0):
    """A random 8-bit 64-input final layer on random features (for --quick without a
    checkpoint); labels are the clean predictions, so every sample is attackable."""
    from models.ocm import OutputCodeMatching, SoftmaxOutput, make_codebook

    g = torch.Generator().manual_seed(seed)
    out = 16 if ocm else 10
    codes = torch.randint(-127, 128, (out, 64), generator=g)
    layer = FinalLayer(codes.to(device), 0.01, torch.zeros(out, device=device), 8, tanh=ocm)
    output = (OutputCodeMatching(make_codebook(10, 16)) if ocm else SoftmaxOutput(10)).to(device)
    features = torch.relu(torch.randn(360, 64, generator=g)).to(device)
    labels = output.predict(layer.outputs(features))
    return ("synthetic-ocm16" if ocm else "synthetic-vanilla"), layer, output, features, labels


# ---------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="*", default=None,
                   help="checkpoints to attack (default: runs/quickstart/{vanilla,ocm16})")
    p.add_argument("--attacks", type=int, default=3, help="attacks per checkpoint (3)")
    p.add_argument("--ext-max-iters", type=int, default=None,
                   help="outer ADMM iterations (default 2000; 120 with --quick)")
    p.add_argument("--max-search-k", type=int, default=None,
                   help="k values searched (default 6; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="1 attack per model, 2 short runs (120 outer iterations, k=5, 2 "
                        "gammas): timings only; synthetic layers if no checkpoint is found")
    p.add_argument("--no-sequential", action="store_true", help="skip the plain variant")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--seed", type=int, default=1)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_attacks = 1 if args.quick else args.attacks
    cfg = TALBFConfig(
        ext_max_iters=args.ext_max_iters or (120 if args.quick else 2000),
        max_search_k=args.max_search_k or (1 if args.quick else 6),
        max_search_gamma=2 if args.quick else 8)
    paths = args.checkpoints if args.checkpoints is not None else [
        p for p in DEFAULT_CHECKPOINTS if os.path.exists(p)]
    if paths:
        targets = [load_target(p, device) for p in paths]
    elif args.quick:
        targets = [synthetic_target(False, device), synthetic_target(True, device)]
    else:
        print("error: no checkpoints (run bash scripts/quickstart.sh or pass --checkpoints)",
              file=sys.stderr)
        return 2

    variants = [("ours", cfg), ("ours-seq", TALBFConfig(**{**cfg.to_dict(), "gamma_batch": 1}))]
    rows = []
    for name, layer, output, features, labels in targets:
        attacks = {v: TALBF(layer, output, features, labels, c) for v, c in variants}
        first = attacks["ours"]
        items = generate_attack_list(labels, first.num_classes, n_attacks, args.seed,
                                     eligible=first.clean_correct)
        times = {v: 0.0 for v, _ in variants}
        times["sequential"] = 0.0
        outcomes = {v: [] for v in times}
        for item in items:
            aux = first.draw_aux(item.index, aux_seed(args.seed, item))
            for v, _ in variants:
                t0 = time.perf_counter()
                r = attacks[v].run(item.index, item.target, aux=aux)
                times[v] += time.perf_counter() - t0
                outcomes[v].append({"success": r.success, "k": r.k, "gamma": r.gamma,
                                    "bits_changed": r.bits_changed})
            if not args.no_sequential:
                t0 = time.perf_counter()
                outcomes["sequential"].append(sequential_attack(first, item.index, item.target,
                                                                aux.to(device), cfg))
                times["sequential"] += time.perf_counter() - t0
        base = times["sequential"] / n_attacks if not args.no_sequential else float("nan")
        for v in times:
            if v == "sequential" and args.no_sequential:
                continue
            per = times[v] / n_attacks
            ok = outcomes[v]
            rows.append({
                "model": name, "variant": v, "attacks": n_attacks,
                "s/attack": f"{per:.2f}",
                "speed-up": f"{base / per:.1f}x" if per > 0 and base == base else "-",
                "success": sum(o["success"] for o in ok),
                "k, gamma, flips": "; ".join(f"{o['k']:g},{o['gamma']:g},{o['bits_changed']}"
                                             if o["success"] else "fail" for o in ok),
                "same as seq": ("-" if args.no_sequential else
                                f"{sum(a == b for a, b in zip(ok, outcomes['sequential']))}"
                                f"/{n_attacks}")})
    print(f"TA-LBF time per attack ({device}, {torch.get_num_threads()} thread(s), "
          f"ext_max_iters {cfg.ext_max_iters}, {cfg.max_search_k} k x "
          f"{cfg.max_search_gamma} gamma values)")
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
