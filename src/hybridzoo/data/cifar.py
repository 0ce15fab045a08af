"""CIFAR-10 / CIFAR-100 in their "python version" layout, read without unpickling arbitrary objects.

The official archives are Python pickles (`data_batch_1` … `data_batch_5` and `test_batch` with
`batches.meta` for CIFAR-10; `train`, `test` and `meta` for CIFAR-100). A pickle can name any
callable, so `pickle.load` on a file from the internet may execute code. `SafeUnpickler` resolves
only the globals a CIFAR batch needs — numpy's array reconstructor, `ndarray` and `dtype` (object
dtypes refused), and latin-1 `_codecs.encode` (how Python 3 writes bytes under protocol 2) — and
rejects everything else before it is called.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from hybridzoo.data.digits import TensorImageDataset

__all__ = ["SafeUnpickler", "safe_load_pickle", "read_cifar_batch", "load_cifar", "is_cifar_dir", "CIFAR_LAYOUT"]

CIFAR_LAYOUT = ("a CIFAR-10 folder (cifar-10-batches-py: data_batch_1 … data_batch_5, test_batch, batches.meta) "
                "or a CIFAR-100 folder (cifar-100-python: train, test, meta)")


def _safe_dtype(*args, **kwargs):
    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed in a CIFAR batch")
    return dt


def _safe_reconstruct(*args, **kwargs):
    from numpy._core.multiarray import _reconstruct  # numpy >= 2

    return _reconstruct(*args, **kwargs)


def _safe_latin1(text, encoding="latin1"):
    # Python 3 writes bytes under pickle protocol 2 as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("only latin-1 byte strings are allowed in a CIFAR batch")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_latin1,
    ("numpy.core.multiarray", "scalar"): None,  # resolved below (numeric scalars only)
    ("numpy._core.multiarray", "scalar"): None,
}


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only numeric numpy scalars are allowed in a CIFAR batch")
    from numpy._core.multiarray import scalar

    return scalar(dtype, data) if data is not None else scalar(dtype)


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and bytes, and numeric numpy arrays — nothing else."""

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED:
            fn = _ALLOWED[key]
            return _safe_scalar if fn is None else fn
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays, "
                                     "lists, numbers and strings")


def safe_load_pickle(path: str | os.PathLike):
    with open(path, "rb") as f:
        data = f.read()
    try:
        # CIFAR was pickled by Python 2: its keys are byte strings, and bytes must stay bytes.
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{os.fspath(path)!r}: {e}") from e
    except Exception as e:
        raise ValueError(f"{os.fspath(path)!r} is not a readable CIFAR batch (corrupt or truncated?): {e}") from e


def _get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def read_cifar_batch(path: str | os.PathLike, label_key: str = "labels") -> tuple[torch.Tensor, torch.Tensor]:
    """(N×3×32×32 uint8 images, N labels) from one batch file."""
    d = safe_load_pickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{os.fspath(path)!r} is not a CIFAR batch (expected a dict, got {type(d).__name__})")
    data, labels = _get(d, "data"), _get(d, label_key)
    if data is None or labels is None:
        raise ValueError(f"{os.fspath(path)!r} is not a CIFAR batch: expected keys b'data' and b'{label_key}'")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise ValueError(f"{os.fspath(path)!r}: b'data' should be a uint8 array of shape (N, 3072), "
                         f"got {data.dtype} {data.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{os.fspath(path)!r}: {data.shape[0]} images but {labels.shape} labels")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32×32
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def is_cifar_dir(root: str | os.PathLike) -> str | None:
    """'cifar10', 'cifar100' or None."""
    root = Path(root)
    if (root / "data_batch_1").is_file() and (root / "test_batch").is_file():
        return "cifar10"
    if (root / "train").is_file() and (root / "test").is_file():
        return "cifar100"
    return None


class _Uint8Dataset(TensorImageDataset):
    def __getitem__(self, i: int):
        img = self.images[i].float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def load_cifar(root: str | os.PathLike, train_transform=None, val_transform=None):
    """(train, test) datasets and the class names, from a CIFAR-10 or CIFAR-100 python folder."""
    root = Path(root)
    kind = is_cifar_dir(root)
    if kind is None:
        raise FileNotFoundError(f"{os.fspath(root)!r} is not a CIFAR folder; expected {CIFAR_LAYOUT}")
    if kind == "cifar10":
        train_files = sorted(root.glob("data_batch_*"))
        parts = [read_cifar_batch(p) for p in train_files]
        xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        xte, yte = read_cifar_batch(root / "test_batch")
        meta, names_key, n = root / "batches.meta", "label_names", 10
    else:
        xtr, ytr = read_cifar_batch(root / "train", "fine_labels")
        xte, yte = read_cifar_batch(root / "test", "fine_labels")
        meta, names_key, n = root / "meta", "fine_label_names", 100
    classes = [str(i) for i in range(n)]
    if meta.is_file():
        names = _get(safe_load_pickle(meta), names_key)
        if names is not None and len(names) == n:
            classes = [x.decode() if isinstance(x, bytes) else str(x) for x in names]
    for y, what in ((ytr, "train"), (yte, "test")):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ValueError(f"{os.fspath(root)!r}: {what} labels outside 0..{n - 1} for {kind}")
    return (_Uint8Dataset(xtr, ytr, train_transform, classes), _Uint8Dataset(xte, yte, val_transform, classes), classes)
