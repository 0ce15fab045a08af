"""Super-resolution data: MATLAB-compatible bicubic resizing, image folders, benchmark sets, built-ins.

Every dataset yields ``(lr, hr)`` float32 tensors C×H×W with values in [0, 255] (integers, as the
MATLAB-generated benchmark PNGs are), ``hr`` exactly ``scale`` times the size of ``lr``.

Layouts read:
- HR images only (DIV2K_train_HR, Flickr2K_HR, any folder): LR made on the fly by MATLAB `imresize`
  bicubic with antialiasing on uint8, bit-exact (rounded after each one-dimensional pass, as MATLAB);
- paired folders: DIV2K (`DIV2K_train_HR/0001.png` + `DIV2K_train_LR_bicubic/X2/0001x2.png`) and the
  EDSR benchmark layout (`Set5/HR/baby.png` + `Set5/LR_bicubic/X2/babyx2.png`);
- Set5 / Set14 / B100 / Urban100 / Manga109 by name under a benchmark root;
- built in, offline: the photographs shipped with scikit-image, split into train and test.

Training samples are random HR patches of ``patch_size · scale`` pixels (LR ``patch_size``, 48 in
ACT), flipped horizontally / vertically and transposed with probability 0.5 each (EDSR/ACT).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

__all__ = [
    "imresize", "bicubic_downsample", "bicubic_upsample", "quantize", "modcrop", "read_image", "save_image",
    "to_tensor", "list_images", "HRImageDataset", "PairedImageDataset", "sr_collate", "benchmark_dataset",
    "builtin_images", "build_sr_datasets", "eval_dataset", "describe", "BUILTIN_TRAIN", "BUILTIN_TEST", "BENCHMARKS",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BENCHMARKS = {"set5": ("Set5",), "set14": ("Set14",), "b100": ("B100", "BSD100", "BSDS100"),
              "urban100": ("Urban100",), "manga109": ("Manga109",)}


# ---------------------------------------------------------------------------------------------
# MATLAB imresize (bicubic, antialiased when shrinking)
# ---------------------------------------------------------------------------------------------

def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`)."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


@lru_cache(maxsize=64)
def _contributions(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (out_len × P, float64) and 0-based source indices, as MATLAB imresize's `contributions`.

    Shrinking with antialiasing stretches the kernel by 1/scale (and scales it by `scale`); borders
    are mirrored symmetrically (edge pixel repeated), and taps whose weight is zero everywhere dropped.
    """
    stretch = scale < 1 and antialias
    width = 4.0 / scale if stretch else 4.0
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)              # output pixel centre in input coordinates (1-based)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if stretch else _cubic(dist)
    w = w / w.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    idx = mirror[(idx.long() - 1) % (2 * in_len)]
    keep = (w != 0).any(0)
    return w[:, keep].contiguous(), idx[:, keep].contiguous()


def _resize_dim(x: torch.Tensor, dim: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    w, idx = _contributions(x.shape[dim], out_len, scale, antialias)
    w = w.to(device=x.device, dtype=x.dtype)
    idx = idx.to(x.device)
    shape = [1] * x.ndim
    shape[dim] = out_len
    out = None
    for p in range(w.shape[1]):  # a loop over the kernel's taps (≤ 4/scale + 2), not over pixels
        term = x.index_select(dim, idx[:, p]) * w[:, p].reshape(shape)
        out = term if out is None else out + term
    return out


def imresize(x: torch.Tensor, scale: float | None = None, size: tuple[int, int] | None = None,
             antialias: bool = True, uint8: bool | None = None) -> torch.Tensor:
    """MATLAB ``imresize(x, scale, 'bicubic')`` on the last two dims.

    `size` (H, W) overrides `scale`; MATLAB's output size is ``ceil(scale · in)``. Computed in float64.
    The two one-dimensional passes run in MATLAB's order: imresize.m's `dimensionOrder` is
    ``[~, order] = sort(scale)``, the smallest scale factor first, rows first on ties (a stable sort).

    `uint8` (default: whether `x` is a uint8 tensor) emulates MATLAB on a uint8 image: `imresizemex`
    writes each pass's output in the input's class, so the intermediate image is rounded (halves away
    from zero) and clipped to [0, 255] before the second pass, and the result holds uint8 values.
    Returned as uint8 for uint8 input, else in `x`'s float dtype. With uint8 False it is MATLAB on a
    double image: no rounding at all (the float path, e.g. for resizing model outputs).
    """
    if uint8 is None:
        uint8 = x.dtype == torch.uint8
    in_dtype = x.dtype
    if not x.is_floating_point():
        x = x.float()
    H, W = x.shape[-2:]
    if size is not None:
        oh, ow = size
        sh, sw = oh / H, ow / W
    elif scale is not None:
        oh, ow = math.ceil(H * scale - 1e-9), math.ceil(W * scale - 1e-9)
        sh = sw = scale
    else:
        raise ValueError("imresize needs `scale` or `size`")
    dtype = x.dtype
    y = x.double()
    order = [(-2, oh, sh), (-1, ow, sw)]
    if sw < sh:
        order.reverse()
    for dim, n, s in order:
        y = _resize_dim(y, dim, n, s, antialias)
        if uint8:
            y = quantize(y)
    return y.to(torch.uint8) if in_dtype == torch.uint8 else y.to(dtype)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to integers in [0, 255] as MATLAB's uint8 conversion does (halves away from zero)."""
    return torch.floor(x.clamp(0, 255) + 0.5)


def bicubic_downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The standard SR degradation: MATLAB ``imresize(hr, 1/scale, 'bicubic')`` of a (modcropped) uint8 HR
    image, rounded after each pass exactly as MATLAB does on uint8 (bit-exact with the benchmark LR files).

    `hr` holds uint8 values (any dtype); the result is in `hr`'s dtype.
    """
    return imresize(hr, 1.0 / scale, uint8=True)


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: MATLAB ``imresize(lr, scale, 'bicubic')`` on uint8, rounded after each pass."""
    return imresize(lr, float(scale), uint8=True)


def modcrop(img: torch.Tensor, scale: int) -> torch.Tensor:
    H, W = img.shape[-2:]
    return img[..., : H - H % scale, : W - W % scale]


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 H×W×3 array (grey images repeated, alpha dropped)."""
    from PIL import Image

    with Image.open(path) as im:
        return _as_rgb(np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L") else im))


def _as_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W float32 in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()


def save_image(path: str | os.PathLike, img: torch.Tensor) -> None:
    """Write a 3×H×W tensor in [0, 255] (rounded) as an image file."""
    from PIL import Image

    a = quantize(img.detach().float().cpu()).to(torch.uint8).permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

def _augment(*imgs: torch.Tensor) -> list[torch.Tensor]:
    hflip, vflip, transpose = (torch.rand(3) < 0.5).tolist()
    out = []
    for im in imgs:
        if hflip:
            im = im.flip(-1)
        if vflip:
            im = im.flip(-2)
        if transpose:
            im = im.transpose(-1, -2)
        out.append(im.contiguous())
    return out


def _randint(high: int) -> int:
    return int(torch.randint(0, high + 1, ()).item())


class _ImageSource:
    """Images given as paths (read lazily, cached in memory if `cache`) or as arrays."""

    def __init__(self, images: Sequence, names: Sequence[str] | None = None, cache: bool = True):
        self.images = list(images)
        if names is None:
            names = [Path(p).stem if isinstance(p, (str, os.PathLike)) else f"image{i:03d}"
                     for i, p in enumerate(self.images)]
        self.names = list(names)
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        src = self.images[i]
        img = to_tensor(read_image(src) if isinstance(src, (str, os.PathLike)) else _as_rgb(np.asarray(src)))
        if self.cache:
            self._cache[i] = img
        return img


class HRImageDataset(Dataset):
    """HR images; the LR input is made on the fly by MATLAB bicubic downsampling.

    train=True: `repeat` random patches per image and epoch, HR patch ``patch_size · scale`` (images
    smaller than that are bilinearly enlarged first, as the official code does), flips/transpose.
    train=False: whole images, HR cropped to a multiple of `scale`.
    """

    def __init__(self, images: Sequence, scale: int, patch_size: int = 48, train: bool = True,
                 repeat: int = 1, augment: bool = True, names: Sequence[str] | None = None, cache: bool = True):
        self.src = _ImageSource(images, names, cache)
        self.names = self.src.names
        self.scale, self.patch_size, self.train, self.repeat, self.augment = scale, patch_size, train, repeat, augment
        self.layout = f"{len(self.src)} HR images, LR by MATLAB bicubic ×1/{scale}"

    def __len__(self) -> int:
        return len(self.src) * (self.repeat if self.train else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr = self.src.get(i % len(self.src))
        s = self.scale
        if self.train:
            tp = self.patch_size * s
            H, W = hr.shape[-2:]
            if H < tp or W < tp:
                hr = torch.nn.functional.interpolate(hr[None], size=(max(H, tp), max(W, tp)), mode="bilinear",
                                                     align_corners=False)[0].round().clamp(0, 255)
                H, W = hr.shape[-2:]
            y, x = _randint(H - tp), _randint(W - tp)
            hr = hr[:, y:y + tp, x:x + tp]
            if self.augment:
                (hr,) = _augment(hr)
        else:
            hr = modcrop(hr, s)
        return bicubic_downsample(hr, s).float(), hr.contiguous()


class PairedImageDataset(Dataset):
    """Pre-made LR/HR pairs (DIV2K X2/X3/X4, EDSR benchmark `LR_bicubic`); random LR patches when training."""

    def __init__(self, hr_paths: Sequence, lr_paths: Sequence, scale: int, patch_size: int = 48,
                 train: bool = True, repeat: int = 1, augment: bool = True, cache: bool = True):
        if len(hr_paths) != len(lr_paths):
            raise ValueError(f"{len(hr_paths)} HR images but {len(lr_paths)} LR images")
        self.hr = _ImageSource(hr_paths, cache=cache)
        self.lr = _ImageSource(lr_paths, cache=cache)
        self.names = self.hr.names
        self.scale, self.patch_size, self.train, self.repeat, self.augment = scale, patch_size, train, repeat, augment
        lr_dir = Path(lr_paths[0]).parent if lr_paths and isinstance(lr_paths[0], (str, os.PathLike)) else None
        self.layout = f"{len(self.hr)} HR/LR pairs" + (f", LR read from {lr_dir}" if lr_dir else "")

    def __len__(self) -> int:
        return len(self.hr) * (self.repeat if self.train else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i %= len(self.hr)
        lr, hr = self.lr.get(i), self.hr.get(i)
        s = self.scale
        h, w = lr.shape[-2:]
        if hr.shape[-2] // s != h or hr.shape[-1] // s != w:  # MATLAB's LR is the modcropped HR ÷ s, exactly
            raise ValueError(f"{self.names[i]}: HR {tuple(hr.shape[-2:])} is not ×{s} of LR {(h, w)} "
                             f"(expected LR {(hr.shape[-2] // s, hr.shape[-1] // s)}): wrong scale folder?")
        hr = hr[:, : h * s, : w * s]
        if self.train:
            p = self.patch_size
            if h < p or w < p:
                raise ValueError(f"{self.names[i]}: LR image {(h, w)} smaller than the patch size {p}")
            y, x = _randint(h - p), _randint(w - p)
            lr, hr = lr[:, y:y + p, x:x + p], hr[:, y * s:(y + p) * s, x * s:(x + p) * s]
            if self.augment:
                lr, hr = _augment(lr, hr)
        return lr.contiguous(), hr.contiguous()


def sr_collate(batch):
    """Stack equal-sized samples (training patches); keep lists for whole images of different sizes."""
    lrs, hrs = zip(*batch)
    if all(t.shape == lrs[0].shape for t in lrs) and all(t.shape == hrs[0].shape for t in hrs):
        return torch.stack(lrs), torch.stack(hrs)
    return list(lrs), list(hrs)


# ---------------------------------------------------------------------------------------------
# Folder layouts
# ---------------------------------------------------------------------------------------------

def _lr_dir(base: Path, scale: int) -> Path | None:
    for cand in (base / f"X{scale}", base / f"x{scale}", base):
        if cand.is_dir() and list_images(cand):
            return cand
    return None


def _pair(hr_dir: Path, lr_dir: Path, scale: int) -> tuple[list[Path], list[Path]]:
    lrs = {}
    for p in list_images(lr_dir):
        stem = p.stem
        for suffix in (f"x{scale}", f"X{scale}"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        lrs[stem] = p
    hrs = list_images(hr_dir)
    missing = [p.name for p in hrs if p.stem not in lrs]
    if missing:
        raise ValueError(f"no LR image in {lr_dir} for {missing[:5]} (expected e.g. {hrs[0].stem}x{scale}.png)")
    return hrs, [lrs[p.stem] for p in hrs]


def _folder_dataset(folder: Path, scale: int, train: bool, **kw) -> Dataset:
    """A folder as a dataset: `HR/` (+ `LR_bicubic/X{s}`), `*_HR` (+ `*_LR_bicubic/X{s}`), or flat images."""
    folder = Path(folder)
    hr_dir, lr_base = None, None
    if (folder / "HR").is_dir():
        hr_dir, lr_base = folder / "HR", folder / "LR_bicubic"
    elif folder.name.endswith("_HR"):
        hr_dir, lr_base = folder, folder.with_name(folder.name[:-3] + "_LR_bicubic")
    if hr_dir is not None:
        lr_dir = _lr_dir(lr_base, scale) if lr_base.is_dir() else None
        if lr_dir is not None:
            hrs, lrs = _pair(hr_dir, lr_dir, scale)
            return PairedImageDataset(hrs, lrs, scale, train=train, **kw)
        return HRImageDataset(list_images(hr_dir), scale, train=train, **kw)
    images = list_images(folder)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    return HRImageDataset(images, scale, train=train, **kw)


def benchmark_dataset(root: str | os.PathLike, name: str, scale: int) -> Dataset:
    """Set5 / Set14 / B100 / Urban100 / Manga109 under `root` (or `root/benchmark`), for evaluation."""
    root = Path(root)
    names = BENCHMARKS.get(name.lower(), (name,))
    for base in (root, root / "benchmark"):
        if not base.is_dir():
            continue
        entries = {p.name.lower(): p for p in base.iterdir() if p.is_dir()}
        for n in names:
            if n.lower() in entries:
                return _folder_dataset(entries[n.lower()], scale, train=False)
    raise FileNotFoundError(f"benchmark {name!r} not found under {root} (looked for {', '.join(names)})")


def eval_dataset(path: str | os.PathLike, scale: int, root: str | os.PathLike | None = None) -> Dataset:
    """A folder given for evaluation, evaluated whole (no image held out or skipped).

    Read: `HR/` + `LR_bicubic/X{s}/` (EDSR/BasicSR benchmark layout; pairs matched by name, LR read
    from the files), `*_HR` + `*_LR_bicubic/X{s}/` (DIV2K_valid_HR), a DIV2K root (its
    `DIV2K_valid_HR`), a root whose only split is `val/` / `valid/` / `test/`, or a flat folder of HR
    images (LR made by MATLAB bicubic). A name that is not a folder (`Set5`, `B100`) is looked up as a
    benchmark under `root`.
    """
    p = Path(path)
    if not p.exists():
        if root is not None and Path(root).is_dir():
            return benchmark_dataset(root, str(path), scale)
        raise FileNotFoundError(
            f"evaluation folder not found: {p} (expected a folder of HR images, HR/ + LR_bicubic/X{scale}/, "
            f"or a benchmark name such as Set5 with --data pointing at the folder that holds it)")
    if not p.is_dir():
        raise ValueError(f"{p} is a file; evaluation takes a folder of images (HR/ + LR_bicubic/X{scale}/ or HR images)")
    if (p / "DIV2K_valid_HR").is_dir():
        p = p / "DIV2K_valid_HR"
    elif not (p / "HR").is_dir() and not list_images(p):
        sub = {q.name.lower(): q for q in p.iterdir() if q.is_dir()}
        split = next((sub[v] for v in ("val", "valid", "validation", "test") if v in sub), None)
        if split is None:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {p}, and no HR/, DIV2K_valid_HR/ "
                                    f"or val/ folder in it")
        p = split
    return _folder_dataset(p, scale, train=False)


def describe(ds: Dataset) -> str:
    """How many images a dataset holds and where its LR comes from ('5 HR/LR pairs, LR read from ...')."""
    if isinstance(ds, ConcatDataset):
        return " + ".join(describe(d) for d in ds.datasets)
    return getattr(ds, "layout", f"{len(ds)} images")


def build_sr_datasets(data: str | os.PathLike | Sequence, scale: int, patch_size: int = 48, repeat: int = 1,
                      val_data: str | os.PathLike | None = None) -> tuple[Dataset, Dataset]:
    """Train and validation datasets from one or more folders.

    A root with `DIV2K_train_HR` (and `DIV2K_valid_HR`) uses the DIV2K split, paired with
    `DIV2K_*_LR_bicubic/X{s}` when present; `Flickr2K/Flickr2K_HR` next to it is added to training
    (DF2K). A root with `train/` and `val/` (or `valid/`, `test/`) uses those. Any other folder is
    a set of HR images whose every tenth image is held out. `val_data` (a folder, e.g. `.../Set14`)
    replaces the validation set.
    """
    roots = [Path(d) for d in ([data] if isinstance(data, (str, os.PathLike)) else data)]
    kw = dict(patch_size=patch_size, repeat=repeat)
    train_sets, val_sets = [], []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        if (root / "DIV2K_train_HR").is_dir():
            train_sets.append(_folder_dataset(root / "DIV2K_train_HR", scale, True, **kw))
            if (root / "DIV2K_valid_HR").is_dir():
                val_sets.append(_folder_dataset(root / "DIV2K_valid_HR", scale, False))
            for flickr in (root / "Flickr2K" / "Flickr2K_HR", root / "Flickr2K_HR"):
                if flickr.is_dir():
                    train_sets.append(_folder_dataset(flickr, scale, True, **kw))
                    break
            continue
        split = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
        if "train" in split:
            train_sets.append(_folder_dataset(split["train"], scale, True, **kw))
            for v in ("val", "valid", "validation", "test"):
                if v in split:
                    val_sets.append(_folder_dataset(split[v], scale, False))
                    break
            continue
        ds = _folder_dataset(root, scale, True, **kw)
        if isinstance(ds, HRImageDataset) and val_data is None and len(ds.src) >= 2:
            paths = list(ds.src.images)
            held = paths[9::10] or paths[-1:]
            kept = [p for p in paths if p not in held]
            train_sets.append(HRImageDataset(kept, scale, train=True, **kw))
            held_out = HRImageDataset(held, scale, train=False)
            held_out.layout = (f"{len(held)} of the {len(paths)} HR images in {root} held out (every tenth; "
                               f"pass --val-data to validate elsewhere), LR by MATLAB bicubic ×1/{scale}")
            val_sets.append(held_out)
        else:
            train_sets.append(ds)
    if val_data is not None:
        val_sets = [eval_dataset(val_data, scale, root=roots[0])]
    if not val_sets:
        raise ValueError(f"no validation images found in {[str(r) for r in roots]}: pass a validation folder")
    train = train_sets[0] if len(train_sets) == 1 else ConcatDataset(train_sets)
    val = val_sets[0] if len(val_sets) == 1 else ConcatDataset(val_sets)
    return train, val


# ---------------------------------------------------------------------------------------------
# Built-in, offline: scikit-image's photographs
# ---------------------------------------------------------------------------------------------

BUILTIN_TRAIN = ("astronaut", "rocket", "camera", "brick", "grass", "gravel", "moon",
                 "immunohistochemistry", "hubble_deep_field", "stereo_motorcycle", "retina", "colorwheel")
BUILTIN_TEST = ("chelsea", "coffee", "coins", "text")


def builtin_images(split: str) -> tuple[list[np.ndarray], list[str]]:
    """The scikit-image photographs of one split ('train' or 'test') as RGB uint8 arrays."""
    from skimage import data as skdata

    names = {"train": BUILTIN_TRAIN, "test": BUILTIN_TEST}[split]
    images = []
    for name in names:
        img = getattr(skdata, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity) → the left view
            img = img[0]
        images.append(_as_rgb(np.asarray(img)))
    return images, list(names)
