"""The README's quick-start demo, end to end (slow: about 5 minutes on 2 CPU cores)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_trains_both_models_above_95_percent(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DEVICE="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh")], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for model in ("vanilla", "ocm16"):
        result = json.load(open(tmp_path / model / "eval.json"))
        assert result["n"] == 359
        assert result["top1"] >= 95.0, (model, result)
    assert "ocm16" in proc.stdout and "top-1 %" in proc.stdout
    # the attack half: stealthy T-BFA needs clearly more flips on the OCM model
    from utils.results import JsonlResults, mean_std
    flips = {m: mean_std([r["n_flips"] for r in JsonlResults(
        str(tmp_path / m / "attack_tbfa" / "results.jsonl")).records])[0]
        for m in ("vanilla", "ocm16")}
    assert flips["ocm16"] > 2 * flips["vanilla"], flips
    assert "PA-ACC %" in proc.stdout
    for m in ("vanilla", "ocm16"):  # the TA-LBF step
        assert len(JsonlResults(str(tmp_path / m / "attack_talbf" / "results.jsonl")).records) == 5
