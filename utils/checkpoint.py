"""Self-contained, atomically written checkpoints (and reading the published ones).

A checkpoint written here is a dict with ``format`` = :data:`FORMAT`, ``model_config`` (the
:class:`models.factory.ModelConfig` as a dict), ``defenses`` (each defense of the model as
:meth:`defenses.Defense.to_dict` gives it), ``codebook`` (OCM) , ``dataset``,
``normalization`` (mean, std), ``state_dict`` and, for training checkpoints, ``epoch``
(epochs completed), ``optimizer``, ``best_acc`` and ``args``. Published checkpoints (a dict
with ``state_dict`` saved from ``nn.DataParallel``) are read too; their model description
then comes from the command-line flags.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import types

import torch

from defenses import Defense, config_defenses, defense_from_dict, switch_defenses
from models.factory import ModelConfig, build_model
from models.loading import is_bfa_cifar_resnet, load_weights, strip_prefix

from .data import NORMALIZATIONS, Normalization, named_normalization
from .errors import CheckpointError

FORMAT = "bitflip-ocm-checkpoint/1"
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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint file; a missing, truncated or foreign file raises CheckpointError."""
    if not path:
        raise CheckpointError("no checkpoint path given")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (give the path of a "
                              f"checkpoint.pth.tar or model_best.pth.tar)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower().replace(" ", "_"):
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                                  f"({_first_line(e)})") from None
        # Published checkpoints may pickle objects outside torch's safe list (e.g. argparse
        # namespaces); they come from the papers' authors, so fall back to a full unpickle.
        log.warning("%s holds objects beyond tensors and plain types; loading it fully", path)
        obj = _load_full(path, map_location)
    except Exception as e:  # torch raises many types for a damaged file; all mean unusable
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or not a "
                              f"PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" not in obj and _looks_like_state_dict(obj):
        obj = {"state_dict": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a model checkpoint (expected a dict with a "
                              f"'state_dict' entry)")
    return obj


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
    return state


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
