import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (run in CI; skip locally with -m 'not slow')")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and two crawl when the cores are shared."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# The two public checkpoints of the conformance folder (trained by the public code on digits,
# 98.9 % and 98.3 %) and the model flags that describe them.
PUBLIC_MODELS = {
    "vanilla": dict(arch="resnet20_quan", num_classes=10, bits=8),
    "ocm16": dict(arch="resnet20_quan", num_classes=10, bits=8, ocm=True, code_length=16,
                  output_act="tanh"),
}


@pytest.fixture(scope="session")
def digits_checkpoints(tmp_path_factory):
    """The public code's vanilla and OCM16 ResNet-20 digits models, rewritten as this tool's
    self-describing checkpoints (``dataset`` digits: the same images as the public code's
    CIFAR-10-format copy). Well-trained models the attacks behave on as in the papers, and no
    training time in the suite (main.py's training is tested on its own)."""
    from models.factory import ModelConfig
    from utils.checkpoint import (load_checkpoint, make_checkpoint, model_from_checkpoint,
                                  save_checkpoint)
    from utils.data import get_dataset_info

    info = get_dataset_info("digits")
    root = tmp_path_factory.mktemp("digits_models")
    paths = {}
    for name, fields in PUBLIC_MODELS.items():
        public = load_checkpoint(conformance_path(name, "model_best.pth.tar"))
        config = ModelConfig(**fields).validate()
        model, output = model_from_checkpoint(public, config)
        out = root / name
        out.mkdir()
        paths[name] = str(out / "model_best.pth.tar")
        save_checkpoint(make_checkpoint(model, config, output, "digits", info.mean, info.std,
                                        epoch=public["epoch"], best_acc=public["best_acc1"]),
                        paths[name])
    return paths


@pytest.fixture(scope="module")
def digits_test():
    """The digits test split as an :class:`attacks.common.EvalSet` on the CPU (one per module)."""
    from attacks.common import EvalSet
    from utils.data import get_dataset_info, load_split_tensors

    images, labels = load_split_tensors("digits", None, "test")
    info = get_dataset_info("digits")
    return EvalSet(images, labels, info.mean, info.std, "cpu")


def attacked_model(path):
    """``(model, output)`` of a checkpoint (e.g. one of :func:`digits_checkpoints`), in eval and
    integer mode, ready to be attacked (tests: ``from conftest import attacked_model``)."""
    from models import to_integer
    from utils.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    model, output = model_from_checkpoint(ckpt, checkpoint_config(ckpt))
    return to_integer(model.eval()), output


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
