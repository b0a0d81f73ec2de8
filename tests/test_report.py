"""The report generator (campaigns/report.py, report.py) on fixture result folders: table values,
published columns, figures, missing and corrupt results (docs/algorithms.md section 9)."""

import csv
import json
import logging
import math
import os
import sys

import pytest

import report as report_script
from campaigns import runner as campaign
from cli.args import run
from campaigns.report import (PUBLISHED, ModelResults, asr_budget_curve, bfa_curve, bfa_rows,
                          budget_curve, format_markdown_bfa,
                          load_model, table_rows, value_at_budget, write_report)
from campaigns.results import (TALBF, read_jsonl, read_records, results_files, talbf_summary, upgrade_record,
                               write_csv)


def _tbfa(key, n_flips, asr, pa_acc, clean=90.0, curve=True):
    """A T-BFA results line as an earlier version wrote it (``n_flips``, ``hamming``, curve
    points counted in ``flips``: they read as ``iterations`` and ``bits_changed``); its curve rises linearly to the final ASR / falls to the final
    PA-ACC, one point per flip (``--curve-every 1``)."""
    r = {"key": key, "clean_acc": clean, "asr": asr, "asr_src": 100.0, "pa_acc": pa_acc,
         "test_acc": pa_acc, "n_flips": n_flips, "hamming": n_flips, "stop_reason": "success"}
    if curve:
        r["curve"] = [{"flips": 0, "asr": 0.0, "pa_acc": clean}] + [
            {"flips": i, "asr": asr * i / n_flips, "asr_src": 100.0,
             "pa_acc": clean + (pa_acc - clean) * i / n_flips} for i in range(1, n_flips + 1)]
    return r


def _talbf(key, success, n_flips, pa_acc, clean=90.0):
    """A TA-LBF line as an earlier version wrote it (``n_flips``: read as ``bits_changed``)."""
    return {"key": key, "success": success, "asr": 100.0 if success else 0.0,
            "n_flips": n_flips, "pa_acc": pa_acc, "clean_acc": clean}


def _write_jsonl(path, records, extra_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def _write_bfa(folder, attack, clean, accs):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"attack": attack, "clean_accuracy": clean, "final_accuracy": accs[-1],
                   "iterations": len(accs), "bit_flips": len(accs), "stopped_by": "n_iter"}, f)
    with open(os.path.join(folder, "profile.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["iteration", "flip", "layer", "accuracy"])
        w.writeheader()
        for i, a in enumerate(accs, start=1):
            w.writerow({"iteration": i, "flip": i, "layer": "conv1", "accuracy": a})


@pytest.fixture
def results(tmp_path):
    """vanilla: 3 T-BFA experiments (flips 2, 4, 6), 3 TA-LBF attacks (2 successful), two BFA
    runs and one random run; ocm16: 2 T-BFA experiments and a corrupt line, no TA-LBF."""
    van, ocm = tmp_path / "vanilla", tmp_path / "ocm16"
    _write_jsonl(str(van / "attack_tbfa" / "results.jsonl"),
                 [_tbfa("a", 2, 80.0, 70.0), _tbfa("b", 4, 90.0, 60.0), _tbfa("c", 6, 100.0, 50.0)])
    (van / "attack_tbfa" / "campaign.json").write_text(json.dumps({"dataset": "cifar10"}))
    _write_jsonl(str(van / "attack_talbf" / "results.jsonl"),
                 [_talbf("0", True, 5, 88.0), _talbf("1", True, 7, 86.0), _talbf("2", False, 0, 0.0)])
    _write_bfa(str(van / "attack_bfa" / "run1"), "bfa", 90.0, [50.0, 20.0, 10.0])
    _write_bfa(str(van / "attack_bfa" / "run2"), "bfa", 90.0, [70.0, 10.0])
    _write_bfa(str(van / "attack_bfa_random" / "run1"), "random", 90.0, [90.0, 89.0, 89.0, 88.0])
    _write_jsonl(str(ocm / "attack_tbfa" / "results.jsonl"),
                 [_tbfa("a", 10, 60.0, 40.0, clean=91.0), _tbfa("b", 30, 80.0, 30.0, clean=91.0)],
                 extra_lines=['{"key": "c", "asr": 5'])  # a write cut short
    return tmp_path


def test_table_has_mean_and_sample_std_and_published_values(results):
    models = [load_model("vanilla", str(results / "vanilla")),
              load_model("ocm16", str(results / "ocm16"))]
    rows = {r["model"]: r for r in table_rows(models, PUBLISHED["cifar10"])}
    v, o = rows["vanilla"], rows["ocm16"]
    assert v["tbfa_n"] == 3 and o["tbfa_n"] == 2
    assert v["tbfa_iterations_mean"] == pytest.approx(4.0)
    assert v["tbfa_iterations_std"] == pytest.approx(2.0)            # sample std of 2, 4, 6
    assert v["tbfa_asr_mean"] == pytest.approx(90.0) and v["tbfa_asr_std"] == pytest.approx(10.0)
    assert v["tbfa_pa_acc_mean"] == pytest.approx(60.0)
    assert v["clean_acc_mean"] == pytest.approx(90.0) and v["clean_acc_std"] == 0.0
    # TA-LBF: ASR over all 3 attacks, PA-ACC and flips over the 2 successful ones (docs/algorithms.md section 8)
    assert v["talbf_n"] == 3 and v["talbf_successes"] == 2
    assert v["talbf_asr_mean"] == pytest.approx(200 / 3)
    assert v["talbf_asr_std"] == pytest.approx(math.sqrt(((100 - 200 / 3) ** 2 * 2
                                                          + (200 / 3) ** 2) / 2))
    assert v["talbf_bits_changed_mean"] == pytest.approx(6.0)
    assert v["talbf_bits_changed_std"] == pytest.approx(math.sqrt(2.0))
    assert v["talbf_pa_acc_mean"] == pytest.approx(87.0)
    assert o["tbfa_iterations_mean"] == pytest.approx(20.0)
    assert o["tbfa_iterations_std"] == pytest.approx(math.sqrt(200.0))
    assert math.isnan(o["talbf_asr_mean"])
    # published values of docs/algorithms.md section 9 beside ours
    assert v["tbfa_pa_acc_paper"] == 84.38 and v["tbfa_iterations_paper"] == ""
    assert o["tbfa_iterations_paper"] == 95.7 and o["talbf_pa_acc_paper"] == 86.5


def test_report_writes_the_known_table(results, tmp_path):
    models = [load_model("vanilla", str(results / "vanilla")),
              load_model("ocm16", str(results / "ocm16"))]
    out = tmp_path / "report"
    rep = write_report(models, str(out), published=PUBLISHED["cifar10"], title="fixture")
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| model | clean % | T-BFA exp. | T-BFA ASR % | T-BFA PA-ACC % "
                               "| paper | T-BFA # bit-flips (iterations) | paper |")
    assert table[2] == ("| vanilla | 90.00 ± 0.00 | 3 | 90.00 ± 10.00 | 60.00 ± 10.00 | 84.38 "
                        "| 4.00 ± 2.00 | – | 3 | 66.67 ± 57.74 | 87.00 ± 1.41 | – "
                        "| 6.00 ± 1.41 | – |")
    assert table[3] == ("| OCM16 | 91.00 ± 0.00 | 2 | 70.00 ± 14.14 | 35.00 ± 7.07 | 53.22 "
                        "| 20.00 ± 14.14 | 95.7 | 0 | – | – | 86.5 | – | 31.1 |")
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["vanilla", "ocm16"]
    assert float(rows[0]["tbfa_iterations_mean"]) == 4.0 and float(rows[0]["tbfa_iterations_std"]) == 2.0
    bfa = (out / "bfa_table.md").read_text()
    assert "| vanilla | – | none | BFA | 2 | 90.00 ± 0.00 | 10.00 ± 0.00 | 2.50 ± 0.71 | 2 n_iter |" in bfa
    assert "| vanilla | – | none | random flips | 1 |" in bfa
    md = (out / "report.md").read_text()
    assert "fig1_asr_vs_max_flips.png" in md and "ocm16: no TA-LBF results" in md
    assert any("results.jsonl:3: corrupt results line skipped" in p for p in rep.problems)


def test_figures_are_pngs_with_one_line_per_model(results, tmp_path):
    models = [load_model("vanilla", str(results / "vanilla")),
              load_model("ocm16", str(results / "ocm16"))]
    rep = write_report(models, str(tmp_path / "report"), published=None)
    lines = {os.path.basename(p): n for p, n in rep.figures.items()}
    # Figures 1 and 2: the two models; the BFA figure: vanilla's BFA and random-flip curves
    assert lines == {"fig1_asr_vs_max_flips.png": 2, "fig2_pa_acc_vs_flips.png": 2,
                     "fig_bfa_accuracy.png": 2}
    for path in rep.figures:
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_budget_curve_holds_the_final_value_of_finished_attacks():
    recs = [upgrade_record(_tbfa("a", 2, 80.0, 70.0)), upgrade_record(_tbfa("b", 4, 100.0, 50.0))]
    assert value_at_budget(recs[0], 1, "asr") == pytest.approx(40.0)
    assert value_at_budget(recs[0], 3, "asr") == pytest.approx(80.0)  # stopped after 2 flips
    means, stds = asr_budget_curve(recs, [0, 1, 2, 4, 10])
    assert means == pytest.approx([0.0, 32.5, 65.0, 90.0, 90.0])
    assert stds[0] == 0.0 and stds[-1] == pytest.approx(math.sqrt(200.0))
    pa, _ = budget_curve(recs, [0, 4], "pa_acc")
    assert pa == pytest.approx([90.0, 60.0])
    # every 2nd flip recorded (--curve-every 2): the last point at or before the budget
    sparse = dict(recs[1], curve=[p for p in recs[1]["curve"] if p["iterations"] % 2 == 0])
    assert value_at_budget(sparse, 3, "asr") == pytest.approx(50.0)


def test_unmerged_rank_files_of_a_multi_process_campaign_count(results):
    folder = results / "ocm16" / "attack_tbfa"
    _write_jsonl(str(folder / "results.rank1.jsonl"), [_tbfa("b", 30, 80.0, 30.0, clean=91.0),
                                                      _tbfa("d", 20, 70.0, 35.0, clean=91.0)])
    m = load_model("ocm16", str(results / "ocm16"))
    assert sorted(r["key"] for r in m.tbfa) == ["a", "b", "d"]  # "b" twice counts once


def test_bfa_curve_holds_the_last_accuracy(results):
    runs = load_model("vanilla", str(results / "vanilla")).bfa
    bfa = [r for r in runs if r.attack == "bfa"]
    assert sorted(r.accuracy for r in bfa) == [[90.0, 50.0, 20.0, 10.0], [90.0, 70.0, 10.0]]
    means, _ = bfa_curve(bfa)
    assert means == pytest.approx([90.0, 60.0, 15.0, 10.0])


def test_corrupt_line_is_named_skipped_and_left_alone(results, caplog):
    path = str(results / "ocm16" / "attack_tbfa" / "results.jsonl")
    before = open(path, "rb").read()
    with caplog.at_level(logging.WARNING):
        records = read_jsonl(path)
    assert [r["key"] for r in records] == ["a", "b"]
    assert f"{path}:3: corrupt results line skipped" in caplog.text
    assert open(path, "rb").read() == before  # the report never rewrites results


def test_empty_and_partial_folders_say_what_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _write_jsonl(str(tmp_path / "partial" / "attack_tbfa" / "results.jsonl"),
                 [_tbfa("a", 3, 100.0, 50.0, curve=False)])
    out = tmp_path / "report"
    code = run(report_script.main, [f"vanilla={tmp_path / 'empty'}",
                                    f"pc={tmp_path / 'partial'}",
                                    f"ocm16={tmp_path / 'nowhere'}", "--out", str(out)])
    assert code == 0
    md = (out / "report.md").read_text()
    for text in ("vanilla: no T-BFA results", "vanilla: no TA-LBF results",
                 "pc: the T-BFA results have no per-flip curves", "ocm16: folder",
                 "does not exist", "no BFA or random-flip run (a campaign folder from "
                 "attack_bfa.py) for vanilla, pc\n",
                 "fig1_asr_vs_max_flips.png not drawn"):
        assert text in md, text
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 5 and table[3].startswith("| piecewise clustering | 90.00 ± 0.00 | 1 |")
    assert table[2].startswith("| vanilla | – | 0 |")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run(report_script.main, ["vanilla", "--out", str(tmp_path)]) == 2
    assert "is not LABEL=FOLDER" in capsys.readouterr().err
    assert run(report_script.main, ["--out", str(tmp_path)]) == 2
    assert "no models" in capsys.readouterr().err
    assert run(report_script.main, ["a=x", "a=y", "--out", str(tmp_path)]) == 2
    assert "given twice" in capsys.readouterr().err
    assert run(report_script.main, ["a=x", "--out", str(tmp_path), "--published", "mnist"]) == 2
    assert "--published" in capsys.readouterr().err


def test_models_file_and_auto_published(results, tmp_path, capsys):
    manifest = results / "models.txt"
    manifest.write_text("# label=folder, relative to this file\nvanilla=vanilla\n"
                        "ocm16 = ocm16   # OCM\n")
    out = tmp_path / "r"
    assert run(report_script.main, ["--models-file", str(manifest), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| 84.38 |" in table  # the campaign says cifar10: published values shown
    assert run(report_script.main, ["--models-file", str(manifest), "--out", str(out),
                                    "--published", "none", "--no-figures"]) == 0
    assert "paper" not in (out / "table.md").read_text()


def test_without_matplotlib_tables_are_still_written(results, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    models = [load_model("vanilla", str(results / "vanilla"))]
    with caplog.at_level(logging.WARNING):
        rep = write_report(models, str(tmp_path / "r"))
    assert rep.figures == {}
    assert "matplotlib is not installed" in caplog.text
    assert (tmp_path / "r" / "table.md").exists() and (tmp_path / "r" / "bfa_table.md").exists()


# ---------------------------------------------------------------------------------------------
# One reader for the campaigns and the report (campaigns/results.py)
# ---------------------------------------------------------------------------------------------

def _bytes_of(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_key_in_the_merged_and_a_rank_file_is_read_once_the_first_wins(results):
    folder = results / "ocm16" / "attack_tbfa"  # results.jsonl: a (10 flips), b (30), corrupt c
    _write_jsonl(str(folder / "results.rank10.jsonl"), [_tbfa("b", 99, 1.0, 1.0, clean=91.0),
                                                       _tbfa("e", 12, 1.0, 1.0, clean=91.0)])
    _write_jsonl(str(folder / "results.rank2.jsonl"), [_tbfa("e", 14, 1.0, 1.0, clean=91.0),
                                                      _tbfa("d", 16, 1.0, 1.0, clean=91.0)])
    assert [os.path.basename(p) for p in results_files(str(folder))] == [
        "results.jsonl", "results.rank2.jsonl", "results.rank10.jsonl"]  # by rank number
    records = read_records(str(folder))
    assert [(r["key"], r["iterations"]) for r in records] == [("a", 10), ("b", 30), ("e", 14),
                                                              ("d", 16)]
    m = load_model("ocm16", str(results / "ocm16"))
    assert [(r["key"], r["iterations"]) for r in m.tbfa] == [(r["key"], r["iterations"])
                                                             for r in records]
    assert table_rows([m])[0]["tbfa_iterations_mean"] == pytest.approx((10 + 30 + 14 + 16) / 4)
    # the campaign's resume and merge read the same way
    assert campaign.read_records is read_records
    assert [r["key"] for r in campaign.merge_results(str(folder))] == ["a", "b", "e", "d"]


def test_the_report_modifies_no_results_file(results, tmp_path):
    """Corrupt lines, a line without a key and a cut last line: named, skipped, left alone."""
    folder = results / "ocm16" / "attack_tbfa"
    with open(folder / "results.rank1.jsonl", "w") as f:
        f.write(json.dumps(_tbfa("d", 20, 70.0, 35.0, clean=91.0)) + "\n")
        f.write('{"n_flips": 3}\n')              # no key: cannot be counted once
        f.write('{"key": "e", "asr":')           # cut short, no newline
    before = _bytes_of(results / "ocm16")
    m = load_model("ocm16", str(results / "ocm16"))
    rep = write_report([m], str(tmp_path / "report"))
    assert _bytes_of(results / "ocm16") == before  # every results file, byte for byte
    assert sorted(r["key"] for r in m.tbfa) == ["a", "b", "d"]
    rank1 = str(folder / "results.rank1.jsonl")
    assert [p.split(": ")[0] for p in rep.problems] == [
        f"{folder / 'results.jsonl'}:3", f"{rank1}:2", f"{rank1}:3"]
    assert all("corrupt results line skipped" in p for p in rep.problems)


def test_talbf_rule_is_asr_over_all_and_the_rest_over_successes():
    records = [_talbf("0", True, 4, 80.0), _talbf("1", True, 8, 90.0),
               _talbf("2", False, 40, 10.0), _talbf("3", False, 0, 0.0)]
    records = [upgrade_record(r) for r in records]
    rows = {r["metric"]: r for r in talbf_summary(records)}
    assert list(rows) == [TALBF.asr, TALBF.pa_acc, TALBF.bits_changed]
    assert rows["asr"]["mean"] == 50.0 and rows["asr"]["n"] == 4
    assert rows["asr"]["std"] == pytest.approx(math.sqrt(4 * 50.0 ** 2 / 3))
    assert (rows["bits_changed"]["mean"], rows["bits_changed"]["n"]) == (6.0, 2)  # failures out
    assert rows["bits_changed"]["std"] == pytest.approx(math.sqrt(8.0))
    assert rows["pa_acc"]["mean"] == 85.0 and rows["pa_acc"]["std"] == pytest.approx(math.sqrt(50))
    # the attack script's summary and the report's table use that rule
    from attacks.talbf import TALBF as TALBFAttack

    script = {r["metric"]: r for r in TALBFAttack.summary(
        [dict(r, converged=True, pa_acc_clean=r["pa_acc"], k=5, gamma=50.0, outer_iters=200,
              seconds=1.0) for r in records])}
    table = table_rows([ModelResults("m", "m", records={"talbf": [("m", r) for r in records]})])[0]
    for metric in ("asr", "pa_acc", "bits_changed"):
        assert script[metric] == rows[metric]
        assert table[f"talbf_{metric}_mean"] == rows[metric]["mean"]
        assert table[f"talbf_{metric}_std"] == rows[metric]["std"]
    assert table["talbf_n"] == 4 and table["talbf_successes"] == 2


def test_write_csv_is_utf8_and_atomic(tmp_path):
    path = tmp_path / "t.csv"
    write_csv(str(path), [{"model": "OCM16 ± PC", "mean": 1 / 3}])
    assert path.read_bytes() == "model,mean\r\nOCM16 ± PC,0.3333333333333333\r\n".encode("utf-8")
    assert os.listdir(tmp_path) == ["t.csv"]
    write_csv(str(tmp_path / "none.csv"), [])
    assert os.listdir(tmp_path) == ["t.csv"]  # no rows: no file


def test_runs_are_grouped_by_number_format_and_fault_model(tmp_path):
    """BFA runs on other formats / under a fault model are rows of their own; a T-BFA campaign
    under a fault model names it beside the model."""
    m = tmp_path / "float"
    for name, fmt, fault, accs in (("fp32", "fp32", None, [10.0]),
                                   ("fp16", "fp16", None, [40.0, 10.0]),
                                   ("fp16page", "fp16", {"one_per_page": True}, [60.0, 30.0, 10.0])):
        _write_bfa(str(m / name), "bfa", 90.0, accs)
        summary = json.loads((m / name / "summary.json").read_text())
        summary.update(number_format=fmt, fault_model=fault)
        (m / name / "summary.json").write_text(json.dumps(summary))
    _write_jsonl(str(m / "attack_tbfa" / "results.jsonl"), [_tbfa("a", 2, 80.0, 70.0)])
    (m / "attack_tbfa" / "campaign.json").write_text(json.dumps(
        {"dataset": "digits", "fault": {"direction": "0to1"}, "number_format": None}))
    model = load_model("float", str(m))
    assert model.name == "float [0to1]"
    rows = [(r["number_format"], r["fault"], r["bits_flipped_mean"]) for r in bfa_rows([model])]
    assert rows == [("fp16", "none", 2.0), ("fp16", "1/page", 3.0), ("fp32", "none", 1.0)]
    table = format_markdown_bfa(bfa_rows([model]))
    assert "| float [0to1] | fp16 | 1/page | BFA | 1 |" in table


def test_a_results_path_of_the_wrong_kind_is_left_out(tmp_path):
    """A ``results.jsonl`` that is a folder holds no results: the report lists the attack as
    missing instead of failing on it (a partial folder never makes an error)."""
    (tmp_path / "m" / "attack_tbfa" / "results.jsonl").mkdir(parents=True)
    assert results_files(str(tmp_path / "m" / "attack_tbfa")) == []
    assert run(report_script.main, [f"m={tmp_path / 'm'}", "--out", str(tmp_path / "r"),
                                    "--no-figures", "--attacks", "tbfa"]) == 0
    assert "m: no " in (tmp_path / "r" / "report.md").read_text()
