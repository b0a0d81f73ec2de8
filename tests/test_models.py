"""Registry (docs/algorithms.md section 2): every architecture builds, trains, and loads published layouts."""

import pytest
import torch
import torchvision

from models import get_model, get_model_entry, list_models, quant_layers, to_integer
from models.factory import ModelConfig, build_model
from models.loading import load_weights

CIFAR_ARCHS = list_models("cifar")
IMAGENET_ARCHS = list_models("imagenet")


def test_registry_lists_spec_models():
    for name in ["resnet20_quan", "resnet32_quan", "resnet44_quan", "resnet56_quan",
                 "resnet20_bin", "vgg11_bn_quan", "wrn28_4_quan", "wrn28_8_quan",
                 "resnet18_quan", "resnet34_quan", "resnet50_quan", "mobilenet_v2_quan"]:
        assert name in list_models()
    with pytest.raises(KeyError, match="valid"):
        get_model("resnet21_quan", 10)


@pytest.mark.parametrize("arch", CIFAR_ARCHS + IMAGENET_ARCHS)
def test_forward_backward(arch):
    torch.manual_seed(0)
    size = 32 if arch in CIFAR_ARCHS else 64
    model = get_model(arch, 16, output_act="tanh")
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 16)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    # every conv/linear is quantized, the final layer included
    n_plain = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert len(quant_layers(model)) == n_plain
    assert model.final_layer() is dict(model.named_modules())[model.final_layer_name]
    model.eval()  # dropout and batch statistics off: features then head equals forward
    assert torch.allclose(model.forward_head(model.forward_features(x)), model(x))


def test_resnet20_depths_and_params():
    counts = {d: sum(p.numel() for p in get_model(f"resnet{d}_quan", 10).parameters())
              for d in (20, 32, 44, 56)}
    assert counts[20] == 269722  # the canonical 0.27M ResNet-20
    assert counts[20] < counts[32] < counts[44] < counts[56]


def test_binarized_arch_is_one_bit():
    model = get_model("resnet20_bin", 10)
    assert {layer.n_bits for _, layer in quant_layers(model)} == {1}
    with pytest.raises(ValueError):
        get_model("resnet20_bin", 10, n_bits=8)


def test_resnet20_state_dict_names():
    keys = set(get_model("resnet20_quan", 10).state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.2.bn2.bias",
              "linear.weight", "linear.bias", "linear.step_size", "layer2.1.conv2.b_w"]:
        assert k in keys


def test_wrn_state_dict_names():
    keys = set(get_model("wrn28_4_quan", 10).state_dict())
    for k in ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
              "block2.layer.3.conv2.weight", "block3.layer.0.convShortcut.step_size", "bn1.weight",
              "linear.weight"]:
        assert k in keys
    assert "block1.layer.1.convShortcut.weight" not in keys


@pytest.mark.parametrize("arch,tv", [("resnet18_quan", "resnet18"), ("resnet50_quan", "resnet50"),
                                     ("mobilenet_v2_quan", "mobilenet_v2")])
def test_imagenet_layout_is_torchvision(arch, tv):
    ours = get_model(arch, 1000).state_dict()
    ref = getattr(torchvision.models, tv)(weights=None).state_dict()
    renamed = {("linear." + k[3:] if k.startswith("fc.") else k) for k in ref}
    plain = {k for k in ours if not k.endswith((".step_size", ".b_w"))}
    assert plain == renamed


def test_load_torchvision_weights_maps_fc():
    """Every torchvision weight lands in its layer (fc in linear), and the loaded model computes
    torchvision's function with each conv / linear weight replaced by its 8-bit quantization."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    model = get_model("resnet18_quan", 10)
    load_weights(model, tv.state_dict())
    assert torch.equal(model.linear.weight, tv.fc.weight)
    assert torch.equal(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    tv.eval(), model.eval()
    tv_layers = dict(tv.named_modules())
    with torch.no_grad():
        for name, layer in quant_layers(model):
            ref = tv_layers["fc" if name == "linear" else name]
            q = layer.quantized_weight()
            levels = (q / layer.step_size).round()
            assert torch.allclose(q, levels * layer.step_size) and levels.abs().max() <= 127
            assert (q - ref.weight).abs().max() <= layer.step_size / 2 + 1e-7, name
            ref.weight.copy_(q)
        x = torch.randn(2, 3, 64, 64)
        assert torch.allclose(model(x), tv(x), rtol=1e-4, atol=1e-5)


def published_state_dict(model):
    """The published checkpoints' layout: DataParallel prefix, step_size and b_w entries."""
    return {"module." + k: v.clone() for k, v in model.state_dict().items()}


# The public checkpoint layout against the public function: tests/test_conformance.py.

def test_load_without_quant_entries_computes_the_same():
    """torchvision-style state dicts have no step_size / b_w: the step is recomputed from the
    weights, so the loaded model computes what the source model computes."""
    torch.manual_seed(2)
    src = get_model("resnet20_quan", 10).eval()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith(("step_size", "b_w"))}
    dst = load_weights(get_model("resnet20_quan", 10), sd).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_load_errors_are_explicit():
    sd = published_state_dict(get_model("resnet20_quan", 10, n_bits=8))
    with pytest.raises(ValueError, match="8-bit layers.*--bits 8"):
        load_weights(get_model("resnet20_quan", 10, n_bits=4), sd)
    with pytest.raises(ValueError, match="16 outputs but the model has 10"):
        load_weights(get_model("resnet20_quan", 10),
                     published_state_dict(get_model("resnet20_quan", 16)))
    with pytest.raises(ValueError, match="does not fit architecture resnet32_quan"):
        load_weights(get_model("resnet32_quan", 10), sd)


def test_finetune_skip_final_keeps_everything_else():
    src = get_model("resnet20_quan", 10)
    dst = get_model("resnet20_quan", 64, output_act="tanh")
    init_final = dst.linear.weight.detach().clone()
    load_weights(dst, src.state_dict(), skip_final=True)
    assert torch.equal(dst.layer3[2].conv2.weight, src.layer3[2].conv2.weight)
    assert torch.equal(dst.linear.weight, init_final)


def test_integer_mode_whole_model_same_outputs():
    torch.manual_seed(0)
    model = get_model("resnet20_quan", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    to_integer(model)
    assert torch.allclose(model(x), before, atol=1e-5)


def test_model_config_validation():
    with pytest.raises(ValueError, match="tanh"):
        ModelConfig("resnet20_quan", 10, 8, "linear", True, 16).validate()
    with pytest.raises(ValueError, match="power of two"):
        ModelConfig("resnet20_quan", 10, 8, "tanh", True, 24).validate()
    with pytest.raises(ValueError, match="bit width"):
        ModelConfig("resnet20_quan", 10, 17).validate()
    assert get_model_entry("resnet50_quan").input_kind == "imagenet"
