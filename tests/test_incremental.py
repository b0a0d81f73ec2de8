"""Incremental forward and the fast progressive bit search: same numbers as full forwards,
same flips as the plain search (issue: faster bit search)."""

import pytest
import torch
import torch.nn as nn

from attacks import tbfa as T
from attacks.bfa import BFA
from models import get_model, list_models, quant_layers, to_integer
from models.incremental import IncrementalForward, NotTraceable
from models.bits import snapshot
from utils.bitsearch import MINIMIZE, AttackLoss, ProgressiveBitSearch
from conftest import attacked_model

IMAGENET_SIZED = {"resnet18_quan", "resnet34_quan", "resnet50_quan", "mobilenet_v2_quan"}


def randomized(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = get_model(arch, num_outputs=10)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return to_integer(model.eval())


@pytest.mark.parametrize("arch", list_models())
def test_rerun_equals_full_forward_bit_for_bit(arch):
    """Every layer's rerun after a flip equals model(x) exactly, also after earlier commits
    (the cache must follow the kept flips and never be overwritten by in-place ops)."""
    model = randomized(arch)
    names = [n for n, _ in quant_layers(model)]
    engine = IncrementalForward(model, names)
    size = 48 if arch in IMAGENET_SIZED else 32
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        assert torch.equal(engine.prime(x), model(x))
        for i, (name, layer) in enumerate(quant_layers(model)):
            flat = layer.weight.view(-1)
            index = int(torch.randint(flat.numel(), (1,), generator=gen))
            saved = flat[index].clone()
            layer.flip_bit(index, 0)
            assert torch.equal(engine.rerun(name), model(x)), name
            if i % 3 == 0:  # keep this flip
                engine.commit(name)
            else:
                flat[index] = saved
        assert torch.equal(engine.output, model(x))
        last = names[-1]
        assert torch.equal(engine.rerun(last), model(x))


def test_plan_skips_upstream_layers():
    model = randomized("resnet20_quan")
    engine = IncrementalForward(model, [n for n, _ in quant_layers(model)])
    plan_targets = {n.target for n in engine.plans["linear"]}
    assert "layer1.0.conv1" not in plan_targets and "linear" in plan_targets
    assert len(engine.plans["conv1"]) > len(engine.plans["layer3.2.conv2"]) > \
        len(engine.plans["linear"])
    # a flip in a block's second conv reuses the block's shortcut input
    assert "layer2.1.conv1" not in {n.target for n in engine.plans["layer2.1.conv2"]}


def test_inplace_operations_do_not_corrupt_the_cache():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            from models.quantization import QuantConv2d
            self.a = QuantConv2d(3, 4, 3, padding=1)
            self.b = QuantConv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.a(x)
            out += self.b(x)          # in-place add of the other branch
            return self.relu(out).relu_().sum((2, 3))

    torch.manual_seed(0)
    model = to_integer(Net().eval())
    engine = IncrementalForward(model, ["a", "b"])
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        engine.prime(x)
        for name in ("b", "a", "b"):
            layer = model.get_submodule(name)
            layer.flip_bit(5, 0)
            assert torch.equal(engine.rerun(name), model(x))
            layer.flip_bit(5, 0)


def test_untraceable_model_is_reported():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            from models.quantization import QuantLinear
            self.fc = QuantLinear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(NotTraceable, match="cannot be traced"):
        IncrementalForward(to_integer(Branchy()), ["fc"])


@pytest.mark.parametrize("kind,full_gradient", [("vanilla", False), ("ocm16", True)])
def test_fast_search_equals_plain_search_over_a_whole_experiment(digits_checkpoints, digits_test,
                                                                 kind, full_gradient):
    model, output = attacked_model(digits_checkpoints[kind])
    clean = snapshot(model)
    sets = T.draw_sets(digits_test.labels, 3, 12, 12, seed=4)
    results = {}
    for incremental in (False, True):
        for name, layer in quant_layers(model):
            layer.weight.data.copy_(clean[name])
        cfg = T.TBFAConfig(max_iters=60, incremental=incremental,
                           full_gradient=full_gradient, stop_on_rest=False)
        results[incremental] = T.TBFA(model, output, cfg).run(digits_test, sets, 3, 5)
    plain, fast = results[False], results[True]
    assert plain.iterations >= 3
    assert fast.flips == plain.flips  # layer, index, bit, codes and the loss, every iteration
    assert (fast.iterations, fast.asr, fast.pa_acc, fast.stop_reason) == \
        (plain.iterations, plain.asr, plain.pa_acc, plain.stop_reason)


def test_fast_bfa_equals_plain_bfa(digits_checkpoints, digits_test):
    model, output = attacked_model(digits_checkpoints["vanilla"])
    clean = snapshot(model)
    runs = {}
    for incremental in (False, True):
        for name, layer in quant_layers(model):
            layer.weight.data.copy_(clean[name])
        attack = BFA(model, output, incremental=incremental)
        res = attack.run(digits_test.images[:64], digits_test, n_iter=6)
        runs[incremental] = [(r.layer, r.index, r.bit, r.loss) for r in res.profile]
    assert runs[True] == runs[False] and len(runs[True]) >= 6


def test_search_cache_follows_outside_changes(digits_checkpoints, digits_test):
    """Weights changed between steps (a restore) make the search re-prime its cache."""
    model, output = attacked_model(digits_checkpoints["vanilla"])
    x = digits_test.inputs(torch.arange(20))
    y = torch.full((20,), 2)
    loss = AttackLoss(model, x, lambda out: output.loss(out, y))
    grad = lambda: (loss(), None)  # noqa: E731
    clean = snapshot(model)
    search = ProgressiveBitSearch(model, MINIMIZE)
    first = search.step(grad, loss)
    for name, layer in quant_layers(model):  # undo outside the search
        layer.weight.data.copy_(clean[name])
    again = search.step(grad, loss)
    assert [f.as_dict() for f in again.flips] == [f.as_dict() for f in first.flips]
    assert again.loss_after == first.loss_after
