r"""Training speed: the cost of quantization-aware training, the speed flags, the data pipeline.

Two measurements, each a table of ratios taken in the same run (rounds interleave the
variants, and each figure is the median over the rounds, so a change of machine load hits
every variant alike):

1. Training step of the quantized network (``--arch``, N-bit QuantConv2d/QuantLinear,
   quantization-aware: every forward re-quantizes the weights) against the *same* network
   with plain ``nn.Conv2d`` / ``nn.Linear`` layers and the same weights (:func:`float_twin`),
   for the variants ``default`` (float32), ``channels-last``, ``amp`` (bfloat16 autocast, the
   quantizer in float32) and ``compile`` (``torch.compile``). A step is what ``main.py`` runs:
   :func:`utils.training.train_one_epoch` over a :class:`utils.data.TensorLoader` (batch
   drawn, cropped, flipped and normalized on the device; forward, loss, backward, SGD with
   momentum and weight decay). Columns: ms per step, images per second, QAT/float (quantized
   step time over float step time, same variant), and the speed-up over ``default``.
2. Data pipeline, one training epoch of CIFAR-shaped uint8 images (random pixels) delivered
   to the device: our :class:`~utils.data.TensorLoader` (device-side shuffle, crop, flip,
   normalize) against torchvision's per-sample pipeline (a ``torchvision.datasets.CIFAR10``-
   style dataset: PIL image, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
   ``ToTensor``, ``Normalize``, through a ``DataLoader`` with worker processes).

Examples:
  python -m bench.bench_train                  # ResNet-20 8-bit, batch 128, every variant
  python -m bench.bench_train --device cuda --loader-images 50000
  python -m bench.bench_train --variants default amp --no-loader
  python -m bench.bench_train --quick          # seconds; compile left out (see --variants)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn


from models import get_model
from models.ocm import SoftmaxOutput
from models.quantization import QuantLayer
from utils.data import DATASETS, TensorLoader
from campaigns.results import format_table
from utils.schedules import LRSchedule
from utils.training import build_optimizer, train_one_epoch

VARIANTS = ("default", "channels-last", "amp", "compile")
CIFAR = DATASETS["cifar10"]


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers are plain ``nn.Conv2d`` / ``nn.Linear``
    with the same hyper-parameters and float weights (the network without quantization)."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, QuantLayer):
                continue
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                stride=child.stride, padding=child.padding,
                                dilation=child.dilation, groups=child.groups,
                                bias=child.bias is not None, padding_mode=child.padding_mode)
            else:
                new = nn.Linear(child.in_features, child.out_features,
                                bias=child.bias is not None)
            new = new.to(child.weight.device)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(parent, name, new)
    assert not any(isinstance(m, QuantLayer) for m in twin.modules())
    return twin


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------
# 1. Training step
# ---------------------------------------------------------------------------------------------

class StepRunner:
    """One network in one variant: ``epoch()`` trains ``steps`` steps and returns seconds."""

    def __init__(self, model, variant, images, labels, batch, device, compile_backend):
        self.variant, self.device = variant, device
        channels_last = variant == "channels-last"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=fmt)
        self.loader = TensorLoader(images, labels, batch, CIFAR.mean, CIFAR.std, device,
                                   train=True, seed=0, memory_format=fmt)
        self.optimizer = build_optimizer(self.model, "sgd", 0.01, 0.9, 5e-4)
        self.schedule = LRSchedule(0.01, 1, "constant")
        self.output = SoftmaxOutput(10).to(device)
        self.amp = variant == "amp"
        self.step_model = (torch.compile(self.model, backend=compile_backend)
                           if variant == "compile" else self.model)
        self.times: list[float] = []
        self.epochs = 0

    def epoch(self) -> float:
        self.loader.set_epoch(self.epochs)
        self.epochs += 1
        sync(self.device)
        t0 = time.perf_counter()
        train_one_epoch(self.step_model, self.output, self.loader, self.optimizer, self.schedule,
                        0, progress=False, amp=self.amp)
        sync(self.device)
        return time.perf_counter() - t0


def bench_steps(args, device) -> list[dict]:
    torch.manual_seed(0)
    quant = get_model(args.arch, 10, args.bits)
    flt = float_twin(quant)
    n = args.batch * args.steps
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    runners, notes = {}, {}
    for variant in args.variants:
        if variant == "amp" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notes[variant] = "skipped: no bfloat16 on this GPU"
            continue
        pair, warm = {}, []
        try:
            for net, model in (("float", flt), ("quantized", quant)):
                r = StepRunner(copy.deepcopy(model), variant, images, labels, args.batch,
                               device, args.compile_backend)
                first = r.epoch()  # warm-up (and, with compile, the compilation)
                warm.append(f"{net} {first:.0f}s")
                pair[net] = r
        except Exception as e:  # e.g. torch.compile without a working compiler
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:60]
            notes[variant] = f"failed: {type(e).__name__}: {line}"
            continue
        if variant == "compile":
            notes[variant] = "first epoch (compilation): " + ", ".join(warm)
        runners.update({(variant, net): r for net, r in pair.items()})
    for _ in range(args.rounds):
        for r in runners.values():
            r.times.append(r.epoch())
    med = {k: statistics.median(r.times) / args.steps for k, r in runners.items()}
    rows = []
    for variant in args.variants:
        for net in ("float", "quantized"):
            key = (variant, net)
            if key not in med:
                if net == "float":
                    rows.append({"variant": variant, "network": "-", "ms/step": "-",
                                 "images/s": "-", "QAT/float": "-", "vs default": "-",
                                 "note": notes.get(variant, "not run")})
                continue
            base = med.get(("default", net))
            rows.append({
                "variant": variant, "network": net, "ms/step": f"{1000 * med[key]:.1f}",
                "images/s": f"{args.batch / med[key]:.0f}",
                "QAT/float": (f"{med[(variant, 'quantized')] / med[(variant, 'float')]:.2f}x"
                              if net == "quantized" and (variant, "float") in med else ""),
                "vs default": f"{base / med[key]:.2f}x" if base else "-",
                "note": notes.get(variant, "") if net == "float" else ""})
    return rows


# ---------------------------------------------------------------------------------------------
# 2. Data pipeline
# ---------------------------------------------------------------------------------------------

class CifarLikeDataset(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10.__getitem__`` does: an HWC uint8 array row becomes a
    PIL image, then the per-sample transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def torchvision_epoch(dataset, batch, workers, device) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=False,
                                         pin_memory=device.type == "cuda")
    sync(device)
    t0 = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
    sync(device)
    return time.perf_counter() - t0


def tensorloader_epoch(loader, epoch, device) -> float:
    loader.set_epoch(epoch)
    sync(device)
    t0 = time.perf_counter()
    for x, y in loader:
        pass
    sync(device)
    return time.perf_counter() - t0


def bench_loader(args, device) -> list[dict]:
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(2)
    n = args.loader_images
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    ours = TensorLoader(images, labels, args.batch, CIFAR.mean, CIFAR.std, device, train=True)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR.mean, CIFAR.std)])
    dataset = CifarLikeDataset(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy(),
                               transform)
    worker_counts = sorted({args.workers, 0}, reverse=True)
    times = {"TensorLoader": [], **{w: [] for w in worker_counts}}
    tensorloader_epoch(ours, 0, device)  # warm-up
    for r in range(args.rounds):
        times["TensorLoader"].append(tensorloader_epoch(ours, r + 1, device))
        for w in worker_counts:
            times[w].append(torchvision_epoch(dataset, args.batch, w, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[worker_counts[0]]
    rows = [{"pipeline": "TensorLoader (ours, on the device)", "workers": "-",
             "s/epoch": f"{med['TensorLoader']:.3f}", "images/s": f"{n / med['TensorLoader']:.0f}",
             "vs torchvision": f"{base / med['TensorLoader']:.1f}x"}]
    for w in worker_counts:
        rows.append({"pipeline": "torchvision per-sample + DataLoader", "workers": str(w),
                     "s/epoch": f"{med[w]:.3f}", "images/s": f"{n / med[w]:.0f}",
                     "vs torchvision": f"{base / med[w]:.1f}x"})
    return rows


# ---------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20_quan", help="network (default resnet20_quan)")
    p.add_argument("--bits", type=int, default=8, help="weight bits (8)")
    p.add_argument("--batch", type=int, default=None, help="batch size (128; 16 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per timed epoch (10; 2 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds; figures are medians (5; 1 with --quick)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="training variants (default: all; --quick: all but compile)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile variant (inductor)")
    p.add_argument("--loader-images", type=int, default=None,
                   help="images per data-pipeline epoch (20000; 1024 with --quick)")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers of the torchvision pipeline (2; 0 is measured too)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step table")
    p.add_argument("--no-loader", action="store_true", help="skip the data-pipeline table")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, for the test: timings only, not representative")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, i.e. the cores)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    q = args.quick
    args.batch = args.batch or (16 if q else 128)
    args.steps = args.steps or (2 if q else 10)
    args.rounds = args.rounds or (1 if q else 5)
    args.loader_images = args.loader_images or (1024 if q else 20000)
    if args.variants is None:
        args.variants = [v for v in VARIANTS if not (q and v == "compile")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device: {device} ({device_name(device)}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); load average {load()}")
    if not args.no_train:
        rows = bench_steps(args, device)
        print(f"\nTraining step, {args.arch} {args.bits}-bit vs the same network with float "
              f"layers: batch {args.batch}, {args.steps} steps x {args.rounds} rounds "
              f"(median), SGD")
        print(format_table(rows, list(rows[0])))
    if not args.no_loader:
        rows = bench_loader(args, device)
        print(f"\nData pipeline, one epoch of {args.loader_images} CIFAR-shaped images to "
              f"{device}, batch {args.batch}, {args.rounds} rounds (median)")
        print(format_table(rows, list(rows[0])))
    print(f"\nload average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
