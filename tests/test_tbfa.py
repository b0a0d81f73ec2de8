"""Stealthy T-BFA (docs/algorithms.md section 7): sets, stop rules, campaigns, resume, the script."""

import json
import os
from dataclasses import astuple

import pytest
import torch

import attack_tbfa
from attacks import tbfa as T
from models.bits import Flip, changed_bits, snapshot
from utils.bitsearch import SearchStep
from cli.args import run
from campaigns.results import CURVE, TBFA, JsonlResults
from campaigns.runner import CampaignResults, CampaignRunner
from conftest import attacked_model


def test_protocol_pairs():
    pairs = T.protocol_pairs(10)
    assert len(pairs) == 20 and pairs[:4] == [(0, 9), (0, 1), (1, 0), (1, 2)]
    assert pairs[-1] == (9, 0)
    assert len(T.protocol_pairs(50)) == 100
    assert T.protocol_pairs(10, 2, 4) == [(2, 1), (2, 3), (3, 2), (3, 4)]


def test_draw_sets_follow_spec():
    labels = torch.arange(100) % 4  # 25 samples per class
    sets = T.draw_sets(labels, source=2, n_src=10, n_aux=30, seed=5)
    assert (labels[sets.src] == 2).all() and (labels[sets.rest] == 2).all()
    assert not set(sets.src.tolist()) & set(sets.rest.tolist())
    assert (labels[sets.aux] != 2).all() and (labels[sets.pa] != 2).all()
    assert len(sets.aux) + len(sets.pa) == 75
    assert not set(sets.aux.tolist()) & set(sets.pa.tolist())
    again = T.draw_sets(labels, source=2, n_src=10, n_aux=30, seed=5)
    assert torch.equal(sets.src, again.src) and torch.equal(sets.aux, again.aux)
    with pytest.raises(ValueError, match="class 2 has only 25 test samples"):
        T.draw_sets(labels, source=2, n_src=26, n_aux=30, seed=5)


def test_pinned_sets_validation():
    labels = torch.arange(40) % 4
    ok = {"src": [2, 6], "rest": [10, 14], "aux": [0, 1]}
    sets = T.pinned_sets(ok, labels, 2)
    assert len(sets.pa) == 30 - 2
    for bad, msg in [({**ok, "src": [2, 99]}, "outside"), ({**ok, "rest": [3]}, "class 3"),
                     ({**ok, "aux": [2]}, "source class"), ({**ok, "rest": [2]}, "overlap")]:
        with pytest.raises(ValueError, match=msg):
            T.pinned_sets(bad, labels, 2)


def test_tbfa_reaches_target_and_keeps_count(digits_checkpoints, digits_test):
    model, output = attacked_model(digits_checkpoints["vanilla"])
    clean = snapshot(model)
    sets = T.draw_sets(digits_test.labels, 3, 12, 12, seed=0)
    result = T.TBFA(model, output, T.TBFAConfig(max_iters=200)).run(
        digits_test, sets, source=3, target=5)
    assert result.stop_reason == "success"
    assert max(result.asr_src, result.asr) == 100.0
    assert result.iterations == len(result.flips)
    assert result.bits_changed == changed_bits(model, clean) <= result.iterations
    assert all(f["before"] != f["after"] for f in result.flips)
    # The flip log replayed on a fresh copy of the model is the attacked model, and PA-ACC
    # (and the public formula's figure, whole blocks of 100) are its hit counts on D_pa.
    replay, _ = attacked_model(digits_checkpoints["vanilla"])
    layers = dict(replay.named_modules())
    for f in result.flips:
        codes = layers[f["layer"]].weight.data.view(-1)
        assert int(codes[f["index"]].round()) == f["before"], f
        codes[f["index"]] = f["after"]
    assert changed_bits(replay, snapshot(model)) == 0
    pa = sets.pa
    hits = int((digits_test.predict(replay, output, pa) == digits_test.labels[pa]).sum())
    assert result.pa_acc == 100.0 * hits / len(pa)
    scored = len(pa) // 100 * 100
    hits_public = int((digits_test.predict(replay, output, pa[:scored])
                       == digits_test.labels[pa[:scored]]).sum())
    assert result.pa_acc_public == 100.0 * hits_public / len(pa)
    clean_model, _ = attacked_model(digits_checkpoints["vanilla"])
    clean_hits = int((digits_test.predict(clean_model, output, pa)
                      == digits_test.labels[pa]).sum())
    assert result.pa_acc_clean == 100.0 * clean_hits / len(pa)


def test_tbfa_reaches_100_percent_on_d_src(digits_checkpoints, digits_test):
    model, output = attacked_model(digits_checkpoints["vanilla"])
    sets = T.draw_sets(digits_test.labels, 2, 12, 12, seed=4)
    result = T.TBFA(model, output, T.TBFAConfig(max_iters=300, stop_on_rest=False)).run(
        digits_test, sets, source=2, target=3)
    assert result.stop_reason == "success" and result.asr_src == 100.0


def test_tbfa_iteration_lowers_attack_loss(digits_checkpoints, digits_test):
    model, output = attacked_model(digits_checkpoints["ocm16"])
    sets = T.draw_sets(digits_test.labels, 1, 12, 12, seed=1)
    x = digits_test.inputs(torch.cat([sets.src, sets.aux]))
    y = torch.cat([torch.full((12,), 7), digits_test.labels[sets.aux]])

    def loss():
        with torch.no_grad():
            out = model(x)
            return float(output.loss(out[:12], y[:12]) + output.loss(out[12:], y[12:]))

    before = loss()
    result = T.TBFA(model, output, T.TBFAConfig(max_iters=1)).run(
        digits_test, sets, source=1, target=7)
    assert result.iterations == 1
    assert loss() == pytest.approx(result.flips[0]["loss"], rel=1e-4)
    assert loss() < before


def fake_steps(monkeypatch, flips, admissible=True):
    """Replace the search with a scripted sequence of flips (to drive the stop rules)."""
    seq = iter(flips)

    def step(self, gradient_loss, attack_loss):
        layer, index = next(seq)
        return SearchStep([Flip(layer, index, 0, 0, 0)], 1.0, 0.5, admissible)

    monkeypatch.setattr(T.ProgressiveBitSearch, "step", step)


def run_rule(digits_checkpoints, digits_test, **cfg):
    model, output = attacked_model(digits_checkpoints["vanilla"])
    sets = T.draw_sets(digits_test.labels, 3, 10, 10, seed=0)
    config = T.TBFAConfig(success_threshold=101.0, **cfg)
    return T.TBFA(model, output, config).run(digits_test, sets, 3, 5)


def test_stop_rule_oscillation(monkeypatch, digits_checkpoints, digits_test):
    fake_steps(monkeypatch, [("a", 1), ("b", 2), ("c", 2), ("d", 2), ("e", 3)])
    r = run_rule(digits_checkpoints, digits_test, max_iters=10)
    assert r.stop_reason == "oscillation" and r.iterations == 4  # index 2 three times in a row


def test_stop_rule_oscillation_by_layer(monkeypatch, digits_checkpoints, digits_test):
    fake_steps(monkeypatch, [("a", 2), ("b", 2), ("c", 2), ("c", 2), ("c", 2), ("x", 9)])
    r = run_rule(digits_checkpoints, digits_test, max_iters=6, oscillation_by_layer=True)
    assert r.stop_reason == "oscillation" and r.iterations == 5


def test_stop_rule_no_bit(monkeypatch, digits_checkpoints, digits_test):
    fake_steps(monkeypatch, [("a", 1), ("b", 2)], admissible=False)
    r = run_rule(digits_checkpoints, digits_test, max_iters=10)
    assert r.stop_reason == "no_bit" and r.iterations == 1


def test_stop_rule_max_iters(monkeypatch, digits_checkpoints, digits_test):
    fake_steps(monkeypatch, [("a", 1), ("b", 2), ("c", 3)])
    r = run_rule(digits_checkpoints, digits_test, max_iters=3)
    assert r.stop_reason == "max_iters" and r.iterations == 3


def test_stop_rule_success_on_rest(digits_checkpoints, digits_test):
    model, output = attacked_model(digits_checkpoints["vanilla"])
    sets = T.draw_sets(digits_test.labels, 3, 10, 10, seed=0)
    r = T.TBFA(model, output, T.TBFAConfig(max_iters=300)).run(digits_test, sets, 3, 5)
    assert r.stop_reason == "success" and (r.asr > 99.9 or r.asr_src > 99.9)


def strip_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in records]


def test_campaign_resume_equals_uninterrupted(digits_checkpoints, digits_test, tmp_path):
    """The one runner drives T-BFA: killed after two experiments (and a line cut short), the
    same campaign resumed runs only the rest and equals an uninterrupted one."""
    model, output = attacked_model(digits_checkpoints["ocm16"])
    clean = snapshot(model)
    exps = T.plan_experiments(digits_test.labels, [(0, 1), (4, 3)], 2, 8, 8, seed=3)
    attack = T.TBFA(model, output, T.TBFAConfig(max_iters=6), data=digits_test)
    full = CampaignResults(str(tmp_path / "a"))
    CampaignRunner(full, attack, exps, progress=False).run_items()
    assert changed_bits(model, clean) == 0  # restored
    assert [r["key"] for r in full.records] == [e.key for e in exps]
    assert all(r["attack"] == "tbfa" and r["iterations"] >= 1 for r in full.records)

    run_item, calls = attack.run_item, []

    def crash(item):
        calls.append(item)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_item(item)

    attack.run_item = crash
    part = CampaignResults(str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        CampaignRunner(part, attack, exps, progress=False).run_items()
    attack.run_item = run_item
    assert changed_bits(model, clean) == 0  # restored after the interruption too
    assert len(JsonlResults(part.path).records) == 2
    with open(part.path, "a") as f:
        f.write('{"key": "s4-t3-r0", "asr": 1')  # a line cut short by the crash
    JsonlResults(part.path)  # a resumed campaign's file: the broken line removed
    resumed = CampaignResults(str(tmp_path / "b"))
    runner = CampaignRunner(resumed, attack, exps, progress=False)
    assert [e.key for e in runner.todo] == [e.key for e in exps[2:]]
    assert len(runner.run_items()) == 2
    assert strip_times(resumed.records) == strip_times(full.records)


# ---------------------------------------------------------------------------------------------
# attack_tbfa.py
# ---------------------------------------------------------------------------------------------

def script(ckpt, results, *extra):
    return ["--checkpoint", ckpt, "--results", str(results), "--device", "cpu",
            "--no-progress", *extra]


def test_script_end_to_end_and_resume(digits_checkpoints, tmp_path, capsys):
    ckpt = digits_checkpoints["ocm16"]
    args = script(ckpt, tmp_path / "r", "--pairs", "2:3,5:4", "--avgs", "1", "--iters", "8",
                  "--curve-every", "2", "--save-sets", str(tmp_path / "sets.json"))
    assert run(attack_tbfa.main, args) == 0
    out = capsys.readouterr().out
    assert "pa_acc" in out and "iterations" in out
    lines = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["key"] == "s2-t3-r0" and rec["curve"][0]["iterations"] == 0
    # the fields the report reads (named once, in campaigns/results.py) are the ones written
    assert set(astuple(TBFA)) <= set(rec) and set(astuple(CURVE)) <= set(rec["curve"][1])
    assert os.path.exists(tmp_path / "r" / "summary.csv")
    # running again does nothing new
    assert run(attack_tbfa.main, args) == 0
    assert len((tmp_path / "r" / "results.jsonl").read_text().splitlines()) == 2
    # pinned sets repeat the experiments exactly
    pinned = script(ckpt, tmp_path / "p", "--sets", str(tmp_path / "sets.json"), "--iters", "8",
                    "--curve-every", "2")
    assert run(attack_tbfa.main, pinned) == 0
    a = [json.loads(l) for l in lines]
    b = [json.loads(l) for l in (tmp_path / "p" / "results.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        for k in ("asr", "asr_src", "pa_acc", "iterations", "bits_changed", "curve"):
            assert x[k] == y[k], k


def test_script_refuses_other_campaign_in_same_folder(digits_checkpoints, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    assert run(attack_tbfa.main, script(ckpt, tmp_path, "--pairs", "1:2", "--avgs", "1",
                                        "--iters", "3")) == 0
    rc = run(attack_tbfa.main, script(ckpt, tmp_path, "--pairs", "1:2", "--avgs", "1",
                                      "--iters", "3", "--n-src", "5"))
    assert rc == 2 and "other settings" in capsys.readouterr().err
    # --overwrite replaces the campaign (and only the campaign's files)
    (tmp_path / "notes.txt").write_text("mine")
    assert run(attack_tbfa.main, script(ckpt, tmp_path, "--pairs", "1:2", "--avgs", "1",
                                        "--iters", "3", "--n-src", "5", "--overwrite")) == 0
    records = JsonlResults(str(tmp_path / "results.jsonl")).records
    assert len(records) == 1 and records[0]["n_src"] == 5
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing_ckpt", "flags_mismatch", "class_out_of_range",
                                  "source_equals_target", "iters_zero", "set_too_large",
                                  "pinned_out_of_range", "pinned_overlap", "pinned_wrong_class",
                                  "pinned_missing_file", "bad_pairs", "results_is_a_file",
                                  "results_under_a_file", "sets_is_a_folder",
                                  "save_sets_missing_folder", "save_sets_onto_folder",
                                  "pinned_fractional", "pinned_repeated", "pairs_repeated",
                                  "negative_seed", "negative_curve", "foreign_results",
                                  "pinned_not_json", "pinned_pa_wrong"])
def test_script_bad_input(case, digits_checkpoints, digits_test, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    labels = digits_test.labels
    src = (labels == 3).nonzero().view(-1).tolist()
    aux = (labels == 4).nonzero().view(-1).tolist()

    def pinned(entry):
        path = tmp_path / f"pins_{len(list(tmp_path.glob('pins_*')))}.json"
        path.write_text(json.dumps({"experiments": [entry]}))
        return ["--sets", str(path)]

    base = {"source": 3, "target": 5, "src": src[:5], "rest": src[5:10], "aux": aux[:5]}
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    repeated = tmp_path / "repeated.json"
    repeated.write_text(json.dumps({"experiments": [{**base, "rep": 0}, {**base, "rep": 0}]}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.jsonl").write_text('{"id": 1, "value": 2}\n')
    cases = {
        "missing_ckpt": (["--checkpoint", str(tmp_path / "none.pth.tar")], "not found"),
        "flags_mismatch": (["--bits", "4"], "--bits 4"),
        "class_out_of_range": (["--pairs", "3:10"], "out of range"),
        "source_equals_target": (["--pairs", "3:3"], "different"),
        "iters_zero": (["--iters", "0"], "--iters"),
        "set_too_large": (["--pairs", "3:5", "--n-src", "500"], "has only"),
        "pinned_out_of_range": (pinned({**base, "aux": [100000]}), "outside"),
        "pinned_overlap": (pinned({**base, "rest": src[:5]}), "overlap"),
        "pinned_wrong_class": (pinned({**base, "src": aux[:3]}), "not the source class"),
        "pinned_missing_file": (["--sets", str(tmp_path / "nope.json")], "not found"),
        "bad_pairs": (["--pairs", "3-5"], "source:target"),
        "results_is_a_file": (["--results", str(a_file)], "is a file"),
        "results_under_a_file": (["--results", str(a_file / "r")], "is a file"),
        "sets_is_a_folder": (["--sets", str(tmp_path)], "is a folder"),
        "save_sets_missing_folder": (["--pairs", "3:5", "--save-sets",
                                      str(tmp_path / "nowhere" / "s.json")], "does not exist"),
        "save_sets_onto_folder": (["--pairs", "3:5", "--save-sets", str(tmp_path)],
                                  "is a folder"),
        "pinned_fractional": (pinned({**base, "aux": [aux[0] + 0.5]}), "integer"),
        "pinned_repeated": (["--sets", str(repeated)], "repeats"),
        "pairs_repeated": (["--pairs", "3:5,3:5"], "twice"),
        "negative_seed": (["--pairs", "3:5", "--seed", "-1"], "--seed"),
        "negative_curve": (["--pairs", "3:5", "--curve-every", "-1"], "--curve-every"),
        "foreign_results": (["--pairs", "3:5", "--results", str(foreign)], "--overwrite"),
        "pinned_not_json": (["--sets", str(a_file)], "not a pinned-sets file"),
        "pinned_pa_wrong": (pinned({**base, "pa": aux[:3]}), "'pa'"),
    }
    extra, expected = cases[case]
    args = script(ckpt, tmp_path / "results", *extra)
    if case == "missing_ckpt":
        args = args[2:]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc = run(attack_tbfa.main, args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected.lower() in err.lower(), err
    assert not (tmp_path / "results").exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
