"""Stealthy TA-LBF (SPEC section 8): projections, the relaxed layer, the ADMM against an
autograd reference, the search, NaN handling, campaigns, resume, the script and the bench."""

import copy
import importlib.util
import json
import math
import os

import pytest
import torch

import attack_talbf
from attacks import talbf as T
from attacks.common import EvalSet
from models import bits as bitlib
from models import to_integer
from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint
from utils.cli import run
from utils.data import get_dataset_info, load_split_tensors
from utils.results import JsonlResults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Faster penalty growth and fewer outer iterations than the paper (rho_fact 1.01, 2000): the
# attacks on the digits models still succeed, in well under a second each.
FAST = {"ext_max_iters": 300, "rho_fact": 1.05}
FAST_FLAGS = ["--ext-max-iters", "300", "--rho-fact", "1.05"]


@pytest.fixture(scope="module", autouse=True)
def one_thread(digits_checkpoints):
    """One thread for the attacks (after the shared checkpoints are trained): these small
    tensor ops do not gain from two, and a second busy process on the machine hurts less."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_test():
    images, labels = load_split_tensors("digits", None, "test")
    info = get_dataset_info("digits")
    return EvalSet(images, labels, info.mean, info.std, "cpu")


def attacked_model(path):
    ckpt = load_checkpoint(path)
    model, output = model_from_checkpoint(ckpt, checkpoint_config(ckpt))
    return to_integer(model.eval()), output


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
    spec = importlib.util.spec_from_file_location("bench_talbf",
                                                  os.path.join(ROOT, "bench", "bench_talbf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert torch.equal(flat.weight_from_bits(b0), layer.weight.detach() * layer.step_size)
    assert torch.equal(flat.codes_from_bits(flat.bits()), layer.int_weight())
    # the attack's own copy (bit-plane first) holds the same bits
    assert torch.equal(attack.b0.view(layer.n_bits, -1).t().reshape(b0.shape), b0)
    # cached features + reconstructed layer = the whole model's predictions
    assert torch.equal(attack.predict(attack.features), digits_test.predict(model, output))


@pytest.mark.parametrize("penalties", ["spec", "large"])
@pytest.mark.parametrize("name", ["vanilla", "ocm16"])
def test_admm_matches_autograd_reference(name, penalties, targets):
    """Our batched ADMM with analytic gradients against the obvious autograd implementation
    (bench/bench_talbf.py) of the SPEC's augmented Lagrangian, loss of each model kind
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


@pytest.mark.parametrize("name,index,target", [("vanilla", 10, 7), ("ocm16", 5, 2)])
def test_attack_succeeds_and_reports_its_flips(name, index, target, targets, digits_test):
    model, output, attack = targets[name]
    clean = model.final_layer().weight.detach().clone()
    result = attack.run(index, target, seed=index)
    assert result.success and result.source == int(digits_test.labels[index])
    assert result.k in attack.config.k_values() and result.gamma in attack.config.gamma_values()
    # the reported count is the Hamming distance of the final layer, flip by flip
    layer = T.FinalLayer.from_model(model)
    assert result.n_flips == bitlib.hamming_distance(layer.codes, result.codes, layer.n_bits)
    assert result.n_flips == len(result.flips) > 0
    # a flipped relaxed bit moved by more than 1/2, so ||b - b0||^2 <= k allows at most 4k
    assert result.n_flips <= 4 * result.k
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


@pytest.mark.parametrize("name,index,target", [("vanilla", 0, 3), ("ocm16", 5, 2)])
def test_batched_over_gamma_equals_sequential(name, index, target, targets):
    _, _, attack = targets[name]
    aux = attack.draw_aux(index, seed=0)
    results = [with_config(attack, **cfg).run(index, target, aux=aux)
               for cfg in ({}, {"gamma_batch": 1}, {"k_batch": 0})]
    first = results[0]
    assert first.success and first.runs > 1  # the winner is not the first run of the order
    for other in results[1:]:
        for f in ("success", "k", "gamma", "n_flips", "flips", "outer_iters", "pa_acc",
                  "runs", "nan_runs", "converged"):
            assert getattr(other, f) == getattr(first, f), f
        assert torch.equal(other.codes, first.codes)


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
    assert result.n_flips is None and result.pa_acc is None


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
    text = f"0 {i0}\n\n# comment\n5 {i5}\n5.0 {i5}.0\n"
    items = T.parse_attack_info(text, labels, 10)
    assert [(it.pos, it.target, it.index) for it in items] == [(0, 0, i0), (1, 5, i5),
                                                               (2, 5, i5)]
    assert len({it.key for it in items}) == 3  # a repeated line is a separate attack
    assert T.read_attack_info(T.format_attack_info(items)) == [(1, 0, i0), (2, 5, i5),
                                                               (3, 5, i5)]
    own = int(labels[7])
    for bad, msg in [("0 1 2", "line 1: expected"), ("a b", "line 1: expected"),
                     (f"0 {i0}\n3 99999", "line 2: test index 99999"),
                     (f"12 {i0}", "target class 12"), (f"{own} 7", "of class"),
                     ("# nothing\n", "no 'target_class")]:
        with pytest.raises(ValueError, match=msg):
            T.parse_attack_info(bad, labels, 10)


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
    _, _, attack = targets["vanilla"]
    attack = with_config(attack, max_search_k=2)
    items = T.generate_attack_list(digits_test.labels, 10, 3, seed=2)
    full = JsonlResults(str(tmp_path / "a.jsonl"))
    T.run_campaign(attack, items, full, seed=1)
    assert [r["key"] for r in full.records] == [it.key for it in items]

    calls = []

    def crash(record):
        calls.append(record)
        if len(calls) == 1:
            raise KeyboardInterrupt

    part = JsonlResults(str(tmp_path / "b.jsonl"))
    with pytest.raises(KeyboardInterrupt):
        T.run_campaign(attack, items, part, seed=1, on_result=crash)
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"key": "1-t1-i')  # a line cut short by the crash
    resumed = JsonlResults(str(tmp_path / "b.jsonl"))
    assert len(resumed.records) == 1
    new = T.run_campaign(attack, items, resumed, seed=1)
    assert len(new) == 2
    assert strip_times(resumed.records) == strip_times(full.records)
    rows = {r["metric"]: r for r in T.summary_rows(full.records)}
    ok = [r for r in full.records if r["success"]]
    assert rows["asr"]["mean"] == pytest.approx(100.0 * len(ok) / 3)
    assert rows["n_flips"]["n"] == len(ok)


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
    assert "asr" in out and "pa_acc" in out and "n_flips" in out
    lines = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    for k in ("target", "index", "source", "success", "k", "gamma", "n_flips", "pa_acc",
              "converged"):
        assert k in rec
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


def test_script_refuses_other_campaign_in_same_folder(digits_checkpoints, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    assert run(attack_talbf.main, script(ckpt, tmp_path, "--n-attacks", "1")) == 0
    rc = run(attack_talbf.main, script(ckpt, tmp_path, "--n-attacks", "1", "--n_aux", "32"))
    assert rc == 2 and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["list_missing", "list_malformed", "list_index_range",
                                  "list_own_class", "list_class_range", "n_aux_too_large",
                                  "k_zero", "k_negative", "gamma_zero", "gamma_nan",
                                  "n_attacks_zero", "ext_iters_zero", "missing_ckpt",
                                  "flags_mismatch"])
def test_script_bad_input(case, digits_checkpoints, digits_test, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    labels = digits_test.labels
    own = int(labels[4])

    def listing(text):
        path = tmp_path / f"list_{len(list(tmp_path.glob('list_*')))}.txt"
        path.write_text(text)
        return ["--attack_info", str(path)]

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


def test_bench_quick_runs(digits_checkpoints, capsys):
    bench = load_bench()
    assert bench.main(["--quick", "--checkpoints", digits_checkpoints["vanilla"],
                       digits_checkpoints["ocm16"]]) == 0
    out = capsys.readouterr().out
    assert "sequential" in out and "ours" in out and "speed-up" in out
    assert "1/1" in out  # ours agrees with the plain variant
