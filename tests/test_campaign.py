"""Attack campaigns shared among torchrun processes and resumed with another process count
(campaigns/runner.py, attack_tbfa.py, attack_talbf.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import attack_tbfa
from campaigns import runner as C
from cli.args import run
from campaigns.results import JsonlResults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Item:
    def __init__(self, key):
        self.key = key


def write_lines(path, keys, broken=False):
    with open(path, "w") as f:
        for k in keys:
            f.write(json.dumps({"key": k, "value": k}) + "\n")
        if broken:
            f.write('{"key": "cut')


def test_campaign_results_reads_every_file_and_merges(tmp_path):
    write_lines(tmp_path / "results.jsonl", ["a", "b"])
    write_lines(tmp_path / "results.rank0.jsonl", ["c"])
    write_lines(tmp_path / "results.rank3.jsonl", ["d", "b"], broken=True)  # b twice: once
    res = C.CampaignResults(str(tmp_path))
    assert res.done() == {"a", "b", "c", "d"}
    items = [Item(k) for k in "abcdefg"]
    assert [it.key for it in res.share(items)] == ["e", "f", "g"]
    res.append({"key": "e"})
    assert "e" in res.done()
    records = res.finish()
    assert sorted(r["key"] for r in records) == list("abcde")
    assert os.listdir(tmp_path) == ["results.jsonl"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == list("abcde")


def test_share_is_disjoint_and_complete(monkeypatch, tmp_path):
    items = [Item(str(i)) for i in range(11)]
    write_lines(tmp_path / "results.jsonl", ["3", "4"])
    shares = []
    for world in (1, 2, 3):
        got = []
        for r in range(world):
            monkeypatch.setattr(C.dist, "rank", lambda r=r: r)
            monkeypatch.setattr(C.dist, "world_size", lambda w=world: w)
            monkeypatch.setattr(C.dist, "broadcast_object",  # rank 0's reading, sent to all
                                lambda obj: C.read_records(str(tmp_path)))
            got.append([it.key for it in C.CampaignResults(str(tmp_path)).share(items)])
        flat = [k for share in got for k in share]
        assert sorted(flat, key=int) == [str(i) for i in range(11) if i not in (3, 4)]
        assert len(flat) == len(set(flat))
        shares.append(got)
    assert shares[1] == [["0", "2", "6", "8", "10"], ["1", "5", "7", "9"]]


def test_reading_a_folder_leaves_its_files_alone_appending_repairs_its_own(tmp_path):
    write_lines(tmp_path / "results.rank0.jsonl", ["a"], broken=True)
    write_lines(tmp_path / "results.rank1.jsonl", ["b"], broken=True)
    before = (tmp_path / "results.rank1.jsonl").read_bytes()
    problems = []
    assert [r["key"] for r in C.read_records(str(tmp_path), problems)] == ["a", "b"]
    assert [p.split(": ")[0] for p in problems] == [f"{tmp_path / 'results.rank0.jsonl'}:2",
                                                    f"{tmp_path / 'results.rank1.jsonl'}:2"]
    assert (tmp_path / "results.rank1.jsonl").read_bytes() == before  # read-only
    # the file a process appends to loses its cut line first, so the next line stands alone
    own = JsonlResults(str(tmp_path / "results.rank0.jsonl"))
    own.append({"key": "c"})
    assert (tmp_path / "results.rank0.jsonl").read_text() == (
        '{"key": "a", "value": "a"}\n{"key": "c"}\n')
    assert (tmp_path / "results.rank1.jsonl").read_bytes() == before


def test_a_complete_last_line_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}')  # cut between the record and its newline
    res = JsonlResults(str(path))
    assert res.done() == {"a", "b"}
    res.append({"key": "c"})
    assert [r["key"] for r in JsonlResults(str(path)).records] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# torchrun end to end (2 CPU processes, gloo)
# ---------------------------------------------------------------------------------------------

def torchrun_cmd(script, args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone", os.path.join(ROOT, script), *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def keys_in(folder):
    keys = []
    for path in C.results_files(str(folder)):
        with open(path) as f:
            keys += [json.loads(line)["key"] for line in f if line.strip().endswith("}")]
    return keys


@pytest.mark.slow
def test_tbfa_campaign_two_processes_interrupted_then_resumed_by_one(digits_checkpoints,
                                                                      tmp_path):
    results = tmp_path / "tbfa"
    args = ["--checkpoint", digits_checkpoints["vanilla"], "--results", str(results),
            "--device", "cpu", "--no-progress", "--pairs", "0:1,2:3,4:5,6:7", "--avgs", "2",
            "--iters", "4", "--n-src", "8", "--n-aux", "8"]
    expected = {f"s{s}-t{t}-r{r}" for s, t in ((0, 1), (2, 3), (4, 5), (6, 7)) for r in (0, 1)}
    proc = subprocess.Popen(torchrun_cmd("attack_tbfa.py", args), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(keys_in(results)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: every process gets it
    out, _ = proc.communicate(timeout=120)
    first = keys_in(results)
    assert len(first) == len(set(first)), out[-3000:]       # no experiment ran twice
    assert set(first) <= expected and first, out[-3000:]
    ranked = [p for p in C.results_files(str(results)) if "rank" in p]
    if len(first) < len(expected):  # interrupted: each rank kept its own file
        assert ranked, out[-3000:]

    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "attack_tbfa.py"), *args],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    final = keys_in(results)
    assert sorted(final) == sorted(expected)                # each experiment exactly once
    assert C.results_files(str(results)) == [str(results / "results.jsonl")]
    assert f"{len(expected) - len(set(first))} to run" in resumed.stdout + resumed.stderr
    assert "8 experiments" in resumed.stdout


@pytest.mark.slow
def test_talbf_campaign_two_processes(digits_checkpoints, tmp_path):
    results = tmp_path / "talbf"
    args = ["--checkpoint", digits_checkpoints["vanilla"], "--results", str(results),
            "--device", "cpu", "--no-progress", "--n-attacks", "4", "--ext-max-iters", "300",
            "--rho-fact", "1.05", "--max-search-k", "1"]
    res = subprocess.run(torchrun_cmd("attack_talbf.py", args), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    keys = keys_in(results)
    assert len(keys) == 4 == len(set(keys))
    assert C.results_files(str(results)) == [str(results / "results.jsonl")]
    assert "4 attacks" in res.stdout
    # the same campaign with one process: nothing left to run, same summary
    again = subprocess.run([sys.executable, os.path.join(ROOT, "attack_talbf.py"), *args],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 to run" in again.stdout + again.stderr


def test_single_process_script_still_writes_results_jsonl(digits_checkpoints, tmp_path):
    results = tmp_path / "one"
    args = ["--checkpoint", digits_checkpoints["vanilla"], "--results", str(results),
            "--device", "cpu", "--no-progress", "--pairs", "0:1", "--avgs", "1", "--iters", "2",
            "--n-src", "8", "--n-aux", "8"]
    assert run(attack_tbfa.main, args) == 0
    assert C.results_files(str(results)) == [str(results / "results.jsonl")]
    assert keys_in(results) == ["s0-t1-r0"]
