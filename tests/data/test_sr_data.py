"""MATLAB-compatible bicubic resizing and the super-resolution readers."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from hybridzoo.data.super_resolution import (
    HRImageDataset, PairedImageDataset, benchmark_dataset, bicubic_downsample, bicubic_upsample, build_sr_datasets,
    builtin_images, describe, eval_dataset, imresize, quantize, save_image, sr_collate,
)


def _keys_cubic(t: float) -> float:
    a = abs(t)
    if a <= 1:
        return 1.5 * a ** 3 - 2.5 * a ** 2 + 1
    if a <= 2:
        return -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2
    return 0.0


def _matlab_resize_1d(x: list[float], scale: float) -> list[float]:
    """MATLAB imresize along one axis, pixel by pixel: pad symmetrically, then weight each output."""
    n = len(x)
    out_len = math.ceil(n * scale)
    aa = scale < 1
    half = (2.0 / scale if aa else 2.0)

    def sample(k: int) -> float:  # 1-based index with symmetric (edge-repeating) extension
        period = 2 * n
        m = (k - 1) % period
        return x[m] if m < n else x[period - 1 - m]

    out = []
    for j in range(1, out_len + 1):
        u = j / scale + 0.5 * (1 - 1 / scale)
        ks = range(math.floor(u - half), math.ceil(u + half) + 1)
        w = [(scale * _keys_cubic(scale * (u - k)) if aa else _keys_cubic(u - k)) for k in ks]
        s = sum(w)
        out.append(sum(wi * sample(k) for wi, k in zip(w, ks)) / s)
    return out


def _matlab_resize_2d(img: np.ndarray, scale: float) -> np.ndarray:
    rows = np.array([_matlab_resize_1d(list(col), scale) for col in img.T]).T   # along H first
    return np.array([_matlab_resize_1d(list(r), scale) for r in rows])


def test_hand_computed_border_value():
    # imresize((1:16)', 0.5): first output, u = 1.5, weights 0.5·cubic(0.5·(u - k)) for k = -2..5,
    # samples 3 2 1 1 2 3 4 5 after symmetric padding → 371/256
    y = imresize(torch.arange(1, 17, dtype=torch.float64)[:, None].repeat(1, 4), 0.5)[:, 0]
    assert y[0].item() == pytest.approx(371 / 256, abs=1e-12)
    # far from the borders the antialiased cubic reproduces a ramp: output j sits at input 2j - 0.5
    torch.testing.assert_close(y[2:6], torch.tensor([5.5, 7.5, 9.5, 11.5], dtype=torch.float64))


@pytest.mark.parametrize("shape,scale", [((9, 11), 0.5), ((13, 10), 1 / 3), ((12, 17), 0.25), ((5, 7), 2.0),
                                         ((4, 6), 3.0), ((3, 3), 0.5)])
def test_imresize_matches_reference(shape, scale):
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=shape)
    ref = _matlab_resize_2d(img, scale)
    got = imresize(torch.from_numpy(img)[None], scale)[0].numpy()
    assert got.shape == (math.ceil(shape[0] * scale), math.ceil(shape[1] * scale))
    np.testing.assert_allclose(got, ref, atol=1e-9)


def _matlab_imresize_uint8(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(uint8 img, scale, 'bicubic')`` in exact rational arithmetic, pixel by pixel.

    Straight from imresize.m: `contributions` (kernel stretched by 1/scale when shrinking, weights
    normalised per output pixel, indices mirrored through [1:n, n:-1:1]), the dimension with the
    smallest scale first (rows on ties), and `imresizemex` writing each pass in the input's class,
    uint8: round half away from zero, saturate to [0, 255].
    """
    s = Fraction(scale).limit_denominator(1000)

    def cubic(t: Fraction) -> Fraction:
        a = abs(t)
        if a <= 1:
            return Fraction(3, 2) * a ** 3 - Fraction(5, 2) * a ** 2 + 1
        if a <= 2:
            return -Fraction(1, 2) * a ** 3 + Fraction(5, 2) * a ** 2 - 4 * a + 2
        return Fraction(0)

    def to_uint8(v: Fraction) -> int:
        return int(min(max(math.floor(v + Fraction(1, 2)), 0), 255))

    def resize_1d(x: list[int]) -> list[int]:
        n = len(x)
        aux = list(range(1, n + 1)) + list(range(n, 0, -1))
        width = 4 / s if s < 1 else Fraction(4)
        out = []
        for j in range(1, math.ceil(n * s) + 1):
            u = j / s + (1 - 1 / s) / 2
            left = math.floor(u - width / 2)
            ks = range(left, left + math.ceil(width) + 2)
            w = [s * cubic(s * (u - k)) if s < 1 else cubic(u - k) for k in ks]
            total = sum(w)
            out.append(to_uint8(sum(wi / total * x[aux[(k - 1) % (2 * n)] - 1] for wi, k in zip(w, ks))))
        return out

    cols = np.array([resize_1d([int(v) for v in col]) for col in img.T]).T     # dim 1 (rows) first
    return np.array([resize_1d([int(v) for v in row]) for row in cols], dtype=np.uint8)


def test_uint8_hand_computed_rounds_after_each_pass():
    # imresize(uint8([0 255; 255 0]), 2). Along a length-2 line the outputs sit at u = .75, 1.25, 1.75,
    # 2.25; the cubic at the distances, with symmetric padding (a a | b b), gives (140a - 12b)/128,
    # (102a + 26b)/128 and their mirrors. Rows first: column [0; 255] → [-23.9 51.8 203.2 278.9] →
    # uint8 [0 52 203 255], column [255; 0] → [255 203 52 0]. Second pass on row [52 203]:
    # 4844/128, 10582/128, 22058/128, 27796/128 → [38 83 172 217].
    img = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8)
    expected = torch.tensor([[0, 52, 203, 255], [38, 83, 172, 217], [217, 172, 83, 38], [255, 203, 52, 0]],
                            dtype=torch.uint8)
    got = imresize(img, 2.0)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)
    assert torch.equal(bicubic_upsample(img.float(), 2), expected.float())
    # rounding once at the end (MATLAB on a double image) clips the first pass's -23.9 / 278.9 too late
    assert quantize(imresize(img.double(), 2.0))[0].tolist() == [0, 38, 217, 255]


@pytest.mark.parametrize("shape,scale", [((9, 11), 0.5), ((13, 10), 1 / 3), ((17, 12), 0.25), ((7, 5), 2.0),
                                         ((5, 6), 3.0), ((3, 5), 4.0), ((11, 11), 0.5)])
def test_uint8_bit_exact_with_matlab_reference(shape, scale):
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    ref = _matlab_imresize_uint8(img, scale)
    got = imresize(torch.from_numpy(img), scale)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), ref)
    # the degradation functions are the same path on float tensors holding uint8 values, per channel
    rgb = torch.from_numpy(np.stack([img, img[::-1, ::-1], 255 - img])).float()
    f = bicubic_downsample if scale < 1 else bicubic_upsample
    out = f(rgb, round(1 / scale) if scale < 1 else int(scale))
    np.testing.assert_array_equal(out[0].numpy(), ref)
    np.testing.assert_array_equal(out[2].numpy(), _matlab_imresize_uint8(255 - img, scale))


def test_constant_stays_constant_and_uint8_rounding():
    x = torch.full((3, 20, 30), 77.0)
    torch.testing.assert_close(imresize(x, 0.25), torch.full((3, 5, 8), 77.0))
    assert torch.equal(quantize(torch.tensor([0.5, 1.5, 2.4999, -3.0, 300.0])), torch.tensor([1.0, 2.0, 2.0, 0.0, 255.0]))
    lr = bicubic_downsample(torch.rand(3, 24, 24) * 255, 4)
    assert lr.shape == (3, 6, 6) and torch.equal(lr, lr.round())


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_hr_dataset_patches_and_full_images():
    imgs = [_rgb(50, 61), _rgb(31, 40, 1)]
    torch.manual_seed(0)
    train = HRImageDataset(imgs, scale=2, patch_size=12, train=True, repeat=3)
    assert len(train) == 6
    lr, hr = train[1]
    assert lr.shape == (3, 12, 12) and hr.shape == (3, 24, 24)
    torch.testing.assert_close(lr, bicubic_downsample(hr, 2))
    val = HRImageDataset(imgs, scale=3, train=False)
    lr, hr = val[0]
    assert hr.shape == (3, 48, 60) and lr.shape == (3, 16, 20)  # modcrop to a multiple of the scale
    small = HRImageDataset([_rgb(10, 10)], scale=2, patch_size=12, train=True)
    assert small[0][1].shape == (3, 24, 24)  # enlarged first, like the official code


def test_paired_dataset_aligned_patches():
    hr = torch.rand(3, 40, 60) * 255
    lr = bicubic_downsample(hr, 2)
    torch.manual_seed(1)
    ds = PairedImageDataset([hr.permute(1, 2, 0).round().byte().numpy()], [lr.permute(1, 2, 0).byte().numpy()],
                            scale=2, patch_size=8, train=True, augment=False)
    lp, hp = ds[0]
    # the LR patch is the same region as the HR patch: compare against downsampling the full HR again
    full_lr = ds.lr.get(0)
    ys = [(y, x) for y in range(20 - 8 + 1) for x in range(30 - 8 + 1)
          if torch.equal(full_lr[:, y:y + 8, x:x + 8], lp)]
    y, x = ys[0]
    assert torch.equal(ds.hr.get(0)[:, 2 * y:2 * y + 16, 2 * x:2 * x + 16], hp)


def _write_set(root, names, scale, with_lr=True, hw=(24, 36)):
    for i, n in enumerate(names):
        img = torch.from_numpy(_rgb(*hw, seed=i)).permute(2, 0, 1).float()
        save_image(root / "HR" / f"{n}.png", img)
        if with_lr:
            save_image(root / "LR_bicubic" / f"X{scale}" / f"{n}x{scale}.png", bicubic_downsample(img, scale))


def test_benchmark_layouts(tmp_path):
    _write_set(tmp_path / "benchmark" / "Set5", ["baby", "bird"], 3)
    ds = benchmark_dataset(tmp_path, "set5", 3)
    assert isinstance(ds, PairedImageDataset) and ds.names == ["baby", "bird"]
    lr, hr = ds[1]
    assert lr.shape == (3, 8, 12) and hr.shape == (3, 24, 36)
    _write_set(tmp_path / "BSD100", ["3096"], 2, with_lr=False)
    ds = benchmark_dataset(tmp_path, "B100", 2)  # alias, LR made on the fly
    assert isinstance(ds, HRImageDataset) and ds[0][0].shape == (3, 12, 18)
    with pytest.raises(FileNotFoundError, match="Urban100"):
        benchmark_dataset(tmp_path, "urban100", 2)


def test_div2k_layout_and_collate(tmp_path):
    for split, n in (("train", 3), ("valid", 2)):
        for i in range(n):
            img = torch.from_numpy(_rgb(30, 30, seed=i)).permute(2, 0, 1).float()
            save_image(tmp_path / f"DIV2K_{split}_HR" / f"{i:04d}.png", img)
            save_image(tmp_path / f"DIV2K_{split}_LR_bicubic" / "X2" / f"{i:04d}x2.png", bicubic_downsample(img, 2))
    train, val = build_sr_datasets(tmp_path, scale=2, patch_size=6, repeat=2)
    assert isinstance(train, PairedImageDataset) and len(train) == 6 and len(val) == 2
    lr, hr = sr_collate([train[0], train[1]])
    assert lr.shape == (2, 3, 6, 6) and hr.shape == (2, 3, 12, 12)
    lrs, hrs = sr_collate([val[0], (torch.zeros(3, 4, 4), torch.zeros(3, 8, 8))])
    assert isinstance(lrs, list) and len(hrs) == 2


def test_builtin_split_is_disjoint():
    train, train_names = builtin_images("train")
    test, test_names = builtin_images("test")
    assert not set(train_names) & set(test_names) and len(test) >= 3
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in train + test)


# -- folders given for evaluation are evaluated whole ------------------------------------------------

def _write_png(path, img):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _noisy_lr(hr: np.ndarray, scale: int, seed: int) -> np.ndarray:
    """MATLAB-bicubic LR plus noise: a file that recomputing the LR from HR cannot reproduce."""
    lr = bicubic_downsample(torch.from_numpy(hr).permute(2, 0, 1).float(), scale).permute(1, 2, 0).numpy()
    noise = np.random.default_rng(seed).integers(-20, 21, size=lr.shape)
    return np.clip(lr + noise, 0, 255).astype(np.uint8)


SET5 = ["baby", "bird", "butterfly", "head", "woman"]


def _edsr_set5(root, scale=2):
    """Set5 in the EDSR/BasicSR benchmark layout: Set5/HR/baby.png + Set5/LR_bicubic/X2/babyx2.png."""
    lrs = {}
    for i, n in enumerate(SET5):
        hr = _rgb(24 + 6 * i, 30, seed=i)
        _write_png(root / "HR" / f"{n}.png", hr)
        lrs[n] = _noisy_lr(hr, scale, i)
        _write_png(root / "LR_bicubic" / f"X{scale}" / f"{n}x{scale}.png", lrs[n])
    return lrs


def test_eval_dataset_edsr_layout_reads_lr_files(tmp_path):
    lrs = _edsr_set5(tmp_path / "Set5")
    ds = eval_dataset(tmp_path / "Set5", 2)
    assert isinstance(ds, PairedImageDataset) and len(ds) == 5 and ds.names == sorted(SET5)
    assert describe(ds).startswith("5 HR/LR pairs")
    for i, name in enumerate(ds.names):
        lr, hr = ds[i]
        assert torch.equal(lr, torch.from_numpy(lrs[name]).permute(2, 0, 1).float())  # from the file
        assert hr.shape[-2:] == (2 * lr.shape[-2], 2 * lr.shape[-1])
    # the same folder by benchmark name under a root, and as --val-data of a training folder
    assert len(eval_dataset("set5", 2, root=tmp_path)) == 5
    _write_set(tmp_path / "train", ["t0", "t1"], 2, with_lr=False)
    _, val = build_sr_datasets(tmp_path / "train", 2, patch_size=6, val_data=tmp_path / "Set5")
    assert isinstance(val, PairedImageDataset) and len(val) == 5


def test_eval_dataset_div2k_valid_layout(tmp_path):
    for i in (801, 802, 803):
        hr = _rgb(30, 36, seed=i)
        _write_png(tmp_path / "DIV2K_valid_HR" / f"{i:04d}.png", hr)
        _write_png(tmp_path / "DIV2K_valid_LR_bicubic" / "X2" / f"{i:04d}x2.png", _noisy_lr(hr, 2, i))
    for folder in (tmp_path / "DIV2K_valid_HR", tmp_path):  # the HR folder or the DIV2K root
        ds = eval_dataset(folder, 2)
        assert isinstance(ds, PairedImageDataset) and ds.names == ["0801", "0802", "0803"]
        lr, hr = ds[2]
        assert lr.shape == (3, 15, 18) and hr.shape == (3, 30, 36)
        assert not torch.equal(lr, bicubic_downsample(hr, 2))  # read, not recomputed


def test_eval_dataset_flat_folder_is_whole_but_training_split_says_so(tmp_path):
    for i in range(5):
        _write_png(tmp_path / "flat" / f"img{i}.png", _rgb(20, 26, seed=i))
    ds = eval_dataset(tmp_path / "flat", 2)
    assert isinstance(ds, HRImageDataset) and len(ds) == 5 and "5 HR images" in describe(ds)
    lr, hr = ds[4]
    assert torch.equal(lr, bicubic_downsample(hr, 2))
    _, val = build_sr_datasets(tmp_path / "flat", 2, patch_size=6)  # training: one image held out ...
    assert len(val) == 1 and "1 of the 5 HR images" in describe(val) and "held out" in describe(val)


def test_eval_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Set5"):
        eval_dataset(tmp_path / "Set5", 2)
    with pytest.raises(FileNotFoundError, match="Urban100"):
        eval_dataset("urban100", 2, root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        eval_dataset(tmp_path / "empty", 2)
    _edsr_set5(tmp_path / "Set5", scale=2)
    (tmp_path / "Set5" / "LR_bicubic" / "X3").mkdir()
    for p in (tmp_path / "Set5" / "LR_bicubic" / "X2").iterdir():  # ×2 files filed under X3
        p.rename(tmp_path / "Set5" / "LR_bicubic" / "X3" / p.name.replace("x2", "x3"))
    ds = eval_dataset(tmp_path / "Set5", 3)
    with pytest.raises(ValueError, match=r"not ×3 of LR"):
        ds[0]
