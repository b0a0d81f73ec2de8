"""bench/bench_train.py keeps working: its --quick mode runs and prints both tables."""

import copy

import torch

from models import get_model, quant_layers, to_float, to_integer



def load_bench():
    from bench import bench_train
    return bench_train


def test_float_twin_is_the_same_network_without_quantization():
    bench = load_bench()
    torch.manual_seed(0)
    quant = get_model("resnet20_quan", 10).eval()
    to_float(to_integer(quant))  # weights on the 8-bit grid: quantizing them changes nothing
    twin = bench.float_twin(quant)
    assert not any(type(m).__name__.startswith("Quant") for m in twin.modules())
    assert len(quant_layers(quant)) == 20  # the original is untouched
    assert set(twin.state_dict()) == {k for k in quant.state_dict()
                                      if not k.endswith(("step_size", "b_w"))}
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(twin(x), quant(x), atol=1e-5)
    assert not torch.allclose(bench.float_twin(get_model("resnet20_quan", 10))(x),
                              copy.deepcopy(quant)(x))  # (a different network differs)


def test_quick_run_prints_both_tables(capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--threads", "1", "--variants", "default", "amp",
                           "channels-last", "compile", "--compile-backend", "no_such_backend"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("device: cpu") for line in lines)
    # training table: float and quantized rows per variant, a QAT/float ratio for each
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["variant", "network",
                                                                          "ms/step"])
    rows = [line.split() for line in lines[head + 2:head + 9]]
    for variant in ("default", "amp", "channels-last"):
        quant_row = next(r for r in rows if r[:2] == [variant, "quantized"])
        assert quant_row[4].endswith("x") and float(quant_row[4][:-1]) > 0
        assert any(r[:2] == [variant, "float"] for r in rows)
    compile_row = next(line for line in lines[head:] if line.split()[0] == "compile")
    assert "failed:" in compile_row  # reported, not raised
    # data-pipeline table: ours and torchvision's, with ratios
    assert "TensorLoader (ours, on the device)" in out
    assert out.count("torchvision per-sample + DataLoader") == 2
    assert "vs torchvision" in out
