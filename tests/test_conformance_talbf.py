"""Stealthy TA-LBF against the public code's own runs (``conformance/talbf/``, see its README).

Every attack of ``vanilla.json`` and ``ocm16.json`` runs through the real path: the public
checkpoints and the digits test set read as CIFAR-10, ``attack_talbf.main`` with the public
model flags and an ``--attacks-file`` holding the public D_aux of each attack (in the order the
public code used them), our model, our feature extraction, our engine with its default
(``public``) numerics. About 70 s on one core: every (k, gamma) try of every attack up to its
first success, 97 tries in all (20 vanilla, 77 OCM16), the gamma values of one k batched.

What is asserted, and why not more:

- per attack: success, k, gamma, the number of flipped bits, every flipped bit (row, col, bit,
  integer before and after) and PA-ACC equal to the public run's, D_aux as pinned, the clean
  accuracy and (OCM) the codebook;
- the one known exception, vanilla ``i`` = 6: there the public run's result came from a
  (k=5, gamma=50) try that met no stop test in 2000 outer iterations, whose end depends on the
  last bits of float32 rounding. The public code itself, run on the same machine with
  PyTorch's AVX2 kernels instead of its AVX-512 ones (``ATEN_CPU_CAPABILITY=avx2``), ends that
  attack exactly as ours does (k=5, gamma=12.5, the same 6 bits, 1157 outer iterations); the
  test accepts either outcome (:data:`ALTERNATIVES`);
- the tries: the same (k, gamma) order, and (nan, success, bits) equal for at least
  :data:`MIN_TRIES_AGREEING` of them. Runs that end without meeting the stop test (or in NaN)
  are chaotic once the penalties saturate (about outer iteration 1318): a change in the last
  float32 bit grows to O(0.1) in b. The public code agrees with itself across AVX-512/AVX2
  kernels on 18/20 and 63/77 tries; ours agrees with it on 16/20 and 61/77 (15/20, 57/77
  with AVX2 kernels and MKL limited to AVX2).
"""

import json

import pytest
import torch

import attack_talbf
from attacks.target import build_target
from cli.args import run, target_spec

MODES = {
    "vanilla": [],
    "ocm16": ["--ocm", "--code_length", "16", "--output_act", "tanh"],
}
# Measured (see the module docstring) minus a margin for other CPUs and BLAS builds.
MIN_TRIES_AGREEING = {"vanilla": 13, "ocm16": 52}
# (mode, i) -> the outcome the public code gives on the same machine with AVX2 kernels:
# (success, k, gamma, [(row, col, bit), ...] with bit 0 = LSB).
ALTERNATIVES = {
    ("vanilla", 6): (True, 5.0, 12.5, [(0, 0, 7), (0, 23, 7), (0, 45, 7), (2, 11, 7),
                                       (2, 45, 7), (2, 54, 7)]),
}


def public_flags(conformance, mode):
    return ["--checkpoint", conformance(mode, "model_best.pth.tar"),
            "--data_dir", conformance("digits-cifar10"), "--dataset", "cifar10",
            "--arch", "resnet20_quan", "--bits", "8", *MODES[mode]]


@pytest.fixture(scope="module", params=list(MODES))
def runs(request, conformance, tmp_path_factory):
    """mode -> (reference JSON, our records in file order, our clean layer codes, our
    output module); the script runs once per mode with the public D_aux pinned."""
    mode = request.param
    with open(conformance("talbf", f"{mode}.json")) as f:
        ref = json.load(f)
    tmp = tmp_path_factory.mktemp(f"talbf_{mode}")
    attacks = tmp / "attacks.jsonl"
    attacks.write_text("".join(json.dumps({"target": a["target"], "idx": a["idx"],
                                           "aux_idx": a["aux_idx"]}) + "\n"
                               for a in ref["attacks"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small tensor ops: a second thread does not pay
    try:
        rc = run(attack_talbf.main, public_flags(conformance, mode) + [
            "--attacks-file", str(attacks), "--save-attacks", str(tmp / "saved.jsonl"),
            "--results", str(tmp / "results"), "--device", "cpu", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert (tmp / "saved.jsonl").read_text() == attacks.read_text()  # repeats the run
    records = [json.loads(line) for line in
               (tmp / "results" / "results.jsonl").read_text().splitlines()]
    parser = attack_talbf.get_args_parser()
    argv = public_flags(conformance, mode) + ["--device", "cpu"]
    target = build_target(target_spec(parser.parse_args(argv)), "cpu")
    codes = target.model.final_layer().int_weight()
    return mode, ref, records, codes, target.output


def public_flips(attack):
    return sorted((f["row"], f["col"], f["bit"]) for f in attack["flipped_bits"])


def our_flips(record):
    """[row, col, i] with i the MSB-first index (7 = the LSB for 8 bits) -> (row, col, bit)."""
    return sorted((row, col, 7 - i) for row, col, i in record["flips"])


def test_model_and_d_aux_are_the_public_ones(runs):
    mode, ref, records, _, output = runs
    assert [(r["pos"], r["target"], r["index"]) for r in records] == \
        [(p, a["target"], a["idx"]) for p, a in enumerate(ref["attacks"])]
    for r, a in zip(records, ref["attacks"]):
        assert r["aux_idx"] == a["aux_idx"]           # pinned, order kept
        assert r["source"] == a["source"]
        assert r["clean_acc"] == pytest.approx(ref["clean_acc"], abs=1e-9)
    if mode == "ocm16":
        assert torch.equal(output.codebook, torch.tensor(ref["codebook"], dtype=torch.float32))


def test_final_results_equal_the_public_runs(runs):
    mode, ref, records, codes, _ = runs
    for r, a in zip(records, ref["attacks"]):
        ours = (r["success"], r["k"], r["gamma"], our_flips(r))
        alternative = ALTERNATIVES.get((mode, a["i"]))
        if alternative is not None and ours[:3] == alternative[:3]:
            # the documented accident: the public run's deciding try never met the stop test
            deciding = a["tries"][-1]
            assert not deciding["stop"] and deciding["outer_iters"] == \
                ref["reference_args"]["ext_max_iters"]
            assert ours[3] == sorted(alternative[3]), (mode, a["i"])
            continue
        assert ours == (a["success"], float(a["k"]), float(a["lambda"]), public_flips(a)), \
            (mode, a["i"], ours)
        assert r["bits_changed"] == int(a["n_bit"]) == len(r["flips"])
        assert r["pa_acc"] == pytest.approx(100.0 * a["pa_acc"], abs=1e-9)
        assert r["converged"] == a["stop"]
        # the integer codes before and after each flip, as the public run reports them
        for f in a["flipped_bits"]:
            before = int(codes[f["row"], f["col"]])
            flipped = (before & 0xFF) ^ (1 << f["bit"])
            assert (before, flipped - 256 if flipped >= 128 else flipped) == \
                (f["int_before"], f["int_after"])


def test_tries_follow_the_public_search(runs):
    mode, ref, records, _, _ = runs
    agreeing = total = 0
    mismatches = []
    for r, a in zip(records, ref["attacks"]):
        ours, theirs = r["tries"], a["tries"]
        # the search order: k doubling, gamma halving, NaN tries skipped over, as public
        n = min(len(ours), len(theirs))
        assert [(t["k"], t["gamma"]) for t in ours[:n]] == \
            [(float(t["k"]), float(t["lambda"])) for t in theirs[:n]]
        assert r["runs"] == len(ours) and r["nan_runs"] == sum(t["status"] == "nan"
                                                              for t in ours)
        for o, t in zip(ours[:n], theirs[:n]):
            mine = ("nan",) if o["status"] == "nan" else (o["success"], o["bits_changed"])
            public = ("nan",) if t["nan"] else (t["suc"], int(t["n_bit"]))
            total += 1
            agreeing += mine == public
            if mine != public:
                mismatches.append((a["i"], t["k"], t["lambda"], mine, public))
    assert total == sum(len(a["tries"]) for a in ref["attacks"])
    assert agreeing >= MIN_TRIES_AGREEING[mode], (agreeing, total, mismatches)
