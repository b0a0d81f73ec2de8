"""The attack protocol (attacks/base.py): every registered attack is driven by the one runner and
shown by the report; a new attack is its class plus one registration."""

import json
import os
from dataclasses import dataclass

import pytest

from attacks import attack_class, list_attacks
from attacks.base import Attack, _REGISTRY, register_attack
from campaigns.report import load_model, write_report
from campaigns.results import COUNTS, read_records, upgrade_record
from campaigns.runner import CampaignRunner, open_campaign


def test_the_papers_attacks_are_registered_with_what_the_runner_and_report_need():
    assert {"bfa", "random", "tbfa", "talbf"} <= set(list_attacks())
    for name in list_attacks():
        cls = attack_class(name)
        assert cls.name == name and cls.noun and cls.results_dir
        assert cls.count in COUNTS, name            # each count named for what it counts
        assert all(metric in cls.summary_metrics or metric == "asr" for metric, _ in cls.columns)
    assert [attack_class(n).count for n in ("tbfa", "talbf", "bfa")] == \
        ["iterations", "bits_changed", "bits_flipped"]
    with pytest.raises(KeyError, match="registered: "):
        attack_class("nope")


@dataclass(frozen=True)
class _Item:
    value: int

    @property
    def key(self) -> str:
        return f"v{self.value}"


class _Toy(Attack):
    """A toy attack: flips ``value`` bits of nothing; records the count and a score."""

    name = "toy"
    noun = "toy trials"
    results_dir = "attack_toy"
    count = "bits_flipped"
    summary_metrics = ("bits_flipped", "score")
    columns = (("score", "score %"), ("bits_flipped", "# bit-flips (bits flipped)"))
    scalars = ("score",)

    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1

    def run_item(self, item):
        return {"bits_flipped": item.value, "score": 10.0 * item.value}


@pytest.fixture
def toy():
    register_attack(_Toy)
    yield _Toy
    del _REGISTRY["toy"]


def test_a_new_attack_is_its_class_plus_one_registration(toy, tmp_path, capsys):
    """Driven by the runner (records, summary, resume) and shown by the report with no edit of
    either: the files a new attack touches are its module and the registration."""
    with pytest.raises(ValueError, match="registered twice"):
        register_attack(type("_Other", (_Toy,), {}))
    folder = tmp_path / "model" / "attack_toy"
    items = [_Item(v) for v in (1, 2, 3)]
    results = open_campaign(str(folder), {"attack": "toy"}, ("attack",))
    attack = toy()
    assert CampaignRunner(results, attack, items[:2], progress=False).run() == 0
    assert attack.resets == 3  # before each item and at the end
    results = open_campaign(str(folder), {"attack": "toy"}, ("attack",))
    runner = CampaignRunner(results, toy(), items, progress=False)
    assert [it.key for it in runner.todo] == ["v3"]  # resumed: only the missing item
    assert runner.run() == 0
    records = read_records(str(folder))
    assert [(r["key"], r["attack"], r["bits_flipped"]) for r in records] == \
        [("v1", "toy", 1), ("v2", "toy", 2), ("v3", "toy", 3)]
    assert "3 trials" in capsys.readouterr().out
    m = load_model("m", str(tmp_path / "model"), expect=())
    rep = write_report([m], str(tmp_path / "report"), figures=False, attacks=())
    table = (tmp_path / "report" / "attacks_table.md").read_text()
    assert "| model | attack | trials | score % | # bit-flips (bits flipped) |" in table
    assert "| m | toy | 3 | 20.00 ± 10.00 | 2.00 ± 1.00 |" in table
    assert "## Other attacks" in rep.markdown


def test_records_of_earlier_versions_read_with_the_new_count_names():
    tbfa = {"key": "s0-t1-r0", "n_flips": 7, "hamming": 5, "stop_reason": "success",
            "curve": [{"flips": 0, "asr": 0.0}, {"flips": 7, "asr": 100.0}]}
    talbf = {"key": "0-t1-i2", "success": True, "n_flips": 3,
             "tries": [{"k": 5.0, "n_flips": 3}]}
    bfa = {"key": "r0", "attack": "random", "bit_flips": 4, "hamming_distance": 2,
           "stopped_by": "n_iter"}
    t, a, b = (upgrade_record(r) for r in (tbfa, talbf, bfa))
    assert (t["attack"], t["iterations"], t["bits_changed"]) == ("tbfa", 7, 5)
    assert [p["iterations"] for p in t["curve"]] == [0, 7] and "n_flips" not in t
    assert (a["attack"], a["bits_changed"], a["tries"][0]["bits_changed"]) == ("talbf", 3, 3)
    assert (b["attack"], b["bits_flipped"], b["bits_changed"]) == ("random", 4, 2)
    new = upgrade_record(t)
    assert new is t  # a record of this version is returned as it is


def test_a_bfa_campaign_folder_is_read_by_the_report(tmp_path):
    """BFA repetitions of a campaign (results.jsonl) and a run of an earlier version
    (summary.json + profile.csv) are rows of the same BFA table."""
    folder = tmp_path / "m" / "attack_bfa"
    os.makedirs(folder)
    (folder / "campaign.json").write_text(json.dumps({"attack": "bfa", "dataset": "digits"}))
    with open(folder / "results.jsonl", "w") as f:
        for rep, accs in enumerate(([50.0, 10.0], [40.0, 30.0, 10.0])):
            f.write(json.dumps({
                "key": f"r{rep}", "attack": "bfa", "clean_acc": 90.0, "final_acc": accs[-1],
                "iterations": len(accs), "bits_flipped": len(accs), "bits_changed": len(accs),
                "stopped_by": "break_acc", "number_format": "int8", "fault_model": None,
                "profile": [{"flip": i + 1, "accuracy": a} for i, a in enumerate(accs)]}) + "\n")
    m = load_model("m", str(tmp_path / "m"), expect=())
    assert [(r.attack, r.accuracy) for r in m.bfa] == [
        ("bfa", [90.0, 50.0, 10.0]), ("bfa", [90.0, 40.0, 30.0, 10.0])]
    write_report([m], str(tmp_path / "r"), figures=False, attacks=("bfa",))
    assert "| m | int8 | none | BFA | 2 | 90.00 ± 0.00 | 10.00 ± 0.00 | 2.50 ± 0.71 | " \
           "2 break_acc |" in (tmp_path / "r" / "bfa_table.md").read_text()
