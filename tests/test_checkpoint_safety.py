"""Loading runs no code of a file unless asked (--trust-checkpoint), and our checkpoints carry a
per-tensor digest checked on load (--no-verify-checkpoint): utils/checkpoint.py, main.py and
the attack scripts (issue 22, items 1 and 2)."""

import argparse
import os

import numpy as np
import pytest
import torch

import attack_bfa
import main
from cli.args import run
from conftest import conformance_path
from fakedata import make_cifar10
from models.factory import ModelConfig, build_model
from utils.checkpoint import (DIGEST_ALGORITHM, load_checkpoint, make_checkpoint,
                              save_checkpoint, torch_load_foreign)
from utils.data import get_dataset_info
from utils.errors import CheckpointError

TAMPERED = "layer1.0.conv1.weight"  # 16 x 16 x 3 x 3 float32: 9216 bytes


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root)
    return str(root)


@pytest.fixture(scope="module")
def state():
    """The checkpoint dict of an untrained 8-bit ResNet-20, as main.py writes it."""
    torch.manual_seed(0)
    config = ModelConfig("resnet20_quan", 10)
    model, output = build_model(config)
    info = get_dataset_info("cifar10")
    return make_checkpoint(model, config, output, "cifar10", info.mean, info.std, epoch=1)


@pytest.fixture
def ours(state, tmp_path):
    path = str(tmp_path / "model_best.pth.tar")
    save_checkpoint(state, path)
    return path


class MakesFile:
    """Unpickling it creates ``marker`` (what a malicious checkpoint could do instead)."""

    def __init__(self, marker, how):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "open":
            return open, (self.marker, "w")
        return os.system, (f"touch {self.marker}",)


EVIL = {"open": "io.open", "system": "posix.system" if os.name == "posix" else "nt.system"}


def evil_checkpoint(state, folder, how):
    """``(path, marker)``: our checkpoint plus an object whose unpickling creates ``marker``."""
    marker = folder / f"marker_{how}"
    path = str(folder / f"evil_{how}.pth.tar")
    torch.save({**state, "extra": MakesFile(marker, how)}, path)
    return path, marker


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------
# item 1: nothing of the file runs by default
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", list(EVIL))
def test_code_in_a_checkpoint_is_refused_by_default(how, state, tmp_path):
    path, marker = evil_checkpoint(state, tmp_path, how)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert EVIL[how] in str(e.value) and "--trust-checkpoint" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("how", list(EVIL))
def test_main_eval_refuses_it_in_one_line(how, state, data_dir, tmp_path, capsys):
    path, marker = evil_checkpoint(state, tmp_path, how)
    argv = ["--eval", path, "--data_dir", data_dir, "--no-progress", "--device", "cpu"]
    assert run(main.main, argv) == 2
    line = one_error_line(capsys)
    assert EVIL[how] in line and "--trust-checkpoint" in line
    assert not marker.exists()


def test_attack_script_refuses_it_in_one_line(state, data_dir, tmp_path, capsys):
    path, marker = evil_checkpoint(state, tmp_path, "open")
    argv = ["--checkpoint", path, "--data_dir", data_dir, "--n_iter", "1", "--no-progress",
            "--device", "cpu", "--results", str(tmp_path / "bfa")]
    assert run(attack_bfa.main, argv) == 2
    line = one_error_line(capsys)
    assert "io.open" in line and "--trust-checkpoint" in line
    assert not marker.exists()


def test_trust_checkpoint_loads_it_fully(state, data_dir, tmp_path, capsys):
    """The flag does what its help says: the file's code runs (here: it creates a file)."""
    path, marker = evil_checkpoint(state, tmp_path, "open")
    argv = ["--eval", path, "--data_dir", data_dir, "--no-progress", "--device", "cpu",
            "--trust-checkpoint"]
    assert run(main.main, argv) == 0
    assert marker.exists()
    assert "--trust-checkpoint" in main.get_args_parser().format_help()
    assert "only for files you trust" in " ".join(attack_bfa.get_args_parser()
                                                  .format_help().split())


class Plain:
    """A harmless class of another code base: still not built without --trust-checkpoint."""


def test_other_classes_are_refused_by_name(state, tmp_path):
    path = str(tmp_path / "plain.pth.tar")
    torch.save({**state, "args": argparse.Namespace(lr=0.1), "losses": np.ones(3, np.float32),
                "extra": Plain()}, path)
    with pytest.raises(CheckpointError, match=r"pickles \S*Plain, .*--trust-checkpoint"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, trust=True)["extra"], Plain)


@pytest.mark.parametrize("name", ["vanilla", "ocm16", "bfa"])
def test_published_checkpoints_load_without_the_flag(name):
    before = set(torch.serialization.get_safe_globals())
    ckpt = load_checkpoint(conformance_path(name, "model_best.pth.tar"))
    assert set(torch.serialization.get_safe_globals()) == before  # nothing left registered
    full = torch_load_foreign(conformance_path(name, "model_best.pth.tar"))
    assert ckpt.keys() == full.keys()
    assert all(torch.equal(v, full["state_dict"][k]) for k, v in ckpt["state_dict"].items())
    if name == "bfa":  # its utils.RecorderMeter, inert, with its numpy arrays
        ours, theirs = vars(ckpt["recorder"]), vars(full["recorder"])
        assert ours.keys() == theirs.keys() and ours["total_epoch"] == 12
        assert all(np.array_equal(ours[k], theirs[k]) for k in ("epoch_losses",
                                                               "epoch_accuracy"))


def test_namespace_and_numpy_1_arrays_load(tmp_path):
    """The public scripts' argparse namespace, and numpy arrays as numpy 1.x names their
    reconstruction (``numpy.core.multiarray``; written here by renaming it in a legacy-format
    file, whose pickle is not inside a zip archive)."""
    obj = {"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, bits=8),
           "losses": np.arange(4, dtype=np.float64)}
    path = tmp_path / "old.pth.tar"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\n" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ckpt = load_checkpoint(str(path))
    assert vars(ckpt["args"]) == {"lr": 0.1, "bits": 8}
    assert np.array_equal(ckpt["losses"], obj["losses"])


# ---------------------------------------------------------------------------------------------
# item 2: the tensor digest
# ---------------------------------------------------------------------------------------------

def tamper(path, tensor, offset=1024, size=4096):
    """Zero ``size`` bytes inside ``tensor``'s data in the file (torch stores the archive's
    entries uncompressed: the tensor's bytes appear as they are)."""
    raw = bytearray(open(path, "rb").read())
    start = raw.find(tensor.numpy().tobytes())
    assert start > 0 and tensor.numel() * tensor.element_size() >= offset + size
    raw[start + offset:start + offset + size] = bytes(size)
    with open(path, "wb") as f:
        f.write(raw)


def test_digest_is_written_and_checked(state, ours):
    record = state["tensor_digest"]
    assert record["algorithm"] == DIGEST_ALGORITHM
    assert record["tensors"].keys() == state["state_dict"].keys()
    assert all(len(h) == 64 for h in record["tensors"].values())
    assert load_checkpoint(ours)["tensor_digest"] == record
    tamper(ours, state["state_dict"][TAMPERED])
    with pytest.raises(CheckpointError, match=rf"tensor {TAMPERED} .*--no-verify-checkpoint"):
        load_checkpoint(ours)
    changed = load_checkpoint(ours, verify=False)["state_dict"][TAMPERED]
    assert (changed.flatten()[256:1280] == 0).all()


def test_resaved_without_updating_the_digest(state, tmp_path):
    """A state changed in Python and saved with torch.save: the same refusal; a tensor added or
    removed is named too; a checkpoint without a digest (older, published) loads as before."""
    path = str(tmp_path / "c.pth.tar")
    changed = {k: v.clone() for k, v in state["state_dict"].items()}
    changed["linear.bias"][0] += 1
    torch.save({**state, "state_dict": changed}, path)
    with pytest.raises(CheckpointError, match="tensor linear.bias does not match"):
        load_checkpoint(path)
    torch.save({**state, "state_dict": {**state["state_dict"], "extra": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="tensor extra is not in its digest"):
        load_checkpoint(path)
    fewer = {k: v for k, v in state["state_dict"].items() if k != "linear.bias"}
    torch.save({**state, "state_dict": fewer}, path)
    with pytest.raises(CheckpointError, match="tensor linear.bias of its digest is missing"):
        load_checkpoint(path)
    torch.save({k: v for k, v in state.items() if k != "tensor_digest"}, path)
    assert "tensor_digest" not in load_checkpoint(path)


def test_main_eval_names_the_changed_tensor(state, ours, data_dir, capsys):
    tamper(ours, state["state_dict"][TAMPERED])
    argv = ["--eval", ours, "--data_dir", data_dir, "--no-progress", "--device", "cpu"]
    assert run(main.main, argv) == 2
    line = one_error_line(capsys)
    assert TAMPERED in line and "--no-verify-checkpoint" in line
    assert run(main.main, argv + ["--no-verify-checkpoint"]) == 0


def test_attack_script_names_the_changed_tensor(state, ours, data_dir, tmp_path, capsys):
    tamper(ours, state["state_dict"][TAMPERED])
    argv = ["--checkpoint", ours, "--data_dir", data_dir, "--n_iter", "1", "--break_acc", "-1",
            "--attack_sample_size", "16", "--no-progress", "--device", "cpu",
            "--results", str(tmp_path / "bfa")]
    assert run(attack_bfa.main, argv) == 2
    line = one_error_line(capsys)
    assert TAMPERED in line and "--no-verify-checkpoint" in line
    assert not (tmp_path / "bfa").exists()
    assert run(attack_bfa.main, argv + ["--no-verify-checkpoint"]) == 0


def test_digest_through_training_resume_and_finetune(data_dir, tmp_path, capsys):
    """Every checkpoint main.py writes (new run, resumed, finetuned) carries a digest that
    matches; --resume and --finetune check the one they start from."""
    common = ["--dataset", "cifar10", "--arch", "resnet20_quan", "-b", "50", "--no-progress",
              "--device", "cpu", "--data_dir", data_dir]
    run_dir = tmp_path / "run"
    assert run(main.main, common + ["--outdir", str(run_dir), "-e", "1"]) == 0
    ckpt = str(run_dir / "checkpoint.pth.tar")
    first = load_checkpoint(ckpt)
    assert run(main.main, ["--resume", ckpt, "-e", "2", "--no-progress"]) == 0
    assert load_checkpoint(ckpt)["tensor_digest"] != first["tensor_digest"]  # new weights
    tuned = tmp_path / "tuned"
    assert run(main.main, common + ["--outdir", str(tuned), "-e", "1", "--finetune", "--ft_path",
                                    ckpt, "--ocm", "--code_length", "16", "--output_act",
                                    "tanh"]) == 0
    assert "tensor_digest" in load_checkpoint(str(tuned / "checkpoint.pth.tar"))
    tamper(ckpt, load_checkpoint(ckpt)["state_dict"][TAMPERED])
    capsys.readouterr()
    assert run(main.main, ["--resume", ckpt, "-e", "3", "--no-progress"]) == 2
    assert TAMPERED in one_error_line(capsys)
    assert run(main.main, common + ["--outdir", str(tmp_path / "t2"), "-e", "1", "--finetune",
                                    "--ft_path", ckpt]) == 2
    assert TAMPERED in one_error_line(capsys)
    assert not (tmp_path / "t2").exists()
