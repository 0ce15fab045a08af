"""The built-in offline classification set: scikit-learn's UCI handwritten digits.

1,797 grey 8×8 images of the digits 0–9 (values 0–16) ship inside scikit-learn, so a fresh install
trains without downloading anything. They are scaled to [0, 1], resized to 32×32 and repeated to
three channels so that every ImageNet-style model accepts them, and split 80/20 — stratified, with
a fixed seed, so every run and every process sees the same split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["load_digits_split", "TensorImageDataset", "DIGITS_CLASSES"]

DIGITS_CLASSES = [str(i) for i in range(10)]
_SPLIT_SEED = 0


class TensorImageDataset(Dataset):
    """Images held in memory as an N×C×H×W float tensor in [0, 1], with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, classes=None):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform
        self.classes = list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


def load_digits_split(img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, val_images, val_labels): 1,437 / 360 images, 3×img_size×img_size."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0)[:, None]          # N×1×8×8 in [0, 1]
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    idx_train, idx_val = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2,
                                          stratify=digits.target, random_state=_SPLIT_SEED)
    idx_train, idx_val = torch.from_numpy(idx_train), torch.from_numpy(idx_val)
    return images[idx_train], labels[idx_train], images[idx_val], labels[idx_val]
