"""The BFA repository's own run, flip for flip: attack_bfa.py on its checkpoint with its flags and
its pinned attack batch (../shared/conformance/bfa/, written by the public code; see its README
and docs/algorithms.md section 10).

The public run: an 8-bit ResNet-20 its main.py trained on the digits read as CIFAR-10 (96.657 %
test accuracy with its normalization), attacked with ``--attack_sample_size 128 --manualSeed 2``
and no ``--k_top``; it stopped after 13 iterations, when the test accuracy fell to 10.86 %.
"""

import json

import pytest
import torch

import attack_bfa
import main as main_script
from cli.args import run
from conftest import conformance_path
from models.loading import rename_bfa_cifar_resnet

# The public attack script's settings: CIFAR-10 flags, 8-bit ResNet-20, all weights searched,
# the multi-bit retry without a bound (docs/algorithms.md section 6), stop at 11 %.
PUBLIC_FLAGS = ["--dataset", "cifar10", "--arch", "resnet20_quan", "--bits", "8",
                "--max_bits_per_layer", "0", "--break_acc", "11", "--n_iter", "20",
                "--device", "cpu", "--threads", "1", "--no-progress"]


def _our_layer(public_name: str) -> str:
    """The public CIFAR ResNet's module name as ours (conv_1_3x3 -> conv1, ...)."""
    (key,) = rename_bfa_cifar_resnet({public_name + ".weight": None})
    return key[:-len(".weight")]


@pytest.fixture(scope="module")
def public_run(tmp_path_factory):
    """attack_bfa.py with the public flags and the public attack batch: (record, campaign,
    the public iterations)."""
    results = tmp_path_factory.mktemp("bfa") / "results"
    assert run(attack_bfa.main, [
        "--checkpoint", conformance_path("bfa", "model_best.pth.tar"),
        "--data_dir", conformance_path("digits-cifar10"),
        "--attack-batch", conformance_path("bfa", "attack_batch_seed2.pt"),
        "--results", str(results), *PUBLIC_FLAGS]) == 0
    with open(results / "results.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    with open(results / "campaign.json") as f:
        campaign = json.load(f)
    with open(conformance_path("bfa", "public_iters_seed2.jsonl")) as f:
        public = [json.loads(line) for line in f]
    return record, campaign, public, results


def test_main_eval_gives_the_public_accuracy(capsys):
    """The BFA repository's checkpoint is evaluated with its own normalization by default."""
    assert run(main_script.main, [
        "--eval", conformance_path("bfa", "model_best.pth.tar"),
        "--data_dir", conformance_path("digits-cifar10"), "--dataset", "cifar10",
        "--arch", "resnet20_quan", "--bits", "8", "--device", "cpu", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 359 and result["top1"] == pytest.approx(96.657, abs=1e-3)
    assert result["normalization"]["name"] == "bfa"
    assert result["normalization"]["mean"] == pytest.approx([125.3 / 255, 123.0 / 255,
                                                             113.9 / 255])


def test_every_iteration_flips_the_public_bits(public_run):
    record, _, public, _ = public_run
    ours = {}
    for row in record["profile"]:
        ours.setdefault(row["iteration"], []).append(row)
    assert sorted(ours) == [it["iteration"] for it in public]
    for it in public:
        rows = ours[it["iteration"]]
        assert [(r["layer"], r["index"], r["before"], r["after"], 7 - r["bit"]) for r in rows] \
            == [(_our_layer(c["layer"]), c["index"], c["before"], c["after"], b)
                for c in it["changes"] for b in c["bits_lsb"]], it["iteration"]
        # the attack-batch loss after the iteration's flip, to float32 precision
        assert rows[-1]["loss"] == pytest.approx(it["loss_max"], rel=2e-6, abs=1e-6)


def test_the_public_stop_and_test_accuracy(public_run):
    record, campaign, public, _ = public_run
    assert record["stopped_by"] == "break_acc" and record["iterations"] == len(public) == 13
    assert record["bits_flipped"] == record["bits_changed"] == 13
    assert record["final_acc"] == pytest.approx(100.0 * 39 / 359, abs=1e-4)   # 10.86 %
    assert record["clean_acc"] == pytest.approx(96.657, abs=1e-3)
    accuracies = [row["accuracy"] for row in record["profile"]]
    assert all(a > 11.0 for a in accuracies[:-1]) and accuracies[-1] <= 11.0
    # the results say which batch and which normalization were used
    assert campaign["normalization"]["name"] == "bfa"
    assert campaign["pinned_batch"]["file"].endswith("attack_batch_seed2.pt")
    assert record["attack_batch"]["sha256"] == campaign["pinned_batch"]["sha256"]


def test_the_saved_batch_repeats_the_run(public_run, tmp_path):
    """The batch a run saves is the one it attacked with: given back, the same flips."""
    record, _, _, results = public_run
    saved = results / record["attack_batch"]["saved"]
    state = torch.load(saved, map_location="cpu", weights_only=True)
    public = torch.load(conformance_path("bfa", "attack_batch_seed2.pt"), map_location="cpu",
                        weights_only=True)
    assert torch.equal(state["data"], public["data"]) and torch.equal(state["target"],
                                                                      public["target"])
    again = tmp_path / "again"
    assert run(attack_bfa.main, [
        "--checkpoint", conformance_path("bfa", "model_best.pth.tar"),
        "--data_dir", conformance_path("digits-cifar10"), "--attack-batch", str(saved),
        "--results", str(again), *PUBLIC_FLAGS, "--n_iter", "3"]) == 0
    with open(again / "results.jsonl") as f:
        (repeat,) = [json.loads(line) for line in f]
    assert repeat["profile"] == record["profile"][:len(repeat["profile"])]
