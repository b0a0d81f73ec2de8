"""Multi-process training (torchrun + DistributedDataParallel, gloo on the CPU).

The two-process run of main.py is compared with a single-process reference over the same
global batches. BatchNorm keeps plain DDP semantics (each process normalizes with the
statistics of its own half batch; the running statistics are rank 0's, broadcast before every
forward), so the reference forwards the two halves separately, keeps only the first half's
running-statistics update, and takes one SGD step on the weighted mean of the two losses:
exactly what DDP's gradient average computes (each rank's gradient, then their mean).
Tolerance: 1e-5 absolute on every weight and buffer after two epochs (measured: 0, the runs
agree bit for bit). The reference runs on one thread like each torchrun process: a different
thread count changes the summation order inside the convolutions, and those last-bit
differences grow through the quantizer's rounding (to about 1e-4 after 14 steps).
"""

import csv
import os
import subprocess
import sys

import pytest
import torch

from fakedata import make_cifar10
from models.factory import ModelConfig, build_model
from utils import distributed
from utils.checkpoint import load_checkpoint
from utils.data import DATASETS, TensorLoader, load_in_memory
from utils.regularizers import piecewise_clustering
from utils.schedules import LRSchedule
from utils.training import build_optimizer, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
# 205 training images, global batch 32: six batches of 16 + 16 and a last one of 13 (7 + 6),
# which exercises the uneven split and its loss weights.
N_PER_FILE = 41
BATCH = 32
SEED = 3
LR = 0.05
FLAGS = ["--dataset", "cifar10", "--arch", "resnet20_quan", "-b", str(BATCH), "--device", "cpu",
         "--no-progress", "--seed", str(SEED), "--clustering", "--lr", str(LR)]


# ---------------------------------------------------------------------------------------------
# Sharding (no processes needed)
# ---------------------------------------------------------------------------------------------

def _ids(loader):
    """Sample ids of every step (labels are the ids) and the batch weights."""
    return [(y.tolist(), loader.batch_weight(i)) for i, (_, y) in enumerate(loader)]


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_make_up_the_single_process_batches(world):
    n = 53  # four batches of 12 and a last one of 5, split 3 + 2 or 1 + 2 + 2
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(n)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", train=True, seed=7)
    single = TensorLoader(x, y, 12, **kw)
    single.set_epoch(4)
    whole = [ids for ids, _ in _ids(single)]
    shards = []
    for r in range(world):
        ld = TensorLoader(x, y, 12, rank=r, world_size=world, **kw)
        ld.set_epoch(4)
        assert len(ld) == len(single)
        shards.append(_ids(ld))
    for step, batch in enumerate(whole):
        parts = [shards[r][step][0] for r in range(world)]
        assert sum(parts, []) == batch  # same samples, same order, same augmentation draws
        # each rank's mean loss times its weight, averaged over the ranks (DDP), gives every
        # sample the weight 1 / global batch size
        for r in range(world):
            assert shards[r][step][1] / (world * len(parts[r])) == pytest.approx(1 / len(batch))
    # augmented pixels are identical too
    ld = TensorLoader(x, y, 12, rank=1, world_size=world, **kw)
    ld.set_epoch(4)
    single_x = torch.cat([b for b, _ in single])
    pos = {i: k for k, i in enumerate(sum(whole, []))}
    for bx, by in ld:
        for img, i in zip(bx, by.tolist()):
            assert torch.equal(img, single_x[pos[i]])
    # test mode: contiguous shares that cover the set once
    tests = [TensorLoader(x, y, 8, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", rank=r,
                          world_size=world) for r in range(world)]
    assert sum((by.tolist() for t in tests for _, by in t), []) == list(range(n))
    # a last batch smaller than the number of processes is dropped (a rank would get nothing)
    short = TensorLoader(x[:50], y[:50], 12, rank=0, world_size=3, **kw)
    assert len(short) == 4 and [len(b) for _, b in short] == [4, 4, 4, 4]


def test_batch_must_split_across_processes():
    from utils.errors import DataError

    x = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="divisible"):
        TensorLoader(x, torch.zeros(10, dtype=torch.int64), 5, (0.5,) * 3, (0.2,) * 3, "cpu",
                     train=True, rank=0, world_size=2)


def test_single_process_helpers():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    distributed.barrier()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


# ---------------------------------------------------------------------------------------------
# torchrun end to end
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_ddp")
    make_cifar10(root, n=N_PER_FILE)
    return str(root)


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", os.path.join(ROOT, "main.py"), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    res = torchrun(FLAGS + ["--data_dir", data_dir, "--outdir", str(out), "-e", "2"])
    return out, res


def reference_run(data_dir, epochs, world=2):
    """Single process, same global batches, DDP's BatchNorm and gradient semantics."""
    torch.manual_seed(SEED)  # main.py seeds the initialisation the same way
    config = ModelConfig("resnet20_quan", 10, 8)
    model, output = build_model(config)
    info = DATASETS["cifar10"]
    xtr, ytr, xte, yte = load_in_memory("cifar10", data_dir)
    loaders = [TensorLoader(xtr, ytr, BATCH, info.mean, info.std, "cpu", train=True,
                            seed=SEED, rank=r, world_size=world) for r in range(world)]
    optimizer = build_optimizer(model, "sgd", LR, 0.9, 5e-4)
    params = list(model.parameters())
    schedule = LRSchedule(LR, epochs, "step")
    model.train()
    accs = []
    for epoch in range(epochs):
        torch.manual_seed(SEED * 1_000_003 + epoch)
        for ld in loaders:
            ld.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(epoch)
        for step, batches in enumerate(zip(*loaders)):
            buffers = [(m, k, v.clone()) for m in model.modules()
                       for k, v in m.named_buffers(recurse=False)]
            grads = [torch.zeros_like(p) for p in params]
            for r in reversed(range(world)):  # rank 0 last: only its running statistics stay
                for m, k, v in buffers:  # every rank starts from rank 0's buffers
                    setattr(m, k, v.clone())
                x, y = batches[r]
                loss = output.loss(model(x), y) + piecewise_clustering(model, 1e-3)
                # each rank's own gradient, then their average (DDP's all-reduce)
                for g, gr in zip(grads, torch.autograd.grad(loss * loaders[r].batch_weight(step),
                                                            params)):
                    g += gr
            for p, g in zip(params, grads):
                p.grad = g / world
            optimizer.step()
        test = TensorLoader(xte, yte, 256, info.mean, info.std, "cpu")
        accs.append(evaluate(model, output, test)["top1"])
    return model, accs


def test_two_process_run_matches_single_process_reference(ddp_run, data_dir):
    out, res = ddp_run
    ckpt = load_checkpoint(str(out / "checkpoint.pth.tar"))
    assert ckpt["epoch"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, accs = reference_run(data_dir, 2)
    finally:
        torch.set_num_threads(threads)
    ref_state = ref.state_dict()
    assert set(ckpt["state_dict"]) == set(ref_state)  # no "module." prefix
    worst = max(float((ckpt["state_dict"][k].double() - v.double()).abs().max())
                for k, v in ref_state.items())
    assert worst <= TOLERANCE, f"largest weight difference {worst:.3g}"
    # rank 0 wrote one row per epoch; the sharded evaluation counts every test image once
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["test_acc"]) for r in rows] == pytest.approx(accs, abs=1e-3)
    log = (out / "train.log").read_text()
    assert log.count("epoch   2/2") == 1 and "x 2 processes (16 images each" in log
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint.pth.tar", "log.csv",
                                       "model_best.pth.tar", "tb", "train.log"]


def test_two_process_resume_is_exact(ddp_run, data_dir, tmp_path):
    full, _ = ddp_run
    torchrun(FLAGS + ["--data_dir", data_dir, "--outdir", str(tmp_path), "-e", "1"])
    assert load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))["epoch"] == 1
    torchrun(["--resume", str(tmp_path / "checkpoint.pth.tar"), "-e", "2", "--no-progress"])
    a = load_checkpoint(str(full / "checkpoint.pth.tar"))
    b = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    assert b["epoch"] == 2
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    with open(tmp_path / "log.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
