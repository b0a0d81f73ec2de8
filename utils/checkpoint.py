"""Self-contained, atomically written checkpoints (and reading the published ones).

A checkpoint written here is a dict with ``format`` = :data:`FORMAT`, ``model_config`` (the
:class:`models.factory.ModelConfig` as a dict), ``defenses`` (each defense of the model as
:meth:`defenses.Defense.to_dict` gives it), ``codebook`` (OCM) , ``dataset``,
``normalization`` (mean, std), ``state_dict`` and, for training checkpoints, ``epoch``
(epochs completed), ``optimizer``, ``best_acc`` and ``args``, and ``tensor_digest`` (a sha256
per state-dict tensor, checked on load). Published checkpoints (a dict with ``state_dict``
saved from ``nn.DataParallel``) are read too; their model description then comes from the
command-line flags.

Files from elsewhere: loading runs no code of the file unless asked (``--trust-checkpoint``):
torch's weights-only unpickler builds tensors and plain values, plus the few types the
published checkpoints need, allowed by name (:func:`published_globals`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
import types

import torch

from defenses import Defense, config_defenses, defense_from_dict, switch_defenses
from models.factory import ModelConfig, build_model
from models.loading import is_bfa_cifar_resnet, load_weights, strip_prefix

from .data import NORMALIZATIONS, Normalization, named_normalization
from .errors import CheckpointError

FORMAT = "bitflip-ocm-checkpoint/1"
DIGEST_ALGORITHM = "per-tensor sha256 over name, dtype, shape, bytes"
TRUST_FLAG = "--trust-checkpoint"
NO_VERIFY_FLAG = "--no-verify-checkpoint"
log = logging.getLogger(__name__)


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically: a crash or Ctrl-C leaves the old file intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth.tar", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu", trust: bool = False,
                    verify: bool = True) -> dict:
    """Read a checkpoint file; a missing, truncated or foreign file raises CheckpointError.

    Nothing in the file runs by default: it is unpickled with ``weights_only=True``, which
    builds only tensors, plain values and the types :func:`published_globals` names (what the
    OCM and BFA repositories' files hold); any other type is refused, naming it and
    ``--trust-checkpoint``. ``trust`` unpickles such a file fully (its code runs: only for
    files one trusts). ``verify``: a stored ``tensor_digest`` must match the tensors
    (:func:`verify_tensor_digest`); ``--no-verify-checkpoint`` turns it off."""
    if not path:
        raise CheckpointError("no checkpoint path given")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (give the path of a "
                              f"checkpoint.pth.tar or model_best.pth.tar)")
    obj = _unpickle(path, map_location, trust)
    if isinstance(obj, dict) and "state_dict" not in obj and _looks_like_state_dict(obj):
        obj = {"state_dict": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a model checkpoint (expected a dict with a "
                              f"'state_dict' entry)")
    if verify:
        verify_tensor_digest(obj, path)
    return obj


def _unpickle(path: str, map_location, trust: bool):
    """The object in ``path``: a weights-only unpickle allowing :func:`published_globals`;
    a file that needs more is refused (one line) unless ``trust``."""
    try:
        with torch.serialization.safe_globals(published_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower().replace(" ", "_"):
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                                  f"({_first_line(e)})") from None
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} is refused: it pickles {_refused_type(str(e))}, which "
                f"a load that runs none of the file's code does not build (allowed: tensors, "
                f"plain values, numpy arrays, argparse.Namespace, the BFA repository's "
                f"utils.RecorderMeter); {TRUST_FLAG} loads it anyway and runs the file's "
                f"code: only for files you trust") from None
    except Exception as e:  # torch raises many types for a damaged file; all mean unusable
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or not a "
                              f"PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    log.warning("%s: loading it fully (%s): its pickled code runs", path, TRUST_FLAG)
    return _load_full(path, map_location)


# What torch's weights-only unpickler says about the type it refused, in the forms it uses.
_REFUSED = (re.compile(r"GLOBAL (\S+) was not an allowed global"),
            re.compile(r"unsupported GLOBAL (\S+) whose module"),
            re.compile(r"unrecognized function (.+?)(?: which belongs|$)", re.M),
            re.compile(r"but got (<class '[^']+'>)"))


def _refused_type(message: str) -> str:
    """The type or function named in torch's weights-only refusal (else its own words)."""
    for pattern in _REFUSED:
        found = pattern.search(message)
        if found:
            return found.group(1).strip()
    detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
    return f"something it does not allow ({detail[0] if detail else 'no detail'})"


class RecorderMeter:
    """Inert stand-in for the BFA repository's ``utils.RecorderMeter`` (its ``main.py`` pickles
    one into every checkpoint): keeps the pickled state (epoch counts, numpy arrays of losses
    and accuracies) as attributes; no method of the original exists here."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def published_globals() -> list:
    """The types beyond torch's own that a weights-only load allows, by name: exactly what the
    published checkpoints pickle. The BFA repository's ``main.py``: its ``RecorderMeter`` (as
    :class:`RecorderMeter`) holding float32 numpy arrays (numpy's array reconstruction under
    its numpy 1.x and 2.x names, ``ndarray``, ``dtype`` and the float dtypes); the public
    training scripts' stored flags: ``argparse.Namespace``. Each only sets attributes or builds
    an array: none runs code of the file."""
    import argparse

    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [argparse.Namespace, np.ndarray, np.dtype,
            type(np.dtype(np.float32)), type(np.dtype(np.float64)),
            (_reconstruct, "numpy._core.multiarray._reconstruct"),
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (RecorderMeter, "utils.RecorderMeter")]


class _Foreign:
    """Stand-in for a class of another code base met while unpickling (its state is kept)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _ForeignUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (AttributeError, ImportError):
            return type(name, (_Foreign,), {"__module__": module})


_FOREIGN_PICKLE = types.SimpleNamespace(Unpickler=_ForeignUnpickler, load=pickle.load,
                                        __name__="pickle")


def torch_load_foreign(path, map_location="cpu"):
    """``torch.load`` of a file written by another code base (full unpickling: trusted files
    only); classes it cannot import (e.g. the BFA repository's ``utils.RecorderMeter``) become
    inert stand-ins instead of failing the whole load."""
    return torch.load(path, map_location=map_location, weights_only=False,
                      pickle_module=_FOREIGN_PICKLE)


def _load_full(path, map_location):
    try:
        return torch_load_foreign(path, map_location)
    except Exception as e:  # any failure here means the file is unusable
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from None


def _looks_like_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and all(
        torch.is_tensor(v) for v in obj.values())


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def is_self_describing(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT and "model_config" in ckpt


def checkpoint_config(ckpt: dict) -> ModelConfig | None:
    """The stored model config, or None for a checkpoint without metadata (published ones)."""
    return ModelConfig.from_dict(ckpt["model_config"]) if is_self_describing(ckpt) else None


def checkpoint_origin(ckpt: dict) -> str:
    """Which code wrote a checkpoint: ``ours`` (self-describing), ``bfa`` (the BFA repository's
    ``main.py``: it pickles its ``RecorderMeter`` as ``recorder``, and its CIFAR ResNet has its
    own layer names), else ``published`` (e.g. the OCM repository's)."""
    if is_self_describing(ckpt):
        return "ours"
    state = strip_prefix(ckpt.get("state_dict") or {})
    return "bfa" if "recorder" in ckpt or is_bfa_cifar_resnet(state) else "published"


def checkpoint_normalization(ckpt: dict, info, choice: str = "auto") -> Normalization:
    """The input normalization to evaluate and attack ``ckpt`` with (docs/algorithms.md section
    10). ``auto``: the one our checkpoints store; the BFA repository's for its checkpoints; else
    the data set's own (the OCM repository's). ``dataset`` / ``bfa``: that one (ValueError when
    it has no values for the data set)."""
    if choice == "auto":
        stored = ckpt.get("normalization")
        if isinstance(stored, dict) and stored:
            return Normalization("checkpoint", tuple(stored.get("mean", info.mean)),
                                 tuple(stored.get("std", info.std)))
        choice = "bfa" if checkpoint_origin(ckpt) == "bfa" and info.name in NORMALIZATIONS["bfa"] \
            else "dataset"
    return named_normalization(info, choice)


def model_from_checkpoint(ckpt: dict, config: ModelConfig, path: str = "checkpoint",
                          skip_final: bool = False):
    """Build ``config``'s model and load the checkpoint's weights: ``(model, output)``.

    The checkpoint's stored codebook is used when present (unless ``skip_final``).
    """
    codebook = None if skip_final else ckpt.get("codebook")
    if config.layout == "v0":
        logging.getLogger(__name__).info(
            "%s: written by this tool before its models matched the public code (no 'layout' in "
            "its config): evaluated with the layout it was trained with (v0: zero channels on "
            "both sides of the option-A shortcut, adaptive pooling), exactly as before", path)
    try:
        model, output = build_model(config, codebook=codebook)
        load_weights(model, ckpt["state_dict"], skip_final=skip_final)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {str(e).strip(chr(39))}") from None
    return model, output


def make_checkpoint(model, config: ModelConfig, output, dataset: str, mean, std,
                    defenses: list[Defense] | None = None, **extra) -> dict:
    """The dict :func:`save_checkpoint` writes: everything needed to rebuild and resume.

    ``defenses``: every defense of the model (default: those its config describes, the OCM
    head), recorded so that the attack side rebuilds them (:func:`checkpoint_defenses`)."""
    if defenses is None:
        defenses = config_defenses(config)
    state = {
        "format": FORMAT,
        "model_config": config.to_dict(),
        "defenses": [d.to_dict() for d in defenses],
        "codebook": output.codebook.detach().cpu().clone() if config.ocm else None,
        "dataset": dataset,
        "normalization": {"mean": list(mean), "std": list(std)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": config.arch,
    }
    state.update(extra)
    state["tensor_digest"] = tensor_digest(state["state_dict"])
    return state


def tensor_digest(state_dict: dict) -> dict:
    """The ``tensor_digest`` entry of a checkpoint: the algorithm and, per tensor of
    ``state_dict``, a sha256 of its name, dtype, shape and bytes (per tensor, so that a
    mismatch names the tensor that changed)."""
    return {"algorithm": DIGEST_ALGORITHM,
            "tensors": {name: _tensor_sha256(name, t) for name, t in state_dict.items()
                        if torch.is_tensor(t)}}


def _tensor_sha256(name: str, tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def verify_tensor_digest(ckpt: dict, path: str) -> None:
    """Check the tensors of ``ckpt`` against its stored ``tensor_digest`` (none stored, as in
    older and published checkpoints: nothing to check). A changed, missing or added tensor
    raises CheckpointError naming the first one, in the state dict's order."""
    record = ckpt.get("tensor_digest")
    if record is None:
        return
    stored = record.get("tensors") if isinstance(record, dict) else None
    if not isinstance(stored, dict) or record.get("algorithm") != DIGEST_ALGORITHM:
        raise _digest_error(path, "its tensor_digest is not one this tool reads")
    state = ckpt["state_dict"]
    for name, digest in stored.items():
        value = state.get(name)
        if not torch.is_tensor(value):
            raise _digest_error(path, f"tensor {name} of its digest is missing")
        if _tensor_sha256(name, value) != digest:
            raise _digest_error(path, f"tensor {name} does not match the digest stored with "
                                      f"it (the file changed after it was written)")
    extra = [name for name, value in state.items() if torch.is_tensor(value)
             and name not in stored]
    if extra:
        raise _digest_error(path, f"tensor {extra[0]} is not in its digest")


def _digest_error(path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {problem}; {NO_VERIFY_FLAG} loads it without "
                           f"the check (for deliberate experiments)")


def checkpoint_defenses(ckpt: dict, config: ModelConfig | None = None) -> list[Defense]:
    """The defenses of a checkpoint's model, for the attack side to rebuild.

    A checkpoint that records ``"defenses"`` gives them. One without the record (ours written
    before it, the published OCM and BFA ones) derives them: the OCM head from the model config
    (``config``, else the stored one; a published checkpoint stores none, so pass the config
    its flags describe), piecewise clustering and mixup from its stored training flags
    (``args``: ``clustering`` with ``lambda_coeff``, ...) when present; else none.
    """
    if "defenses" in ckpt:
        return [_rebuilt(defense_from_dict, record, f"defense {record!r}")
                for record in ckpt["defenses"]]
    config = config if config is not None else checkpoint_config(ckpt)
    flags = _stored_flags(ckpt.get("args"))
    return config_defenses(config) + _rebuilt(switch_defenses, flags, "training flags")


def _rebuilt(build, record, what: str):
    """``build(record)``; a record this tool cannot build raises CheckpointError."""
    try:
        return build(record)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise CheckpointError(f"the checkpoint's {what} cannot be rebuilt: {message}") from None


def _stored_flags(args) -> dict:
    """A checkpoint's stored training flags as a dict: ours store a dict, the public scripts an
    ``argparse.Namespace`` (or, unpickled without its class, an object holding the same)."""
    if isinstance(args, dict):
        return args
    return dict(getattr(args, "__dict__", None) or {})
