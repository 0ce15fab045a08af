"""Semantic-segmentation data: readers for the layouts users have, augmentations, built-in scenes.

Readers (every sample is an RGB image and a label map of class indices, 255 = ignore):

- `CityscapesSegmentation`: `leftImg8bit/{split}/{city}/*_leftImg8bit.png` with
  `gtFine/{split}/{city}/*_gtFine_labelIds.png`; the 34 label ids are mapped to the 19 train ids
  (everything else → 255), as `cityscapesscripts` and mmsegmentation do. `*_labelTrainIds.png`
  files are used as they are when no `labelIds` file exists.
- `ADE20KSegmentation`: `ADEChallengeData2016/{images,annotations}/{training,validation}`; 150
  classes, label 0 ("other") → 255 and the rest shift down by one (mmseg's `reduce_zero_label`).
- `FolderSegmentation`: `images/` + `masks/` with matching file stems (optionally split into
  `train/` and `val/` either above or below those two folders). A mask holding only the values
  {0, 255} is binary (255 → 1); otherwise values are class indices and 255 is ignored. A dataset's
  own void value (`ignore_index`, e.g. CamVid's 11) and mmseg's `reduce_zero_label` are mapped to
  255 here, in the data layer; a value out of range is an error naming it and its file.
- `SyntheticScenes`: the built-in set — random discs, ellipses, rectangles and triangles, each
  textured with a crop of one of scikit-image's photographs (the class *is* the photograph), over a
  background texture; the masks are exact and a sample depends only on (seed, split, index).

The transforms follow mmsegmentation's pipeline with torch/numpy ops only: random rescale
(ratio 0.5–2.0 of a base scale), random crop with `cat_max_ratio`, horizontal flip,
PhotoMetricDistortion (brightness, contrast, saturation, hue), normalisation, padding with 255.
Validation images are resized to a test scale while their masks keep the original resolution, so
metrics are computed at full label resolution; `collate_segmentation` pads a batch and records
each sample's image and mask size in a (B, 4) `meta` tensor.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "CITYSCAPES_CLASSES", "CITYSCAPES_LABEL_TO_TRAIN",
    "SegTransform", "CityscapesSegmentation", "ADE20KSegmentation", "FolderSegmentation", "SyntheticScenes",
    "collate_segmentation", "palette", "detect_layout", "read_image", "read_mask",
]

IGNORE_INDEX = 255
IMAGENET_MEAN = (123.675, 116.28, 103.53)   # mmseg's img_norm_cfg, in 0..255
IMAGENET_STD = (58.395, 57.12, 57.375)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# cityscapesscripts/helpers/labels.py: label id → train id (ids not listed are ignored)
CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                             24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _k, _v in CITYSCAPES_LABEL_TO_TRAIN.items():
    _CITYSCAPES_LUT[_k] = _v

_IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def palette(num_classes: int, class_names: Sequence[str] | None = None) -> np.ndarray:
    """A (K, 3) uint8 colour table: Cityscapes' own colours for its 19 classes, else a fixed spread."""
    if num_classes == 19 and class_names is not None and tuple(class_names) == CITYSCAPES_CLASSES:
        return np.array(CITYSCAPES_PALETTE, dtype=np.uint8)
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, size=(max(num_classes, 1), 3)).astype(np.uint8)
    if num_classes <= 2:  # binary: black background, a clear foreground colour
        pal[0] = (0, 0, 0)
        if num_classes == 2:
            pal[1] = (255, 64, 64)
    return pal


# ----------------------------------------------------------------------------------------------- I/O

def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as H×W×3 uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label file as H×W uint8 (palette PNGs give their indices, RGB masks their first channel)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "L", "1", "I;16", "I"):
            arr = np.asarray(im)
        else:
            arr = np.asarray(im.convert("RGB"))[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.max(initial=0) > 255:
        raise ValueError(f"{path}: mask values above 255 are not supported")
    return arr.astype(np.uint8)


# ---------------------------------------------------------------------------------------- transforms

@dataclass
class SegTransform:
    """Training or test pipeline on (H×W×3 uint8 image, H×W uint8 label) pairs.

    scale: the base (short, long) size the ratio applies to, as mmseg's `img_scale` (2048, 1024)
        for Cityscapes; None keeps the image's own size as the base.
    """

    train: bool
    crop_size: tuple[int, int] | None = (512, 512)
    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    test_scale: tuple[int, int] | None = None   # (short, long) to resize validation images to, keeping the ratio
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # 3×H×W, 0..255
        lab = torch.from_numpy(np.array(label, dtype=np.int64))
        mask_hw = tuple(lab.shape)
        if self.train:
            img, lab = self._rescale(img, lab, rng)
            img, lab = self._crop(img, lab, rng)
            if rng.random() < self.flip_prob:
                img, lab = img.flip(-1), lab.flip(-1)
            if self.photometric:
                img = photometric_distortion(img, rng)
        elif self.test_scale is not None:
            img = _resize_image(img, _rescale_size(img.shape[-2:], self.test_scale))
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        img = (img - mean) / std
        if self.train and self.crop_size is not None:
            img, lab = _pad_to(img, lab, self.crop_size, self.ignore_index)
            mask_hw = tuple(lab.shape)
        meta = torch.tensor([img.shape[-2], img.shape[-1], mask_hw[0], mask_hw[1]], dtype=torch.long)
        return img, lab, meta

    def _rescale(self, img, lab, rng):
        h, w = img.shape[-2:]
        base = self.scale if self.scale is not None else (min(h, w), max(h, w))
        ratio = rng.uniform(*self.ratio_range)
        target = (int(base[0] * ratio), int(base[1] * ratio))
        size = _rescale_size((h, w), target)
        return _resize_image(img, size), _resize_label(lab, size)

    def _crop(self, img, lab, rng):
        if self.crop_size is None:
            return img, lab
        ch, cw = self.crop_size
        h, w = lab.shape
        mh, mw = max(h - ch, 0), max(w - cw, 0)
        for _ in range(10):  # mmseg RandomCrop: retry while one class covers more than cat_max_ratio
            y0, x0 = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
            crop = lab[y0:y0 + ch, x0:x0 + cw]
            if self.cat_max_ratio >= 1.0:
                break
            valid = crop[crop != self.ignore_index]
            counts = torch.bincount(valid.flatten(), minlength=1) if valid.numel() else torch.zeros(1)
            if (counts > 0).sum() > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return img[:, y0:y0 + ch, x0:x0 + cw], lab[y0:y0 + ch, x0:x0 + cw]


def _rescale_size(hw: Sequence[int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.imrescale: the largest size with the image's ratio inside (short, long) = scale."""
    h, w = int(hw[0]), int(hw[1])
    short, long = min(scale), max(scale)
    factor = min(long / max(h, w), short / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]


def _resize_label(lab: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(lab.shape) == tuple(size):
        return lab
    return F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _pad_to(img, lab, size, ignore_index):
    h, w = lab.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        lab = F.pad(lab, (0, pw, 0, ph), value=ignore_index)
    return img, lab


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(0)
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h * 60.0, torch.zeros_like(h))  # degrees, 0..360
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(0)
    c = v * s
    hp = (h % 360.0) / 60.0
    x = c * (1 - (hp % 2 - 1).abs())
    zero = torch.zeros_like(c)
    sector = hp.floor().long().clamp(0, 5)
    rgb_options = torch.stack([
        torch.stack([c, x, zero]), torch.stack([x, c, zero]), torch.stack([zero, c, x]),
        torch.stack([zero, x, c]), torch.stack([x, zero, c]), torch.stack([c, zero, x]),
    ])  # 6×3×H×W
    rgb = rgb_options.gather(0, sector[None, None].expand(1, 3, *sector.shape))[0]
    return rgb + (v - c)[None]


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: float = 18) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a 3×H×W float image in 0..255 (each step with p = 0.5).

    Hue is shifted in degrees here (mmseg works on OpenCV's 0..180 hue scale, so its ±18 is ±36°).
    """
    img = img.clone()
    if rng.random() < 0.5:
        img = (img + rng.uniform(-brightness_delta, brightness_delta)).clamp(0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = (img * rng.uniform(*contrast_range)).clamp(0, 255)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = _rgb_to_hsv(img / 255.0)
        if do_sat:
            hsv[1] = (hsv[1] * rng.uniform(*saturation_range)).clamp(0, 1)
        if do_hue:
            hsv[0] = (hsv[0] + 2 * rng.uniform(-hue_delta, hue_delta)) % 360.0
        img = (_hsv_to_rgb(hsv) * 255.0).clamp(0, 255)
    if not contrast_first and rng.random() < 0.5:
        img = (img * rng.uniform(*contrast_range)).clamp(0, 255)
    return img


def collate_segmentation(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Pad images (with 0) and masks (with 255) to the largest in the batch; stack the meta rows."""
    h = max(s[0].shape[-2] for s in samples)
    w = max(s[0].shape[-1] for s in samples)
    mh = max(s[1].shape[-2] for s in samples)
    mw = max(s[1].shape[-1] for s in samples)
    imgs = torch.stack([F.pad(s[0], (0, w - s[0].shape[-1], 0, h - s[0].shape[-2])) for s in samples])
    masks = torch.stack([F.pad(s[1], (0, mw - s[1].shape[-1], 0, mh - s[1].shape[-2]), value=IGNORE_INDEX) for s in samples])
    meta = torch.stack([s[2] for s in samples])
    return imgs, masks, meta


# ------------------------------------------------------------------------------------------ readers

def _aug_rng(seed: int, epoch: int, i: int) -> np.random.Generator:
    # One draw from torch's generator: augmentations change every epoch even when nobody calls
    # set_epoch, and follow torch.manual_seed (DataLoader workers get seeded generators of their own).
    return np.random.default_rng([seed, epoch, i, int(torch.randint(0, 2**31 - 1, ()).item())])


class _SegDataset(Dataset):
    """Common base: subclasses fill `self.items` with (image path, mask path) and define `_load_mask`."""

    num_classes: int = 0
    class_names: tuple[str, ...] = ()

    def __init__(self, transform: SegTransform | None = None, seed: int = 0):
        self.transform = transform
        self.seed = seed
        self.items: list[tuple[Path, Path]] = []
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def raw_image(self, i: int) -> np.ndarray:
        return read_image(self.items[i][0])

    def raw_mask(self, i: int) -> np.ndarray:
        return self._load_mask(self.items[i][1])

    def _load_mask(self, path: Path) -> np.ndarray:
        return read_mask(path)

    def _rng(self, i: int) -> np.random.Generator:
        return _aug_rng(self.seed, self._epoch, i)

    def __getitem__(self, i: int):
        img, lab = self.raw_image(i), self.raw_mask(i)
        if img.shape[:2] != lab.shape[:2]:
            raise ValueError(f"image {self.items[i][0]} is {img.shape[:2]} but its mask is {lab.shape[:2]}")
        tf = self.transform or SegTransform(train=False)
        return tf(img, lab, self._rng(i))


class CityscapesSegmentation(_SegDataset):
    """Cityscapes fine annotations, 19 train classes (labelIds mapped, the rest ignored)."""

    num_classes = 19
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: SegTransform | None = None, seed: int = 0):
        super().__init__(transform, seed)
        root = Path(root)
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes layout expected: {img_dir} does not exist")
        for img in sorted(img_dir.rglob("*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            gt_dir = root / "gtFine" / split / img.parent.name
            ids, train_ids = gt_dir / f"{stem}_gtFine_labelIds.png", gt_dir / f"{stem}_gtFine_labelTrainIds.png"
            if ids.is_file():
                self.items.append((img, ids))
            elif train_ids.is_file():
                self.items.append((img, train_ids))
            else:
                raise FileNotFoundError(f"no gtFine labels for {img} (looked for {ids.name})")
        if not self.items:
            raise FileNotFoundError(f"no *_leftImg8bit.png images under {img_dir}")

    def _load_mask(self, path: Path) -> np.ndarray:
        m = read_mask(path)
        return m if path.name.endswith("_labelTrainIds.png") else _CITYSCAPES_LUT[m]


class ADE20KSegmentation(_SegDataset):
    """ADE20K (SceneParsing ADEChallengeData2016): 150 classes, label 0 ignored (reduce_zero_label)."""

    num_classes = 150
    class_names = tuple(f"ade_{i}" for i in range(150))

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: SegTransform | None = None, seed: int = 0):
        super().__init__(transform, seed)
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        sub = {"train": "training", "val": "validation"}.get(split, split)
        img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
        if not img_dir.is_dir() or not ann_dir.is_dir():
            raise FileNotFoundError(f"ADE20K layout expected: {img_dir} and {ann_dir}")
        for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in _IMG_EXTS):
            ann = ann_dir / f"{img.stem}.png"
            if not ann.is_file():
                raise FileNotFoundError(f"no annotation {ann} for {img}")
            self.items.append((img, ann))
        if not self.items:
            raise FileNotFoundError(f"no images under {img_dir}")

    def _load_mask(self, path: Path) -> np.ndarray:
        m = read_mask(path).astype(np.int16) - 1   # reduce_zero_label: 0 → 255, k → k-1
        m[m < 0] = IGNORE_INDEX
        return m.astype(np.uint8)


class FolderSegmentation(_SegDataset):
    """`images/` + `masks/` folders with matching stems; binary {0,255} masks become {0,1}.

    Void pixels: `ignore_index` names the value the mask *files* use for them (CamVid: 11, some
    medical sets: a border value) and `reduce_zero_label` treats 0 as void and shifts every other
    value down by one (mmsegmentation's option: 255 stays void); both map to the engine's
    `IGNORE_INDEX`, so losses and metrics never see the dataset's own convention. Without
    `ignore_index`, 255 in an indexed mask is void. A value that is neither void nor below
    `num_classes` is an error naming the value and the file. With `num_classes` None the count is
    inferred from the first `scan` masks, which must hold class indices 0..K-1 (or a binary 0/255
    mask); anything else is refused rather than read as "max + 1" classes.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: SegTransform | None = None,
                 seed: int = 0, num_classes: int | None = None, val_fraction: float = 0.2,
                 ignore_index: int | None = None, reduce_zero_label: bool = False, scan: int = 200):
        super().__init__(transform, seed)
        if ignore_index is not None and not 0 <= int(ignore_index) <= 255:
            raise ValueError(f"--ignore-index must be a mask value in 0..255, got {ignore_index}")
        if num_classes is not None and not 1 <= int(num_classes) <= 255:
            raise ValueError(f"--num-classes must be in 1..255 (masks are 8-bit, 255 = void), got {num_classes}")
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.num_classes = None if num_classes is None else int(num_classes)   # None while inferring
        root = Path(root)
        img_dir, mask_dir, subset = _folder_dirs(root, split)
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in _IMG_EXTS}
        pairs = []
        for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in _IMG_EXTS):
            m = masks.get(img.stem) or masks.get(f"{img.stem}_mask") or masks.get(f"{img.stem}_segmentation")
            if m is None:
                raise FileNotFoundError(f"no mask in {mask_dir} for {img.name}")
            pairs.append((img, m))
        if not pairs:
            raise FileNotFoundError(f"no images under {img_dir}")
        if subset:  # no split folders: a fixed, seed-independent hold-out
            n_val = max(1, int(round(len(pairs) * val_fraction))) if len(pairs) > 1 else 0
            pairs = pairs[len(pairs) - n_val:] if split == "val" else pairs[: len(pairs) - n_val]
        self.items = pairs
        if num_classes is None:
            self.num_classes = self._infer_num_classes(scan)
        else:
            for _, m in self.items[:scan]:   # fail before training starts; later masks are checked on load
                self._load_mask(m)
        k = self.num_classes
        self.class_names = ("background", "foreground") if k == 2 else tuple(f"class_{i}" for i in range(k))

    def _infer_num_classes(self, limit: int = 200) -> int:
        first_seen: dict[int, Path] = {}
        for _, m in self.items[:limit]:
            arr = self._load_mask(m)
            for v in np.unique(arr[arr != IGNORE_INDEX]).tolist():
                first_seen.setdefault(int(v), m)
        values = sorted(first_seen)
        if not values:
            return 2
        if values != list(range(values[-1] + 1)):
            missing = sorted(set(range(values[-1] + 1)) - set(values))
            top = values[-1]
            raise ValueError(
                f"cannot infer the class count: the masks hold the values {_fmt_values(values)} (after the "
                f"void mapping), which are not class indices 0..K-1 nor a binary 0/255 mask "
                f"({len(missing)} values below {top} never occur); {top} first occurs in {first_seen[top]}. "
                f"If {top} marks void pixels pass --ignore-index {top}; if the labels start "
                f"at 1 pass --reduce-zero-label; otherwise pass --num-classes N explicitly")
        return max(2, len(values))

    def _load_mask(self, path: Path) -> np.ndarray:
        raw = read_mask(path)
        void = raw == self.ignore_index if self.ignore_index is not None else None
        m = raw
        if self.reduce_zero_label:   # mmseg: 0 → 255, k → k − 1, 255 stays 255
            m = raw.astype(np.int16) - 1
            m[(raw == 0) | (raw == 255)] = IGNORE_INDEX
            m = m.astype(np.uint8)
        elif self.ignore_index != 255:
            values = np.unique(raw if void is None else raw[~void])
            if values.max(initial=0) == 255 and np.isin(values, (0, 255)).all():
                m = (raw == 255).astype(np.uint8)   # binary mask saved as 0/255
        if void is not None:
            m = np.where(void, IGNORE_INDEX, m).astype(np.uint8)
        if self.num_classes is not None:
            bad = (m != IGNORE_INDEX) & (m >= self.num_classes)
            if bad.any():
                v = int(raw[bad].max())
                stored = f"{v} (stored value; {int(m[bad].max())} after --reduce-zero-label)" if self.reduce_zero_label else str(v)
                raise ValueError(
                    f"{path}: label value {stored} is outside the {self.num_classes} classes 0..{self.num_classes - 1}"
                    f" ({int(bad.sum())} pixels); if {v} marks void pixels pass --ignore-index {v}, otherwise "
                    f"raise --num-classes (values in this mask: {_fmt_values(np.unique(raw).tolist())})")
        return m


def _fmt_values(values: Sequence[int], limit: int = 12) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return "{" + shown + (f", … ({len(values)} in all)" if len(values) > limit else "") + "}"


def _folder_dirs(root: Path, split: str) -> tuple[Path, Path, bool]:
    """(images dir, masks dir, whether a hold-out split must be made) for the generic layout."""
    for img_dir, mask_dir in ((root / split / "images", root / split / "masks"),
                              (root / "images" / split, root / "masks" / split)):
        if img_dir.is_dir() and mask_dir.is_dir():
            return img_dir, mask_dir, False
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return root / "images", root / "masks", True
    raise FileNotFoundError(f"expected {root}/images and {root}/masks (optionally with train/ and val/ subfolders)")


def detect_layout(root: str | os.PathLike) -> str:
    """'cityscapes', 'ade20k' or 'folder' from the folders under `root`."""
    root = Path(root)
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    if (base / "images" / "training").is_dir() and (base / "annotations" / "training").is_dir():
        return "ade20k"
    try:
        _folder_dirs(root, "train")
        return "folder"
    except FileNotFoundError:
        pass
    raise FileNotFoundError(f"{root}: not a Cityscapes (leftImg8bit/ + gtFine/), ADE20K (images/ + annotations/) "
                            "or images/ + masks/ folder")


# --------------------------------------------------------------------------------- synthetic scenes

# The class *is* the photograph its shapes are cut from; the background is a grey-level texture.
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel", "retina")
_BACKGROUNDS = ("grass", "gravel", "brick")


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _random_crop(src: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = src.shape[:2]
    scale = max(size / h, size / w, 1.0)
    if scale > 1.0:  # too small: nearest upscale, deterministic
        yy = (np.arange(int(np.ceil(h * scale))) / scale).astype(int).clip(0, h - 1)
        xx = (np.arange(int(np.ceil(w * scale))) / scale).astype(int).clip(0, w - 1)
        src = src[yy][:, xx]
        h, w = src.shape[:2]
    y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = src[y0:y0 + size, x0:x0 + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


class SyntheticScenes(Dataset):
    """Built-in scenes: textured shapes with exact masks, deterministic by (seed, split, index).

    num_classes K: class 0 is the background texture, classes 1..K-1 are shapes cut from scikit-image
    photographs (astronaut, coffee, chelsea, rocket, ...). With K = 2 (binary), every shape is
    foreground and takes its texture from any of the photographs.
    """

    def __init__(self, length: int = 256, size: int = 128, num_classes: int = 5, split: str = "train", seed: int = 0,
                 transform: SegTransform | None = None, max_shapes: int = 6):
        if not 2 <= num_classes <= len(_PHOTOS) + 1:
            raise ValueError(f"SyntheticScenes supports 2..{len(_PHOTOS) + 1} classes, got {num_classes}")
        self.length, self.size, self.num_classes = length, size, num_classes
        self.split, self.seed, self.transform, self.max_shapes = split, seed, transform, max_shapes
        self.class_names = (("background", "foreground") if num_classes == 2
                            else ("background",) + _PHOTOS[: num_classes - 1])
        self._epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _scene_rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The i-th scene: (size×size×3 uint8 image, size×size uint8 mask)."""
        from skimage.draw import disk, ellipse, polygon

        rng = self._scene_rng(i)
        s = self.size
        bg = _random_crop(_photo(_BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]), s, rng).astype(np.float32)
        tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        image = (bg * tint).astype(np.uint8)
        mask = np.zeros((s, s), dtype=np.uint8)
        for _ in range(int(rng.integers(1, self.max_shapes + 1))):
            if self.num_classes == 2:
                cls, photo = 1, _PHOTOS[int(rng.integers(len(_PHOTOS)))]
            else:
                cls = int(rng.integers(1, self.num_classes))
                photo = _PHOTOS[cls - 1]
            kind = int(rng.integers(4))
            cy, cx = rng.uniform(0.1, 0.9, size=2) * s
            r = rng.uniform(0.08, 0.25) * s
            if kind == 0:
                rr, cc = disk((cy, cx), r, shape=(s, s))
            elif kind == 1:
                rr, cc = ellipse(cy, cx, r, r * rng.uniform(0.4, 0.9), shape=(s, s), rotation=rng.uniform(0, np.pi))
            elif kind == 2:
                h, w = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
                rr, cc = polygon([cy - h, cy - h, cy + h, cy + h], [cx - w, cx + w, cx + w, cx - w], shape=(s, s))
            else:
                ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
                rr, cc = polygon(cy + r * np.sin(ang), cx + r * np.cos(ang), shape=(s, s))
            texture = _random_crop(_photo(photo), s, rng)
            image[rr, cc] = texture[rr, cc]
            mask[rr, cc] = cls
        return image, mask

    def raw_image(self, i: int) -> np.ndarray:
        return self.scene(i)[0]

    def raw_mask(self, i: int) -> np.ndarray:
        return self.scene(i)[1]

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        img, lab = self.scene(i)
        tf = self.transform or SegTransform(train=False)
        return tf(img, lab, _aug_rng(self.seed, self._epoch, i))


def dataset_info(ds: Any) -> dict[str, Any]:
    return {"num_classes": ds.num_classes, "class_names": list(ds.class_names), "in_chans": 3,
            "ignore_index": IGNORE_INDEX}
