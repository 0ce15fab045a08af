"""Land-cover scenes for patch-based per-pixel classification (WetMapFormer's setting).

A scene is a multi-band raster (H × W × C: e.g. Sentinel-2 reflectances + Sentinel-1 backscatter)
and a label raster of the same H × W (0 = unlabelled, any other integer a class). Readers:

- GeoTIFF (`.tif`/`.tiff`, read with tifffile; bands as samples, planes or pages). Georeferencing
  tags (ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDouble/AsciiParams,
  GDAL nodata) are kept as `extratags` so the predicted class map is written back georeferenced.
- NumPy `.npy` (H × W × C, or C × H × W when the label raster says so).
- MATLAB `.mat` — the authors' format: `scipy.io.loadmat` of a dict holding one array
  (`SA1.mat` → `SA1`, `SA1_gt.mat` → `SA1_gt`), or several (hyperspectral scenes such as Indian
  Pines, Salinas, Pavia and Houston ship the cube, the labels and an RGB preview in one file): the
  variables are chosen by name (`data_key` / `label_key`, the CLI's `--data-key` / `--label-key`),
  else by elimination, and an ambiguous choice is an error listing every variable with its shape
  and dtype. v7.3 files are HDF5: read with h5py when it is installed, else a clear error.

Patches follow the authors' notebook (`createImageCubes`): the scene is zero-padded (raw zeros,
before normalisation, so a padded pixel is (0 − mean) / std like the Keras Normalization layer gives
it) and a P × P patch is cut around every labelled pixel at rows r − P//2 … r − P//2 + P − 1: for
the default even P = 8 the labelled pixel sits at index (4, 4), off-centre. Patches are cut on the
fly from the padded scene (no N × P × P × C copy). Raw values that are NaN/inf or < −1000 become −1
as in the notebook, and `load_scene` says how many pixels and which bands that touched (a warning
line on stderr, and `Scene.nodata`). Normalisation is per band, with statistics from the training pixels only.

Augmentation (optional, training only): the notebook's Keras flips/rotation/zoom move the labelled
pixel off index (4, 4); here the 8 flips/transposes of the dihedral group are taken *about the
labelled pixel* (the flipped window is cut one pixel shifted), so the label stays correct.

Splits, always named in the results:
- "random": the paper's protocol — a stratified random 70/30 split of labelled pixels
  (`train_test_split(test_size=0.3, stratify=y, random_state=345)`). Neighbouring patches overlap
  (7/8 of the rows of adjacent pixels' patches are shared), so its accuracy is optimistic.
- "block": spatially disjoint — the scene is cut into square blocks, whole blocks go to validation
  until 30 % of the labelled pixels do, and training pixels within `buffer` pixels (default: the
  patch size) of a validation block are dropped, so no training patch shares a pixel with a
  validation patch.

The built-in scene (`make_synthetic_scene`) is SYNTHETIC: generated, not observed. Seven wetland
classes (water, marsh, bog, fen, forested wetland, shrub wetland, upland) are laid out as smooth
random regions; 12 Sentinel-2-like L2A reflectance bands carry class spectra with smooth
within-class variation and sensor noise, and 4 Sentinel-1-like backscatter bands (VV and VH from two
orbits) carry class backscatter with multiplicative gamma speckle, in dB. 12 + 4 = 16 bands, the
count the paper's notebook uses (its band list was not published).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "WETLAND_CLASSES", "SYNTHETIC_BANDS", "GEO_TAG_CODES", "Scene", "read_raster", "to_hwc", "load_scene",
    "parse_bands", "clean_nodata", "nodata_counts", "nodata_message", "mat_variables", "describe_variables",
    "encode_labels", "labelled_pixels", "random_split", "block_split", "band_stats",
    "pad_and_normalise", "d4_offsets", "extract_patches", "PatchDataset", "make_synthetic_scene", "RasterSource",
    "write_geotiff",
]

WETLAND_CLASSES = ("water", "marsh", "bog", "fen", "forested wetland", "shrub wetland", "upland")
SYNTHETIC_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
                   "VV_asc", "VH_asc", "VV_desc", "VH_desc")
# GeoTIFF georeferencing tags kept from the input and written with the output map
GEO_TAG_CODES = {33550: "ModelPixelScale", 33922: "ModelTiepoint", 34264: "ModelTransformation",
                 34735: "GeoKeyDirectory", 34736: "GeoDoubleParams", 34737: "GeoAsciiParams",
                 42113: "GDAL_NODATA"}
RASTER_EXTENSIONS = (".tif", ".tiff", ".npy", ".mat")


@dataclass
class Scene:
    """One scene: raw bands (H, W, C) float32, labels (H, W) int (0 = unlabelled) or None."""

    image: np.ndarray
    labels: np.ndarray | None = None
    band_names: list[str] | None = None
    class_names: list[str] | None = None        # one per class value, in increasing value order
    geo: list[tuple] = field(default_factory=list)   # tifffile `extratags` to georeference outputs
    name: str = "scene"
    synthetic: bool = False
    nodata: dict[str, Any] = field(default_factory=dict)   # what `clean_nodata` replaced (see `nodata_counts`)


# --------------------------------------------------------------------------------------- readers
def mat_variables(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every numeric array (2-D or more) of a MATLAB file, by variable name.

    v4–v7 files are read by scipy; v7.3 files are HDF5 and are read with h5py when it is installed
    (arrays transposed back from HDF5's reversed, row-major view of MATLAB's column-major data).
    """
    from scipy.io import loadmat

    path = os.fspath(path)
    try:
        d = loadmat(path)
    except NotImplementedError as e:  # scipy's answer to v7.3 (HDF5) files
        return _mat73_variables(path, e)
    return {k: v for k, v in d.items()
            if not k.startswith("__") and isinstance(v, np.ndarray) and v.ndim >= 2 and v.dtype.kind in "biuf"}


def _mat73_variables(path: str, cause: Exception) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise ValueError(f"{path!r} is a MATLAB v7.3 (HDF5) file: install h5py (`pip install h5py`) to read it, "
                         "or save it in MATLAB with `save(..., '-v7')`, or convert it to .npy/.tif") from cause
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for k, v in f.items():
            if isinstance(v, h5py.Dataset) and not k.startswith("#") and v.ndim >= 2 and v.dtype.kind in "biuf":
                out[k] = np.ascontiguousarray(np.asarray(v).T)
    return out


def describe_variables(arrays: dict[str, np.ndarray]) -> str:
    """"a (145×145×200 uint16), b (145×145 uint8)" — what a user needs to pick a variable."""
    return ", ".join(f"{k} ({'×'.join(str(s) for s in v.shape)} {v.dtype})" for k, v in sorted(arrays.items())) or "none"


def _mat_array(path: str, key: str | None = None, role: str = "data", exclude: Sequence[str] = ()) -> np.ndarray:
    """One variable of a .mat file: `key`, else the only candidate, else the one named like the file.

    `role` ("data" or "label") names the option in errors and, when the choice is otherwise open,
    prefers the only 3-D array (a cube) or the only 2-D array (a label raster); `exclude` leaves
    out a variable already taken for the other role (scenes that ship cube and labels in one file).
    """
    option = "--data-key" if role == "data" else "--label-key"
    arrays = mat_variables(path)
    if key is not None:
        if key not in arrays:
            raise ValueError(f"{path!r} has no numeric variable {key!r} ({option}); it holds: {describe_variables(arrays)}")
        return arrays[key]
    cands = {k: v for k, v in arrays.items() if k not in exclude}
    if len(cands) == 1:
        return next(iter(cands.values()))
    stem = Path(path).stem.lower()
    named = [k for k in cands if k.lower() == stem]   # Indian_pines_corrected.mat holds indian_pines_corrected
    if len(named) == 1:
        return cands[named[0]]
    by_rank = [k for k, v in cands.items() if v.ndim == (3 if role == "data" else 2)]
    if len(by_rank) == 1 and len(cands) > 1:
        return cands[by_rank[0]]
    raise ValueError(f"{path!r} holds {len(arrays)} arrays and which one is the {role} is ambiguous: "
                     f"{describe_variables(arrays)}; name it with {option} NAME")


def _tiff_geo(page) -> list[tuple]:
    tags = []
    for code in GEO_TAG_CODES:
        tag = page.tags.get(code)
        if tag is not None:
            value = tag.value
            count = len(value) if isinstance(value, (tuple, list)) else (0 if isinstance(value, str) else 1)
            tags.append((code, int(tag.dtype), count, value, True))
    return tags


def _tiff_read(path: str, mmap: bool = False) -> tuple[Any, str, list[tuple]]:
    """(array, axes, geo tags); a memory map when `mmap` and the file is uncompressed and contiguous."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        geo = _tiff_geo(tif.pages[0])
        arr = None
        if mmap:
            try:
                arr = tifffile.memmap(path, mode="r")
            except ValueError:
                arr = None
        if arr is None:
            arr = series.asarray()
    return arr, axes, geo


def read_raster(path: str | os.PathLike, mmap: bool = False, key: str | None = None, role: str = "data",
                exclude: Sequence[str] = ()) -> tuple[Any, str | None, list[tuple]]:
    """Read a raster as stored: (array, tifffile axes string or None, geo tags).

    `key` names the variable of a `.mat` file (see `_mat_array`); other formats hold one raster.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"raster not found: {path!r}")
    ext = Path(path).suffix.lower()
    if key is not None and ext != ".mat":
        raise ValueError(f"{'--data-key' if role == 'data' else '--label-key'} names a variable of a MATLAB .mat "
                         f"file, but {path!r} is a {ext} raster")
    if ext in (".tif", ".tiff"):
        return _tiff_read(path, mmap)
    if ext == ".npy":
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False), None, []
    if ext == ".mat":
        return _mat_array(path, key, role, exclude), None, []
    raise ValueError(f"{path!r}: unsupported raster format {ext!r}; expected one of {RASTER_EXTENSIONS}")


def to_hwc(arr: Any, axes: str | None = None, hw: tuple[int, int] | None = None) -> Any:
    """Bring a stored raster to (H, W, C) (a view where possible).

    The tifffile axes decide for TIFFs (S = samples; a leading plane/page axis = bands). Otherwise the
    label raster's (H, W) decides, and without one a leading axis much smaller than the other two is
    taken as bands (C × H × W); a 2-D raster is one band.
    """
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D raster, got shape {tuple(arr.shape)}")
    if axes is not None and len(axes) == 3:
        if axes.endswith("S") or axes[:2] == "YX":
            return arr
        return np.moveaxis(arr, 0, -1)
    if hw is not None:
        if tuple(arr.shape[:2]) == tuple(hw):
            return arr
        if tuple(arr.shape[1:]) == tuple(hw):
            return np.moveaxis(arr, 0, -1)
        raise ValueError(f"raster of shape {tuple(arr.shape)} does not match the label raster's {tuple(hw)}")
    if arr.shape[0] < min(arr.shape[1:]) and arr.shape[-1] > arr.shape[0] and arr.shape[0] <= 64:
        return np.moveaxis(arr, 0, -1)
    return arr


def parse_bands(spec: str | Sequence[int] | None, n_bands: int | None = None) -> list[int] | None:
    """"0,2,5-7" → [0, 2, 5, 6, 7] (0-based, ranges inclusive); None → all bands."""
    if spec is None or spec == "" or spec == "all":
        return None
    if isinstance(spec, str):
        out: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    else:
        out = [int(b) for b in spec]
    if not out:
        raise ValueError(f"no bands in {spec!r}")
    if n_bands is not None and (min(out) < 0 or max(out) >= n_bands):
        raise ValueError(f"bands {spec!r} out of range for a raster with {n_bands} bands (0-based)")
    return out


def _nodata_mask(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(x) | (x < -1000)


def clean_nodata(x: np.ndarray) -> np.ndarray:
    """The notebook's nodata rule: NaN (and ±inf) and values < −1000 become −1. Returns float32."""
    x = np.array(x, dtype=np.float32, copy=True)
    x[_nodata_mask(x)] = -1.0
    return x


def nodata_counts(x: np.ndarray) -> dict[str, Any]:
    """What `clean_nodata` would replace in an (H, W, C) raster: {"pixels": pixels with at least one
    such value, "values": values replaced, "per_band": {band index: values}} (bands with none left out)."""
    bad = _nodata_mask(np.asarray(x, dtype=np.float32))
    per_band = bad.reshape(-1, bad.shape[-1]).sum(0)
    return {"pixels": int(bad.any(-1).sum()), "values": int(per_band.sum()),
            "per_band": {int(b): int(n) for b, n in enumerate(per_band) if n}}


def nodata_message(where: str, counts: dict[str, Any], shape: Sequence[int],
                   band_names: Sequence[str] | None = None) -> str:
    """One line saying how many pixels and which bands were NaN/inf or < −1000 and set to −1."""
    names = list(band_names) if band_names else None
    bands = ", ".join(f"{names[b] if names and b < len(names) else f'band {b}'}: {n:,}"
                      for b, n in list(counts["per_band"].items())[:8])
    more = f", … ({len(counts['per_band'])} bands)" if len(counts["per_band"]) > 8 else ""
    return (f"warning: {where}: {counts['pixels']:,} of {int(shape[0]) * int(shape[1]):,} pixels had NaN/inf or "
            f"< −1000 values ({counts['values']:,} values in {len(counts['per_band'])} of {int(shape[2])} bands: "
            f"{bands}{more}); they were set to −1 (the WetMapFormer notebook's nodata rule)")


def load_scene(image: str | os.PathLike, label: str | os.PathLike | None = None,
               bands: str | Sequence[int] | None = None, class_names: Sequence[str] | None = None,
               data_key: str | None = None, label_key: str | None = None, warn: bool = True) -> Scene:
    """Read a scene from files (GeoTIFF, .npy or .mat); `bands` selects and orders bands (0-based).

    `data_key` / `label_key` name the variables of `.mat` files; with `label_key` and no `label`
    the labels are read from the image's own file. NaN/inf and < −1000 values become −1 and, with
    `warn`, a line on stderr says how many (also kept in `Scene.nodata`).
    """
    import sys

    labels = None
    if label is None and label_key is not None:
        label = image
    same_file = label is not None and os.path.abspath(os.fspath(label)) == os.path.abspath(os.fspath(image))
    if label is not None:
        lab, _, _ = read_raster(label, key=label_key, role="label",
                                exclude=(data_key,) if same_file and data_key else ())
        lab = np.asarray(lab)
        if lab.ndim == 3 and 1 in lab.shape:
            lab = lab.reshape([s for s in lab.shape if s != 1])
        if lab.ndim != 2:
            raise ValueError(f"label raster {os.fspath(label)!r} must be 2-D (H, W), got shape {lab.shape}"
                             + (" (choose the label variable with --label-key)" if Path(label).suffix.lower() == ".mat" else ""))
        if not np.issubdtype(lab.dtype, np.integer):
            if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
                raise ValueError(f"label raster {os.fspath(label)!r} must hold integers (0 = unlabelled)")
            lab = lab.astype(np.int64)
        if lab.min() < 0:
            raise ValueError(f"label raster {os.fspath(label)!r} has negative values; 0 = unlabelled, classes > 0")
        labels = lab.astype(np.int64)
    arr, axes, geo = read_raster(image, key=data_key, role="data", exclude=(label_key,) if same_file and label_key else ())
    img = to_hwc(arr, axes, labels.shape if labels is not None else None)
    sel = parse_bands(bands, img.shape[-1])
    if sel is not None:
        img = img[..., sel]
    counts = nodata_counts(img)
    img = clean_nodata(img)
    if counts["values"] and warn:
        print(nodata_message(os.fspath(image), counts, img.shape), file=sys.stderr)
    if labels is not None and labels.shape != img.shape[:2]:
        raise ValueError(f"label raster {labels.shape} and image {img.shape[:2]} differ in size")
    return Scene(image=img, labels=labels, class_names=list(class_names) if class_names else None, geo=geo,
                 name=Path(image).stem, nodata=counts)


# --------------------------------------------------------------------------------------- labels and splits
def encode_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label values → class indices 0..K−1 in increasing value order (−1 = unlabelled), and the values."""
    values = np.unique(labels[labels > 0])
    if values.size == 0:
        raise ValueError("the label raster has no labelled pixel (every value is 0)")
    lut = np.full(int(values.max()) + 1, -1, dtype=np.int64)
    lut[values] = np.arange(values.size)
    return lut[labels], values


def labelled_pixels(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) row/col coordinates of labelled pixels (row-major order) and their class indices."""
    rows, cols = np.nonzero(targets >= 0)
    return np.stack([rows, cols], 1), targets[rows, cols]


def random_split(y: np.ndarray, val_fraction: float = 0.3, seed: int = 345) -> tuple[np.ndarray, np.ndarray]:
    """The paper's stratified random pixel split (sklearn `train_test_split`, random_state 345)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


def block_split(coords: np.ndarray, y: np.ndarray, shape: tuple[int, int], block_size: int = 32,
                val_fraction: float = 0.3, buffer: int = 8, seed: int = 0, trials: int = 64
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spatially disjoint split: whole blocks to validation, a buffer of dropped training pixels.

    Blocks (block_size × block_size) holding labelled pixels are added to validation in a random order
    until `val_fraction` of the labelled pixels are in it; of `trials` random orders the one covering
    the most classes on both sides, then closest to the fraction, is kept. Training pixels within
    `buffer` pixels (Chebyshev) of a validation block are dropped. Returns (train_idx, val_idx,
    val_mask (H, W) bool).
    """
    from scipy.ndimage import binary_dilation

    H, W = shape
    nbw = -(-W // block_size)
    block = (coords[:, 0] // block_size) * nbw + coords[:, 1] // block_size
    ids, inv = np.unique(block, return_inverse=True)
    K = int(y.max()) + 1
    per_block = np.zeros((len(ids), K), dtype=np.int64)
    np.add.at(per_block, (inv, y), 1)
    total = per_block.sum(0)
    target = val_fraction * len(y)
    rng = np.random.default_rng(seed)
    best, best_score = None, None
    for _ in range(max(1, trials)):
        order = rng.permutation(len(ids))
        cum = np.cumsum(per_block[order].sum(1))
        n = int(np.searchsorted(cum, target)) + 1
        n = min(max(n, 1), len(ids) - 1) if len(ids) > 1 else 1
        chosen = order[:n]
        val_counts = per_block[chosen].sum(0)
        covered = int(((val_counts > 0) & (total - val_counts > 0)).sum())
        score = (covered, -abs(val_counts.sum() - target))
        if best_score is None or score > best_score:
            best, best_score = chosen, score
    val_blocks = np.zeros(len(ids), dtype=bool)
    val_blocks[best] = True
    is_val = val_blocks[inv]
    val_mask = np.zeros((H, W), dtype=bool)
    for b in ids[val_blocks]:
        r0, c0 = (b // nbw) * block_size, (b % nbw) * block_size
        val_mask[r0:r0 + block_size, c0:c0 + block_size] = True
    near = binary_dilation(val_mask, structure=np.ones((2 * buffer + 1,) * 2, dtype=bool)) if buffer > 0 else val_mask
    keep_train = ~is_val & ~near[coords[:, 0], coords[:, 1]]
    return np.nonzero(keep_train)[0], np.nonzero(is_val)[0], val_mask


def band_stats(image: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std over the given (training) pixels; std floored to avoid division by 0."""
    px = image[coords[:, 0], coords[:, 1]].astype(np.float64)
    mean = px.mean(0)
    std = px.std(0)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


# --------------------------------------------------------------------------------------- patches
def pad_and_normalise(raw: np.ndarray, mean: np.ndarray, std: np.ndarray, pad: int) -> torch.Tensor:
    """Zero-pad raw (H, W, C) bands by `pad` (raw zeros, as the notebook), then normalise per band."""
    H, W, C = raw.shape
    out = np.zeros((H + 2 * pad, W + 2 * pad, C), dtype=np.float32)
    out[pad:pad + H, pad:pad + W] = raw
    out -= mean
    out /= std
    return torch.from_numpy(out)


def d4_offsets(patch_size: int) -> torch.Tensor:
    """(8, 2, P, P) row/col offsets from the labelled pixel for the 8 flips/transposes about it.

    Element 0 is the identity: rows r − P//2 … r − P//2 + P − 1, the notebook's window. Every element
    maps patch index (P//2, P//2) to the labelled pixel; flipped windows reach P//2 on the far side.
    """
    u = torch.arange(patch_size) - patch_size // 2
    a, b = torch.meshgrid(u, u, indexing="ij")
    out = []
    for transpose in (False, True):
        for fr in (1, -1):
            for fc in (1, -1):
                r, c = (b, a) if transpose else (a, b)
                out.append(torch.stack([fr * r, fc * c]))
    return torch.stack(out)


def extract_patches(padded: torch.Tensor, coords: torch.Tensor, patch_size: int, pad: int,
                    offsets: torch.Tensor | None = None, transform: torch.Tensor | None = None) -> torch.Tensor:
    """Cut (N, C, P, P) patches around `coords` (N, 2, scene coordinates) from a padded (H+2p, W+2p, C) scene.

    `transform` (N,) picks one of `offsets` (from `d4_offsets`) per patch; None = the plain window.
    """
    if offsets is None:
        offsets = d4_offsets(patch_size)
    offsets = offsets.to(coords.device)
    off = offsets[0].expand(len(coords), -1, -1, -1) if transform is None else offsets[transform]
    rows = coords[:, 0, None, None] + pad + off[:, 0]
    cols = coords[:, 1, None, None] + pad + off[:, 1]
    return padded[rows, cols].permute(0, 3, 1, 2).contiguous()


class PatchDataset(Dataset):
    """Patches around labelled pixels of one normalised, padded scene: items are (C×P×P float, class)."""

    def __init__(self, padded: torch.Tensor, coords: np.ndarray, targets: np.ndarray, patch_size: int,
                 augment: bool = False, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 scene: Scene | None = None):
        self.padded = padded
        self.coords = torch.as_tensor(np.asarray(coords), dtype=torch.long).reshape(-1, 2)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.patch_size = patch_size
        self.pad = patch_size // 2
        self.augment = augment
        self.offsets = d4_offsets(patch_size)
        self.num_classes = num_classes if num_classes is not None else int(self.targets.max()) + 1
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        self.scene = scene   # for maps; never serialised into the run's info

    def __len__(self) -> int:
        return len(self.targets)

    def patches(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        coords = self.coords[index]
        transform = torch.randint(0, 8, (len(index),)) if self.augment else None
        x = extract_patches(self.padded, coords, self.patch_size, self.pad, self.offsets, transform)
        return x, self.targets[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.patches([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # the DataLoader's batched fetch: one vectorised cut for the whole batch
        x, y = self.patches(indices)
        return list(zip(x.unbind(0), y.unbind(0)))


# --------------------------------------------------------------------------------------- the built-in scene
# Class spectra (surface reflectance, 12 Sentinel-2 L2A bands B1..B12 without B10) — plausible shapes,
# not measured endmembers: water dark and falling into the NIR/SWIR, vegetation with a red edge, the
# peatland classes (bog, fen, shrub wetland) deliberately close to each other.
_SPECTRA = np.array([
    [0.060, 0.062, 0.055, 0.035, 0.030, 0.022, 0.020, 0.016, 0.015, 0.010, 0.006, 0.004],   # water
    [0.040, 0.050, 0.080, 0.060, 0.110, 0.220, 0.270, 0.300, 0.310, 0.300, 0.200, 0.110],   # marsh
    [0.030, 0.040, 0.060, 0.050, 0.090, 0.180, 0.220, 0.240, 0.250, 0.240, 0.170, 0.090],   # bog
    [0.034, 0.045, 0.068, 0.055, 0.098, 0.195, 0.240, 0.262, 0.272, 0.262, 0.185, 0.098],   # fen
    [0.020, 0.030, 0.050, 0.030, 0.070, 0.200, 0.260, 0.300, 0.310, 0.300, 0.150, 0.070],   # forested wetland
    [0.028, 0.038, 0.060, 0.042, 0.082, 0.205, 0.255, 0.285, 0.295, 0.285, 0.170, 0.082],   # shrub wetland
    [0.045, 0.055, 0.085, 0.075, 0.115, 0.215, 0.255, 0.280, 0.290, 0.280, 0.230, 0.140],   # upland
], dtype=np.float32)
# Mean backscatter in dB (VV, VH): open water specular and dark; emergent marsh and flooded forest
# bright in VV (double bounce); peatlands in between; the two orbits share the class means.
_BACKSCATTER_DB = np.array([
    [-21.0, -27.0], [-8.5, -16.5], [-12.0, -19.0], [-11.0, -18.5], [-7.0, -13.0], [-9.5, -15.5], [-9.0, -14.5],
], dtype=np.float32)
# class prior offsets for the argmax of the region fields: upland common, fen and water rarer
_PRIOR = np.array([0.1, 0.0, 0.15, -0.15, 0.0, -0.05, 0.45], dtype=np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma=(0,) * (len(shape) - 2) + (sigma, sigma), mode="wrap")
    axes = tuple(range(len(shape) - 2, len(shape)))
    f = (f - f.mean(axis=axes, keepdims=True)) / (f.std(axis=axes, keepdims=True) + 1e-12)
    return f.astype(np.float32)


def make_synthetic_scene(height: int = 160, width: int = 160, seed: int = 0, looks: int = 4,
                         label_fraction: float = 0.5, region_scale: float | None = None,
                         optical_noise: float = 0.02) -> Scene:
    """A SYNTHETIC 16-band wetland scene with a sparse label raster; deterministic by `seed`.

    Class regions: argmax over seven smoothed Gaussian noise fields plus class priors (smooth blobs).
    Optical bands: class spectrum × (1 + 10 % smooth brightness variation) + 0.005 smooth per-band
    variation + Gaussian sensor noise (`optical_noise`, 0.02 reflectance). SAR bands: class σ⁰
    (dB → linear) × smooth ±1 dB variation × Gamma(L, 1/L) speckle (L = `looks`, independent per
    band and pixel), back in dB.
    Labels: "field survey" regions (a thresholded smooth field covering `label_fraction` of the
    scene) carry their class value 1..7; the rest is 0.
    """
    rng = np.random.default_rng(seed)
    sigma = region_scale if region_scale is not None else max(2.0, min(height, width) / 20)
    K = len(WETLAND_CLASSES)
    fields = _smooth_field(rng, (K, height, width), sigma)
    cls = np.argmax(fields + _PRIOR[:, None, None], axis=0)
    bright = _smooth_field(rng, (1, height, width), sigma / 2)[0]
    band_var = _smooth_field(rng, (12, height, width), sigma / 2)
    optical = _SPECTRA[cls] * (1.0 + 0.10 * bright[..., None]) + 0.005 * np.moveaxis(band_var, 0, -1)
    optical += optical_noise * rng.standard_normal(optical.shape).astype(np.float32)
    sar_db = np.repeat(_BACKSCATTER_DB[cls], 2, axis=-1)          # VV, VH, VV, VH (two orbits)
    sar_var = _smooth_field(rng, (1, height, width), sigma / 2)[0]
    linear = 10.0 ** ((sar_db + 1.0 * sar_var[..., None]) / 10.0)
    speckle = rng.gamma(shape=looks, scale=1.0 / looks, size=linear.shape).astype(np.float32)
    sar = 10.0 * np.log10(linear * speckle + 1e-10)
    image = np.concatenate([optical, sar], axis=-1).astype(np.float32)
    survey = _smooth_field(rng, (1, height, width), sigma * 0.75)[0]
    labelled = survey > np.quantile(survey, 1.0 - label_fraction)
    labels = np.where(labelled, cls + 1, 0).astype(np.int64)
    return Scene(image=image, labels=labels, band_names=list(SYNTHETIC_BANDS), class_names=list(WETLAND_CLASSES),
                 name=f"synthetic-wetland-{height}x{width}-seed{seed}", synthetic=True)


# --------------------------------------------------------------------------------------- whole-scene I/O
class RasterSource:
    """A scene raster read row-block by row-block (memory-mapped where the format allows), for predict.

    Uncompressed contiguous GeoTIFFs and `.npy` files are memory-mapped, so a scene larger than RAM
    is never loaded at once; compressed TIFFs and `.mat` files are read whole.
    """

    def __init__(self, path: str | os.PathLike, bands: Sequence[int] | None = None, key: str | None = None):
        arr, axes, geo = read_raster(path, mmap=True, key=key)
        self.array = to_hwc(arr, axes)
        self.geo = geo
        self.path = os.fspath(path)
        self.height, self.width, n = self.array.shape
        self.bands = list(bands) if bands is not None else None
        if self.bands is not None and (min(self.bands) < 0 or max(self.bands) >= n):
            raise ValueError(f"{self.path!r} has {n} bands; the model was trained on bands {self.bands}")
        self.num_bands = len(self.bands) if self.bands is not None else n
        self.nodata = {"pixels": 0, "values": 0, "per_band": {}}   # summed over the rows read

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Raw bands of rows [r0, r1) as float32 (H', W, C), nodata cleaned (and counted in `nodata`)."""
        block = np.asarray(self.array[r0:r1])
        if self.bands is not None:
            block = block[..., self.bands]
        c = nodata_counts(block)
        self.nodata["pixels"] += c["pixels"]
        self.nodata["values"] += c["values"]
        for b, n in c["per_band"].items():
            self.nodata["per_band"][b] = self.nodata["per_band"].get(b, 0) + n
        return clean_nodata(block)


def write_geotiff(path: str | os.PathLike, array: np.ndarray, geo: Sequence[tuple] = ()) -> None:
    """Write a 2-D map as a (Geo)TIFF, with the input's georeferencing tags when there are any."""
    import tifffile

    tifffile.imwrite(os.fspath(path), array, photometric="minisblack", extratags=list(geo))
