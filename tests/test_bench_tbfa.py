"""The T-BFA benchmark keeps working (--quick) and its searches agree flip for flip."""

from bench import bench_tbfa


def test_bench_tbfa_quick(capsys):
    assert bench_tbfa.main(["--quick", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "One T-BFA iteration" in out and "One whole T-BFA experiment" in out
    for variant in ("reference", "ours-plain", "ours"):
        assert variant in out
    assert "NO" not in out.split()
