"""--pretrained: torchvision's ImageNet weights from the torch hub cache, quantized after
training (docs/algorithms.md sections 1 and 2). The weights here are a randomly initialised torchvision
ResNet-18 saved into a temporary hub cache; the network is never touched."""

import json
import os
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import attack_bfa
from models import quant_layers
from models.pretrained import torchvision_weights_path
from attacks.target import build_target
from cli.args import explicit_dests, run, target_spec

ARCH = "resnet18_quan"


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding random ResNet-18 weights at torchvision's file name; the global
    hub folder is restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "_hub_dir", str(tmp_path_factory.mktemp("hub")))
        torch.manual_seed(0)
        state = torchvision.models.resnet18(weights=None).state_dict()
        path = torchvision_weights_path(ARCH)
        os.makedirs(os.path.dirname(path))
        torch.save(state, path)
        yield state


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """ImageNet layout with 2 classes x 2 tiny images in train/ and val/."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return str(root)


def parse(argv):
    parser = attack_bfa.get_args_parser()
    return parser.parse_args(argv), explicit_dests(parser, argv)


def test_pretrained_weights_are_quantized_torchvision_weights(hub_cache):
    args, explicit = parse(["--pretrained", "--arch", ARCH, "--dataset", "imagenet"])
    target = build_target(target_spec(args), torch.device("cpu"))
    config = target.config
    assert (config.arch, config.bits, config.num_classes, config.ocm) == (ARCH, 8, 1000, False)
    assert target.source == f"torchvision:{ARCH}" and target.dataset.name == "imagenet"
    layers = quant_layers(target.model)
    assert len(layers) == sum(1 for k in hub_cache if k.endswith(".weight") and
                              hub_cache[k].dim() in (2, 4))  # every conv and the classifier
    for name, layer in layers:
        w = hub_cache[("fc" if name == "linear" else name) + ".weight"]
        assert layer.integer_mode
        step = float(layer.step_size)
        assert step == pytest.approx(float(w.abs().max()) / 127, rel=1e-6)
        q = layer.weight.detach()
        assert torch.equal(q, q.round()) and int(q.abs().max()) == 127
        assert float((q * step - w).abs().max()) <= step / 2 * (1 + 1e-4), name
    # the classifier is torchvision's fc, quantized (docs/algorithms.md section 1)
    fc = hub_cache["fc.weight"]
    fc_step = fc.abs().max() / 127
    assert torch.equal(target.model.linear.weight.detach(),
                       torch.round(torch.clamp(fc / fc_step, -127, 127)))
    assert torch.equal(target.model.linear.bias.detach(), hub_cache["fc.bias"])
    assert torch.equal(target.model.bn1.running_var, hub_cache["bn1.running_var"])
    with torch.no_grad():
        out = target.model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and bool(torch.isfinite(out).all())


def test_attack_bfa_pretrained_end_to_end(hub_cache, imagenet_dir, tmp_path):
    results = tmp_path / "results"
    argv = ["--pretrained", "--arch", ARCH, "--dataset", "imagenet", "--data_dir", imagenet_dir,
            "--workers", "0", "--n_iter", "1", "--attack_sample_size", "2", "--break_acc", "-1",
            "--results", str(results), "--no-progress", "--device", "cpu"]
    assert run(attack_bfa.main, argv) == 0
    campaign = json.loads((results / "campaign.json").read_text())
    (summary,) = [json.loads(line) for line in (results / "results.jsonl").open()]
    assert campaign["source"] == f"torchvision:{ARCH}" and summary["iterations"] == 1
    assert summary["attack_images"] == 2 and summary["test_images"] == 4
    assert campaign["test_batch"] == 128  # ImageNet default
    assert len(summary["profile"]) == summary["bits_flipped"] >= 1


def test_pretrained_offline_with_empty_cache(imagenet_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    results = tmp_path / "results"
    argv = ["--pretrained", "--arch", ARCH, "--data_dir", imagenet_dir, "--workers", "0",
            "--results", str(results), "--no-progress", "--device", "cpu"]
    assert run(attack_bfa.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert torchvision_weights_path(ARCH) in err
    assert calls and not results.exists()


@pytest.mark.parametrize("extra, message", [
    (["--arch", "resnet20_quan"], "architecture"),
    (["--arch", ARCH, "--ocm", "--code_length", "1024", "--output_act", "tanh"], "--ocm"),
    (["--arch", ARCH, "--dataset", "cifar10"], "imagenet"),
])
def test_pretrained_bad_input(extra, message, imagenet_dir, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--pretrained", "--data_dir", imagenet_dir, "--results", str(results),
            "--no-progress", "--device", "cpu", *extra]
    assert run(attack_bfa.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not results.exists()
