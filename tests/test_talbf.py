"""Stealthy TA-LBF (docs/algorithms.md section 8): projections, the relaxed layer, the ADMM against an
autograd reference, the search, NaN handling, campaigns, resume, the script and the bench."""

import copy
import json
import math
import os
from dataclasses import astuple

import pytest
import torch

import attack_talbf
from attacks import talbf as T
from models import bits as bitlib
from cli.args import run
from attacks import talbf_file as AF
from campaigns.results import TALBF, JsonlResults
from campaigns.runner import CampaignResults, CampaignRunner
from conftest import attacked_model

# Faster penalty growth and fewer outer iterations than the paper (rho_fact 1.01, 2000): the
# attacks on the digits models still succeed, in well under a second each.
FAST = {"ext_max_iters": 300, "rho_fact": 1.05}
FAST_FLAGS = ["--ext-max-iters", "300", "--rho-fact", "1.05"]
# The OCM digits models (public model function) need slower penalty growth to be attacked at
# all: with FAST every OCM attack tried ends without success. This one takes about 10 s.
OCM_SLOW = {"ext_max_iters": 1000, "rho_fact": 1.02}


@pytest.fixture(scope="module", autouse=True)
def one_thread(digits_checkpoints):
    """One thread for the attacks (after the shared checkpoints are trained): these small
    tensor ops do not gain from two, and a second busy process on the machine hurts less."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def targets(digits_checkpoints, digits_test):
    """name -> (model, output, TALBF with the FAST config); features computed once each."""
    out = {}
    for name, path in digits_checkpoints.items():
        model, output = attacked_model(path)
        out[name] = (model, output, T.TALBF.from_model(model, output, digits_test,
                                                       T.TALBFConfig(**FAST)))
    return out


def with_config(attack, **cfg):
    """The same attack (same cached features) under another config."""
    other = copy.copy(attack)
    other.config = T.TALBFConfig(**{**FAST, **cfg}).validate()
    return other


def load_bench():
    from bench import bench_talbf
    return bench_talbf


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------

def test_project_box_is_the_closest_point_of_the_box(rng):
    x = torch.randn(6, 40, generator=rng) * 2 + 0.5
    y = T.project_box(x)
    expected = torch.where(x < 0, torch.zeros_like(x), torch.where(x > 1, torch.ones_like(x), x))
    assert torch.equal(y, expected)
    q = torch.rand(200, 40, generator=rng)  # points of the box
    for i in range(len(x)):
        assert torch.norm(x[i] - y[i]) <= torch.norm(x[i] - q, dim=1).min() + 1e-6


def test_project_sphere_is_the_closest_point_of_the_sphere(rng):
    n = 37
    x = torch.randn(6, n, generator=rng) * 3
    y = T.project_sphere(x)
    radius = math.sqrt(n) / 2
    assert torch.allclose(torch.norm(y - 0.5, dim=1), torch.full((6,), radius), atol=1e-5)
    # same direction from the centre, positive scale
    cos = torch.nn.functional.cosine_similarity(y - 0.5, x - 0.5, dim=1)
    assert torch.allclose(cos, torch.ones(6), atol=1e-6)
    q = torch.randn(500, n, generator=rng)
    q = 0.5 + radius * q / q.norm(dim=1, keepdim=True)  # points of the sphere
    for i in range(len(x)):
        assert torch.norm(x[i] - y[i]) <= torch.norm(x[i] - q, dim=1).min() + 1e-5
    # every binary vector lies on the sphere: the projection keeps it
    bits = (torch.rand(4, n, generator=rng) > 0.5).float()
    assert torch.allclose(T.project_sphere(bits), bits, atol=1e-6)
    assert torch.equal(T.project_positive(torch.tensor([-1.0, 0.0, 2.0])),
                       torch.tensor([0.0, 0.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# The relaxed layer and the ADMM
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vanilla", "ocm16"])
def test_relaxed_bits_reconstruct_the_integer_layer(name, targets, digits_test):
    model, output, attack = targets[name]
    layer = model.final_layer()
    flat = T.FinalLayer.from_model(model)
    b0 = flat.bits().float()
    assert b0.shape == (*layer.weight.shape, layer.n_bits)
    assert torch.equal(flat.codes_from_bits(flat.bits()), layer.int_weight())
    # the attack's own copy (bit-plane first) holds the same bits
    assert torch.equal(attack.b0.view(layer.n_bits, -1).t().reshape(b0.shape), b0)
    # the weight the ADMM computes from them (a batch of two runs) is the layer's
    w = flat.weight_from_bits(attack.b0.expand(2, -1))
    assert torch.equal(w, (layer.weight.detach() * layer.step_size).expand(2, -1, -1))
    # one flipped relaxed bit moves one weight by step * base[k]
    b = attack.b0.clone().view(layer.n_bits, -1)
    b[1, 5] = 1.0 - b[1, 5]
    delta = flat.weight_from_bits(b.reshape(1, -1))[0] - w[0]
    expected = torch.zeros_like(delta).view(-1)
    expected[5] = (1 - 2 * float(attack.b0.view(layer.n_bits, -1)[1, 5])) * 2 ** (layer.n_bits - 2)
    assert torch.allclose(delta.view(-1), expected * flat.step, atol=1e-6)
    # cached features + reconstructed layer = the whole model's predictions
    assert torch.equal(attack.predict(attack.features), digits_test.predict(model, output))


@pytest.mark.parametrize("penalties", ["spec", "large"])
@pytest.mark.parametrize("name", ["vanilla", "ocm16"])
def test_admm_matches_autograd_reference(name, penalties, targets):
    """Our batched ADMM with analytic gradients against the obvious autograd implementation
    (bench/bench_talbf.py) of the augmented Lagrangian (docs/algorithms.md section 8), loss of each model kind
    (cross-entropy; BCE through sigmoid(2z) for OCM), for a few outer iterations; with large
    penalties the box, sphere and budget terms and the dual updates weigh in from the start."""
    bench = load_bench()
    _, _, attack = targets[name]
    extra = {"rho1": 2.0, "rho2": 1.0, "rho3": 0.05} if penalties == "large" else {}
    attack = with_config(attack, ext_max_iters=6, min_ext_iters=10 ** 6, **extra)
    index, target = 5, 2
    aux = attack.draw_aux(index, seed=3)
    problem = T._Problem(attack, index, target, aux)
    order = [(0.5, 100.0), (10.0, 3.125)]  # a budget below the first moves: its term acts
    runs = attack.admm(problem, order)
    assert problem.ocm == (name == "ocm16")
    for run_, (k, gamma) in zip(runs, order):
        ref = bench.sequential_run(attack, index, target, aux, k, gamma, attack.config)
        assert run_.status == "max_iters" and run_.iters == 6
        assert (run_.relaxed - T.FinalLayer.from_model(targets[name][0]).bits().float()
                ).abs().max() > 1e-3  # it moved
        assert torch.allclose(run_.relaxed, ref["relaxed"], atol=2e-5, rtol=0), \
            (run_.relaxed - ref["relaxed"]).abs().max()


@pytest.mark.parametrize("name,index,target", [("vanilla", 10, 7), ("ocm16", 1, 4)])
def test_attack_succeeds_and_reports_its_flips(name, index, target, targets, digits_test):
    model, output, attack = targets[name]
    if name == "ocm16":
        attack = with_config(attack, **OCM_SLOW)
    clean = model.final_layer().weight.detach().clone()
    result = attack.run(index, target, seed=index)
    assert result.success and result.source == int(digits_test.labels[index])
    assert result.k in attack.config.k_values() and result.gamma in attack.config.gamma_values()
    # the reported count is the Hamming distance of the final layer, flip by flip
    layer = T.FinalLayer.from_model(model)
    assert result.bits_changed == bitlib.hamming_distance(layer.codes, result.codes, layer.n_bits)
    assert result.bits_changed == len(result.flips) > 0
    # a flipped relaxed bit moved by more than 1/2, so ||b - b0||^2 <= k allows at most 4k
    assert result.bits_changed <= 4 * result.k
    # the model itself is unchanged
    assert torch.equal(model.final_layer().weight, clean)
    # the attacked codes in the real model classify x_s as the target; PA-ACC agrees
    attacked = copy.deepcopy(model)
    attacked.final_layer().set_int_weight(result.codes)
    assert int(digits_test.predict(attacked, output, torch.tensor([index]))[0]) == target
    keep = torch.ones(len(digits_test), dtype=torch.bool)
    keep[index] = False
    keep[torch.tensor(result.aux)] = False
    assert len(result.aux) == attack.config.n_aux and index not in result.aux
    pa = digits_test.accuracy(attacked, output, keep.nonzero().view(-1))
    assert result.pa_acc == pytest.approx(pa, abs=1e-4)  # EvalSet averages in float32
    assert result.pa_acc_clean == pytest.approx(
        digits_test.accuracy(model, output, keep.nonzero().view(-1)), abs=1e-4)


@pytest.mark.parametrize("name,index,target", [("vanilla", 0, 3), ("ocm16", 1, 4)])
def test_batched_over_gamma_equals_sequential(name, index, target, targets):
    _, _, attack = targets[name]
    aux = attack.draw_aux(index, seed=index)
    # OCM: the k that wins under OCM_SLOW (about 10 s per config; every FAST run fails here)
    extra = {**OCM_SLOW, "init_k": 20.0, "max_search_k": 1} if name == "ocm16" else {}
    results = [with_config(attack, **extra, **cfg).run(index, target, aux=aux)
               for cfg in ({}, {"gamma_batch": 1}, {"k_batch": 0})]
    first = results[0]
    assert first.success and first.runs > 1  # the winner is not the first run of the order
    # The winner is the same; a run that does not converge may end elsewhere (batched matrix
    # products round differently), so the other runs are compared for vanilla only.
    fields = ["success", "k", "gamma", "bits_changed", "flips", "outer_iters", "pa_acc", "runs",
              "converged"] + (["nan_runs", "tries"] if name == "vanilla" else [])
    for other in results[1:]:
        for f in fields:
            assert getattr(other, f) == getattr(first, f), f
        assert torch.equal(other.codes, first.codes)


def test_log_prob_nan_is_the_public_autograd_nan(targets):
    """With log_prob_nan the vanilla gradient is NaN exactly when autograd of the public
    ``-log(softmax(z_s))[t]`` is (1/p_t overflows in float32), for that run only; otherwise
    (and with numerics "stable") it is the finite softmax - onehot."""
    _, _, attack = targets["vanilla"]
    index, target = 10, 7
    problem = T._Problem(attack, index, target, attack.draw_aux(index, seed=1))
    gammas = torch.tensor([100.0, 50.0, 25.0])
    roww, ycode = problem.row_weights(gammas)
    zt = torch.zeros(3, 10, problem.x.shape[0])
    # x_s logits: target far below (p_t underflows), at the edge, well inside float32
    for g, gap in enumerate((95.0, 85.0, 30.0)):
        zt[g, :, -1] = gap / 2
        zt[g, target, -1] = -gap / 2
    grad = problem.grad_zt(zt, roww, ycode * roww)
    for g in range(3):
        z = zt[g, :, -1].clone().requires_grad_(True)
        (-torch.log(torch.softmax(z, dim=0))[target]).backward()
        public_nan = bool(torch.isnan(z.grad).any())
        assert bool(torch.isnan(grad[g]).all()) == public_nan
        assert public_nan == (g == 0)
        if not public_nan:
            assert torch.allclose(grad[g, :, -1], z.grad, atol=1e-6)
    stable = copy.copy(attack)
    stable.config = attack.config.with_numerics("stable")
    quiet = T._Problem(stable, index, target, attack.draw_aux(index, seed=1))
    assert torch.isfinite(quiet.grad_zt(zt, roww, ycode * roww)).all()


def test_numerics_switch():
    cfg = T.TALBFConfig()
    assert cfg.numerics == "public" and cfg.sphere_float64 and cfg.log_prob_nan \
        and cfg.public_decode
    stable = cfg.with_numerics("stable")
    assert stable.numerics == "stable" and not (stable.sphere_float64 or stable.log_prob_nan
                                                or stable.public_decode)
    assert T.TALBFConfig(public_decode=False).numerics == "mixed"
    with pytest.raises(ValueError, match="numerics"):
        cfg.with_numerics("fast")
    with pytest.raises(ValueError, match="log_prob_nan"):
        T.TALBFConfig(log_prob_nan=1).validate()


@pytest.mark.parametrize("name,index,target", [("vanilla", 0, 3)])
def test_public_and_stable_numerics_agree_on_a_clear_attack(name, index, target, targets):
    """The two numerics differ in rounding only: a clear-cut attack ends the same way (not
    every attack does: a run that does not converge ends where the rounding takes it)."""
    _, _, attack = targets[name]
    aux = attack.draw_aux(index, seed=index)
    stable = copy.copy(attack)
    stable.config = attack.config.with_numerics("stable")
    a, b = attack.run(index, target, aux=aux), stable.run(index, target, aux=aux)
    assert a.success and (a.k, a.gamma, a.bits_changed, a.flips) == (b.k, b.gamma, b.bits_changed, b.flips)
    assert torch.equal(attack.predict(attack.features), stable.predict(attack.features))


def test_nan_moves_the_search_to_the_next_gamma(targets, monkeypatch):
    _, _, attack = targets["vanilla"]
    original = T._Problem.grad_zt

    def nan_when_gamma_is_100(self, zt, roww, ycodew):
        g = original(self, zt, roww, ycodew)
        bad = (roww[:, 0, 0] * self.n_aux - 100.0).abs() < 1e-3
        return torch.where(bad.view(-1, 1, 1), torch.full_like(g, float("nan")), g)

    monkeypatch.setattr(T._Problem, "grad_zt", nan_when_gamma_is_100)
    for cfg in ({}, {"gamma_batch": 1}):
        a = with_config(attack, **cfg)
        runs = a.admm(T._Problem(a, 10, 7, a.draw_aux(10, 10)), [(5.0, 100.0), (5.0, 50.0)])
        assert runs[0].status == "nan" and runs[1].status != "nan"
        result = a.run(10, 7, seed=10)
        assert result.success and result.gamma != 100.0 and result.nan_runs >= 1
    # a real divergence: every run fails with NaN, the attack fails cleanly
    monkeypatch.undo()
    result = with_config(attack, inn_lr=1e30, max_search_k=2).run(10, 7, seed=10)
    assert not result.success and result.runs == result.nan_runs == 16
    assert result.bits_changed is None and result.pa_acc is None


# ---------------------------------------------------------------------------------------------
# Attack lists, D_aux, campaigns
# ---------------------------------------------------------------------------------------------

def test_generated_attack_list_follows_the_protocol(digits_test):
    labels = digits_test.labels
    items = T.generate_attack_list(labels, 10, 40, seed=3)
    assert [it.target for it in items] == [i % 10 for i in range(40)]
    for t in range(10):
        sources = [it.index for it in items if it.target == t]
        assert len(sources) == 4 == len(set(sources))
        assert all(int(labels[i]) != t for i in sources)
    assert T.generate_attack_list(labels, 10, 12, seed=3) == items[:12]  # prefix
    assert T.generate_attack_list(labels, 10, 40, seed=4) != items
    eligible = torch.zeros(len(labels), dtype=torch.bool)
    eligible[:200] = True
    assert all(it.index < 200 for it in T.generate_attack_list(labels, 10, 20, 3, eligible))
    with pytest.raises(ValueError, match="lower --n-attacks"):
        T.generate_attack_list(labels, 10, 4000, seed=3)


def test_attack_info_public_format(digits_test):
    labels = digits_test.labels
    i0 = int((labels != 0).nonzero()[0])
    i5 = int((labels != 5).nonzero()[3])
    text = f"0 {i0}\n\n# comment\n5.0 {i5}.0\n"
    items = T.parse_attack_info(text, labels, 10)
    assert [(it.pos, it.target, it.index) for it in items] == [(0, 0, i0), (1, 5, i5)]
    assert T.read_attack_info(T.format_attack_info(items)) == [(1, 0, i0), (2, 5, i5)]
    own = int(labels[7])
    for bad, msg in [("0 1 2", "line 1: expected"), ("a b", "line 1: expected"),
                     (f"5 {i5}\n0 {i0}\n5.0 {i5}.0", "line 3 repeats the attack of line 1"),
                     (f"0 {i0}\n3 99999", "line 2: test index 99999"),
                     (f"12 {i0}", "target class 12"), (f"{own} 7", "of class"),
                     ("# nothing\n", "no 'target_class")]:
        with pytest.raises(ValueError, match=msg):
            T.parse_attack_info(bad, labels, 10)


def pinned_line(target, idx, aux):
    return json.dumps({"target": target, "idx": idx, "aux_idx": list(aux)})


def test_attacks_file_round_trip(tmp_path):
    text = "# D_aux pinned by hand\n" + pinned_line(2, 53, [9, 1, 5]) + "\n\n" + \
        pinned_line(0, 7, [3, 4, 8]) + "\n"
    attacks = AF.parse_attacks(text, n_aux=3)
    assert [(a.line, a.target, a.idx, a.aux_idx) for a in attacks] == [
        (2, 2, 53, (9, 1, 5)), (4, 0, 7, (3, 4, 8))]  # D_aux order kept as written
    AF.check_attacks(attacks, 60)
    path = tmp_path / "a.jsonl"
    AF.write_attacks_file(str(path), attacks)
    again = AF.read_attacks_file(str(path), n_aux=3)
    assert [(a.target, a.idx, a.aux_idx) for a in again] == \
        [(a.target, a.idx, a.aux_idx) for a in attacks]
    assert AF.format_attacks(again) == path.read_text()
    # attack items (pinned or drawn) write the same format; the D_aux digest is in the key
    items = T.items_from_pinned(attacks)
    assert [(it.pos, it.target, it.index, it.aux) for it in items] == [
        (0, 2, 53, (9, 1, 5)), (1, 0, 7, (3, 4, 8))]
    assert AF.format_attacks(items) == path.read_text()
    assert items[0].key.startswith("0-t2-i53-a") and T.AttackItem(0, 2, 53).key == "0-t2-i53"
    assert T.AttackItem(0, 2, 53, (9, 5, 1)).key != items[0].key
    assert T.attack_list_digest(items) != T.attack_list_digest(
        [T.AttackItem(i.pos, i.target, i.index) for i in items])
    with pytest.raises(ValueError, match="no D_aux"):
        AF.format_attacks([T.AttackItem(0, 2, 53)])


@pytest.mark.parametrize("text,n_test,msg", [
    ("", 60, "holds no attacks"),
    ("# only a comment\n", 60, "holds no attacks"),
    ('{"target": 2, "idx": 53, "aux_idx": [1, 2, 3]\n', 60, "is not valid JSON"),
    ("[2, 53, [1, 2, 3]]", 60, "expected a JSON object"),
    ('{"target": 2, "aux_idx": [1, 2, 3]}', 60, "missing key 'idx'"),
    ('{"target": 2, "idx": 5, "aux": [1, 2, 3]}', 60, "missing key 'aux_idx'"),
    ('{"target": 2, "idx": 5, "aux_idx": [1, 2, 3], "gamma": 5}', 60, "unknown key 'gamma'"),
    ('{"target": 2.0, "idx": 5, "aux_idx": [1, 2, 3]}', 60, "target must be an integer"),
    ('{"target": 2, "idx": "5", "aux_idx": [1, 2, 3]}', 60, "idx must be an integer"),
    ('{"target": true, "idx": 5, "aux_idx": [1, 2, 3]}', 60, "target must be an integer"),
    ('{"target": 2, "idx": 5, "aux_idx": [1, 2.5, 3]}', 60, "aux_idx[1] must be an integer"),
    ('{"target": 2, "idx": 5, "aux_idx": "1 2 3"}', 60, "aux_idx must be a list"),
    ('{"target": 2, "idx": 5, "aux_idx": [1, 2, 1]}', 60, "repeats test index 1"),
    ('{"target": 2, "idx": 5, "aux_idx": [1, 5, 3]}', 60, "holds the attacked image 5"),
    ('{"target": 2, "idx": 5, "aux_idx": [1, 2]}', 60, "has 2 test indices but --n_aux is 3"),
    ('{"target": 2, "idx": 60, "aux_idx": [1, 2, 3]}', 60, "idx 60 is outside the test set"),
    ('{"target": 2, "idx": -1, "aux_idx": [1, 2, 3]}', 60, "idx -1 is outside"),
    ('{"target": 2, "idx": 5, "aux_idx": [1, 99, 3]}', 60, "aux_idx holds 99, outside"),
    ('{"target": 10, "idx": 5, "aux_idx": [1, 2, 3]}', 60, "target class 10 is outside"),
    ('{"target": 1, "idx": 4, "aux_idx": [7, 8, 9]}', 60, "repeats the attack of line 1"),
])
def test_attacks_file_errors(text, n_test, msg):
    empty = msg == "holds no attacks"
    good = "" if empty else pinned_line(1, 4, [7, 8, 9]) + "\n"
    with pytest.raises(ValueError) as info:
        attacks = AF.parse_attacks(good + text, name="f.jsonl", n_aux=3)
        AF.check_attacks(attacks, n_test, num_classes=10, name="f.jsonl")
    message = str(info.value)
    assert msg in message and "\n" not in message
    if not empty:
        assert message.startswith("f.jsonl line 2")  # the line of the bad attack


def test_attacks_file_own_class_and_missing(tmp_path):
    labels = torch.tensor([0, 1, 2, 3, 4])
    attacks = AF.parse_attacks(pinned_line(3, 3, [0, 1]))
    with pytest.raises(ValueError, match="of class 3, the target itself"):
        AF.check_attacks(attacks, 5, labels, 10)
    with pytest.raises(ValueError, match="attacks file .*none.jsonl: file not found"):
        AF.read_attacks_file(str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="is a folder"):
        AF.read_attacks_file(str(tmp_path))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        AF.read_attacks_file(str(tmp_path / "bin.jsonl"))
    # the same attack (target, idx and D_aux) listed twice would run twice
    with pytest.raises(ValueError, match="line 2 repeats the attack of line 1"):
        AF.parse_attacks(pinned_line(3, 3, [0, 1]) + "\n" + pinned_line(3, 3, [0, 1]))
    assert len(AF.parse_attacks(pinned_line(3, 3, [0, 1]) + "\n" +
                                pinned_line(3, 3, [1, 0]))) == 2  # another D_aux order


def test_pinned_aux_order_is_the_public_order(targets):
    """D_aux rows come first in the given order, x_s last (the public ``np.append(aux_idx,
    target_idx)``); a campaign item with a pinned D_aux runs exactly that D_aux."""
    _, _, attack = targets["vanilla"]
    aux = torch.tensor([30, 4, 17, 9])
    problem = T._Problem(attack, 12, 3, aux)
    assert torch.equal(problem.x, attack.features[torch.tensor([30, 4, 17, 9, 12])])
    a = with_config(attack, max_search_k=1, n_aux=4)
    result = a.run(12, 3, aux=aux)
    assert result.aux == [30, 4, 17, 9] and len(result.tries) == result.runs
    drawn = T.with_drawn_aux(a, [T.AttackItem(0, 3, 12), T.AttackItem(1, 3, 12, (1, 2, 3, 4))],
                             seed=5)
    assert drawn[0].aux == tuple(a.draw_aux(12, T.aux_seed(5, T.AttackItem(0, 3, 12))).tolist())
    assert drawn[1].aux == (1, 2, 3, 4)


def test_draw_aux(targets):
    _, _, attack = targets["vanilla"]
    aux = attack.draw_aux(17, seed=5)
    assert len(aux) == 64 == len(set(aux.tolist())) and 17 not in aux.tolist()
    assert torch.equal(aux, attack.draw_aux(17, seed=5))
    assert not torch.equal(aux, attack.draw_aux(17, seed=6))
    everything = attack.draw_aux(0, seed=1, n_aux=len(attack.labels) - 1)
    assert sorted(everything.tolist()) == list(range(1, len(attack.labels)))
    with pytest.raises(ValueError, match="larger"):
        attack.draw_aux(0, seed=1, n_aux=len(attack.labels))


def strip_times(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_campaign_resume_equals_uninterrupted(targets, digits_test, tmp_path):
    """The one runner drives TA-LBF: interrupted after one attack (and a line cut short), the
    resumed campaign runs the other two and equals an uninterrupted one."""
    _, _, attack = targets["vanilla"]
    attack = with_config(attack, max_search_k=2)
    attack.seed = 1
    items = T.generate_attack_list(digits_test.labels, 10, 3, seed=2)
    full = CampaignResults(str(tmp_path / "a"))
    CampaignRunner(full, attack, items, progress=False).run_items()
    assert [r["key"] for r in full.records] == [it.key for it in items]

    run_item, calls = attack.run_item, []

    def crash(item):
        calls.append(item)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_item(item)

    attack.run_item = crash
    part = CampaignResults(str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        CampaignRunner(part, attack, items, progress=False).run_items()
    attack.run_item = run_item
    with open(part.path, "a") as f:
        f.write('{"key": "1-t1-i')  # a line cut short by the crash
    assert len(JsonlResults(part.path).records) == 1
    resumed = CampaignResults(str(tmp_path / "b"))
    assert len(CampaignRunner(resumed, attack, items, progress=False).run_items()) == 2
    assert strip_times(resumed.records) == strip_times(full.records)
    rows = {r["metric"]: r for r in attack.summary(full.records)}
    ok = [r for r in full.records if r["success"]]
    assert rows["asr"]["mean"] == pytest.approx(100.0 * len(ok) / 3)
    assert rows["bits_changed"]["n"] == len(ok)


# ---------------------------------------------------------------------------------------------
# attack_talbf.py
# ---------------------------------------------------------------------------------------------

def script(ckpt, results, *extra):
    return ["--checkpoint", ckpt, "--results", str(results), "--device", "cpu",
            "--no-progress", *FAST_FLAGS, "--max-search-k", "2", *extra]


def test_script_end_to_end_resume_and_attack_info(digits_checkpoints, tmp_path, capsys):
    ckpt = digits_checkpoints["ocm16"]
    listed = tmp_path / "list.txt"
    args = script(ckpt, tmp_path / "r", "--n-attacks", "2", "--max-search-k", "1",
                  "--save-attack-info", str(listed))
    assert run(attack_talbf.main, args) == 0
    out = capsys.readouterr().out
    assert "asr" in out and "pa_acc" in out and "bits_changed" in out
    lines = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    for k in ("target", "index", "source", "success", "k", "gamma", "bits_changed", "pa_acc",
              "converged"):
        assert k in rec
    assert set(astuple(TALBF)) <= set(rec)  # the fields the report reads (campaigns/results.py)
    assert os.path.exists(tmp_path / "r" / "summary.csv")
    assert len(listed.read_text().splitlines()) == 2
    # running again does nothing new; a longer list only runs the new attack
    assert run(attack_talbf.main, args) == 0
    assert len((tmp_path / "r" / "results.jsonl").read_text().splitlines()) == 2
    # the saved list in the public format repeats the attacks exactly
    assert run(attack_talbf.main, script(ckpt, tmp_path / "p", "--attack_info", str(listed),
                                        "--max-search-k", "1")) == 0
    a = [json.loads(line) for line in lines]
    b = [json.loads(line) for line in (tmp_path / "p" / "results.jsonl").read_text().splitlines()]
    assert strip_times(a) == strip_times(b)


def test_script_save_attacks_repeats_the_run(digits_checkpoints, tmp_path, capsys):
    """--save-attacks writes the attacks with the D_aux they drew; --attacks-file with that
    file runs exactly the same attacks (same D_aux in the same order, same results)."""
    ckpt = digits_checkpoints["vanilla"]
    saved = tmp_path / "attacks.jsonl"
    assert run(attack_talbf.main, script(ckpt, tmp_path / "a", "--n-attacks", "2",
                                        "--max-search-k", "1", "--save-attacks",
                                        str(saved))) == 0
    lines = saved.read_text().splitlines()
    assert len(lines) == 2 and all(set(json.loads(x)) == {"target", "idx", "aux_idx"}
                                   for x in lines)
    first = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert [r["aux_idx"] for r in first] == [json.loads(x)["aux_idx"] for x in lines]
    assert run(attack_talbf.main, script(ckpt, tmp_path / "b", "--attacks-file", str(saved),
                                        "--max-search-k", "1", "--save-attacks",
                                        str(tmp_path / "again.jsonl"))) == 0
    assert (tmp_path / "again.jsonl").read_text() == saved.read_text()
    second = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    drop = {"key", "aux_seed", "seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in first] == \
        [{k: v for k, v in r.items() if k not in drop} for r in second]
    assert all(r["aux_seed"] is None and "-a" in r["key"] for r in second)
    assert all(len(r["tries"]) == r["runs"] for r in second)


def test_script_refuses_other_campaign_in_same_folder(digits_checkpoints, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    assert run(attack_talbf.main, script(ckpt, tmp_path, "--n-attacks", "1")) == 0
    rc = run(attack_talbf.main, script(ckpt, tmp_path, "--n-attacks", "1", "--n_aux", "32"))
    assert rc == 2 and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["list_missing", "list_malformed", "list_index_range",
                                  "list_own_class", "list_class_range", "n_aux_too_large",
                                  "k_zero", "k_negative", "gamma_zero", "gamma_nan",
                                  "n_attacks_zero", "ext_iters_zero", "missing_ckpt",
                                  "flags_mismatch", "attacks_missing", "attacks_bad_json",
                                  "attacks_index_range", "attacks_dup_aux", "attacks_idx_in_aux",
                                  "attacks_count", "attacks_non_integer", "attacks_own_class",
                                  "attacks_and_attack_info", "save_attacks_no_folder",
                                  "numerics_unknown"])
def test_script_bad_input(case, digits_checkpoints, digits_test, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    labels = digits_test.labels
    own = int(labels[4])

    def listing(text):
        path = tmp_path / f"list_{len(list(tmp_path.glob('list_*')))}.txt"
        path.write_text(text)
        return ["--attack_info", str(path)]

    other = (own + 1) % 10
    aux = list(range(5, 69))   # 64 valid indices, not 4

    def pinned(*lines):
        path = tmp_path / f"pinned_{len(list(tmp_path.glob('pinned_*')))}.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        return ["--attacks-file", str(path), "--save-attacks", str(tmp_path / "saved.jsonl")]

    cases = {
        "list_missing": (["--attack_info", str(tmp_path / "none.txt")], "not found"),
        "list_malformed": (listing("1 4\n2 x 3\n"), "line 2"),
        "list_index_range": (listing("1 4\n2 100000\n"), "outside the test set"),
        "list_own_class": (listing(f"{own} 4\n"), "of class"),
        "list_class_range": (listing("10 4\n"), "target class 10"),
        "n_aux_too_large": (["--n_aux", "360"], "--n_aux 360"),
        "k_zero": (["--init-k", "0"], "--init-k"),
        "k_negative": (["--init_k", "-5"], "--init-k"),
        "gamma_zero": (["--init-lam", "0"], "--init-lam"),
        "gamma_nan": (["--init-lam", "nan"], "finite"),
        "n_attacks_zero": (["--n-attacks", "0"], "--n-attacks"),
        "ext_iters_zero": (["--ext_max_iters", "0"], "--ext-max-iters"),
        "missing_ckpt": (["--checkpoint", str(tmp_path / "none.pth.tar")], "not found"),
        "flags_mismatch": (["--bits", "4"], "--bits 4"),
        "attacks_missing": (["--attacks-file", str(tmp_path / "none.jsonl")],
                            "none.jsonl: file not found"),
        "attacks_bad_json": (pinned(pinned_line(other, 4, aux), "{oops"), "line 2 is not valid"),
        "attacks_index_range": (pinned(pinned_line(other, 100000, aux)),
                                "idx 100000 is outside the test set"),
        "attacks_dup_aux": (pinned(pinned_line(other, 4, aux[:-1] + [5])), "repeats"),
        "attacks_idx_in_aux": (pinned(pinned_line(other, 4, [4] + aux[1:])),
                               "holds the attacked image 4"),
        "attacks_count": (pinned(pinned_line(other, 4, aux[:3])), "--n_aux is 64"),
        "attacks_non_integer": (pinned('{"target": %d, "idx": 4.5, "aux_idx": %s}'
                                       % (other, json.dumps(aux))), "idx must be an integer"),
        "attacks_own_class": (pinned(pinned_line(own, 4, aux)), "the target itself"),
        "attacks_and_attack_info": (pinned(pinned_line(other, 4, aux)) + listing("1 4\n"),
                                    "not both"),
        "save_attacks_no_folder": (["--save-attacks", str(tmp_path / "no" / "a.jsonl")],
                                   "does not exist"),
        "numerics_unknown": (["--numerics", "fast"], "--numerics"),
    }
    extra, expected = cases[case]
    args = script(ckpt, tmp_path / "results", *extra)
    if case == "missing_ckpt":
        args = args[2:]
    rc = run(attack_talbf.main, args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected.lower() in err.lower(), err
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "saved.jsonl").exists()


def test_bench_quick_runs(digits_checkpoints, capsys):
    bench = load_bench()
    assert bench.main(["--quick", "--checkpoints", digits_checkpoints["vanilla"],
                       digits_checkpoints["ocm16"]]) == 0
    out = capsys.readouterr().out
    assert "sequential" in out and "ours" in out and "speed-up" in out
    assert "1/1" in out  # ours agrees with the plain variant
