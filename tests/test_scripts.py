"""The paper scripts in scripts/ as dry runs (DRY_RUN=1 prints each command instead of running
it): every python command they would run must parse with its script's own argument parser, every
attacked checkpoint must come from a training step of the same script, and the paths must come
from DATA_DIR / OUT_ROOT, relative ones taken from the caller's working directory."""

import importlib
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["paper_cifar10.sh", "ocm_train_cifar10.sh", "ocm_train_cifar100.sh",
           "ocm_train_imagenet.sh", "bfa_cifar10.sh", "train_cifar10_defenses.sh",
           "paper_smoke.sh", "defenses_cifar10.sh"]
PY_SCRIPTS = {"main.py": "main", "attack_tbfa.py": "attack_tbfa", "attack_talbf.py": "attack_talbf",
              "attack_bfa.py": "attack_bfa", "report.py": "report",
              "evaluate_defenses.py": "evaluate_defenses"}


def dry_run(script, cwd, **env):
    full = dict(os.environ, DRY_RUN="1", PYTHON="python", **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], cwd=str(cwd),
                          env=full, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    commands = []
    for line in proc.stdout.splitlines():
        if line.startswith("+ "):
            argv = shlex.split(line[2:])
            i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
            launcher = argv[:i]
            assert launcher == ["python"] or (launcher[:2] == ["torchrun", "--standalone"]
                                              and launcher[2].startswith("--nproc_per_node=")), line
            commands.append((argv[i], argv[i + 1:], launcher))
    return commands


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def fake_python(tmp_path):
    """A ``python`` (and a ``torchrun``) that records each call in ``calls.txt`` and exits with
    ``$FAKE_RC``: the scripts' real code paths run, with every Python command captured."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "torchrun"):
        stub = bin_dir / name
        stub.write_text('#!/usr/bin/env bash\n{ printf "%q " "$(basename "$0")" "$@"; echo; } '
                        '>> "$CALLS"\nexit "${FAKE_RC:-0}"\n')
        stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, PYTHON=str(bin_dir / "python"), CALLS=str(calls),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("DRY_RUN", None)
    return env, calls


def recorded(calls):
    """The recorded calls as ``(launcher, script, argv)``, the calls file emptied."""
    out = []
    if calls.exists():
        for line in calls.read_text().splitlines():
            argv = shlex.split(line)
            i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
            out.append((argv[:i], argv[i], argv[i + 1:]))
        calls.unlink()
    return out


def parse(name, argv):
    return importlib.import_module(PY_SCRIPTS[name]).get_args_parser().parse_args(argv)


def test_lib_steps_train_resume_skip_and_report_failures(tmp_path):
    """The steps of scripts/_lib.sh outside a dry run: a new training, the --resume of an
    interrupted one, the skip of a finished one (train.done), the BFA skip, torchrun with
    NPROC > 1, the timings file, and a failing command's report under QUIET=1."""
    env, calls = fake_python(tmp_path)
    run_dir, res = tmp_path / "m", tmp_path / "res"
    lib = os.path.join(ROOT, "scripts", "_lib.sh")

    def bash(body, **extra):
        return subprocess.run(["bash", "-c", f"set -euo pipefail; source {shlex.quote(lib)}; "
                               f"DATA_DIR={shlex.quote(str(tmp_path / 'd'))}; {body}"],
                              env=dict(env, **extra), capture_output=True, text=True,
                              timeout=30)

    run_dir.mkdir()
    train = f"train {shlex.quote(str(run_dir))} --dataset digits -e 2"
    assert bash(train, DEVICE="cpu").returncode == 0
    [(launcher, name, argv)] = recorded(calls)
    args = parse(name, argv)
    assert launcher == ["python"] and name == "main.py" and args.resume is None
    assert (args.outdir, args.epochs, args.device) == (str(run_dir), 2, "cpu")
    assert (run_dir / "train.done").exists()
    (run_dir / "train.done").unlink()
    (run_dir / "checkpoint.pth.tar").write_bytes(b"")  # an interrupted run
    assert bash(train, NPROC="2").returncode == 0
    [(launcher, name, argv)] = recorded(calls)
    args = parse(name, argv)
    assert launcher == ["torchrun", "--standalone", "--nproc_per_node=2"]
    assert args.resume == str(run_dir / "checkpoint.pth.tar") and args.outdir is None
    proc = bash(train)  # train.done again: nothing runs
    assert proc.returncode == 0 and "already trained" in proc.stdout and not recorded(calls)

    bfa = f"bfa {shlex.quote(str(run_dir))} {shlex.quote(str(res))} --seed 3"
    for _ in range(2):  # a campaign: run again, attack_bfa.py itself skips the finished runs
        proc = bash(bfa, NPROC="2", TIMINGS=str(tmp_path / "t.tsv"), STEP="bfa m")
        assert proc.returncode == 0
        [(launcher, name, argv)] = recorded(calls)
        args = parse(name, argv)
        assert launcher == ["python"] and name == "attack_bfa.py"  # always one process
        assert (args.checkpoint, args.results) == (str(run_dir / "model_best.pth.tar"), str(res))
    rows = [r.split("\t") for r in (tmp_path / "t.tsv").read_text().splitlines()]
    assert len(rows) == 2 and all(r[0] == "bfa m" and r[3].endswith("--seed 3") for r in rows)

    log = tmp_path / "quiet.log"
    (run_dir / "train.done").unlink()
    proc = bash(train, QUIET="1", LOG=str(log), FAKE_RC="3")
    assert proc.returncode == 3 and "command failed (exit 3)" in proc.stderr
    assert f"last lines of {log}" in proc.stderr and not (run_dir / "train.done").exists()


@pytest.mark.parametrize("attack", ["0", "1"])
def test_quickstart_commands_parse(attack, tmp_path):
    """scripts/quickstart.sh (no dry-run mode): its commands, captured, parse with their
    scripts' parsers; EPOCHS overrides both recipes, ATTACK=0 stops after the training and
    otherwise both trained models are attacked and reported."""
    env, calls = fake_python(tmp_path)
    out = tmp_path / "qs"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh")],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                          env=dict(env, OUT=str(out), ATTACK=attack, EPOCHS="1"))
    assert proc.returncode == 0, proc.stderr
    commands = recorded(calls)
    assert all(launcher == ["python"] for launcher, _, _ in commands)
    assert [n for _, n, _ in commands] == ["main.py"] * 2 + (
        [] if attack == "0" else ["attack_tbfa.py", "attack_talbf.py"] * 2 + ["report.py"])
    parsed = [(name, parse(name, argv)) for _, name, argv in commands]
    vanilla, ocm = parsed[0][1], parsed[1][1]
    assert (vanilla.outdir, ocm.outdir) == (str(out / "vanilla"), str(out / "ocm16"))
    assert vanilla.epochs == ocm.epochs == 1 and not vanilla.ocm
    assert ocm.ocm and ocm.code_length == 16 and ocm.output_act == "tanh"
    attacked = {(name, args.checkpoint) for name, args in parsed[2:-1]}
    expected = {(a, str(out / m / "model_best.pth.tar"))
                for a in ("attack_tbfa.py", "attack_talbf.py") for m in ("vanilla", "ocm16")}
    assert attacked == (set() if attack == "0" else expected)
    for name, args in parsed[2:-1]:  # each next to its model, in its own folder
        assert args.results == os.path.join(os.path.dirname(args.checkpoint), name[:-3])
    if attack == "1":
        assert parsed[-1][1].models == [f"vanilla={out / 'vanilla'}", f"ocm16={out / 'ocm16'}"]


def test_formats_faults_commands_parse(tmp_path):
    """scripts/formats_faults.sh: three trainings (8-bit vanilla, 8-bit OCM16, float), BFA on
    every format and under fault models, T-BFA on both 8-bit models under the three fault
    models of the README table, then the two reports; every command parses."""
    env, calls = fake_python(tmp_path)
    out = tmp_path / "ff"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "formats_faults.sh")],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                          env=dict(env, OUT=str(out), EPOCHS="1", PAIRS="all"))
    assert proc.returncode == 0, proc.stderr
    parsed = [(name, parse(name, argv)) for _, name, argv in recorded(calls)]
    assert [n for n, _ in parsed] == (["main.py"] * 3 + ["attack_bfa.py"] * 8
                                      + ["attack_tbfa.py"] * 6 + ["report.py"] * 2)
    train = [a for n, a in parsed if n == "main.py"]
    assert [a.bits for a in train] == [8, 8, 32] and train[1].ocm and not train[2].ocm
    assert all(a.epochs == 1 for a in train)
    bfa = [(a.format, a.fault_bits, a.one_flip_per_page, os.path.basename(a.results))
           for n, a in parsed if n == "attack_bfa.py"]
    assert bfa == [("trained", None, False, "bfa_trained"), ("fp32", None, False, "bfa_fp32"),
                   ("bf16", None, False, "bfa_bf16"), ("fp16", None, False, "bfa_fp16"),
                   ("torch-int8", None, False, "bfa_torch-int8"),
                   ("fp32", "2-31", False, "bfa_fp32_bits2-31"),
                   ("trained", None, True, "bfa_trained_page"),
                   ("torch-int8", None, True, "bfa_torch-int8_page")]
    tbfa = [(a.one_flip_per_page, a.fault_direction, a.pairs, a.results)
            for n, a in parsed if n == "attack_tbfa.py"]
    assert [t[:3] for t in tbfa] == [(False, "any", None)] * 2 + [(True, "any", None)] * 2 + [
        (False, "0to1", None)] * 2
    assert len({t[3] for t in tbfa}) == 6  # each campaign in its own folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_parses_and_attacks_a_trained_model(script, tmp_path):
    commands = dry_run(script, tmp_path, DATA_DIR="cifar", OUT_ROOT="out", OUT="smoke",
                       NPROC="4" if script == "ocm_train_imagenet.sh" else "1")
    assert commands
    trained = set()
    for name, argv, launcher in commands:
        assert name in PY_SCRIPTS, name
        args = importlib.import_module(PY_SCRIPTS[name]).get_args_parser().parse_args(argv)
        if name == "main.py":
            assert args.outdir and os.path.isabs(args.outdir)
            assert args.outdir.startswith(str(tmp_path))  # OUT_ROOT relative to the caller
            if args.finetune:
                assert args.ft_path in trained  # finetuned from a model trained before
            trained.add(os.path.join(args.outdir, "model_best.pth.tar"))
        if script == "ocm_train_imagenet.sh" and name != "report.py":
            assert launcher[0] == "torchrun"  # NPROC=4: training and campaigns on 4 GPUs
        else:
            assert launcher == ["python"]
        if name.startswith("attack_"):
            assert args.checkpoint in trained, (script, args.checkpoint)
        if name != "report.py" and script != "paper_smoke.sh":
            assert args.data_dir == str(tmp_path / "cifar")
        if name == "report.py":
            for spec in args.models:
                label, folder = spec.split("=", 1)
                assert os.path.join(folder, "model_best.pth.tar") in trained


def _count(commands):
    counts = {}
    for name, _, _ in commands:
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_paper_cifar10_runs_every_row_of_the_table(tmp_path):
    commands = dry_run("paper_cifar10.sh", tmp_path, OUT_ROOT=str(tmp_path / "o"))
    assert _count(commands) == {"main.py": 7, "attack_tbfa.py": 7, "attack_talbf.py": 7,
                                "report.py": 1}
    trains = {os.path.basename(flag(a, "--outdir")): a for n, a, _ in commands if n == "main.py"}
    assert list(trains) == ["vanilla", "pc", "ocm16", "ocm64", "ocm16_pc", "mixup",
                            "manifold_mixup"]
    for label, argv in trains.items():  # the papers' recipe: main.py's defaults (docs/algorithms.md section 4)
        assert flag(argv, "--dataset") == "cifar10" and flag(argv, "-e") == "160"
        assert flag(argv, "--arch") == "resnet20_quan" and flag(argv, "--bits") == "8"
        assert ("--ocm" in argv) == label.startswith("ocm")
        assert ("--clustering" in argv) == (label in ("pc", "ocm16_pc"))
    assert flag(trains["ocm64"], "--code_length") == "64"
    assert "--mixup" in trains["mixup"] and "--manifold-mixup" in trains["manifold_mixup"]
    for name, argv, _ in commands:
        if name == "attack_tbfa.py":  # the protocol: default pairs, 5 repetitions, full curves
            assert flag(argv, "--avgs") == "5" and flag(argv, "--curve-every") == "1"
            assert "--pairs" not in argv and "--iters" not in argv
        if name == "attack_talbf.py":
            assert flag(argv, "--n-attacks") == "1000"
    report = [a for n, a, _ in commands if n == "report.py"][0]
    assert flag(report, "--out") == str(tmp_path / "o" / "cifar10" / "report")


def test_defense_matrices_attack_every_trained_model(tmp_path):
    """The CIFAR-10 and the digits matrix scripts: the five trained models plus the vanilla
    model behind RADAR and DeepNcode, the papers', the adaptive and the aware attacks, three
    fault models (the digits miniature: two by default)."""
    for script in ("defenses_cifar10.sh", "defenses_digits.sh"):
        commands = dry_run(script, tmp_path, OUT_ROOT=str(tmp_path / "o"),
                           OUT=str(tmp_path / "d"), MATRIX_NPROC="3")
        trained = {os.path.join(flag(a, "--outdir"), "model_best.pth.tar")
                   for n, a, _ in commands if n == "main.py"}
        matrix = [a for n, a, _ in commands if n == "evaluate_defenses.py"]
        assert len(trained) == 5 and len(matrix) == 1
        args = parse("evaluate_defenses.py", matrix[0])
        rows = dict(m.split("=", 1) for m in args.models)
        assert list(rows) == ["vanilla", "ocm16", "pc", "ocm16_pc", "binarized", "radar",
                              "deepncode"]
        assert set(rows.values()) == trained
        assert [d.split("=")[0] for d in args.deploy] == ["radar", "deepncode"]
        assert {"tbfa", "talbf", "bfa", "radar_pairs"} <= set(args.attacks)
        assert any(a.startswith("tbfa_adaptive") for a in args.attacks)
        assert any(a.startswith("bfa_adaptive") for a in args.attacks)
        if script == "defenses_digits.sh":
            assert args.faults == ["none", "page"]
            # the trainings in one process; the matrix's processes share its items
            assert {tuple(l) for n, _, l in commands if n == "main.py"} == {("python",)}
            launcher = [l for n, _, l in commands if n == "evaluate_defenses.py"][0]
            assert launcher[2] == "--nproc_per_node=3" and flag(matrix[0], "--threads") == "1"
        else:
            assert args.faults == ["none", "page", "0to1"]


def test_imagenet_finetunes_ocm_from_the_vanilla_model(tmp_path):
    commands = dry_run("ocm_train_imagenet.sh", tmp_path, OUT_ROOT=str(tmp_path))
    trains = [a for n, a, _ in commands if n == "main.py"]
    assert [os.path.basename(flag(a, "--outdir")) for a in trains] == ["vanilla", "ocm1024",
                                                                       "ocm2048", "pc"]
    for a in trains[1:3]:
        assert "--finetune" in a and flag(a, "--opt") == "adam" and flag(a, "-e") == "60"
        assert flag(a, "--ft_path") == os.path.join(flag(trains[0], "--outdir"),
                                                    "model_best.pth.tar")
    assert flag(trains[3], "--lambda_coeff") == "5e-4"
    assert _count(commands).get("attack_talbf.py", 0) == 0  # the supplement has none on ImageNet
    assert all(launcher == ["python"] for _, _, launcher in dry_run("ocm_train_imagenet.sh",
                                                                      tmp_path))  # NPROC=1


def test_bfa_flow_attacks_each_model_with_bfa_and_random_flips(tmp_path):
    commands = dry_run("bfa_cifar10.sh", tmp_path, RUNS="2")
    attacks = [a for n, a, _ in commands if n == "attack_bfa.py"]
    assert len(attacks) == 4 * 2 * 2  # 4 models x (BFA + random) x 2 runs
    assert sum("--random_bfa" in a for a in attacks) == 8
    assert len({flag(a, "--results") for a in attacks}) == 16  # one folder per run
    trains = [a for n, a, _ in commands if n == "main.py"]
    binarized = [a for a in trains if flag(a, "--arch") == "resnet20_bin"]
    assert len(binarized) == 1 and flag(binarized[0], "--bits") == "1"
    assert "--clustering" not in binarized[0]
    assert all(a[a.index("--schedule") + 1:a.index("--schedule") + 3] == ["80", "120"]
               for a in trains)


def test_unknown_model_label_fails(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "paper_cifar10.sh")],
                          cwd=str(tmp_path), env=dict(os.environ, DRY_RUN="1", MODELS="vanilla foo"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown model label 'foo'" in proc.stderr
