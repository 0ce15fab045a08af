"""CIFAR batches (safe unpickling), image folders, the built-in digits, and their error messages."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from hybridzoo.data.cifar import load_cifar, read_cifar_batch, safe_load_pickle
from hybridzoo.data.digits import load_digits_split
from hybridzoo.data.folder import ImageFolder


def _write_batch(path, n, label_key=b"labels", classes=10, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n).tolist()
    d = {b"batch_label": b"testing batch", label_key: labels, b"data": data,
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [x // 5 for x in labels]
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)  # the protocol the CIFAR python archives use
    return data, labels


def test_cifar10_batch_layout(tmp_path):
    data, labels = _write_batch(tmp_path / "data_batch_1", 5)
    x, y = read_cifar_batch(tmp_path / "data_batch_1")
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == labels
    # row layout: 1024 red values, then green, then blue, each row-major
    assert x[2, 1, 3, 4] == data[2, 1024 + 3 * 32 + 4]


def test_cifar10_folder(tmp_path):
    for i in range(1, 3):
        _write_batch(tmp_path / f"data_batch_{i}", 4, seed=i)
    _write_batch(tmp_path / "test_batch", 3, seed=9)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    train, test, classes = load_cifar(tmp_path)
    assert len(train) == 8 and len(test) == 3 and classes[3] == "c3"
    img, label = train[0]
    assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1 and isinstance(label, int)


def test_cifar100_folder(tmp_path):
    _write_batch(tmp_path / "train", 6, b"fine_labels", classes=100)
    _write_batch(tmp_path / "test", 2, b"fine_labels", classes=100)
    train, test, classes = load_cifar(tmp_path)
    assert len(classes) == 100 and len(train) == 6 and len(test) == 2


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_safe_unpickler_refuses_code(tmp_path):
    p = tmp_path / "data_batch_1"
    with open(p, "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        safe_load_pickle(p)


def test_safe_unpickler_refuses_object_arrays(tmp_path):
    p = tmp_path / "b"
    with open(p, "wb") as f:
        pickle.dump({b"data": np.array([1, "x"], dtype=object)}, f, protocol=2)
    with pytest.raises(ValueError, match="object"):
        safe_load_pickle(p)


def test_corrupt_cifar_batch_names_the_file(tmp_path):
    _write_batch(tmp_path / "data_batch_1", 4)
    raw = (tmp_path / "data_batch_1").read_bytes()
    (tmp_path / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_1"):
        read_cifar_batch(tmp_path / "data_batch_1")


def test_not_a_cifar_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar(tmp_path)


def _write_folder(root, classes=("cat", "dog"), n=3, size=(20, 24)):
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.full((*size, 3), 40 * ci + i, dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


def test_image_folder(tmp_path):
    _write_folder(tmp_path)
    train, val = ImageFolder.splits(tmp_path)
    assert train.classes == ["cat", "dog"] and len(train) == 6 and len(val) == 6
    img, label = train[4]
    assert img.shape == (3, 20, 24) and label == 1
    assert img[0, 0, 0].item() == pytest.approx((40 + 1) / 255)


def test_image_folder_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ImageFolder.splits(tmp_path / "nope")
    assert "nope" in str(e.value) and "train/<class>" in str(e.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val/"):
        ImageFolder.splits(tmp_path)


def test_image_folder_corrupt_image_names_the_file(tmp_path):
    _write_folder(tmp_path, n=1)
    bad = tmp_path / "train" / "cat" / "0.png"
    bad.write_bytes(b"not a png at all")
    train, _ = ImageFolder.splits(tmp_path)
    with pytest.raises(ValueError, match="0.png"):
        train[0]


def test_image_folder_empty_class_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder.splits(tmp_path)


def test_digits_split_is_fixed():
    xtr, ytr, xva, yva = load_digits_split()
    assert xtr.shape == (1437, 3, 32, 32) and xva.shape == (360, 3, 32, 32)
    assert 0 <= xtr.min() and xtr.max() <= 1
    assert torch.equal(load_digits_split()[3], yva)
    assert torch.bincount(yva).min() >= 35  # stratified: every digit in val
