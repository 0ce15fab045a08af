"""ImageFolder datasets read with Pillow and numpy (no torchvision).

Layout::

    root/train/<class name>/<image>.{jpg,jpeg,png,bmp,gif,tif,tiff,webp}
    root/val/<class name>/...          (or root/test/...)

Class indices follow the sorted class-folder names of `train/`; `val/` must use the same names.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "find_images", "load_image", "FOLDER_LAYOUT", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FOLDER_LAYOUT = "an image folder: ROOT/train/<class>/*.png|jpg and ROOT/val/<class>/*.png|jpg (val/ may be test/)"


def load_image(path: str | os.PathLike, mode: str = "RGB") -> torch.Tensor:
    """A C×H×W float image in [0, 1]; a file Pillow cannot decode is an error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)!r} (corrupt or not an image?): {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def find_images(split_dir: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"missing folder {os.fspath(split_dir)!r}; expected {FOLDER_LAYOUT}")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"{os.fspath(split_dir)!r} has no class folders; expected {FOLDER_LAYOUT}")
    split_is_train = classes is None
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{os.fspath(split_dir)!r} has class folders not in train/: {unknown}")
    index = {c: i for i, c in enumerate(classes)}
    samples, empty = [], []
    for c in found:
        n = len(samples)
        for root, _, files in sorted(os.walk(split_dir / c, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(root, f), index[c]))
        if len(samples) == n:
            empty.append(c)
    if empty and samples and split_is_train:
        # each training folder is a class: an empty one would be a class the model can never learn
        raise ValueError(f"class folder(s) without images in {os.fspath(split_dir)!r}: "
                         f"{', '.join(repr(os.fspath(split_dir / c)) for c in empty)}; every folder of train/ is a "
                         f"class, so remove them or add images ({', '.join(IMG_EXTENSIONS)})")
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {os.fspath(split_dir)!r}; "
                                f"expected {FOLDER_LAYOUT}")
    return samples, classes


class ImageFolder(Dataset):
    """One split of an image folder; `classes` fixes the label order (pass train's to val)."""

    def __init__(self, split_dir: str | os.PathLike, transform=None, classes: list[str] | None = None,
                 mode: str = "RGB"):
        self.root = Path(split_dir)
        self.samples, self.classes = find_images(self.root, classes)
        self.transform, self.mode = transform, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_image(path, self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @classmethod
    def splits(cls, root: str | os.PathLike, train_transform=None, val_transform=None, mode: str = "RGB"):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {os.fspath(root)!r} does not exist; expected {FOLDER_LAYOUT}")
        val_dir = root / "val" if (root / "val").is_dir() else root / "test"
        if not (root / "train").is_dir() or not val_dir.is_dir():
            raise FileNotFoundError(f"{os.fspath(root)!r} lacks train/ and val/ folders; expected {FOLDER_LAYOUT}")
        train = cls(root / "train", train_transform, mode=mode)
        val = cls(val_dir, val_transform, classes=train.classes, mode=mode)
        return train, val
