"""Number formats end to end through the attack scripts (docs/algorithms.md section 1b): a float
ResNet-20 trained with --bits 32 attacked as fp32/bf16/fp16/torch-int8, and torchvision's
ResNet-18 (--pretrained, weights from the torch hub cache) attacked as fp32 and as PyTorch's
per-channel int8 on ImageNet-format image folders written here."""

import json
import os

import numpy as np
import pytest
import torch

import attack_bfa
import attack_tbfa
from models.pretrained import torchvision_weights_path
from cli.args import run


def _summary(folder):
    """The first run of a BFA campaign folder, with the campaign's settings (source, ...)."""
    with open(os.path.join(folder, "campaign.json")) as f:
        campaign = json.load(f)
    with open(os.path.join(folder, "results.jsonl")) as f:
        return {**campaign, **json.loads(f.readline())}


def _profile(folder):
    return _summary(folder)["profile"]


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    """A float (--bits 32) ResNet-20 trained 2 epochs on the digits."""
    import main

    out = tmp_path_factory.mktemp("float")
    assert main.main(["--dataset", "digits", "--arch", "resnet20_quan", "--bits", "32", "-e", "2",
                      "--device", "cpu", "--threads", "1", "--no-progress",
                      "--outdir", str(out / "run")]) == 0
    ckpt = torch.load(out / "run" / "model_best.pth.tar", map_location="cpu", weights_only=False)
    assert ckpt["model_config"]["bits"] == 32
    assert not any(k.endswith("step_size") for k in ckpt["state_dict"])  # plain float layers
    return str(out / "run" / "model_best.pth.tar")


@pytest.mark.parametrize("fmt,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                       ("fp16", torch.float16), ("torch-int8", None)])
def test_bfa_on_each_format_of_a_float_model(float_checkpoint, fmt, dtype, tmp_path):
    results = tmp_path / fmt
    status = run(attack_bfa.main, ["--checkpoint", float_checkpoint, "--format", fmt,
                                   "--n_iter", "2", "--break_acc", "-1",
                                   "--attack_sample_size", "32", "--calibration_images", "64",
                                   "--device", "cpu", "--threads", "1", "--no-progress",
                                   "--results", str(results)])
    assert status == 0
    summary = _summary(results)
    assert summary["number_format"] == fmt and summary["iterations"] == 2
    rows = _profile(results)
    assert rows  # fp32/bf16: the first flip makes the output NaN; nothing can follow it
    for row in rows:
        if fmt == "torch-int8":
            assert -128 <= int(row["before"]) <= 127 and -128 <= int(row["after"]) <= 127
        else:  # an IEEE value of that format, one bit apart
            before, after = (torch.tensor([float(row[k])], dtype=torch.float64).to(dtype)
                             for k in ("before", "after"))
            assert float(before) == float(row["before"]) or np.isnan(float(row["before"]))
            width = {torch.float32: torch.int32}.get(dtype, torch.int16)
            diff = int(before.view(width)) ^ int(after.view(width))
            assert bin(diff & ((1 << (32 if dtype == torch.float32 else 16)) - 1)).count("1") == 1


def test_tbfa_on_torch_int8_under_a_fault_model(float_checkpoint, tmp_path):
    results = tmp_path / "tbfa"
    status = run(attack_tbfa.main, ["--checkpoint", float_checkpoint, "--format", "torch-int8",
                                    "--pairs", "1:2", "--avgs", "1", "--iters", "3",
                                    "--n-src", "5", "--n-aux", "5", "--calibration_images", "64",
                                    "--one-flip-per-page", "--fault-direction", "0to1",
                                    "--device", "cpu", "--threads", "1", "--no-progress",
                                    "--results", str(results)])
    assert status == 0
    with open(results / "campaign.json") as f:
        campaign = json.load(f)
    assert campaign["number_format"] == "torch-int8"
    assert campaign["fault"]["one_per_page"] and campaign["fault"]["direction"] == "0to1"
    with open(results / "results.jsonl") as f:
        record = json.loads(f.readline())
    assert record["fault_violations"] == 0 and 1 <= record["iterations"] <= 3


def test_torch_int8_needs_the_cpu(float_checkpoint, tmp_path, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to ask for")
    status = run(attack_bfa.main, ["--checkpoint", float_checkpoint, "--format", "torch-int8",
                                   "--device", "cuda", "--results", str(tmp_path / "r")])
    assert status == 2 and "CPU-only" in capsys.readouterr().err


def _image_folders(root, classes=4, per_class=3, size=48):
    """ImageNet layout: train/ and val/, one folder of JPEGs per class (n0000000c)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += np.uint8(150)  # class colour
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)


@pytest.mark.slow
def test_torchvision_resnet18_fp32_and_torch_int8_on_image_folders(tmp_path, monkeypatch):
    """torchvision's ResNet-18 (its weights file in the torch hub cache) attacked as a float
    model (no quantization) and as PyTorch's per-channel int8, under a fault model."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = torchvision_weights_path("resnet18_quan")
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    _image_folders(tmp_path / "data")
    for fmt in ("fp32", "torch-int8"):
        results = tmp_path / f"r18_{fmt}"
        status = run(attack_bfa.main, [
            "--pretrained", "--arch", "resnet18_quan", "--dataset", "imagenet",
            "--data_dir", str(tmp_path / "data"), "--format", fmt, "--n_iter", "1",
            "--break_acc", "-1", "--attack_sample_size", "4", "--calibration_images", "8",
            "--one-flip-per-page", "--workers", "0", "--device", "cpu", "--threads", "2",
            "--no-progress", "--results", str(results)])
        assert status == 0
        summary = _summary(results)
        assert summary["number_format"] == fmt and summary["source"] == "torchvision:resnet18_quan"
        assert summary["iterations"] == 1 and summary["fault_violations"] == 0
        assert summary["fault_model"]["one_per_page"] is True
        assert summary["test_images"] == 12


def test_talbf_refuses_a_float_model(float_checkpoint, tmp_path, capsys):
    import attack_talbf

    status = run(attack_talbf.main, ["--checkpoint", float_checkpoint, "--n-attacks", "1",
                                     "--device", "cpu", "--results", str(tmp_path / "t")])
    assert status == 2 and "float model" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flags,message", [
    (["--fault-bits", "x"], "bit positions"),
    (["--fault-profile", "missing.txt"], "--fault-profile"),
    (["--fault-direction", "0to1", "--flip-budget", "0"], "budget"),
    (["--one-flip-per-page", "--page-bytes", "6"], "page size"),
])
def test_bad_fault_flags_are_one_line_errors(float_checkpoint, tmp_path, capsys, flags,
                                             message):
    for script in (attack_bfa, attack_tbfa):
        results = tmp_path / script.__name__
        status = run(script.main, ["--checkpoint", float_checkpoint, *flags, "--device", "cpu",
                                   "--results", str(results)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and err[-1].startswith("error: ") and message in err[-1]
        assert not results.exists()
