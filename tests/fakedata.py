"""Tiny data sets written in the real on-disk formats, shared by the tests."""

import pickle

import numpy as np

N_PER_FILE = 20


def _cifar_images(n, start):
    """Deterministic distinct uint8 images [n, 3072], row-major CHW."""
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root, n=N_PER_FILE):
    """Write cifar-10-batches-py/ under root; return (train_x, train_y, test_x, test_y) numpy."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = _cifar_images(n, i)
        y = [(j + i) % 10 for j in range(n)]
        _dump(d / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)]})
        xs.append(x)
        ys += y
    xt = _cifar_images(n, 99)
    yt = [(3 * j) % 10 for j in range(n)]
    _dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt,
                             b"filenames": [f"t_{j}.png".encode() for j in range(n)]})
    _dump(d / "batches.meta", {b"num_cases_per_batch": n, b"label_names": [b"a"] * 10,
                               b"num_vis": 3072})
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def make_cifar100(root, n=N_PER_FILE):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = []
    for split, seed in (("train", 1), ("test", 2)):
        x = _cifar_images(n, seed)
        fine = [(7 * j + seed) % 100 for j in range(n)]
        _dump(d / split, {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
                          b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                          b"data": x})
        out += [x, np.array(fine)]
    _dump(d / "meta", {b"fine_label_names": [b"x"] * 100, b"coarse_label_names": [b"y"] * 20})
    return out
