"""Data sets and loaders.

Small data sets (CIFAR-10/100, sklearn digits) are read straight from their on-disk format into
one uint8 tensor and served by :class:`TensorLoader`, which keeps the data on the training device
and does shuffling and augmentation as batched tensor ops (no worker processes, no PIL).
ImageNet is served from image folders by torchvision's ``ImageFolder`` + ``DataLoader``, wrapped
in :class:`FolderLoader` so the training loop sees the same interface.

Every problem the user can fix (missing or corrupt files, unknown names) raises
:class:`~utils.errors.DataError` with a one-line message naming the problem, the path and the fix.
Nothing is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from utils.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "list_datasets",
    "get_dataset_info",
    "load_in_memory",
    "TensorLoader",
    "FolderLoader",
    "build_loaders",
    "normalize_images",
    "load_split_tensors",
    "sample_indices",
    "Normalization",
    "named_normalization",
]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set that models and loaders need."""

    name: str  # canonical: 'cifar10' | 'cifar100' | 'imagenet' | 'digits'
    num_classes: int
    mean: tuple  # per-channel, in [0, 1] pixel units
    std: tuple
    image_size: int  # 32 or 224
    hflip: bool  # horizontal-flip augmentation
    in_memory: bool  # True: one uint8 tensor; False: image folders


# Digits are read as the public code read them (the conformance material of docs/algorithms.md
# section 10): written in CIFAR-10 format and loaded as CIFAR-10, i.e. CIFAR-10's normalization
# and augmentation (random crop and horizontal flip), so a checkpoint the public code trained on
# them evaluates here exactly as it did there.
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.247, 0.243, 0.261)

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, _CIFAR10_MEAN, _CIFAR10_STD, 32, True, True),
    "cifar100": DatasetInfo("cifar100", 100, (0.5071, 0.4867, 0.4408), (0.267, 0.256, 0.276),
                            32, True, True),
    "imagenet": DatasetInfo("imagenet", 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            224, True, False),
    "digits": DatasetInfo("digits", 10, _CIFAR10_MEAN, _CIFAR10_STD, 32, True, True),
}


# The normalizations other code bases evaluate and attack with (docs/algorithms.md section 10):
# "dataset" is each data set's own above (the OCM repository's); "bfa" the BFA repository's
# main.py (CIFAR-10: mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255), which its
# checkpoints expect. Digits are read as CIFAR-10 (above), so they take CIFAR-10's values.
_BFA_CIFAR10 = (tuple(x / 255 for x in (125.3, 123.0, 113.9)),
                tuple(x / 255 for x in (63.0, 62.1, 66.7)))
NORMALIZATIONS: dict[str, dict[str, tuple[tuple, tuple]]] = {
    "bfa": {"cifar10": _BFA_CIFAR10, "digits": _BFA_CIFAR10,
            "cifar100": (tuple(x / 255 for x in (129.3, 124.1, 112.4)),
                         tuple(x / 255 for x in (68.2, 65.4, 70.4))),
            "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
}


@dataclass(frozen=True)
class Normalization:
    """How pixels become a model's inputs: ``(x/255 - mean) / std``, and whose rule it is
    (``checkpoint``: stored in ours; ``dataset``: the data set's own; ``bfa``: the BFA
    repository's)."""

    name: str
    mean: tuple
    std: tuple

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}


def named_normalization(info: DatasetInfo, name: str) -> Normalization:
    """The normalization ``name`` (``dataset`` or a key of :data:`NORMALIZATIONS`) for ``info``;
    ValueError when that code base has none for the data set."""
    if name == "dataset":
        return Normalization("dataset", tuple(info.mean), tuple(info.std))
    table = NORMALIZATIONS.get(name)
    if table is None:
        raise ValueError(f"unknown normalization {name!r}; use dataset or "
                         f"{', '.join(NORMALIZATIONS)}")
    if info.name not in table:
        raise ValueError(f"the {name} normalization has no values for {info.name} (it has "
                         f"{', '.join(table)})")
    mean, std = table[info.name]
    return Normalization(name, tuple(mean), tuple(std))


def list_datasets() -> list[str]:
    """Canonical names of the supported data sets."""
    return list(DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    """Look up a data set by name, case-insensitively.

    Accepts the original repositories' spellings ('CIFAR10', 'ImageNet', ...) and the hyphenated
    'cifar-10' / 'cifar-100'.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    return DATASETS[key]


# --------------------------------------------------------------------------------------------
# In-memory data sets
# --------------------------------------------------------------------------------------------

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# name -> (folder, train files, test files, label key, pretty name, torchvision class name)
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", "CIFAR-10", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR-100",
                 "CIFAR100"),
}


def _one_line(text: object) -> str:
    """Collapse an arbitrary message (e.g. a wrapped exception) onto one line."""
    return " ".join(str(text).split())


def load_in_memory(name: str, data_dir: str | os.PathLike | None,
                   download: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load a small data set as ``(train_x, train_y, test_x, test_y)`` CPU tensors.

    Images are uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]``. CIFAR is read from the python
    pickle files; ``download=True`` fetches them with torchvision when missing. Digits come
    bundled with scikit-learn (``data_dir`` is ignored).
    """
    info = get_dataset_info(name)
    if info.name in _CIFAR_LAYOUT:
        if data_dir is None:
            raise DataError(f"{info.name}: no data directory given; pass --data_dir pointing at "
                            f"the folder that holds {_CIFAR_LAYOUT[info.name][0]}/")
        out = _load_cifar(info, os.fspath(data_dir), download)
    elif info.name == "digits":
        out = _load_digits()
    else:
        raise DataError(f"{info.name} is not an in-memory data set (it is read from image "
                        f"folders); use build_loaders() for it")
    logger.info("loaded %s: %d train / %d test images", info.name, len(out[1]), len(out[3]))
    return out


def _find_cifar_dir(data_dir: str, folder: str, files: list[str]) -> tuple[str | None, str]:
    """Return (directory holding all ``files`` or None, the path reported when missing).

    Accepts ``data_dir`` being the parent of ``folder``, ``folder`` itself, or the OCM
    repository's layout ``<data_dir>/CIFAR10/<folder>`` (``CIFAR100`` likewise).
    """
    original = "CIFAR10" if folder.startswith("cifar-10-") else "CIFAR100"
    for cand in (os.path.join(data_dir, folder), data_dir,
                 os.path.join(data_dir, original, folder)):
        if all(os.path.isfile(os.path.join(cand, f)) for f in files):
            return cand, cand
    # Report the first missing file, preferring the directly-given folder if it looks right.
    cand = data_dir if os.path.basename(os.path.normpath(data_dir)) == folder \
        else os.path.join(data_dir, folder)
    missing = next(f for f in files if not os.path.isfile(os.path.join(cand, f)))
    return None, os.path.join(cand, missing)


def _load_cifar(info: DatasetInfo, data_dir: str, download: bool):
    folder, train_files, test_files, label_key, pretty, tv_name = _CIFAR_LAYOUT[info.name]
    files = train_files + test_files
    root, missing = _find_cifar_dir(data_dir, folder, files)
    if root is None and download:
        logger.info("%s not found under %s; downloading", pretty, data_dir)
        try:
            cls = getattr(torchvision.datasets, tv_name)
            cls(root=data_dir, train=True, download=True)
            cls(root=data_dir, train=False, download=True)
        except Exception as e:  # offline, disk full, bad checksum, ...
            raise DataError(
                f"{pretty} download into {data_dir} failed ({type(e).__name__}: {_one_line(e)}); "
                f"check the internet connection, or download the python-pickle version from "
                f"{_CIFAR_URL} and extract it so that {missing} exists") from e
        root, missing = _find_cifar_dir(data_dir, folder, files)
    if root is None:
        raise DataError(
            f"{pretty} not found: expected {missing}; download it with --download (needs "
            f"internet) or put the python-pickle version from {_CIFAR_URL} there")

    def read(names):
        parts = [_read_cifar_pickle(os.path.join(root, f), label_key, info.num_classes, pretty)
                 for f in names]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    return (*read(train_files), *read(test_files))


# What a CIFAR pickle may name: numpy's array reconstruction (the official files are Python 2
# pickles of dicts of bytes, lists and arrays); anything else is refused, so that reading a
# data file never runs code from it.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                  ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("_codecs", "encode")}  # bytes in protocol-2 pickles written by Python 3


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never "
                                         f"holds (refused: loading runs no code of a file)")
        return super().find_class(module, name)


def _read_cifar_pickle(path: str, label_key: bytes, num_classes: int, pretty: str):
    """Read and validate one CIFAR pickle: returns (uint8 [n, 3072], int64 [n]).

    The files are pickles, read with an unpickler that allows only numpy's array types (no
    code of the file runs); any failure to decode them or unexpected content becomes a
    DataError naming the file.
    """
    fix = f"delete it and re-download (--download) or re-extract the archive from {_CIFAR_URL}"
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # EOFError, UnpicklingError, OSError, ...
        raise DataError(f"{pretty} file {path} is unreadable or truncated "
                        f"({type(e).__name__}: {_one_line(e)}); {fix}") from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d.keys()) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{pretty} file {path} has unexpected content (expected a dict with "
                        f"{b'data'!r} and {label_key!r}, got {keys}); {fix}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{pretty} file {path} has data of shape {data.shape} dtype {data.dtype}, "
                        f"expected uint8 [N, 3072]; {fix}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{pretty} file {path} has {labels.shape} labels for {len(data)} images; "
                        f"{fix}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{pretty} file {path} has labels outside 0..{num_classes - 1}; {fix}")
    return data, labels.astype(np.int64)


def _load_digits():
    """sklearn's 8x8 digits as uint8 [N,3,32,32], laid out exactly as the public code read them.

    Each 8x8 image is scaled to 0..255 (``round(v * 255 / 16)``), upscaled to 32x32 by nearest
    neighbour (each pixel a 4x4 block) and replicated to RGB. Split inside each class with one
    ``numpy.random.RandomState(0)``: per class in label order a permutation of its indices, the
    first ``round(0.2 n)`` to the test set and the rest to the training set; then the training
    and the test set are each shuffled by a further permutation of the same stream (train
    first). 1438 train / 359 test images, in the order of the CIFAR-10 files of the conformance
    material (docs/algorithms.md section 10), so test-set positions mean the same images.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * 255.0 / 16.0).astype(np.uint8)  # [N, 8, 8]
    pixels = pixels.repeat(4, axis=1).repeat(4, axis=2)  # nearest-neighbour 32x32
    x = torch.from_numpy(np.ascontiguousarray(np.stack([pixels] * 3, axis=1)))
    y = torch.from_numpy(d.target.astype(np.int64))
    rs = np.random.RandomState(0)
    train_idx, test_idx = [], []
    for c in range(10):
        members = rs.permutation(np.flatnonzero(d.target == c))
        n_test = int(round(0.2 * len(members)))
        test_idx.extend(members[:n_test])
        train_idx.extend(members[n_test:])
    train_idx = np.asarray(train_idx)[rs.permutation(len(train_idx))]
    test_idx = np.asarray(test_idx)[rs.permutation(len(test_idx))]
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return x[tr], y[tr], x[te], y[te]


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator whose stream is a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


class TensorLoader:
    """CIFAR-sized data held as one uint8 tensor on the training device; shuffling, random crop
    (zero padding in pixel space, i.e. before normalization, like torchvision
    ``RandomCrop(32, padding=4)``) and horizontal flip are batched tensor ops on that device
    (airbench-style), then normalization.

    Random draws come from a CPU generator seeded from ``(seed, epoch)`` (see :meth:`set_epoch`)
    and are moved to the device, so batches are identical on CPU and CUDA and a resumed run sees
    exactly the same batches. ``train=False``: fixed order, no augmentation, every sample
    (``drop_last`` is ignored).

    Several processes (``world_size > 1``, rank ``rank``, see :mod:`utils.distributed`):
    ``batch_size`` is the *global* batch. Every process draws the same epoch permutation and
    augmentation, and takes its own contiguous part of each global batch (``batch_size /
    world_size`` samples; the last, smaller batch is split as evenly as possible), so the
    ranks' batches of a step together are the single-process batch of that step and an epoch
    covers each sample once. :meth:`batch_weight` rescales a rank's mean loss so that the
    average over the ranks (what DistributedDataParallel computes) is the mean over the global
    batch. A last batch with fewer samples than processes is dropped. Test mode: each rank
    iterates over its contiguous share of the samples (counts are summed afterwards, see
    :func:`utils.training.evaluate`).

    ``memory_format=torch.channels_last`` hands out channels-last batches (``--channels-last``).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean, std, device,
                 train: bool = False, crop_padding: int = 4, hflip: bool = True,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 memory_format: torch.memory_format = torch.contiguous_format):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images must be uint8 [N,C,H,W], got {images.dtype} "
                            f"{tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N] with N={len(images)}, got {tuple(labels.shape)}")
        if int(batch_size) < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}; pass a positive "
                            f"-b/--batch")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        _check_rank(rank, world_size)
        if train and int(batch_size) % int(world_size):
            raise DataError(f"-b/--batch {batch_size} is the global batch and must be divisible "
                            f"by the number of processes ({world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.memory_format = memory_format
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        n, bs = len(labels), self.batch_size
        # a last batch smaller than the number of processes would leave some rank empty
        self.drop_last = (bool(drop_last) or 0 < n % bs < self.world_size) and self.train
        self.seed = int(seed)
        self.epoch = 0
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)

    @property
    def dataset_size(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        """Number of batches (steps) of an epoch, the same on every rank."""
        if not self.train:
            return math.ceil(len(range(*self._test_shard())) / self.batch_size)
        n, b = self.dataset_size, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def _test_shard(self) -> tuple[int, int]:
        n, r, w = self.dataset_size, self.rank, self.world_size
        return r * n // w, (r + 1) * n // w

    def _train_shard(self, step: int) -> tuple[int, int, int]:
        """``(start, end, global_size)``: this rank's positions in the epoch permutation for
        ``step``, and the size of the global batch they belong to."""
        lo = step * self.batch_size
        m = min(self.batch_size, self.dataset_size - lo)
        r, w = self.rank, self.world_size
        return lo + r * m // w, lo + (r + 1) * m // w, m

    def batch_weight(self, step: int) -> float:
        """Factor for this rank's mean loss of ``step``: ``local size * world_size / global
        size`` (1 for a single process, and whenever the global batch splits evenly)."""
        if self.world_size == 1 or not self.train:
            return 1.0
        start, end, m = self._train_shard(step)
        return (end - start) * self.world_size / m

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle/augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def normalize(self, batch: Tensor) -> Tensor:
        """uint8 pixels [B,C,H,W] -> float32 ``(x/255 - mean) / std`` on this loader's device."""
        if batch.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 pixels, got {batch.dtype}")
        x = batch.to(self.device, non_blocking=True).float().div_(255.0)
        x = x.sub_(self.mean).div_(self.std)
        if self.memory_format is not torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        return x

    def _augment(self, x: Tensor, offsets: Tensor, flips: Tensor | None) -> Tensor:
        """Zero-pad by ``crop_padding``, take each sample's HxW window at ``offsets`` [B,2]
        (row, col) and mirror it where ``flips`` [B] is set: one gather over the flattened
        padded images, with one index per output pixel shared by the channels (on a CPU about
        10x faster than 4-D advanced indexing followed by a flip)."""
        p = self.crop_padding
        b, c, h, w = x.shape
        padded = F.pad(x, (p, p, p, p)) if p else x
        j = torch.arange(w, device=x.device)
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # [B,H]
        if flips is None:
            cols = offsets[:, 1:2] + j  # [B,W]
        else:  # a mirrored window reads its columns right to left
            cols = offsets[:, 1:2] + torch.where(flips.view(b, 1), w - 1 - j, j)
        flat = (rows.view(b, h, 1) * (w + 2 * p) + cols.view(b, 1, w)).view(b, 1, h * w)
        return torch.gather(padded.reshape(b, c, -1), 2, flat.expand(b, c, h * w)).view(b, c, h, w)

    def __iter__(self):
        n, bs = self.dataset_size, self.batch_size
        if not self.train:
            lo, hi = self._test_shard()
            for i in range(lo, hi, bs):
                j = min(i + bs, hi)
                yield self.normalize(self.images[i:j]), self.labels[i:j]
            return
        g = _epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(n, generator=g).to(self.device)
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        offsets, flips = offsets.to(self.device), flips.to(self.device)
        for k in range(len(self)):
            start, end, _ = self._train_shard(k)
            sl = slice(start, end)
            idx = perm[sl]
            x = self.images[idx]
            if self.crop_padding > 0 or self.hflip:
                x = self._augment(x, offsets[sl], flips[sl] if self.hflip else None)
            yield self.normalize(x), self.labels[idx]


class FolderLoader:
    """A torch ``DataLoader`` with TensorLoader's interface: batches come out already on
    ``device``, and ``set_epoch`` makes the shuffle order (and, with workers, the augmentation
    seeds) a function of ``(seed, epoch)``.

    Several processes (``world_size > 1``): ``batch_size`` is the global batch; in training
    each rank reads ``batch_size / world_size`` images per step through a
    ``DistributedSampler`` (a shuffle of ``(seed, epoch)``, padded by repeating a few images so
    that every rank has the same number of batches); in test mode each rank reads its
    contiguous share of the images, without padding.
    """

    def __init__(self, dataset, batch_size: int, device, train: bool = False, workers: int = 4,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 memory_format: torch.memory_format = torch.contiguous_format):
        if int(batch_size) < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}; pass a positive "
                            f"-b/--batch")
        _check_rank(rank, world_size)
        if train and int(batch_size) % int(world_size):
            raise DataError(f"-b/--batch {batch_size} is the global batch and must be divisible "
                            f"by the number of processes ({world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.memory_format = memory_format
        self.dataset = dataset
        self.device = torch.device(device)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self._order_gen = torch.Generator()
        self._worker_gen = torch.Generator()
        if self.world_size > 1 and self.train:
            sampler = torch.utils.data.distributed.DistributedSampler(
                dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                seed=self.seed)
        elif self.world_size > 1:
            n = len(dataset)
            sampler = range(self.rank * n // self.world_size,
                            (self.rank + 1) * n // self.world_size)
        elif self.train:
            sampler = torch.utils.data.RandomSampler(dataset, generator=self._order_gen)
        else:
            sampler = torch.utils.data.SequentialSampler(dataset)
        self.sampler = sampler
        per_rank = int(batch_size) // self.world_size if self.train else int(batch_size)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, num_workers=int(workers),
            pin_memory=self.device.type == "cuda", drop_last=bool(drop_last) and self.train,
            generator=self._worker_gen)
        self.set_epoch(0)

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the order and worker generators for ``epoch``."""
        self.epoch = int(epoch)
        self._order_gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        self._worker_gen.manual_seed(self.seed * 1_000_003 + self.epoch + 1 + 7919 * self.rank)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.memory_format is not torch.contiguous_format:
                x = x.contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)


def _check_rank(rank: int, world_size: int) -> None:
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise ValueError(f"rank {rank} of world size {world_size} is impossible")


def _find_imagenet_dirs(data_dir: str) -> tuple[str, str]:
    """Locate (train, val) folders; accepts ``<d>/train`` + ``<d>/val`` or ``<d>/validation``,
    and the original repository's ``<d>/imagenet/train`` + ``<d>/imagenet/validation``."""
    looked = []
    for root in (data_dir, os.path.join(data_dir, "imagenet")):
        train = os.path.join(root, "train")
        vals = [os.path.join(root, "val"), os.path.join(root, "validation")]
        looked += [train, *vals]
        val = next((v for v in vals if os.path.isdir(v)), None)
        if os.path.isdir(train) and val is not None:
            return train, val
    raise DataError(
        f"ImageNet not found: looked for {', '.join(looked)}; expected <data_dir>/train and "
        f"<data_dir>/val (or validation), each with one sub-folder of images per class "
        f"(e.g. train/n01440764/*.JPEG); point --data_dir at that folder")


def _image_folder(path: str, transform):
    try:
        return torchvision.datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"ImageNet folder {path} is unusable ({_one_line(e)}); it must hold one "
                        f"sub-folder of images per class (e.g. {path}/n01440764/*.JPEG)") from e


def build_loaders(name: str, data_dir, batch_size: int, device, workers: int = 4,
                  download: bool = False, seed: int = 0, test_batch_size: int | None = None,
                  rank: int = 0, world_size: int = 1,
                  memory_format: torch.memory_format = torch.contiguous_format,
                  normalization: Normalization | None = None):
    """Build ``(train_loader, test_loader, info)`` for a data set.

    In-memory data sets give two :class:`TensorLoader` (train: shuffled and augmented; test:
    in order). ImageNet gives two :class:`FolderLoader` over ``ImageFolder``. ``test_batch_size``
    defaults to ``max(batch_size, 256)``. With ``world_size > 1`` (torchrun) ``batch_size`` is
    the global batch and each loader serves rank ``rank``'s share (see the loaders).
    ``normalization`` replaces the data set's own (e.g. a checkpoint's, or the BFA
    repository's for its checkpoints).
    """
    dist_kw = {"rank": rank, "world_size": world_size, "memory_format": memory_format}
    info = get_dataset_info(name)
    mean, std = ((normalization.mean, normalization.std) if normalization is not None
                 else (info.mean, info.std))
    if test_batch_size is None:
        test_batch_size = max(int(batch_size), 256)
    device = torch.device(device)
    if info.in_memory:
        xtr, ytr, xte, yte = load_in_memory(info.name, data_dir, download=download)
        # A last batch of one sample (per process) would break BatchNorm in training: drop it.
        train = TensorLoader(xtr, ytr, batch_size, mean, std, device, train=True,
                             hflip=info.hflip, seed=seed,
                             drop_last=0 < len(ytr) % batch_size < 2 * world_size, **dist_kw)
        test = TensorLoader(xte, yte, test_batch_size, mean, std, device, train=False,
                            **dist_kw)
        return train, test, info

    from torchvision import transforms as T

    if data_dir is None:
        raise DataError("imagenet: no data directory given; pass --data_dir pointing at the "
                        "folder that holds train/ and val/")
    train_dir, val_dir = _find_imagenet_dirs(os.fspath(data_dir))
    norm = T.Normalize(mean, std)
    train_ds = _image_folder(train_dir, T.Compose([
        T.RandomResizedCrop(info.image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    val_ds = _image_folder(val_dir, T.Compose([
        T.Resize(256), T.CenterCrop(info.image_size), T.ToTensor(), norm]))
    if train_ds.classes != val_ds.classes:
        raise DataError(f"ImageNet class folders differ between {train_dir} "
                        f"({len(train_ds.classes)} classes) and {val_dir} "
                        f"({len(val_ds.classes)} classes); both need the same class sub-folders")
    if len(train_ds.classes) != info.num_classes:
        logger.warning("ImageNet folders in %s have %d classes, expected %d",
                       train_dir, len(train_ds.classes), info.num_classes)
    logger.info("ImageNet: %d train images in %s, %d val images in %s",
                len(train_ds), train_dir, len(val_ds), val_dir)
    train = FolderLoader(train_ds, batch_size, device, train=True, workers=workers, seed=seed,
                         **dist_kw)
    test = FolderLoader(val_ds, test_batch_size, device, train=False, workers=workers, seed=seed,
                        **dist_kw)
    return train, test, info


# --------------------------------------------------------------------------------------------
# Whole splits as tensors (for the attacks)
# --------------------------------------------------------------------------------------------

def normalize_images(images: Tensor, mean, std) -> Tensor:
    """uint8 ``[B,C,H,W]`` pixels to float32 ``(x/255 - mean) / std`` on the images' device."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def sample_indices(size: int, max_images: int | None, seed: int) -> list[int] | None:
    """The positions :func:`load_split_tensors` takes with ``max_images`` and ``seed`` (None:
    every image, in order)."""
    if max_images is None or max_images >= size:
        return None
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:max_images].tolist()


def _check_indices(indices, size: int, split: str) -> None:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise DataError(f"index {bad[0]} is outside the {split} split (0..{size - 1})")


def load_split_tensors(name: str, data_dir, split: str = "test", download: bool = False,
                       workers: int = 4, max_images: int | None = None,
                       seed: int = 0, indices: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """A whole split as ``(uint8 images [N,3,H,W], int64 labels)`` CPU tensors, read once.

    The attacks keep these on their device and normalize slices on the fly. ImageNet images get
    the test transform (Resize(256), CenterCrop(224)) and are decoded once by ``workers``
    processes. ``max_images`` takes a seeded random subset (e.g. BFA's attack batch drawn from
    the training split; its positions: :func:`sample_indices`) without decoding the rest;
    ``indices`` takes exactly those positions, in that order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    info = get_dataset_info(name)
    if info.in_memory:
        xtr, ytr, xte, yte = load_in_memory(info.name, data_dir, download=download)
        x, y = (xtr, ytr) if split == "train" else (xte, yte)
        pick = indices
        if pick is None:
            pick = sample_indices(len(y), max_images, seed)
        else:
            _check_indices(pick, len(y), split)
        if pick is not None:
            pick = torch.as_tensor(pick, dtype=torch.int64)
            x, y = x[pick], y[pick]
        return x, y
    from torchvision import transforms as T

    if data_dir is None:
        raise DataError("imagenet: no data directory given; pass --data_dir pointing at the "
                        "folder that holds train/ and val/")
    train_dir, val_dir = _find_imagenet_dirs(os.fspath(data_dir))
    dataset = _image_folder(train_dir if split == "train" else val_dir, T.Compose([
        T.Resize(256), T.CenterCrop(info.image_size), T.PILToTensor()]))
    if indices is None:
        indices = sample_indices(len(dataset), max_images, seed) or list(range(len(dataset)))
    else:
        _check_indices(indices, len(dataset), split)
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=64, num_workers=int(workers))
    images = torch.empty((len(indices), 3, info.image_size, info.image_size), dtype=torch.uint8)
    labels = torch.empty(len(indices), dtype=torch.int64)
    pos = 0
    for x, y in loader:
        images[pos:pos + len(y)] = x
        labels[pos:pos + len(y)] = y
        pos += len(y)
    return images, labels


# --------------------------------------------------------------------------------------------
# Attack batches as files (attack_bfa.py --attack-batch, and the batch each run saves)
# --------------------------------------------------------------------------------------------

def write_attack_batch(path: str, images: Tensor, labels: Tensor,
                       indices: list[int] | None = None) -> None:
    """Save an attack batch as the BFA repository's run keeps one: ``{"data": images (uint8
    pixels or normalized float inputs) [N, C, H, W], "target": int64 labels [N]}``, plus the
    training-split ``indices`` when known; written atomically (a crash leaves no half file)."""
    state = {"data": images.detach().cpu(), "target": labels.detach().cpu().long()}
    if indices is not None:
        state["indices"] = torch.as_tensor(indices, dtype=torch.int64)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_attack_batch(path: str, image_size: int | None = None
                      ) -> tuple[Tensor, Tensor, list[int] | None]:
    """``(images, labels, indices or None)`` of an attack-batch file (:func:`write_attack_batch`,
    or the public run's ``attack_batch_seed2.pt``). Only tensors are read (no code runs);
    anything else raises DataError with one line saying what is wrong."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file it cannot read
        raise DataError(f"{path} is not an attack-batch file ({type(e).__name__}: "
                        f"{_one_line(e)}); expected a torch file with 'data' and 'target'") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(state.get(k))
                                              for k in ("data", "target")):
        raise DataError(f"{path}: an attack-batch file holds a dict with the tensors 'data' "
                        f"[N, C, H, W] and 'target' [N]")
    images, labels = state["data"], state["target"]
    if images.dim() != 4 or len(images) == 0 or images.dtype not in (torch.uint8,
                                                                       torch.float32):
        raise DataError(f"{path}: 'data' must be uint8 pixels or float32 inputs [N, C, H, W] "
                        f"with N >= 1, got {images.dtype} {tuple(images.shape)}")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise DataError(f"{path}: images of {tuple(images.shape[2:])} pixels, the data set's "
                        f"are {image_size}x{image_size}")
    if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise DataError(f"{path}: 'target' must be {len(images)} integer labels, got "
                        f"{labels.dtype} {tuple(labels.shape)}")
    indices = state.get("indices")
    return images, labels.long(), (indices.tolist() if torch.is_tensor(indices) else None)


def read_index_list(path: str) -> list[int]:
    """A JSON list of non-negative integers (split positions); DataError naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is not a JSON list of indices ({type(e).__name__}: "
                        f"{_one_line(e)})") from None
    if not isinstance(values, list) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise DataError(f"{path}: expected a non-empty JSON list of non-negative integers, e.g. "
                        f"[12, 7, 301]")
    return values


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (how records name a pinned input)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

