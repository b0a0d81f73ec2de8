"""Regularizer, schedules, metrics, checkpoints, mixup, devices."""

import os

import pytest
import torch

from models import get_model, quant_layers
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.device import resolve_device
from utils.errors import CheckpointError, UserError
from utils.metrics import topk_correct
from utils.regularizers import piecewise_clustering
from utils.schedules import LRSchedule, parse_schedule
from utils.training import _mix_hidden


def reference_clustering(model, lam):
    """The public implementation's formula, written with boolean indexing."""
    total = 0.0
    for _, layer in quant_layers(model):
        w = layer.weight
        pos, neg = w[w.ge(0)], w[w.le(0)]
        total = total + (pos - pos.mean()).pow(2).sum() + (neg - neg.mean()).pow(2).sum()
    return lam * total


def test_piecewise_clustering_matches_reference():
    torch.manual_seed(0)
    model = get_model("resnet20_quan", 10)
    with torch.no_grad():
        model.conv1.weight.view(-1)[:5] = 0.0  # zeros count on both sides (quirk)
    ours = piecewise_clustering(model, 1e-3)
    ref = reference_clustering(model, 1e-3)
    assert torch.allclose(ours, ref, rtol=1e-5)
    ours.backward()
    assert model.linear.weight.grad is not None


def test_piecewise_clustering_is_zero_for_two_valued_weights():
    model = get_model("resnet20_quan", 10)
    with torch.no_grad():
        for _, layer in quant_layers(model):
            layer.weight.copy_(torch.where(torch.rand_like(layer.weight) > 0.5, 0.3, -0.2))
    assert piecewise_clustering(model, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_step_schedule_reference_rule():
    s = LRSchedule(0.1, 160, "step")
    assert s.lr(0) == 0.1 and s.lr(80) == 0.1
    assert s.lr(81) == pytest.approx(0.01) and s.lr(120) == pytest.approx(0.01)
    assert s.lr(121) == pytest.approx(0.001) and s.lr(159) == pytest.approx(0.001)


def test_milestones_and_cosine():
    kind, ms = parse_schedule(["80", "120"])
    s = LRSchedule(0.1, 160, kind, ms, [0.1, 0.1])
    assert s.lr(79) == 0.1 and s.lr(80) == pytest.approx(0.01) and s.lr(120) == pytest.approx(1e-3)
    c = LRSchedule(1.0, 10, "cosine")
    assert c.lr(0) == 1.0 and c.lr(5) == pytest.approx(0.5) and c.lr(9, 0.999) < 1e-4
    w = LRSchedule(1.0, 10, "cosine", warmup_epochs=2)
    assert w.lr(0) < 0.01 and w.lr(1) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError):
        parse_schedule(["fast"])
    with pytest.raises(ValueError):
        LRSchedule(0.1, 10, "milestones", [5], [])


def test_topk_correct_ties_to_lowest_index():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    targets = torch.tensor([0, 2, 2])
    assert topk_correct(scores, targets, ks=(1, 2, 5)) == [1, 2, 3]
    tied = torch.zeros(1, 4)
    assert topk_correct(tied, torch.tensor([0]), ks=(1,)) == [1]


def test_checkpoint_atomic_and_errors(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, str(path))
    assert load_checkpoint(str(path))["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth.tar"]  # no temp files left
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pth.tar"))
    data = path.read_bytes()
    (tmp_path / "trunc.pth.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(tmp_path / "trunc.pth.tar"))
    (tmp_path / "text.pth.tar").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "text.pth.tar"))
    torch.save([1, 2, 3], str(tmp_path / "list.pth.tar"))
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_checkpoint(str(tmp_path / "list.pth.tar"))
    # a bare state dict is accepted
    torch.save({"w": torch.ones(1)}, str(tmp_path / "bare.pth.tar"))
    assert "w" in load_checkpoint(str(tmp_path / "bare.pth.tar"))["state_dict"]


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pth.tar")
    save_checkpoint({"state_dict": {}, "epoch": 1}, path)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"state_dict": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["c.pth.tar"]


def test_manifold_mixup_hook_mixes_hidden_state():
    torch.manual_seed(0)
    model = get_model("resnet20_quan", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    perm = torch.tensor([1, 0, 3, 2])
    h = model.layer1(torch.relu(model.bn1(model.conv1(x))))
    mixed = 0.3 * h + 0.7 * h[perm]
    expected = model.forward_head(torch.nn.functional.adaptive_avg_pool2d(
        model.layer3(model.layer2(mixed)), 1).flatten(1))
    with _mix_hidden(model, "layer1", 0.3, perm):
        out = model(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not model.layer1._forward_hooks  # removed afterwards


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ---------------------------------------------------------------------------------------------
# Speed flags: --amp keeps the quantizer exact; wrapped models
# ---------------------------------------------------------------------------------------------

def test_quantizer_is_exact_under_bf16_autocast():
    from utils.training import autocast

    torch.manual_seed(0)
    model = get_model("resnet20_quan", 10)
    x = torch.randn(4, 3, 32, 32)
    with autocast(torch.device("cpu"), True):
        out = model(x)
        for _, layer in quant_layers(model):
            wq = layer.quantized_weight()
            assert wq.dtype == torch.float32
            step = layer.weight.detach().abs().max() / 127
            assert torch.equal(layer.step_size, step.reshape(()))
            # exactly (integer code) x (step), the codes computed in float32 outside autocast
            codes = torch.clamp(torch.round(layer.weight.detach().float() / step), -127, 127)
            assert torch.equal(wq, codes * step) and codes.abs().max() == 127
            assert torch.equal(layer.int_weight(), codes.long())
    assert out.dtype == torch.bfloat16  # the convolutions did run in bfloat16


def test_train_one_epoch_amp_and_wrapped_model():
    from utils.data import TensorLoader
    from utils.training import build_optimizer, train_one_epoch, unwrap_model
    from models.ocm import SoftmaxOutput

    torch.manual_seed(0)
    model = get_model("resnet20_quan", 10)
    before = model.conv1.weight.detach().clone()
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(24) % 10
    loader = TensorLoader(x, y, 8, (0.5,) * 3, (0.25,) * 3, "cpu", train=True,
                          memory_format=torch.channels_last)
    assert next(iter(loader))[0].is_contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(model, "sgd", 0.05, 0.9, 0.0)
    wrapped = torch.nn.DataParallel(model)  # stands for DDP: the network is found inside
    assert unwrap_model(wrapped) is model
    from defenses import create_defense
    stats = train_one_epoch(wrapped, SoftmaxOutput(10), loader, opt, LRSchedule(0.05, 1), 0,
                            amp=True, progress=False,
                            defenses=[create_defense("manifold_mixup", alpha=2.0)])
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert not torch.equal(model.conv1.weight, before)
    assert model.conv1.weight.dtype == torch.float32  # parameters stay float32 under --amp
