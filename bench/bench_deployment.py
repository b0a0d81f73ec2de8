r"""Inference time and memory of the deployment-time defenses against the undefended model
(docs/algorithms.md section 15).

One 8-bit ResNet-20 (or ``--checkpoint``), in integer mode; each variant is the model behind
its defenses' check (:class:`defenses.deployment.DefendedModel`: every forward first runs the
check and repair, as every evaluation of an attacked model does) and is timed on the same
``--batch`` inputs in the same process: ``none`` (the plain model: the baseline of the
ratios), RADAR with groups of 512 (the paper's ResNet-18 setting) and 64, DeepNcode with its
shortest 8-bit code (C12_3) and its default (C14_4). Rounds are interleaved and the median
seconds per forward reported, with the check alone (its share of the undefended forward, less
noisy than the difference of two forwards on a shared machine) and the stored bits per
weight (``memory_per_weight``).

What is timed is this tool's simulation: the check scans every stored weight on each forward
(RADAR: one group sum per group; DeepNcode: one table look-up per word) and DeepNcode's layers
decode their words at every forward; the papers' figures (RADAR: under 1 % on gem5; DeepNcode:
negligible) are for checks fused into the inference.

Examples:
  python -m bench.bench_deployment                 # batch 128, 20 forwards, 3 rounds
  python -m bench.bench_deployment --checkpoint runs/quickstart/vanilla/model_best.pth.tar
  python -m bench.bench_deployment --quick         # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from campaigns.results import format_table
from defenses import parse_defense
from defenses.deployment import DefendedModel
from models import get_model, to_integer
from utils.device import resolve_device

VARIANTS = ("none", "radar:group_size=512,key=1", "radar:group_size=64,key=1",
            "deepncode:code=C12_3", "deepncode:code=C14_4")


def build(device, checkpoint: str | None, seed: int = 0):
    """A fresh 8-bit ResNet-20 in integer mode (BatchNorm statistics from random batches),
    or the checkpoint's model."""
    if checkpoint:
        from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(checkpoint)
        model, _ = model_from_checkpoint(ckpt, checkpoint_config(ckpt))
    else:
        torch.manual_seed(seed)
        model = get_model("resnet20_quan", 10, 8)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(64, 3, 32, 32))
    return to_integer(model.eval().to(device))


def variant(spec: str, device, checkpoint):
    """``(model to time, its defense or None, stored bits per weight, bits per weight
    undefended)``."""
    model = build(device, checkpoint)
    if spec == "none":
        from models.bits import bit_layers

        bits = [layer.bit_format.n_bits for _, layer in bit_layers(model)]
        numel = [layer.weight.numel() for _, layer in bit_layers(model)]
        plain = sum(b * n for b, n in zip(bits, numel)) / sum(numel)
        return model, None, plain, plain
    defense = parse_defense(spec)
    stored, plain = defense.memory_per_weight(model)
    defense.protect(model)
    return DefendedModel(model, model, [defense]), defense, stored, plain


@torch.inference_mode()
def seconds_per_check(defense, model, iters: int, device) -> float:
    """Seconds of one check and repair of the stored weights alone (nothing to repair)."""
    if defense is None:
        return 0.0
    return seconds_per_forward(lambda _: defense.check_and_repair(model.evaluated), None,
                               iters, device)


@torch.inference_mode()
def seconds_per_forward(model, x, iters: int, device) -> float:
    model(x)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", default=None, help="a model to time (default: ResNet-20)")
    p.add_argument("--batch", type=int, default=128, help="inputs per forward (default 128)")
    p.add_argument("--iters", type=int, default=20, help="timed forwards (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="batch 8, 2 forwards, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.iters, args.rounds = 8, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    models = {spec: variant(spec, device, args.checkpoint) for spec in VARIANTS}
    size = 224 if args.checkpoint and "imagenet" in args.checkpoint else 32
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    times = {spec: [] for spec in VARIANTS}
    checks = {spec: [] for spec in VARIANTS}
    for _ in range(args.rounds):
        for spec, (model, defense, _, _) in models.items():
            times[spec].append(seconds_per_forward(model, x, args.iters, device))
            checks[spec].append(seconds_per_check(defense, model, args.iters, device))
    base = statistics.median(times["none"])
    rows = []
    for spec, (model, _, stored, plain) in models.items():
        t, check = statistics.median(times[spec]), statistics.median(checks[spec])
        rows.append({"defense": spec, "s / forward": f"{t:.4f}",
                     "time vs none": f"{t / base:.2f}x", "check alone": f"{check:.4f}",
                     "check vs none": f"{check / base:.3f}x",
                     "bits / weight": f"{stored:.3f}", "memory vs none": f"{stored / plain:.3f}x"})
    print(f"Deployment-time defenses, {args.checkpoint or 'ResNet-20 8-bit'}, batch "
          f"{args.batch}, {device}, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} rounds of {args.iters} forwards (check and repair before each)")
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
