"""Agreement with the public code itself (docs/algorithms.md, "Conformance").

Two kinds of evidence, neither built from our own output:

- artifacts the public OCM code wrote (``../shared/conformance``: two checkpoints it trained, the
  class and raw output it computed for every test image, its stealthy T-BFA runs flip by flip),
  which our scripts must reproduce through the same paths a user takes;
- for every architecture the public OCM repository defines under a name we use, a state dict in
  its checkpoint layout (``module.`` prefix, 0-d ``step_size``, ``b_w``) loaded by our loader and
  compared with a plain functional forward written here from the public model definitions
  (IGITUGraz/OutputCodeMatching ``models/quan_resnet.py``, ``models/quan_wideresnet.py``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import attack_bfa
import attack_tbfa
import main as main_script
from conftest import conformance_path
from models import to_integer
from models.factory import ModelConfig, build_model
from models.loading import load_weights
from utils.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint
from attacks.target import build_target
from cli.args import run, target_spec
from utils.data import get_dataset_info, load_split_tensors, normalize_images

# The public scripts' model flags for the two checkpoints of the conformance folder.
PUBLIC_FLAGS = {
    "vanilla": ["--dataset", "cifar10", "--arch", "resnet20_quan", "--bits", "8"],
    "ocm16": ["--dataset", "cifar10", "--arch", "resnet20_quan", "--bits", "8", "--ocm",
              "--code_length", "16", "--output_act", "tanh"],
}
TBFA_RUNS = ["vanilla_0_1", "vanilla_3_4", "ocm16_1_2", "ocm16_9_0"]


def _data_dir():
    return conformance_path("digits-cifar10")


def _predictions(name):
    with open(conformance_path(name, "predictions.json")) as f:
        return json.load(f)


def _test_inputs():
    images, labels = load_split_tensors("cifar10", _data_dir(), "test")
    info = get_dataset_info("cifar10")
    return normalize_images(images, info.mean, info.std), labels


def _outputs(model, x, batch=128):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


# ---------------------------------------------------------------------------------------------
# 1. The public checkpoints load with the public flags and compute what the public code computed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vanilla", "ocm16"])
def test_public_checkpoint_outputs_are_the_public_outputs(name):
    """Through the attack scripts' loader (integer mode) and the float quantized forward: every
    predicted class the public code's, every raw output its value.

    The raw outputs are equal to the last bit on the CPU kind the artifacts were written on
    (Intel Xeon; CI checks this there). Another CPU kind runs other convolution kernels, which
    sum in another order: on a 2-core AMD EPYC 2918 of the vanilla model's 3590 outputs differ,
    by at most 7.6e-6 (one OCM16 output by 6e-8). A wrong model (a shortcut, a scale, a
    rounding rule) moves outputs by far more than ``_ATOL``; the predictions must match
    everywhere."""
    ref = _predictions(name)
    x, labels = _test_inputs()
    assert labels.tolist() == ref["labels"]
    path = conformance_path(name, "model_best.pth.tar")
    argv = ["--checkpoint", path, "--data_dir", _data_dir(), "--device", "cpu"] + PUBLIC_FLAGS[name]
    parser = attack_tbfa.get_args_parser()
    args = parser.parse_args(argv)
    target = build_target(target_spec(args), torch.device("cpu"))
    if name == "ocm16":
        assert torch.equal(target.output.codebook.float(), torch.tensor(ref["codebook"]).float())
    out = _outputs(target.model, x)
    _assert_public_outputs(out, ref["out_integer"])
    assert target.output.predict(out).tolist() == ref["pred_integer"]

    model, output = model_from_checkpoint(load_checkpoint(path), target.config, path)
    out = _outputs(model.eval(), x)  # quantized float forward, before the integer conversion
    _assert_public_outputs(out, ref["out_float"])
    assert output.predict(out).tolist() == ref["pred_float"]


_ATOL = 1e-5  # float32 reduction-order noise between CPU kinds (see the test above)


def _assert_public_outputs(out: torch.Tensor, public) -> None:
    """Bit-equal to the public outputs where the CPU sums as the public run's did; elsewhere
    within the reduction-order noise of float32 (never more than ``_ATOL``)."""
    ref = torch.tensor(public, dtype=torch.float32)
    if not torch.equal(out, ref):
        torch.testing.assert_close(out, ref, rtol=0.0, atol=_ATOL)


@pytest.mark.parametrize("name", ["vanilla", "ocm16"])
def test_main_eval_reports_the_public_accuracy(name, capsys):
    path = conformance_path(name, "model_best.pth.tar")
    assert run(main_script.main, ["--eval", path, "--data_dir", _data_dir(), "--device", "cpu",
                                  "--no-progress"] + PUBLIC_FLAGS[name]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["n"] == 359
    assert record["top1"] == pytest.approx(_predictions(name)["accuracy_integer_mode"], abs=1e-4)


def test_attack_bfa_runs_on_a_public_checkpoint(tmp_path):
    path = conformance_path("vanilla", "model_best.pth.tar")
    assert run(attack_bfa.main, ["--checkpoint", path, "--data_dir", _data_dir(), "--device",
                                 "cpu", "--n_iter", "1", "--attack_sample_size", "32",
                                 "--results", str(tmp_path / "bfa"), "--no-progress"]
               + PUBLIC_FLAGS["vanilla"]) == 0
    with open(tmp_path / "bfa" / "results.jsonl") as f:
        summary = json.loads(f.readline())
    assert summary["clean_acc"] == pytest.approx(_predictions("vanilla")["accuracy_integer_mode"],
                                                 abs=1e-4)


# ---------------------------------------------------------------------------------------------
# 2. Stealthy T-BFA: the public runs, flip for flip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_name", TBFA_RUNS)
def test_tbfa_flips_the_public_bits(run_name, tmp_path):
    """attack_tbfa.py with default settings on the pinned sets of a public run: the same bits in
    the same order, the same stop (iteration and reason), the same ASR / PA-ACC / test accuracy."""
    with open(conformance_path("tbfa", f"{run_name}.json")) as f:
        ref = json.load(f)
    model_name = run_name.split("_")[0]
    s = ref["sets"]
    sets_file = tmp_path / "sets.json"
    sets_file.write_text(json.dumps({"experiments": [{
        "source": s["source"], "target": s["target"], "rep": 0, "src": s["src_idx"],
        "rest": s["heldout_idx"], "aux": s["aux_idx"], "pa": s["rest_idx"]}]}))
    results = tmp_path / "results"
    assert run(attack_tbfa.main, [
        "--checkpoint", conformance_path(model_name, "model_best.pth.tar"),
        "--data_dir", _data_dir(), "--sets", str(sets_file), "--flip-log",
        "--iters", str(ref["config"]["max_iters"]), "--results", str(results), "--device", "cpu",
        "--no-progress"] + PUBLIC_FLAGS[model_name]) == 0
    with open(results / "results.jsonl") as f:
        (ours,) = [json.loads(line) for line in f]

    public_flips = [(it["layer"], it["flat_index"], it["bit"], it["int_before"], it["int_after"])
                    for it in ref["iterations"]]
    our_flips = [(fl["layer"], fl["index"], 7 - fl["bit"], fl["before"], fl["after"])
                 for fl in ours["flips"]]  # ours counts bits from the MSB, the public from the LSB
    assert our_flips == public_flips
    for fl, it in zip(ours["flips"], ref["iterations"]):
        assert fl["loss"] == pytest.approx(it["loss_after"], rel=1e-5)

    summary = ref["summary"]
    assert ours["iterations"] == summary["n_flips"]
    assert ours["bits_changed"] == summary["hamming_distance_bits"]
    assert summary["stop_reason"].startswith("asr_src>" if ours["success_on"] == "src"
                                             else "asr_heldout>")
    assert ours["stop_reason"] == "success"
    assert ours["asr_src"] == pytest.approx(summary["asr_src"], abs=0.01)
    assert ours["asr"] == pytest.approx(summary["asr_heldout"], abs=0.01)
    assert ours["pa_acc"] == pytest.approx(summary["pa_acc"], abs=0.01)
    assert ours["pa_acc_public"] == pytest.approx(summary["pa_acc_ref_batchwise"], abs=0.01)
    assert ours["test_acc"] == pytest.approx(summary["test_acc_after"], abs=0.01)
    assert ours["pa_acc_clean"] == pytest.approx(ref["initial"]["pa_acc"], abs=0.01)


# ---------------------------------------------------------------------------------------------
# 3. Every OCM-repository architecture in its checkpoint layout vs a functional reference
# ---------------------------------------------------------------------------------------------

def _quantized(sd, name, n_bits):
    """The public layer's weight in its forward: round(hardtanh(W, +-h*step) / step) * step,
    step = max|W| / h, h = (2**N - 2) / 2."""
    w = sd[f"{name}.weight"]
    half = (2 ** n_bits - 2) / 2
    step = w.abs().max() / half
    bound = half * step.item()
    return torch.round(F.hardtanh(w, -bound, bound) / step) * step


def _bn(sd, name, x):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.1, 1e-5)


def _conv(sd, name, x, n_bits, stride=1, padding=None):
    w = _quantized(sd, name, n_bits)
    pad = (w.shape[-1] // 2) if padding is None else padding
    return F.conv2d(x, w, sd.get(f"{name}.bias"), stride, pad)


def _head(sd, x, n_bits, tanh):
    out = F.linear(x, _quantized(sd, "linear", n_bits), sd["linear.bias"])
    return torch.tanh(out) if tanh else out


def ref_cifar_resnet(sd, x, blocks, n_bits, tanh):
    """OCM ``CifarResNet`` (quan_resnet.py): option-A ``DownsampleA`` = 1x1 average pool with
    stride 2, then ``cat((x, 0 * x))``; ``avg_pool2d(out, out.size(3))``."""
    out = F.relu(_bn(sd, "bn1", _conv(sd, "conv1", x, n_bits)))
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            y = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", out, n_bits, stride)))
            y = _bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", y, n_bits))
            if stride != 1 or in_planes != planes:
                short = F.avg_pool2d(out, kernel_size=1, stride=stride)
                short = torch.cat((short, short.mul(0)), 1)
            else:
                short = out
            y += short
            out = F.relu(y)
            in_planes = planes
    out = F.avg_pool2d(out, out.size()[3]).view(out.size(0), -1)
    return _head(sd, out, n_bits, tanh)


def ref_wide_resnet(sd, x, n, widen, n_bits, tanh):
    """OCM ``WideResNet`` (quan_wideresnet.py): ``equalInOut`` compares widths only; a block
    that changes width pre-activates its input and feeds that to ``convShortcut``."""
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    out = _conv(sd, "conv1", x, n_bits)
    for b in range(3):
        for i in range(n):
            p = f"block{b + 1}.layer.{i}"
            cin = widths[b] if i == 0 else widths[b + 1]
            stride = (1, 2, 2)[b] if i == 0 else 1
            equal = cin == widths[b + 1]
            act = F.relu(_bn(sd, f"{p}.bn1", out))
            y = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv1", act, n_bits, stride)))
            y = _conv(sd, f"{p}.conv2", y, n_bits)
            short = out if equal else _conv(sd, f"{p}.convShortcut", act, n_bits, stride, 0)
            out = torch.add(short, y)
    out = F.relu(_bn(sd, "bn1", out))
    out = F.avg_pool2d(out, 8).view(-1, widths[3])
    return _head(sd, out, n_bits, tanh)


def ref_imagenet_resnet50(sd, x, n_bits, tanh):
    """OCM ``ResNet`` with ``Bottleneck`` (quan_resnet.py): torchvision's structure, quantized
    downsample convolution, ``AdaptiveAvgPool2d``, classifier ``linear``."""
    out = F.relu(_bn(sd, "bn1", _conv(sd, "conv1", x, n_bits, 2, 3)))
    out = F.max_pool2d(out, 3, 2, 1)
    for stage, count in enumerate((3, 4, 6, 3), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            y = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", out, n_bits, 1, 0)))
            y = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", y, n_bits, stride, 1)))
            y = _bn(sd, f"{p}.bn3", _conv(sd, f"{p}.conv3", y, n_bits, 1, 0))
            if f"{p}.downsample.0.weight" in sd:
                identity = _bn(sd, f"{p}.downsample.1",
                               _conv(sd, f"{p}.downsample.0", out, n_bits, stride, 0))
            else:
                identity = out
            y += identity
            out = F.relu(y)
    out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
    return _head(sd, out, n_bits, tanh)


def _public_layout_state_dict(model, gen):
    """Random weights and BN statistics in the public checkpoint layout: ``module.`` prefix, a
    0-d ``step_size`` and the ``b_w`` column of every quantized layer."""
    sd = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            sd[key] = torch.randn(value.shape, generator=gen) * 0.1
        elif key.endswith("step_size"):
            continue
        elif key.endswith("b_w"):
            sd[key] = value.clone()
        elif value.dim() == 1:  # BN scale
            sd[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            fan_in = value[0].numel()
            sd[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / fan_in)
    for key in [k for k in sd if k.endswith(".b_w")]:
        prefix = key[:-len("b_w")]
        half = (2 ** sd[key].shape[0] - 2) / 2
        sd[prefix + "step_size"] = sd[prefix + "weight"].abs().max() / half  # 0-d, as theirs
    assert all(sd[k].dim() == 0 for k in sd if k.endswith("step_size"))
    return {"module." + k: v for k, v in sd.items()}


OCM_ARCHITECTURES = [
    # (arch, bits, OCM code length or None, input size, reference)
    ("resnet20_quan", 8, None, 32, lambda sd, x, t: ref_cifar_resnet(sd, x, 3, 8, t)),
    ("resnet20_quan", 4, 16, 32, lambda sd, x, t: ref_cifar_resnet(sd, x, 3, 4, t)),
    ("resnet20_quan", 8, 64, 32, lambda sd, x, t: ref_cifar_resnet(sd, x, 3, 8, t)),
    ("resnet32_quan", 8, None, 32, lambda sd, x, t: ref_cifar_resnet(sd, x, 5, 8, t)),
    ("wrn28_4_quan", 8, None, 32, lambda sd, x, t: ref_wide_resnet(sd, x, 4, 4, 8, t)),
    ("wrn28_8_quan", 4, 128, 32, lambda sd, x, t: ref_wide_resnet(sd, x, 4, 8, 4, t)),
    ("resnet50_quan", 8, 1024, 64, lambda sd, x, t: ref_imagenet_resnet50(sd, x, 8, t)),
]


@pytest.mark.parametrize("arch,bits,code_length,size,reference", OCM_ARCHITECTURES,
                         ids=[f"{a[0]}-{a[1]}bit-{'ocm' + str(a[2]) if a[2] else 'vanilla'}"
                              for a in OCM_ARCHITECTURES])
def test_public_layout_loads_and_computes_the_public_function(arch, bits, code_length, size,
                                                              reference):
    """Tolerance: exact for the CIFAR networks (same operations in the same order); 1e-5 relative
    for ResNet-50 (torchvision's in-place adds and a 2048-wide mean: reassociation only)."""
    gen = torch.Generator().manual_seed(0)
    num_classes = 100 if arch.startswith("wrn") else 10
    ocm = code_length is not None
    config = ModelConfig(arch, num_classes, bits=bits, ocm=ocm, code_length=code_length,
                         output_act="tanh" if ocm else "linear")
    model, _ = build_model(config)
    sd = _public_layout_state_dict(model, gen)
    load_weights(model, sd)
    model.eval()
    plain = {k[len("module."):]: v for k, v in sd.items()}
    x = torch.randn(4, 3, size, size, generator=gen)
    with torch.no_grad():
        expected = reference(plain, x, ocm)
        ours_float = model(x)
        to_integer(model)
        ours_int = model(x)
    if arch == "resnet50_quan":
        torch.testing.assert_close(ours_float, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_int, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(ours_float, expected)
        assert torch.equal(ours_int, expected)


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints this tool wrote before the conformance fix still evaluate as they did
# ---------------------------------------------------------------------------------------------

def ref_v0_cifar_resnet(sd, x, n_bits):
    """The function this tool's ResNet-20 computed before the fix: zeros split on both sides of
    the subsampled shortcut, adaptive average pooling."""
    out = F.relu(_bn(sd, "bn1", _conv(sd, "conv1", x, n_bits)))
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for i in range(3):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            y = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", out, n_bits, stride)))
            y = _bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", y, n_bits))
            if stride != 1 or in_planes != planes:
                extra = planes - in_planes
                short = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, extra // 2, extra - extra // 2))
            else:
                short = out
            out = F.relu(y + short)
            in_planes = planes
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return F.linear(out, _quantized(sd, "linear", n_bits), sd["linear.bias"])


def test_checkpoint_without_layout_evaluates_as_before():
    gen = torch.Generator().manual_seed(1)
    config = ModelConfig("resnet20_quan", 10, layout="v0")
    model, output = build_model(config)
    sd = {k[len("module."):]: v for k, v in _public_layout_state_dict(model, gen).items()}
    load_weights(model, sd)
    ckpt = make_checkpoint(model, config, output, "cifar10", (0.5,) * 3, (0.5,) * 3)
    ckpt["model_config"].pop("layout")  # as written before the field existed
    ckpt["state_dict"] = {k: (v.reshape(1) if k.endswith("step_size") else v)  # old shape [1]
                          for k, v in ckpt["state_dict"].items()}
    from utils.checkpoint import checkpoint_config
    stored = checkpoint_config(ckpt)
    assert stored.layout == "v0"
    loaded, _ = model_from_checkpoint(ckpt, stored)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        expected = ref_v0_cifar_resnet(sd, x, 8)
        assert torch.equal(loaded.eval()(x), expected)
        public, _ = build_model(ModelConfig("resnet20_quan", 10))
        load_weights(public, sd)
        assert not torch.allclose(public.eval()(x), expected, atol=1e-3)  # the layouts differ
