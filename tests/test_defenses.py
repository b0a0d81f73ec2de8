"""Defenses as components (docs/algorithms.md section 11): the registry and its round trips, the
parts each published defense gives the trainer, a defense registered from outside that
main.py's training loop uses, the published flags as aliases of ``--defense`` (the same weights
bit for bit), the checkpoint's ``"defenses"`` record, and bad ``--defense`` input."""

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import main
from cli.args import run
from defenses import (DeploymentDefense, TrainingDefense, check_defenses, create_defense,
                      defense_from_dict, list_defenses, parse_defense, register_defense)
from defenses import base as defenses_base
from fakedata import make_cifar10
from models.factory import ModelConfig, build_model
from utils.checkpoint import checkpoint_defenses, load_checkpoint, make_checkpoint
from utils.errors import CheckpointError
from utils.regularizers import piecewise_clustering
from utils.training import MixupConfig, mixup_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--dataset", "cifar10", "--arch", "resnet20_quan", "-b", "32", "--no-progress",
          "--device", "cpu"]

# The published defenses and the papers' defaults (docs/algorithms.md sections 3, 4 and 11).
PUBLISHED = {"clustering": {"lambda_coeff": 1e-3},
             "ocm": {"code_length": 16, "output_act": "tanh"},
             "mixup": {"alpha": 1.0},
             "manifold_mixup": {"alpha": 2.0}}


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

def test_published_defenses_are_registered_with_the_papers_defaults():
    assert set(PUBLISHED) <= set(list_defenses("training"))
    for name, params in PUBLISHED.items():
        assert create_defense(name).to_dict() == {"name": name, **params}


@pytest.mark.parametrize("name", list_defenses())
def test_every_registered_defense_builds_and_round_trips(name):
    defense = create_defense(name)
    assert isinstance(defense, (TrainingDefense, DeploymentDefense))
    assert name in list_defenses(defense.stage)
    assert defense_from_dict(defense.to_dict()) == defense
    assert parse_defense(defense.label()) == defense
    assert parse_defense(name) == defense


def test_parse_defense_converts_values():
    assert parse_defense("clustering:lambda_coeff=5e-4") == create_defense(
        "clustering", lambda_coeff=5e-4)
    one = parse_defense(" clustering : lambda_coeff = 1 ")
    assert one.to_dict() == {"name": "clustering", "lambda_coeff": 1.0}
    assert type(one.lambda_coeff) is float  # recorded as --lambda_coeff 1 records it
    assert parse_defense("ocm:code_length=64,output_act=tanh").code_length == 64


@pytest.mark.parametrize("spec, error, expected", [
    ("nope", KeyError, "unknown defense 'nope'"),
    ("clustering:lam=1", ValueError, "no parameter lam"),
    ("clustering:0.1", ValueError, "key=value"),
    ("clustering:lambda_coeff=-1", ValueError, "at least 0"),
    ("clustering:lambda_coeff=abc", ValueError, "finite number"),
    ("clustering:lambda_coeff=nan", ValueError, "finite number"),
    ("clustering:lambda_coeff=true", ValueError, "finite number"),
    ("ocm:code_length=12", ValueError, "power of two"),
    ("ocm:code_length=16.0", ValueError, "integer"),
    ("ocm:output_act=linear", ValueError, "tanh"),
    ("mixup:alpha=0", ValueError, "greater than 0"),
    ("manifold_mixup:alpha=-1", ValueError, "greater than 0"),
])
def test_unknown_names_and_bad_parameters_raise(spec, error, expected):
    with pytest.raises(error, match=expected):
        parse_defense(spec)


def test_unknown_record_and_duplicate_registration_raise():
    with pytest.raises(KeyError, match="registered: "):
        defense_from_dict({"name": "nope"})

    @dataclass
    class Impostor(TrainingDefense):
        name: ClassVar[str] = "clustering"

    with pytest.raises(ValueError, match="registered twice"):
        register_defense(Impostor)
    assert type(create_defense("clustering")).__name__ == "PiecewiseClustering"


def test_one_model_has_each_defense_once_and_one_data_mixing():
    check_defenses([create_defense("ocm"), create_defense("clustering"),
                    create_defense("mixup")])
    with pytest.raises(ValueError, match="clustering is given twice"):
        check_defenses([create_defense("clustering"), create_defense("clustering")])
    with pytest.raises(ValueError, match="one data-mixing defense"):
        check_defenses([create_defense("mixup"), create_defense("manifold_mixup")])
    with pytest.raises(ValueError, match="one data-mixing defense"):
        mixup_of([create_defense("mixup"), create_defense("manifold_mixup")])


# ---------------------------------------------------------------------------------------------
# The parts each published defense gives
# ---------------------------------------------------------------------------------------------

def test_clustering_is_a_loss_term_of_the_existing_regularizer():
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig("resnet20_quan", 10))
    defense = create_defense("clustering", lambda_coeff=5e-4)
    assert torch.equal(defense.loss_term(model), piecewise_clustering(model, 5e-4))
    assert create_defense("clustering", lambda_coeff=0).loss_term(model) is None
    assert defense.mixup() is None
    assert defense.configure(ModelConfig("resnet20_quan", 10)) == ModelConfig("resnet20_quan", 10)


def test_ocm_is_an_output_head_in_the_model_config():
    vanilla = ModelConfig("resnet20_quan", 10)
    config = create_defense("ocm", code_length=64).configure(vanilla)
    assert config == ModelConfig("resnet20_quan", 10, ocm=True, code_length=64,
                                 output_act="tanh")
    assert config.validate() is config and not vanilla.ocm  # a new config, validated
    assert create_defense("ocm").loss_term(None) is None and create_defense("ocm").mixup() is None


def test_mixup_defenses_give_the_trainers_mixup_config():
    assert create_defense("mixup").mixup() == MixupConfig(1.0)
    assert create_defense("manifold_mixup").mixup() == MixupConfig(2.0, manifold=True)
    assert mixup_of([create_defense("ocm"), create_defense("mixup", alpha=0.4)]) == \
        MixupConfig(0.4)
    assert mixup_of([create_defense("clustering")]) is None


# ---------------------------------------------------------------------------------------------
# The checkpoint's record
# ---------------------------------------------------------------------------------------------

def _checkpoint(config, **extra):
    model, output = build_model(config)
    return make_checkpoint(model, config, output, "cifar10", (0.5,) * 3, (0.25,) * 3, **extra)


def test_checkpoint_records_the_defenses():
    ocm16 = ModelConfig("resnet20_quan", 10, ocm=True, code_length=16, output_act="tanh")
    assert _checkpoint(ocm16)["defenses"] == [{"name": "ocm", "code_length": 16,
                                               "output_act": "tanh"}]
    assert _checkpoint(ModelConfig("resnet20_quan", 10))["defenses"] == []
    given = [create_defense("clustering", lambda_coeff=5e-4), create_defense("mixup")]
    ckpt = _checkpoint(ModelConfig("resnet20_quan", 10), defenses=given)
    assert ckpt["defenses"] == [d.to_dict() for d in given]
    assert checkpoint_defenses(ckpt) == given
    ckpt["defenses"].append({"name": "nope"})
    with pytest.raises(CheckpointError, match="unknown defense 'nope'"):
        checkpoint_defenses(ckpt)


def test_checkpoint_without_record_derives_its_defenses():
    ocm16 = ModelConfig("resnet20_quan", 10, ocm=True, code_length=16, output_act="tanh")
    old = _checkpoint(ocm16, args={"clustering": True, "lambda_coeff": 5e-4, "mixup": False,
                                   "manifold_mixup": True, "manifold_mixup_alpha": 1.5})
    del old["defenses"]  # written before the record existed
    assert checkpoint_defenses(old) == [create_defense("ocm"),
                                        create_defense("clustering", lambda_coeff=5e-4),
                                        create_defense("manifold_mixup", alpha=1.5)]
    # published: no config stored (the flags describe it), args an argparse namespace or none
    published = {"state_dict": old["state_dict"], "epoch": 160,
                 "args": argparse.Namespace(clustering=True, lambda_coeff=1e-3)}
    assert checkpoint_defenses(published) == [create_defense("clustering")]
    assert checkpoint_defenses({"state_dict": {}}, ocm16) == [create_defense("ocm")]
    assert checkpoint_defenses({"state_dict": {}}) == []


# ---------------------------------------------------------------------------------------------
# main.py: a defense registered from outside, the aliases, resume, bad input
# ---------------------------------------------------------------------------------------------

@dataclass
class ToyPenalty(TrainingDefense):
    """A toy loss term: ``strength`` times the sum of the final layer's squared weights.
    Records the class of every network it is given."""

    name: ClassVar[str] = "toy_penalty"
    seen: ClassVar[list] = []
    strength: float = 1.0

    def loss_term(self, model):
        ToyPenalty.seen.append(type(model).__name__)
        return self.strength * model.linear.weight.pow(2).sum()


@pytest.fixture
def toy_defense():
    """ToyPenalty registered (one decorator, as a defense module does) for one test."""
    register_defense(ToyPenalty)
    ToyPenalty.seen.clear()
    yield ToyPenalty
    defenses_base._REGISTRY.pop(ToyPenalty.name)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root)
    return str(root)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (the comparisons below are within one thread count)."""


def train(data_dir, outdir, epochs, *flags):
    argv = COMMON + ["--data_dir", data_dir, "--outdir", str(outdir), "-e", str(epochs), *flags]
    assert run(main.main, argv) == 0
    return load_checkpoint(str(outdir / "checkpoint.pth.tar"))


def same_weights(a, b):
    return a["state_dict"].keys() == b["state_dict"].keys() and all(
        torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_registered_defense_is_used_by_main_training_loop(toy_defense, data_dir, tmp_path):
    plain = train(data_dir, tmp_path / "plain", 1)
    assert toy_defense.seen == []
    toy = train(data_dir, tmp_path / "toy", 1, "--defense", "toy_penalty:strength=0.5")
    assert toy_defense.seen and set(toy_defense.seen) == {"CifarResNet"}  # the network itself
    assert not same_weights(plain, toy)
    assert toy["defenses"] == [{"name": "toy_penalty", "strength": 0.5}]
    assert checkpoint_defenses(toy) == [ToyPenalty(0.5)]
    assert "toy_penalty" in main.get_args_parser().format_help()


ALIASES = {
    "clustering": (["--clustering", "-lam", "5e-3"], ["--defense", "clustering:lambda_coeff=5e-3"],
                   [{"name": "clustering", "lambda_coeff": 5e-3}]),
    "ocm": (["--ocm", "--code_length", "16", "--output_act", "tanh"], ["--defense", "ocm"],
            [{"name": "ocm", "code_length": 16, "output_act": "tanh"}]),
    "manifold_mixup": (["--manifold-mixup"], ["--defense", "manifold_mixup:alpha=2"],
                       [{"name": "manifold_mixup", "alpha": 2.0}]),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_published_flags_are_aliases_of_defense(name, data_dir, tmp_path):
    alias, named, record = ALIASES[name]
    a = train(data_dir, tmp_path / "alias", 2, *alias)
    b = train(data_dir, tmp_path / "named", 2, *named)
    assert same_weights(a, b)
    assert a["model_config"] == b["model_config"]
    assert a["defenses"] == b["defenses"] == record
    assert b["args"]["defense"] == named[1:] and a["args"]["defense"] is None


def test_resume_keeps_the_runs_defenses(data_dir, tmp_path):
    """--resume takes --defense back from the checkpoint like every training flag."""
    whole = train(data_dir, tmp_path / "whole", 2, "--defense", "clustering:lambda_coeff=5e-3",
                  "--defense", "ocm")
    train(data_dir, tmp_path / "part", 1, "--defense", "clustering:lambda_coeff=5e-3",
          "--defense", "ocm")
    ckpt = str(tmp_path / "part" / "checkpoint.pth.tar")
    assert run(main.main, ["--resume", ckpt, "-e", "2", "--no-progress"]) == 0
    resumed = load_checkpoint(ckpt)
    assert resumed["epoch"] == 2 and same_weights(whole, resumed)
    assert resumed["defenses"] == whole["defenses"] == [
        {"name": "clustering", "lambda_coeff": 5e-3},
        {"name": "ocm", "code_length": 16, "output_act": "tanh"}]
    assert run(main.main, ["--eval", ckpt, "--data_dir", data_dir, "--defense", "ocm",
                           "--no-progress"]) == 0  # the head the checkpoint has


def bad_defense_cases(vanilla_ckpt):
    return {
        "unknown": (["--defense", "nope"], "--defense nope: unknown defense 'nope'; registered:"),
        "unknown_parameter": (["--defense", "clustering:lam=1"], "no parameter lam"),
        "not_key_value": (["--defense", "clustering:0.1"], "key=value"),
        "negative_lambda": (["--defense", "clustering:lambda_coeff=-1"], "at least 0"),
        "bad_code_length": (["--defense", "ocm:code_length=12"], "power of two"),
        "short_code": (["--defense", "ocm:code_length=8"], "at least classes + 1"),
        "zero_alpha": (["--defense", "mixup:alpha=0"], "greater than 0"),
        "twice": (["--clustering", "--defense", "clustering"], "clustering is given twice"),
        "two_mixings": (["--mixup", "--defense", "manifold_mixup"], "one data-mixing defense"),
        "flag_says_otherwise": (["--defense", "ocm", "--code_length", "64"],
                                "--code_length says 64"),
        "not_the_checkpoints": (["--eval", vanilla_ckpt, "--defense", "ocm"], "ocm=False"),
    }


@pytest.mark.parametrize("case", list(bad_defense_cases("")))
def test_bad_defense_input_is_one_line_and_writes_nothing(case, data_dir, tmp_path, capsys):
    config = ModelConfig("resnet20_quan", 10)
    vanilla = str(tmp_path / "vanilla.pth.tar")
    torch.save(_checkpoint(config), vanilla)
    argv, expected = bad_defense_cases(vanilla)[case]
    outdir = tmp_path / "existing_run"
    outdir.mkdir()
    (outdir / "keep.txt").write_text("precious")
    rc = run(main.main, COMMON + ["--data_dir", data_dir, "--outdir", str(outdir), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert sorted(os.listdir(outdir)) == ["keep.txt"]


def test_main_script_unknown_defense_exits_2(tmp_path):
    """The script itself: ``python main.py --defense nope`` prints one line, exit status 2."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--defense", "nope",
                           "--outdir", str(tmp_path / "run")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --defense nope: unknown defense 'nope'; registered: "
        f"{', '.join(list_defenses())}"]
    assert not (tmp_path / "run").exists()
