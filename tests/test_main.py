"""main.py end to end on tiny CIFAR-format data: train, interrupt, resume, evaluate, finetune,
and every bad input of the foundation issue."""

import json
import os

import pytest
import torch

import main
from fakedata import make_cifar10
from utils import trainer
from utils.checkpoint import load_checkpoint, save_checkpoint
from cli.args import run

COMMON = ["--dataset", "cifar10", "--arch", "resnet20_quan", "-b", "32", "--no-progress",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root)
    return str(root)


def train_args(data_dir, outdir, epochs=3, extra=()):
    return COMMON + ["--data_dir", data_dir, "--outdir", str(outdir), "-e", str(epochs),
                     "--clustering", *extra]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run (vanilla + piecewise clustering)."""
    out = tmp_path_factory.mktemp("run_a")
    assert run(main.main, train_args(data_dir, out)) == 0
    return out


def read_csv_rows(path):
    with open(path) as f:
        return f.read().strip().splitlines()[1:]


def test_training_outputs(trained):
    names = set(os.listdir(trained))
    assert {"checkpoint.pth.tar", "model_best.pth.tar", "log.csv", "args.json", "train.log",
            "tb"} <= names
    assert len(read_csv_rows(trained / "log.csv")) == 3
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(trained / "tb"))
    ckpt = load_checkpoint(str(trained / "checkpoint.pth.tar"))
    assert ckpt["epoch"] == 3
    assert ckpt["model_config"] == {"arch": "resnet20_quan", "num_classes": 10, "bits": 8,
                                    "output_act": "linear", "ocm": False, "code_length": None,
                                    "codebook_seed": 1, "layout": "public"}
    assert ckpt["dataset"] == "cifar10" and ckpt["normalization"]["mean"][0] == 0.4914
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 5e-4  # docs/algorithms.md section 4 default


def test_interrupt_and_resume_is_exact(trained, data_dir, tmp_path, monkeypatch, capsys):
    real = trainer.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 2:  # the third epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    assert run(main.main, train_args(data_dir, tmp_path)) == 130
    assert load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))["epoch"] == 2
    ckpt = tmp_path / "checkpoint.pth.tar"
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"interrupted; {ckpt} holds 2 finished epoch(s) of 3: continue with  python main.py "
        f"--resume {ckpt}")
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    # the run's own flags come back from the checkpoint
    assert run(main.main, ["--resume", str(tmp_path / "checkpoint.pth.tar"), "--no-progress"]) == 0
    a = load_checkpoint(str(trained / "checkpoint.pth.tar"))
    b = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    assert b["epoch"] == 3 and b["best_acc"] == a["best_acc"]
    assert a["args"]["dataset"] == b["args"]["dataset"] == "cifar10"  # resumed: still known
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert read_csv_rows(tmp_path / "log.csv")[-1].split(",")[:7] == \
        read_csv_rows(trained / "log.csv")[-1].split(",")[:7]


def test_eval_best_checkpoint(trained, data_dir, capsys):
    best = load_checkpoint(str(trained / "model_best.pth.tar"))
    assert run(main.main, ["--eval", str(trained / "model_best.pth.tar"), "--data_dir", data_dir,
                           "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(best["test_acc"], abs=1e-3)
    assert result["n"] == 20


def test_eval_with_another_normalization(trained, data_dir, capsys):
    """--normalization bfa evaluates with the BFA repository's values (recorded in the line)."""
    assert run(main.main, ["--eval", str(trained / "model_best.pth.tar"), "--data_dir", data_dir,
                           "--no-progress", "--normalization", "bfa"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["normalization"]["name"] == "bfa"
    assert result["normalization"]["mean"] == pytest.approx([125.3 / 255, 123.0 / 255,
                                                             113.9 / 255])


def test_eval_published_layout_with_flags(trained, data_dir, tmp_path, capsys):
    ours = load_checkpoint(str(trained / "model_best.pth.tar"))
    published = {"state_dict": {"module." + k: v for k, v in ours["state_dict"].items()},
                 "epoch": 160, "best_acc": 0.0}
    path = str(tmp_path / "model_best.pth.tar")
    torch.save(published, path)
    assert run(main.main, ["--eval", path, *COMMON, "--data_dir", data_dir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(ours["test_acc"], abs=1e-3)


def test_finetune_to_ocm(trained, data_dir, tmp_path):
    src = load_checkpoint(str(trained / "model_best.pth.tar"))
    args = COMMON + ["--data_dir", data_dir, "--outdir", str(tmp_path), "-e", "1", "--finetune",
                     "--ft_path", str(trained / "model_best.pth.tar"), "--ocm", "--code_length",
                     "16", "--output_act", "tanh", "--lr", "1e-12"]
    assert run(main.main, args) == 0
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    cfg = ckpt["model_config"]
    assert cfg["ocm"] and cfg["code_length"] == 16 and cfg["output_act"] == "tanh"
    assert ckpt["codebook"].shape == (10, 16)
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.0  # finetune default
    sd = ckpt["state_dict"]
    assert sd["linear.weight"].shape == (16, 64)
    assert torch.allclose(sd["layer2.1.conv1.weight"], src["state_dict"]["layer2.1.conv1.weight"],
                          atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def outdir(tmp_path):
    d = tmp_path / "existing_run"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    return d


def bad_input_cases(data_dir, trained, tmp):
    ckpt = str(trained / "model_best.pth.tar")
    trunc = tmp / "trunc.pth.tar"
    data = open(ckpt, "rb").read()
    trunc.write_bytes(data[: len(data) // 3])
    notckpt = tmp / "notes.pth.tar"
    notckpt.write_text("not a checkpoint")
    incomplete = tmp / "incomplete"
    make_cifar10(incomplete)
    os.remove(incomplete / "cifar-10-batches-py" / "data_batch_3")
    d = ["--data_dir", data_dir]
    return {
        "unknown_dataset": (["--dataset", "mnist"], "valid names"),
        "unknown_arch": (["--arch", "resnet21", *d], "valid"),
        "missing_data": (["--data_dir", str(tmp / "nowhere")], "nowhere"),
        "incomplete_data": (["--data_dir", str(incomplete)], "data_batch_3"),
        "code_length_not_pow2": (["--ocm", "--code_length", "12", "--output_act", "tanh", *d],
                                 "power of two"),
        "code_length_too_short": (["--ocm", "--code_length", "8", "--output_act", "tanh", *d],
                                  "at least classes"),
        "ocm_without_tanh": (["--ocm", "--code_length", "16", *d], "--output_act tanh"),
        "ocm_default_length_too_short": (["--ocm", "--output_act", "tanh", "--dataset",
                                          "cifar100", "--data_dir", str(tmp)], "at least classes"),
        "eval_missing": (["--eval", str(tmp / "nope.pth.tar"), *d], "not found"),
        "eval_truncated": (["--eval", str(trunc), *d], "truncated"),
        "eval_not_checkpoint": (["--eval", str(notckpt), *d], "not"),
        "resume_missing": (["--resume", str(tmp / "nope.pth.tar"), *d], "not found"),
        "finetune_missing": (["--finetune", "--ft_path", str(tmp / "nope.pth.tar"), *d],
                             "not found"),
        "finetune_no_path": (["--finetune", *d], "--ft_path"),
        "eval_bits_mismatch": (["--eval", ckpt, "--bits", "4", *d], "--bits 4"),
        "eval_arch_mismatch": (["--eval", ckpt, "--arch", "resnet32_quan", *d], "--arch"),
        "eval_classes_mismatch": (["--eval", ckpt, "-c", "100", *d], "num_classes"),
        "eval_ocm_mismatch": (["--eval", ckpt, "--ocm", *d], "--ocm"),
        "bits_too_high": (["--bits", "17", *d], "bit width"),
        "bits_zero": (["--bits", "0", *d], "bit width"),
        "no_such_device": (["--device", "cuda:7", *d], "cuda"),
        "bad_schedule": (["--schedule", "fast", *d], "--schedule"),
        "zero_epochs": (["-e", "0", *d], "--epochs"),
        "negative_wd_adam": (["-wd", "-1", "--opt", "adam", *d], "--weight-decay"),
        "negative_momentum": (["--momentum", "-1", *d], "--momentum"),
        "nan_lr": (["--lr", "nan", *d], "--lr"),
        "inf_lr": (["--lr", "inf", *d], "--lr"),
        "negative_warmup": (["--warmup", "-2", *d], "--warmup"),
        "zero_code_length": (["--ocm", "--code_length", "0", "--output_act", "tanh", *d],
                             "power of two"),
        "negative_lambda": (["--clustering", "-lam", "-1", *d], "--lambda_coeff"),
        "zero_mixup_alpha": (["--mixup", "--mixup-alpha", "0", *d], "--mixup-alpha"),
        "negative_gamma": (["--schedule", "2", "--gammas", "-1", *d], "--gammas"),
        "zero_test_batch": (["--test_batch", "0", *d], "--test_batch"),
        "negative_seed": (["--seed", "-1", *d], "--seed"),
        "negative_workers": (["--workers", "-1", *d], "--workers"),
        "zero_threads": (["--threads", "0", *d], "--threads"),
        "resume_other_optimizer": (["--resume", str(trained / "checkpoint.pth.tar"), "--opt",
                                    "adam"], "--opt sgd"),
        "normalization_in_training": (["--normalization", "bfa", *d], "--normalization"),
    }


CASES = ["unknown_dataset", "unknown_arch", "missing_data", "incomplete_data",
         "code_length_not_pow2", "code_length_too_short", "ocm_without_tanh",
         "ocm_default_length_too_short",
         "eval_missing", "eval_truncated", "eval_not_checkpoint", "resume_missing",
         "finetune_missing", "finetune_no_path", "eval_bits_mismatch", "eval_arch_mismatch",
         "eval_classes_mismatch", "eval_ocm_mismatch", "bits_too_high", "bits_zero",
         "no_such_device", "bad_schedule", "zero_epochs", "negative_wd_adam",
         "negative_momentum", "nan_lr", "inf_lr", "negative_warmup", "zero_code_length",
         "negative_lambda", "zero_mixup_alpha", "negative_gamma", "zero_test_batch",
         "negative_seed", "negative_workers", "zero_threads", "resume_other_optimizer",
         "normalization_in_training"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, data_dir, trained, tmp_path, outdir, capsys):
    if case == "no_such_device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv, expected = bad_input_cases(data_dir, trained, tmp_path)[case]
    base = ["--no-progress", "--outdir", str(outdir)]
    if "--device" not in argv:
        base += ["--device", "cpu"]
    rc = run(main.main, argv + base)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected.lower() in err.lower(), err
    assert "Traceback" not in err
    assert sorted(os.listdir(outdir)) == ["keep.txt"]  # nothing written, nothing changed


def test_checkpoint_for_other_architecture_without_metadata(trained, data_dir, tmp_path, capsys):
    ours = load_checkpoint(str(trained / "model_best.pth.tar"))
    path = str(tmp_path / "published.pth.tar")
    save_checkpoint({"state_dict": ours["state_dict"]}, path)
    rc = run(main.main, ["--eval", path, "--arch", "wrn28_4_quan", "--data_dir", data_dir,
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit architecture wrn28_4_quan" in err
    rc = run(main.main, ["--eval", path, "--bits", "4", "--data_dir", data_dir, "--device", "cpu"])
    assert rc == 2 and "--bits 8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --compile, --amp, --channels-last
# ---------------------------------------------------------------------------------------------

def test_compiled_run_writes_plain_checkpoints(data_dir, tmp_path, monkeypatch, capsys):
    """--compile trains through torch.compile (here its graph-capture-only "eager" backend,
    which takes seconds instead of the C++ compiler's minute on this CPU); the checkpoint holds
    the plain module's state dict and loads like any other."""
    real = torch.compile
    calls = []

    def eager_compile(model, **kwargs):
        calls.append(type(model).__name__)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    args = COMMON + ["--data_dir", data_dir, "--outdir", str(tmp_path), "-e", "1", "--compile",
                     "--amp", "--channels-last"]
    assert run(main.main, args) == 0
    assert calls == ["CifarResNet"]
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["state_dict"])
    assert ckpt["args"]["amp"] is True
    monkeypatch.setattr(torch, "compile", real)
    capsys.readouterr()
    assert run(main.main, ["--eval", str(tmp_path / "checkpoint.pth.tar"), "--data_dir",
                           data_dir, "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(ckpt["test_acc"], abs=1e-3)


def test_compile_failure_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    """A machine where torch.compile cannot build its kernels: one error line, status 2."""
    real = torch.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=broken_backend))
    args = COMMON + ["--data_dir", data_dir, "--outdir", str(tmp_path / "run"), "-e", "1",
                     "--compile"]
    assert run(main.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --compile failed on this machine")
    assert "without --compile" in err[0]
    assert not (tmp_path / "run" / "checkpoint.pth.tar").exists()


def _snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_outdir_under_a_file_or_a_file(data_dir, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for outdir, expected in ((blocker / "run", "is a file"), (blocker, "is a file")):
        rc = run(main.main, COMMON + ["--data_dir", data_dir, "--outdir", str(outdir)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and expected in err, err
    assert blocker.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_finished_run_is_never_replaced_without_overwrite(trained, data_dir, capsys, tmp_path):
    before = _snapshot(trained)
    rc = run(main.main, train_args(data_dir, trained, epochs=1))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already holds a training run" in err and "--overwrite" in err, err
    assert "epoch 3 of 3" in err and "--resume" in err
    assert _snapshot(trained) == before
    # --overwrite replaces it (on a copy: the module's run stays intact for other tests)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / "notes.txt").write_text("mine")
    assert run(main.main, train_args(data_dir, copy, epochs=1, extra=["--overwrite"])) == 0
    assert load_checkpoint(str(copy / "checkpoint.pth.tar"))["epoch"] == 1
    assert len(read_csv_rows(copy / "log.csv")) == 1
    assert (copy / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_resume_writes_next_to_the_given_checkpoint(trained, data_dir, tmp_path):
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    ckpt = load_checkpoint(str(moved / "checkpoint.pth.tar"))
    ckpt["epoch"] = 2  # pretend the run stopped after two epochs
    ckpt["history"] = ckpt["history"][:2]
    save_checkpoint(ckpt, str(moved / "checkpoint.pth.tar"))
    before = _snapshot(trained)
    assert run(main.main, ["--resume", str(moved / "checkpoint.pth.tar"), "--data_dir",
                           data_dir, "--no-progress"]) == 0
    assert load_checkpoint(str(moved / "checkpoint.pth.tar"))["epoch"] == 3
    assert _snapshot(trained) == before  # the folder the checkpoint came from is untouched


class Killed(BaseException):
    """Stands for kill -9: nothing of ours catches it."""


def _kill_at(monkeypatch, point, epoch_to_kill=2):
    """Make the run die at ``point`` of epoch ``epoch_to_kill`` (1-based)."""
    real_save = trainer.save_checkpoint

    def save(state, path):
        name = os.path.basename(path)
        if state["epoch"] == epoch_to_kill:
            if point == f"during {name}":  # the temporary file is written, never renamed
                with open(os.path.join(os.path.dirname(path), ".tmp-abc.pth.tar"), "wb") as f:
                    f.write(b"partial")
                raise Killed
            real_save(state, path)
            if point == f"after {name}":
                raise Killed
            return
        real_save(state, path)

    monkeypatch.setattr(trainer, "save_checkpoint", save)


KILL_POINTS = ["during model_best.pth.tar", "after model_best.pth.tar",
               "during checkpoint.pth.tar", "after checkpoint.pth.tar"]


def _improving_accuracy(mp):
    """Every epoch a new best (test accuracy 50 + epoch), so that each epoch writes both
    checkpoints and the kill points are reached."""
    real_train, real_eval, seen = trainer.train_one_epoch, trainer.evaluate, {}

    def train_one_epoch(*args, **kwargs):
        seen["epoch"] = args[5]
        return real_train(*args, **kwargs)

    def evaluate(*args, **kwargs):
        result = real_eval(*args, **kwargs)
        result["top1"] = 50.0 + seen["epoch"]
        return result

    mp.setattr(trainer, "train_one_epoch", train_one_epoch)
    mp.setattr(trainer, "evaluate", evaluate)


@pytest.fixture(scope="module")
def improving_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("improving")
    with pytest.MonkeyPatch.context() as mp:
        _improving_accuracy(mp)
        assert run(main.main, train_args(data_dir, out)) == 0
    return out


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_any_checkpoint_write_then_resume_equals_uninterrupted(
        point, improving_run, data_dir, tmp_path, monkeypatch):
    """kill -9 during or between the two checkpoint writes of epoch 2, then --resume: the same
    checkpoint, model_best and log.csv as the uninterrupted run, no temporary file left."""
    _improving_accuracy(monkeypatch)
    _kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        run(main.main, train_args(data_dir, tmp_path))
    monkeypatch.undo()  # the process is gone; a new one resumes
    _improving_accuracy(monkeypatch)
    assert run(main.main, ["--resume", str(tmp_path / "checkpoint.pth.tar"), "--data_dir",
                           data_dir, "--no-progress"]) == 0
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        a = load_checkpoint(str(improving_run / name))
        b = load_checkpoint(str(tmp_path / name))
        assert (a["epoch"], a["best_acc"]) == (b["epoch"], b["best_acc"]) == (3, 52.0), name
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), (name, k)

    def strip(row):  # all but the seconds column
        return row.split(",")[:-1]
    assert [strip(r) for r in read_csv_rows(tmp_path / "log.csv")] == \
        [strip(r) for r in read_csv_rows(improving_run / "log.csv")]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp") or n.endswith(".tmp")]


def test_threads_flag_sets_pytorchs_cpu_threads():
    """--threads N is applied before the run (CPU results depend on the thread count)."""
    from cli.args import runtime_device

    before = torch.get_num_threads()
    args = main.get_args_parser().parse_args(["--threads", "1", "--device", "cpu"])
    try:
        assert str(runtime_device(args)) == "cpu"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_main_is_parse_build_call():
    """Scripts are parse, build, call: no function of main.py but its parser is over 40 lines,
    and the epoch loop (utils/trainer.py) takes no argparse namespace."""
    import ast

    from utils import trainer as lib
    tree = ast.parse(open(main.__file__).read())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 40]
    assert long == [("get_args_parser", long[0][1])]
    imports = {a.name for n in ast.walk(ast.parse(open(lib.__file__).read()))
               if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imports |= {n.module for n in ast.walk(ast.parse(open(lib.__file__).read()))
                if isinstance(n, ast.ImportFrom) and n.module}
    assert not imports & {"argparse", "cli", "cli.args"}
