"""The shared bit search (docs/algorithms.md section 5) against slow obvious versions."""

import pytest
import torch

from models import QuantLinear, bits, get_model, to_integer
from models.bits import changed_bits, restore, snapshot
from utils.bitsearch import (MAXIMIZE, MINIMIZE, ProgressiveBitSearch, first_order_change,
                             layer_candidate)


def integer_layer(n_bits=8, seed=0, shape=(7, 5)):
    torch.manual_seed(seed)
    layer = QuantLinear(shape[1], shape[0], n_bits=n_bits)
    layer.to_integer()
    layer.weight.grad = torch.randn_like(layer.weight)
    return layer


def brute_force_candidate(layer, direction):
    """Loop over every weight and bit; first-order change (1-2b)*base*g."""
    n = layer.n_bits
    base = bits.bit_values(n).tolist()
    best, best_score = None, 0.0
    codes = layer.weight.detach().view(-1).round().long().tolist()
    grads = layer.weight.grad.view(-1).tolist()
    for i, (q, g) in enumerate(zip(codes, grads)):
        b = bits.int_to_bits(torch.tensor(q), n).tolist()
        for k in range(n):
            score = direction * (1 - 2 * b[k]) * base[k] * g
            if score > best_score:
                best, best_score = (i, k), score
    return best


@pytest.mark.parametrize("n_bits", [8, 4, 2])
@pytest.mark.parametrize("direction", [MAXIMIZE, MINIMIZE])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidate_equals_brute_force(n_bits, direction, seed):
    layer = integer_layer(n_bits, seed)
    cand = layer_candidate("fc", layer, direction)
    assert cand.admissible
    assert (int(cand.indices[0]), int(cand.bits[0])) == brute_force_candidate(layer, direction)


def test_first_order_change_matches_definition():
    layer = integer_layer(8)
    change = first_order_change(layer.weight.detach().view(-1).long(), layer.weight.grad, 8)
    codes = layer.weight.detach().view(-1).long()
    g = layer.weight.grad.view(-1)
    for k in range(8):
        flipped = bits.flip_bits(codes, k, 8)
        assert torch.allclose(change[:, k], (flipped - codes).float() * g)


def test_k_top_restricts_weights():
    layer = integer_layer(8)
    cand = layer_candidate("fc", layer, MAXIMIZE, k_top=3)
    top3 = layer.weight.grad.view(-1).abs().topk(3).indices.tolist()
    assert int(cand.indices[0]) in top3


def test_inadmissible_layer_quirk():
    layer = integer_layer(8)
    layer.weight.grad.zero_()
    layer.weight.grad.view(-1)[4] = 0.0
    cand = layer_candidate("fc", layer, MINIMIZE)
    assert not cand.admissible
    assert int(cand.bits[0]) == 0  # the MSB of the weight with the largest |g|


def test_multi_bit_candidates_are_distinct_and_admissible():
    layer = integer_layer(8)
    cand = layer_candidate("fc", layer, MAXIMIZE, n_bits_to_flip=3)
    pairs = set(zip(cand.indices.tolist(), cand.bits.tolist()))
    assert len(pairs) == 3


def small_model():
    torch.manual_seed(0)
    model = get_model("resnet20_quan", 10).eval()
    return to_integer(model)


def test_step_flips_exactly_one_bit_and_loss_moves():
    model = small_model()
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    loss_fn = torch.nn.CrossEntropyLoss()
    clean = snapshot(model)

    def grad_loss():
        loss = loss_fn(model(x), y)
        return loss, float(loss.detach())

    def attack_loss():
        return float(loss_fn(model(x), y).detach())

    for direction in (MAXIMIZE, MINIMIZE):
        restore(model, clean)
        search = ProgressiveBitSearch(model, direction)
        before = attack_loss()
        step = search.step(grad_loss, attack_loss)
        after = attack_loss()
        assert changed_bits(model, clean) == 1
        assert len(step.flips) == 1
        flip = step.flips[0]
        layer = dict(model.named_modules())[flip.layer]
        assert int(layer.weight.view(-1)[flip.index]) == flip.after
        assert int(clean[flip.layer].view(-1)[flip.index]) == flip.before
        assert after == pytest.approx(step.loss_after, rel=1e-4, abs=1e-5)
        assert direction * (after - before) > 0


def test_multi_bit_retry_grows_when_nothing_improves():
    model = small_model()
    x = torch.randn(4, 3, 32, 32)
    search = ProgressiveBitSearch(model, MAXIMIZE, multi_bit_retry=True, max_bits_per_layer=3)

    def grad_loss():
        loss = model(x).sum()
        return loss, 1e9  # nothing can beat the current loss

    step = search.step(grad_loss, lambda: 0.0)
    assert step.bits_per_layer == 3
    assert 1 <= len(step.flips) <= 3


def test_search_requires_integer_mode():
    with pytest.raises(ValueError, match="integer mode"):
        ProgressiveBitSearch(get_model("resnet20_quan", 10), MAXIMIZE)


def test_a_nan_trial_loss_ranks_as_infinite():
    """A flip that makes the output NaN destroyed it: BFA (maximize) takes it, T-BFA (minimize)
    never does unless every trial is NaN."""
    model = torch.nn.Sequential(QuantLinear(3, 2, n_bits=8))
    model[0].to_integer()
    nan, t = float("nan"), torch.tensor
    up, down = ProgressiveBitSearch(model, MAXIMIZE), ProgressiveBitSearch(model, MINIMIZE)
    assert up._select([t(1.0), t(nan), t(5.0)]) == 1
    assert down._select([t(1.0), t(nan), t(0.5)]) == 2
    assert down._select([t(nan), t(nan)]) == 0
