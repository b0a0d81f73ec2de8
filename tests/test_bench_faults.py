"""The fault-model benchmark keeps working (--quick) and reports every variant."""

from bench import bench_faults


def test_bench_faults_quick(capsys):
    assert bench_faults.main(["--quick", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    for variant in ("none", "1/page", "0to1", "no MSB", "profile 10%", "all"):
        assert f" {variant} " in out
    assert "T-BFA" in out and "BFA" in out
