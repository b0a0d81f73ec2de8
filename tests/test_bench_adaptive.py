"""The adaptive-objective benchmark keeps working (--quick) and reports every variant."""

from bench import bench_adaptive


def test_bench_adaptive_quick(capsys):
    assert bench_adaptive.main(["--quick", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    for variant in bench_adaptive.VARIANTS:
        assert f" {variant} " in out
    assert "T-BFA" in out and "BFA" in out and "cost vs paper" in out
