"""The attacked model is kept: every record lists its flips, and rebuild_attacked.py turns any
campaign item back into the attacked model, whose accuracy is what the attack recorded."""

import json

import pytest
import torch

import attack_bfa
import attack_talbf
import attack_tbfa
import main as main_script
import rebuild_attacked
from cli.args import run
from models import hamming_distance, quant_layers, to_integer
from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint

COMMON = ["--device", "cpu", "--no-progress", "--threads", "1"]


def _records(folder):
    with open(folder / "results.jsonl") as f:
        return [json.loads(line) for line in f]


def _eval(path, capsys) -> dict:
    capsys.readouterr()
    assert run(main_script.main, ["--eval", str(path), *COMMON]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _rebuild(results, key, out) -> int:
    return run(rebuild_attacked.main, ["--results", str(results), "--key", key, "--out",
                                       str(out), *COMMON])


def test_bfa_and_tbfa_items_rebuild_to_their_recorded_accuracy(digits_checkpoints, tmp_path,
                                                               capsys):
    ckpt = digits_checkpoints["vanilla"]
    bfa = tmp_path / "bfa"
    assert run(attack_bfa.main, ["--checkpoint", ckpt, "--n_iter", "3", "--break_acc", "-1",
                                 "--attack_sample_size", "16", "--results", str(bfa),
                                 *COMMON]) == 0
    (record,) = _records(bfa)
    assert record["number_format"] == "int8" and record["fault_model"] is None
    assert _rebuild(bfa, "r0", tmp_path / "bfa_r0.pth.tar") == 0
    attacked = load_checkpoint(str(tmp_path / "bfa_r0.pth.tar"))
    assert attacked["attacked"]["key"] == "r0" and attacked["attacked"]["attack"] == "bfa"
    assert _eval(tmp_path / "bfa_r0.pth.tar", capsys)["top1"] == pytest.approx(
        record["final_acc"], abs=1e-3)

    tbfa = tmp_path / "tbfa"
    assert run(attack_tbfa.main, ["--checkpoint", ckpt, "--pairs", "0:1", "--avgs", "1",
                                  "--iters", "4", "--n-src", "5", "--n-aux", "5",
                                  "--one-flip-per-page", "--results", str(tbfa), *COMMON]) == 0
    (record,) = _records(tbfa)
    assert record["number_format"] == "int8" and record["fault_model"]["one_per_page"]
    assert len(record["flips"]) == record["iterations"]  # every flip, without --flip-log
    assert _rebuild(tbfa, "s0-t1-r0", tmp_path / "tbfa.pth.tar") == 0
    assert _eval(tmp_path / "tbfa.pth.tar", capsys)["top1"] == pytest.approx(
        record["test_acc"], abs=1e-3)


def test_a_talbf_item_rebuilds_with_its_final_layer_bits(digits_checkpoints, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    results = tmp_path / "talbf"
    assert run(attack_talbf.main, ["--checkpoint", ckpt, "--n-attacks", "1", "--max-search-k",
                                   "2", "--results", str(results), *COMMON]) == 0
    (record,) = _records(results)
    assert record["number_format"] == "int8" and record["fault_model"] is None
    assert _rebuild(results, record["key"], tmp_path / "t.pth.tar") == 0
    clean, attacked = (_codes(p) for p in (ckpt, str(tmp_path / "t.pth.tar")))
    changed = {name: hamming_distance(clean[name], attacked[name], 8) for name in clean
               if not torch.equal(clean[name], attacked[name])}
    assert changed == ({"linear": record["bits_changed"]} if record["bits_changed"] else {})


def _codes(path) -> dict:
    """The integer codes of every quantized layer of a checkpoint's model."""
    ckpt = load_checkpoint(path)
    model, _ = model_from_checkpoint(ckpt, checkpoint_config(ckpt), path)
    to_integer(model)
    return {name: layer.int_weight() for name, layer in quant_layers(model)}


def test_rebuild_errors_are_one_line_and_write_nothing(digits_checkpoints, tmp_path, capsys):
    ckpt = digits_checkpoints["vanilla"]
    bfa = tmp_path / "bfa"
    assert run(attack_bfa.main, ["--checkpoint", ckpt, "--n_iter", "1", "--attack_sample_size",
                                 "8", "--results", str(bfa), *COMMON]) == 0
    (tmp_path / "exists.pth.tar").write_bytes(b"x")
    for key, out, message in (("r9", tmp_path / "a.pth.tar", "no record with key"),
                              ("r0", tmp_path / "exists.pth.tar", "exists"),
                              ("r0", bfa / "inside.pth.tar", "inside --results")):
        capsys.readouterr()
        assert _rebuild(bfa, key, out) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "a.pth.tar").exists() and not (bfa / "inside.pth.tar").exists()
    assert (tmp_path / "exists.pth.tar").read_bytes() == b"x"
