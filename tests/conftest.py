import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (run in CI; skip locally with -m 'not slow')")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


DIGITS_RECIPE = ["--dataset", "digits", "--arch", "resnet20_quan", "-b", "64", "--opt", "adam",
                 "--lr", "2e-3", "--schedule", "cosine", "-wd", "1e-4", "--device", "cpu",
                 "--no-progress"]


@pytest.fixture(scope="session")
def digits_checkpoints(tmp_path_factory):
    """Short-trained vanilla and OCM16 ResNet-20 checkpoints on digits (about 25 s in all)."""
    import main
    from utils.cli import run

    root = tmp_path_factory.mktemp("digits_models")
    paths = {}
    for name, extra in (("vanilla", []), ("ocm16", ["--ocm", "--code_length", "16",
                                                    "--output_act", "tanh"])):
        out = root / name
        assert run(main.main, DIGITS_RECIPE + ["-e", "4", "--outdir", str(out)] + extra) == 0
        paths[name] = str(out / "model_best.pth.tar")
    return paths


def conformance_path(*parts: str) -> str:
    """A file of the conformance material: artifacts written by the public code itself.

    ``$CONFORMANCE_DIR`` or ``<repo>/../shared/conformance`` (where CI and the project workspace
    keep it). A missing folder fails the test: agreement with the public code is not optional.
    """
    root = os.environ.get("CONFORMANCE_DIR") or os.path.join(ROOT, "..", "shared", "conformance")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        pytest.fail(f"conformance material missing: {path} (set CONFORMANCE_DIR to the folder "
                    f"of artifacts written by the public code)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def conformance():
    """Callable ``conformance(*parts) -> path`` (see :func:`conformance_path`)."""
    return conformance_path
