"""Tests for utils/data.py on tiny fake data written in the real on-disk formats."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from utils import data as D
from utils.data import load_split_tensors, read_attack_batch, sample_indices, write_attack_batch
from utils.errors import DataError, UserError

from fakedata import N_PER_FILE, _cifar_images, _dump, make_cifar10, make_cifar100


# --------------------------------------------------------------------------------------------
# Fake data in the real formats
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    return root, make_cifar10(root)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling,canon", [
    ("cifar10", "cifar10"), ("CIFAR10", "cifar10"), ("cifar-10", "cifar10"),
    ("CIFAR100", "cifar100"), ("cifar-100", "cifar100"), ("ImageNet", "imagenet"),
    ("digits", "digits"), ("Digits", "digits")])
def test_dataset_names(spelling, canon):
    assert D.get_dataset_info(spelling).name == canon


def test_registry_contents():
    assert D.list_datasets() == ["cifar10", "cifar100", "imagenet", "digits"]
    c10 = D.get_dataset_info("cifar10")
    assert (c10.num_classes, c10.image_size, c10.hflip, c10.in_memory) == (10, 32, True, True)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.247, 0.243, 0.261)
    assert D.get_dataset_info("cifar100").num_classes == 100
    inet = D.get_dataset_info("imagenet")
    assert (inet.num_classes, inet.image_size, inet.in_memory) == (1000, 224, False)
    dg = D.get_dataset_info("digits")
    assert (dg.num_classes, dg.hflip, dg.in_memory) == (10, True, True)
    assert (dg.mean, dg.std) == (c10.mean, c10.std)  # read as CIFAR-10, as the public code did


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as e:
        D.get_dataset_info("mnist")
    msg = str(e.value)
    assert "mnist" in msg and "\n" not in msg
    for n in D.list_datasets():
        assert n in msg
    assert isinstance(e.value, UserError)


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------

def test_cifar10_roundtrip(cifar10_dir):
    root, (x, y, xt, yt) = cifar10_dir
    tx, ty, ex, ey = D.load_in_memory("cifar10", root)
    assert tx.dtype == torch.uint8 and tx.shape == (5 * N_PER_FILE, 3, 32, 32)
    assert ty.dtype == torch.int64 and ex.shape == (N_PER_FILE, 3, 32, 32)
    # row-major CHW: first 1024 bytes are the red plane, row by row
    for k in (0, 37, 99):
        assert torch.equal(tx[k, 0, 0], torch.from_numpy(x[k, :32]))
        assert torch.equal(tx[k, 1, 2, 5], torch.tensor(x[k, 1024 + 2 * 32 + 5]))
        assert torch.equal(tx[k], torch.from_numpy(x[k].reshape(3, 32, 32)))
    assert torch.equal(ty, torch.from_numpy(y))
    assert torch.equal(ex, torch.from_numpy(xt.reshape(-1, 3, 32, 32)))
    assert torch.equal(ey, torch.from_numpy(yt))


def test_cifar10_dir_pointing_at_batches_folder(cifar10_dir):
    root, (x, y, _, _) = cifar10_dir
    tx, ty, _, _ = D.load_in_memory("CIFAR10", root / "cifar-10-batches-py")
    assert torch.equal(tx, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert torch.equal(ty, torch.from_numpy(y))


def test_cifar100_roundtrip(tmp_path):
    x, y, xt, yt = make_cifar100(tmp_path)
    for d in (tmp_path, tmp_path / "cifar-100-python"):
        tx, ty, ex, ey = D.load_in_memory("cifar-100", d)
        assert torch.equal(tx, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
        assert torch.equal(ty, torch.from_numpy(y)) and ty.dtype == torch.int64
        assert torch.equal(ex, torch.from_numpy(xt.reshape(-1, 3, 32, 32)))
        assert torch.equal(ey, torch.from_numpy(yt))


def test_cifar_missing_file(tmp_path):
    make_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DataError) as e:
        D.load_in_memory("cifar10", tmp_path)
    msg = str(e.value)
    assert str(missing) in msg and "--download" in msg and "\n" not in msg


def test_cifar_empty_dir(tmp_path):
    with pytest.raises(DataError) as e:
        D.load_in_memory("cifar100", tmp_path)
    assert str(tmp_path / "cifar-100-python" / "train") in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "missing_key"])
def test_cifar_corrupt_file(tmp_path, damage):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    if damage == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a pickle" * 10)
    elif damage == "wrong_shape":
        _dump(path, {b"data": np.zeros((20, 1000), np.uint8), b"labels": [0] * 20})
    else:
        _dump(path, {b"data": np.zeros((20, 3072), np.uint8), b"fine_labels": [0] * 20})
    with pytest.raises(DataError) as e:
        D.load_in_memory("cifar10", tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_cifar_download_failure_is_data_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise RuntimeError("Name or service not known\n(second line)")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as e:
        D.load_in_memory("cifar10", tmp_path, download=True)
    msg = str(e.value)
    assert "download" in msg and str(tmp_path) in msg and "\n" not in msg


def test_cifar_download_success_is_used(tmp_path, monkeypatch):
    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        if not (tmp_path / "cifar-100-python").exists():
            make_cifar100(tmp_path)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    tx, _, _, _ = D.load_in_memory("cifar100", tmp_path, download=True)
    assert len(tx) == N_PER_FILE and calls and all(c[2] for c in calls)


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------

def test_digits_split_and_stats():
    tx, ty, ex, ey = D.load_in_memory("digits", None)
    assert tx.shape == (1438, 3, 32, 32) and ex.shape == (359, 3, 32, 32)
    assert tx.dtype == ex.dtype == torch.uint8 and ty.dtype == torch.int64
    assert torch.equal(tx[:, 0], tx[:, 1]) and torch.equal(tx[:, 0], tx[:, 2])
    counts_test = torch.bincount(ey, minlength=10)
    assert counts_test.tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    # deterministic across calls
    tx2, ty2, ex2, ey2 = D.load_in_memory("digits", "/nonexistent/ignored")
    assert torch.equal(tx, tx2) and torch.equal(ty, ty2)
    assert torch.equal(ex, ex2) and torch.equal(ey, ey2)


def test_digits_are_the_public_codes_files(conformance):
    """The digits the public code trained and attacked on (written as CIFAR-10 pickles):
    the same images, labels and order, so test-set positions of its runs mean ours."""
    ours = D.load_in_memory("digits", None)
    public = D.load_in_memory("cifar10", conformance("digits-cifar10"))
    for a, b in zip(ours, public):
        assert a.shape == b.shape and torch.equal(a, b)


def test_digits_pixels_match_sklearn():
    from sklearn.datasets import load_digits
    d = load_digits()
    tx, ty, ex, ey = D.load_in_memory("digits", None)
    allx = torch.cat([tx, ex])
    ally = torch.cat([ty, ey])
    # sklearn's first image, scaled and upsampled by hand (4x4 blocks), appears with its label
    img = torch.from_numpy(d.images[0]).double()
    ref = torch.round(img * 255 / 16).to(torch.uint8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    hits = [(k, ally[k].item()) for k in range(len(allx)) if torch.equal(allx[k, 0], ref)]
    assert hits and hits[0][1] == d.target[0]
    assert len(allx) == len(d.images) and torch.equal(torch.sort(ally).values,
                                                       torch.sort(torch.from_numpy(d.target)).values)


# --------------------------------------------------------------------------------------------
# TensorLoader
# --------------------------------------------------------------------------------------------

def _toy(n=50, h=8, w=8):
    g = torch.Generator().manual_seed(123)
    x = torch.randint(1, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)  # no zeros
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # sample id, read back by _ids()
    return x, torch.arange(n) % 7


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _denorm(x):
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return torch.round((x * s + m) * 255).to(torch.uint8)


def test_tensorloader_test_mode():
    x, y = _toy(50)
    ld = D.TensorLoader(x, y, 16, MEAN, STD, "cpu", train=False, drop_last=True)
    assert len(ld) == 4 and ld.dataset_size == 50
    batches = list(ld)
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    expect = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1)
    assert torch.allclose(xs, expect, atol=1e-6)
    assert torch.equal(ys, y)
    assert torch.allclose(ld.normalize(x[:3]), expect[:3], atol=1e-6)
    assert ld.images.dtype == torch.uint8 and torch.equal(ld.images, x)
    assert torch.equal(ld.labels, y)


def _ids(xb):
    """Recover sample ids for un-augmented batches from the pixel written by _toy."""
    return _denorm(xb)[:, 0, 0, 0].long()


def test_tensorloader_train_permutation_and_determinism():
    x, y = _toy(50)
    ld = D.TensorLoader(x, y, 16, MEAN, STD, "cpu", train=True, crop_padding=0, hflip=False,
                        seed=3)
    assert len(ld) == 4

    def epoch(e):
        ld.set_epoch(e)
        return [(bx.clone(), by.clone()) for bx, by in ld]

    e0 = epoch(0)
    ids = torch.cat([_ids(bx) for bx, _ in e0])
    assert sorted(ids.tolist()) == list(range(50))  # every sample exactly once
    assert not torch.equal(ids, torch.arange(50))  # shuffled
    assert torch.equal(torch.cat([by for _, by in e0]), y[ids])  # labels follow images
    again = epoch(0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))
    ids1 = torch.cat([_ids(bx) for bx, _ in epoch(1)])
    assert not torch.equal(ids, ids1)
    # a fresh loader with the same seed (a resumed run) sees the same batches
    ld2 = D.TensorLoader(x, y, 16, MEAN, STD, "cpu", train=True, crop_padding=0, hflip=False,
                         seed=3)
    ld2.set_epoch(1)
    assert torch.equal(torch.cat([_ids(bx) for bx, _ in ld2]), ids1)
    # a different seed gives a different order
    ld3 = D.TensorLoader(x, y, 16, MEAN, STD, "cpu", train=True, crop_padding=0, hflip=False,
                         seed=4)
    assert not torch.equal(torch.cat([_ids(bx) for bx, _ in ld3]), ids)


def test_tensorloader_drop_last():
    x, y = _toy(50)
    ld = D.TensorLoader(x, y, 16, MEAN, STD, "cpu", train=True, drop_last=True)
    assert len(ld) == 3
    assert [len(by) for _, by in ld] == [16, 16, 16]


def _shifted_versions(img, p, flips):
    """All (2p+1)^2 zero-padded crops of img (optionally also flipped)."""
    c, h, w = img.shape
    padded = torch.nn.functional.pad(img, (p, p, p, p))
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out.append(crop)
            if flips:
                out.append(crop.flip(2))
    return out


@pytest.mark.parametrize("hflip", [True, False])
def test_tensorloader_random_crop_matches_reference(hflip):
    n, p = 40, 3
    g = torch.Generator().manual_seed(7)
    x = torch.randint(1, 256, (n, 3, 6, 10), dtype=torch.uint8, generator=g)
    y = torch.arange(n)  # label = source index
    ld = D.TensorLoader(x, y, 12, MEAN, STD, "cpu", train=True, crop_padding=p, hflip=hflip,
                        seed=11)
    shifts, flipped = set(), 0
    for bx, by in ld:
        assert bx.shape[1:] == (3, 6, 10)
        for img, label in zip(_denorm(bx), by):
            src = x[label]
            cands = _shifted_versions(src, p, flips=hflip)
            match = [k for k, c in enumerate(cands) if torch.equal(c, img)]
            assert match, "output is not a zero-padded shift (or horizontal flip) of its source"
            k = match[0]
            shifts.add(k // 2 if hflip else k)
            flipped += int(hflip and k % 2 == 1)
    assert len(shifts) > 5  # offsets actually vary
    if hflip:
        assert 0 < flipped < n

    # exact reference: replay the documented draws from the (seed, epoch) generator
    ld.set_epoch(5)
    gen = torch.Generator().manual_seed(11 * 1_000_003 + 5)
    perm = torch.randperm(n, generator=gen)
    offs = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    flips = torch.randint(0, 2, (n,), generator=gen).bool()
    out = torch.cat([_denorm(bx) for bx, _ in ld])
    for k in range(n):
        padded = torch.nn.functional.pad(x[perm[k]], (p, p, p, p))
        ref = padded[:, offs[k, 0]:offs[k, 0] + 6, offs[k, 1]:offs[k, 1] + 10]
        if hflip and flips[k]:
            ref = ref.flip(2)
        assert torch.equal(out[k], ref)


def test_tensorloader_bad_batch_size():
    x, y = _toy(10)
    with pytest.raises(DataError):
        D.TensorLoader(x, y, 0, MEAN, STD, "cpu")


def test_build_loaders_digits():
    train, test, info = D.build_loaders("digits", None, 128, "cpu", seed=1)
    assert info.name == "digits" and train.hflip
    assert train.dataset_size == 1438 and test.dataset_size == 359
    assert test.batch_size == 256 and len(test) == 2 and len(train) == 12
    bx, by = next(iter(train))
    assert bx.shape == (128, 3, 32, 32) and bx.dtype == torch.float32
    assert by.dtype == torch.int64 and by.max() < 10


def test_build_loaders_cifar(cifar10_dir):
    root, (x, y, xt, yt) = cifar10_dir
    train, test, info = D.build_loaders("cifar10", root, 32, "cpu", test_batch_size=7)
    assert info.name == "cifar10" and train.train and not test.train
    assert train.dataset_size == 100 and test.dataset_size == 20 and len(test) == 3
    assert torch.equal(torch.cat([b for _, b in test]), torch.from_numpy(yt))


# --------------------------------------------------------------------------------------------
# ImageNet folders
# --------------------------------------------------------------------------------------------

def _color(cls, i):
    return (40 + 100 * cls, 10 + 20 * i, 200 - 30 * i)


def make_imagenet(root, train_name="train", val_name="val", n=3):
    """Solid-color images so pixel values and labels can be checked after resizing."""
    for split in (train_name, val_name):
        for cls, wnid in enumerate(["n01440764", "n01443537"]):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (40 + 7 * i, 30 + 5 * cls), _color(cls, i))
                img.save(d / f"img_{i}.{'png' if i % 2 else 'JPEG'}", quality=100)


def _check_solid(bx, by, jpeg_tol):
    m = torch.tensor(D.DATASETS["imagenet"].mean).view(3, 1, 1)
    s = torch.tensor(D.DATASETS["imagenet"].std).view(3, 1, 1)
    for img, lab in zip(bx, by):
        px = img * s + m  # back to [0, 1]
        c = px[:, 112, 112]
        assert (px - c.view(3, 1, 1)).abs().max() < 1e-4  # solid color survived
        # the class is encoded in the red channel (40 or 140), JPEG may shift it a bit
        assert abs(c[0].item() * 255 - (40 + 100 * lab.item())) <= jpeg_tol


@pytest.mark.parametrize("layout", [("train", "val"), ("imagenet/train", "imagenet/validation"),
                                    ("train", "validation")])
def test_imagenet_loaders(tmp_path, layout):
    make_imagenet(tmp_path, *layout)
    train, test, info = D.build_loaders("ImageNet", tmp_path, 4, "cpu", workers=0, seed=0,
                                        test_batch_size=5)
    assert info.name == "imagenet"
    assert train.dataset_size == 6 and test.dataset_size == 6
    assert len(train) == 2 and len(test) == 2
    batches = list(test)
    assert [b[0].shape for b in batches] == [(5, 3, 224, 224), (1, 3, 224, 224)]
    ys = torch.cat([b[1] for b in batches])
    assert ys.tolist() == [0, 0, 0, 1, 1, 1] and ys.dtype == torch.int64
    for bx, by in batches:
        assert bx.dtype == torch.float32
        _check_solid(bx, by, jpeg_tol=3)
    for bx, by in train:
        assert bx.shape[1:] == (3, 224, 224)
        _check_solid(bx, by, jpeg_tol=3)


def test_imagenet_epoch_order_deterministic(tmp_path):
    make_imagenet(tmp_path, n=4)
    train, _, _ = D.build_loaders("imagenet", tmp_path, 2, "cpu", workers=0, seed=5)

    def order(e):
        train.set_epoch(e)
        # the green channel identifies the image within a class
        return [(int(y), round(float((x[1, 0, 0] * 0.224 + 0.456) * 255)))
                for bx, by in train for x, y in zip(bx, by)]

    o0 = order(0)
    assert sorted(o0) == sorted(order(1)) and len(o0) == 8
    assert o0 == order(0)
    assert any(order(e) != o0 for e in range(1, 4))


def test_imagenet_with_workers(tmp_path):
    make_imagenet(tmp_path, n=2)
    _, test, _ = D.build_loaders("imagenet", tmp_path, 2, "cpu", workers=2, test_batch_size=2)
    assert torch.cat([by for _, by in test]).tolist() == [0, 0, 1, 1]


def test_imagenet_missing(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as e:
        D.build_loaders("imagenet", tmp_path, 4, "cpu", workers=0)
    msg = str(e.value)
    assert str(tmp_path / "val") in msg and str(tmp_path / "imagenet" / "validation") in msg
    assert "class" in msg and "\n" not in msg


def test_imagenet_empty_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError) as e:
        D.build_loaders("imagenet", tmp_path, 4, "cpu", workers=0)
    assert str(tmp_path / "train") in str(e.value)


def test_cifar10_original_repository_layout(tmp_path):
    """The OCM repository keeps CIFAR-10 under <data_dir>/CIFAR10/cifar-10-batches-py."""
    xtr, ytr, _, _ = make_cifar10(tmp_path / "CIFAR10")
    train_x, train_y, _, _ = D.load_in_memory("CIFAR10", tmp_path)
    assert torch.equal(train_x.reshape(len(xtr), -1), torch.from_numpy(xtr))
    assert train_y.tolist() == list(ytr)


def test_imagenet_loaders_shard_by_rank(tmp_path):
    """torchrun: the global batch is split, every rank reads a disjoint share of the epoch."""
    make_imagenet(tmp_path, n=4)

    def ident(bx, by):  # the green channel identifies the image within a class
        return [(int(y), round(float((x[1, 0, 0] * 0.224 + 0.456) * 255)))
                for x, y in zip(bx, by)]

    epochs = {}
    for rank in (0, 1):
        train, test, _ = D.build_loaders("imagenet", tmp_path, 4, "cpu", workers=0, seed=5,
                                         test_batch_size=3, rank=rank, world_size=2)
        assert len(train) == 2  # 8 images, global batch 4: 2 steps of 2 images per rank
        assert [len(by) for _, by in train] == [2, 2]
        train.set_epoch(1)
        epochs[rank] = [i for bx, by in train for i in ident(bx, by)]
        assert torch.cat([by for _, by in test]).tolist() == ([0, 0, 0, 0] if rank == 0
                                                              else [1, 1, 1, 1])
    assert len(set(epochs[0]) | set(epochs[1])) == 8  # disjoint, together the whole epoch
    with pytest.raises(DataError, match="divisible"):
        D.build_loaders("imagenet", tmp_path, 3, "cpu", workers=0, rank=0, world_size=2)


def test_attack_batch_files_round_trip_and_refuse_what_is_not_one(tmp_path):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([1, 0, 3, 2])
    path = str(tmp_path / "b.pt")
    write_attack_batch(path, images, labels, [5, 1, 9, 2])
    got_images, got_labels, indices = read_attack_batch(path, image_size=32)
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    assert indices == [5, 1, 9, 2] and os.listdir(tmp_path) == ["b.pt"]
    bad = {"text": b"not a torch file", "list": None, "3-d": {"data": images[0], "target": labels},
           "labels": {"data": images, "target": labels[:3]}}
    for name, content in bad.items():
        p = tmp_path / f"{name}.pt"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            torch.save(content if content is not None else [images, labels], p)
        with pytest.raises(DataError):
            read_attack_batch(str(p))
    with pytest.raises(DataError, match="pixels"):
        read_attack_batch(path, image_size=224)


def test_explicit_indices_and_the_seeded_draw_agree(tmp_path):
    from fakedata import make_cifar10

    make_cifar10(tmp_path)
    drawn, drawn_labels = load_split_tensors("cifar10", str(tmp_path), "train", max_images=7,
                                             seed=3)
    picked, picked_labels = load_split_tensors("cifar10", str(tmp_path), "train",
                                               indices=sample_indices(100, 7, 3))
    assert torch.equal(drawn, picked) and torch.equal(drawn_labels, picked_labels)
    with pytest.raises(DataError, match="outside"):
        load_split_tensors("cifar10", str(tmp_path), "train", indices=[0, 100])


def test_a_cifar_pickle_that_names_code_is_refused(tmp_path):
    """Reading a data file runs none of its code: a pickle naming os.system is a DataError and
    its command never runs."""
    import os
    import pickle

    import pytest

    from utils.data import DataError, _read_cifar_pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="posix.system|os.system|refused"):
        _read_cifar_pickle(str(path), b"labels", 10, "CIFAR-10")
    assert not marker.exists()
