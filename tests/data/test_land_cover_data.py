"""Land-cover data: readers (GeoTIFF with geo tags, .npy, .mat), patches, splits, the synthetic scene."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from scipy.io import savemat

from hybridzoo.data import land_cover as lc

GEO = [(33550, "d", 3, (10.0, 10.0, 0.0), True),
       (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 5100000.0, 0.0), True),
       (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32619), True),
       (34737, "s", 0, "NAD83 / UTM zone 19N|", True)]


def _scene(h=12, w=10, c=5, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(h, w, c)).astype(np.float32)
    lab = rng.integers(0, 4, size=(h, w))
    return img, lab


def _geo_values(tags):
    return {code: value for code, _, _, value, _ in tags}


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_geotiff_reader_keeps_georeferencing(tmp_path, planar):
    img, lab = _scene()
    data = img if planar == "contig" else np.moveaxis(img, -1, 0)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack", planarconfig=planar, extratags=GEO)
    tifffile.imwrite(tmp_path / "gt.tif", lab.astype(np.uint8), extratags=GEO)
    scene = lc.load_scene(tmp_path / "s.tif", tmp_path / "gt.tif")
    np.testing.assert_array_equal(scene.image, img)
    np.testing.assert_array_equal(scene.labels, lab)
    geo = _geo_values(scene.geo)
    assert geo[33550] == (10.0, 10.0, 0.0)
    assert geo[33922][3:5] == (500000.0, 5100000.0)
    assert geo[34735][-1] == 32619 and geo[34737].startswith("NAD83")
    # written back with the output map
    lc.write_geotiff(tmp_path / "map.tif", lab.astype(np.uint8), scene.geo)
    with tifffile.TiffFile(tmp_path / "map.tif") as t:
        assert t.pages[0].tags[33922].value == geo[33922]
        assert t.pages[0].tags[34735].value == geo[34735]


def test_geotiff_bands_as_pages_and_lazy_source(tmp_path):
    img, _ = _scene(h=9, w=7, c=3)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(img, -1, 0), photometric="minisblack")
    src = lc.RasterSource(tmp_path / "p.tif", bands=[2, 0])
    assert (src.height, src.width, src.num_bands) == (9, 7, 2)
    np.testing.assert_array_equal(src.read_rows(3, 6), img[3:6][..., [2, 0]])


def test_npy_layout_follows_the_label_raster(tmp_path):
    img, lab = _scene(h=6, w=5, c=6)   # C = H: only the label raster can tell the layouts apart
    np.save(tmp_path / "hwc.npy", img)
    np.save(tmp_path / "chw.npy", np.moveaxis(img, -1, 0).copy())
    np.save(tmp_path / "gt.npy", lab)
    for name in ("hwc.npy", "chw.npy"):
        scene = lc.load_scene(tmp_path / name, tmp_path / "gt.npy")
        np.testing.assert_array_equal(scene.image, img)
    np.save(tmp_path / "bad.npy", np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="differ|does not match"):
        lc.load_scene(tmp_path / "hwc.npy", tmp_path / "bad.npy")


def test_mat_authors_format_and_band_selection(tmp_path):
    img, lab = _scene(h=8, w=8, c=16)
    img[0, 0, 0] = np.nan
    img[1, 1, 1] = -5000.0
    savemat(tmp_path / "SA1.mat", {"SA1": img.astype(np.float64)})
    savemat(tmp_path / "SA1_gt.mat", {"SA1_gt": lab.astype(np.uint8)})
    scene = lc.load_scene(tmp_path / "SA1.mat", tmp_path / "SA1_gt.mat", bands="0-2,5")
    assert scene.image.shape == (8, 8, 4) and scene.image.dtype == np.float32
    # the notebook's nodata rule: NaN and values < −1000 become −1
    assert scene.image[0, 0, 0] == -1.0 and scene.image[1, 1, 1] == -1.0
    np.testing.assert_allclose(scene.image[2:, 2:, 3], img[2:, 2:, 5])
    savemat(tmp_path / "two.mat", {"a": img, "b": img})
    with pytest.raises(ValueError, match="2 arrays"):
        lc.load_scene(tmp_path / "two.mat", tmp_path / "SA1_gt.mat")
    with pytest.raises(ValueError, match="unsupported"):
        lc.read_raster(__file__)


def test_parse_bands():
    assert lc.parse_bands("0,2,5-7") == [0, 2, 5, 6, 7]
    assert lc.parse_bands(None) is None
    with pytest.raises(ValueError, match="out of range"):
        lc.parse_bands("0,16", n_bands=16)


def _notebook_cubes(X, y, window=8):
    """The authors' `createImageCubes` (zero pad by window/2, patch X[r−m:r+m, c−m:c+m]) re-typed."""
    m = window // 2
    Z = np.zeros((X.shape[0] + 2 * m, X.shape[1] + 2 * m, X.shape[2]))
    Z[m:-m, m:-m] = X
    patches, labels = [], []
    for r in range(m, Z.shape[0] - m):
        for c in range(m, Z.shape[1] - m):
            if y[r - m, c - m] > 0:
                patches.append(Z[r - m:r + m, c - m:c + m])
                labels.append(y[r - m, c - m] - 1)
    return np.stack(patches), np.array(labels)


def test_patches_match_the_notebook_cutter():
    img, lab = _scene(h=11, w=9, c=3)
    ref_x, ref_y = _notebook_cubes(img, lab)
    targets, values = lc.encode_labels(lab)
    coords, y = lc.labelled_pixels(targets)
    zero, one = np.zeros(3, np.float32), np.ones(3, np.float32)
    padded = lc.pad_and_normalise(img, zero, one, 4)
    x = lc.extract_patches(padded, torch.as_tensor(coords), 8, 4)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), ref_x, atol=1e-6)
    np.testing.assert_array_equal(values[y] - 1, ref_y)
    # the labelled pixel sits at index (4, 4) of the even-sized patch
    np.testing.assert_allclose(x[:, :, 4, 4].numpy(), img[coords[:, 0], coords[:, 1]])


def test_padding_is_raw_zero_then_normalised():
    img = np.full((4, 4, 2), 5.0, np.float32)
    padded = lc.pad_and_normalise(img, np.array([1.0, 2.0], np.float32), np.array([2.0, 4.0], np.float32), 2)
    assert padded.shape == (8, 8, 2)
    np.testing.assert_allclose(padded[0, 0].numpy(), [-0.5, -0.5])      # (0 − mean) / std
    np.testing.assert_allclose(padded[3, 3].numpy(), [2.0, 0.75])


def test_d4_augmentation_keeps_the_labelled_pixel():
    img, lab = _scene(h=12, w=12, c=2)
    targets, _ = lc.encode_labels(lab)
    coords, y = lc.labelled_pixels(targets)
    padded = lc.pad_and_normalise(img, np.zeros(2, np.float32), np.ones(2, np.float32), 4)
    c = torch.as_tensor(coords[:5]).repeat_interleave(8, 0)
    t = torch.arange(8).repeat(5)
    x = lc.extract_patches(padded, c, 8, 4, transform=t).reshape(5, 8, 2, 8, 8)
    for i in range(5):
        for k in range(8):
            np.testing.assert_allclose(x[i, k, :, 4, 4].numpy(), img[coords[i, 0], coords[i, 1]])
        # 8 different views of the same neighbourhood (a pixel's 3×3 surroundings, flipped/transposed)
        assert len({x[i, k].numpy().tobytes() for k in range(8)}) == 8
        core = x[i, :, :, 3:6, 3:6]
        flips = {torch.flip(core[0], d).numpy().tobytes() for d in ((1,), (2,), (1, 2))}
        flips.add(core[0].transpose(1, 2).numpy().tobytes())
        assert flips <= {core[k].numpy().tobytes() for k in range(8)}
    ds = lc.PatchDataset(padded, coords, y, 8, augment=True)
    batch = ds.__getitems__([0, 1, 2])
    assert len(batch) == 3 and batch[0][0].shape == (2, 8, 8)


def test_random_split_is_stratified_70_30_and_deterministic():
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=1000, p=[0.5, 0.3, 0.15, 0.05])
    tr, va = lc.random_split(y, 0.3, 345)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 1000
    assert len(va) == 300
    np.testing.assert_allclose(np.bincount(y[va]) / 300, np.bincount(y) / 1000, atol=0.01)
    tr2, va2 = lc.random_split(y, 0.3, 345)
    assert np.array_equal(va, va2)


def test_block_split_is_spatially_disjoint():
    rng = np.random.default_rng(1)
    lab = rng.integers(1, 4, size=(64, 64))
    targets, _ = lc.encode_labels(lab)
    coords, y = lc.labelled_pixels(targets)
    P = 8
    tr, va, val_mask = lc.block_split(coords, y, lab.shape, block_size=16, val_fraction=0.3, buffer=P, seed=0)
    assert len(np.intersect1d(tr, va)) == 0
    assert 0.2 <= len(va) / len(y) <= 0.45
    # validation = whole blocks
    assert val_mask[coords[va, 0], coords[va, 1]].all() and not val_mask[coords[tr, 0], coords[tr, 1]].any()
    # no training patch shares a pixel with a validation patch (even flipped: reach P//2 either side)
    d = np.abs(coords[tr][:, None, :] - coords[va][None, :, :]).max(-1)
    assert d.min() > P
    assert set(np.unique(y[va])) == set(np.unique(y))


def test_band_stats_from_given_pixels_only():
    img, _ = _scene(h=5, w=5, c=2)
    coords = np.array([[0, 0], [1, 1], [2, 3]])
    mean, std = lc.band_stats(img, coords)
    px = img[coords[:, 0], coords[:, 1]]
    np.testing.assert_allclose(mean, px.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, px.std(0), rtol=1e-5)


def test_synthetic_scene_is_deterministic_and_wetland_like():
    a = lc.make_synthetic_scene(48, 48, seed=3)
    b = lc.make_synthetic_scene(48, 48, seed=3)
    c = lc.make_synthetic_scene(48, 48, seed=4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert a.synthetic and a.image.shape == (48, 48, 16) and len(a.class_names) == 7
    assert 0.3 < (a.labels > 0).mean() < 0.7
    big = lc.make_synthetic_scene(96, 96, seed=0)
    lab, img = big.labels, big.image
    water, upland = img[lab == 1], img[lab == 7]
    # water: dark in the NIR (B8) and in VV backscatter
    assert water[:, 7].mean() < 0.05 < upland[:, 7].mean()
    assert water[:, 12].mean() < upland[:, 12].mean() - 8
    # SAR speckle is multiplicative gamma (L = 4 looks): linear-intensity CV near 1/√L inside a class
    lin = 10 ** (upland[:, 12] / 10)
    assert 0.4 < lin.std() / lin.mean() < 0.75


# ------------------------------------------------------- .mat files with several arrays (issue 12.7)

def _indian_pines_like(tmp_path, name="Indian_pines.mat"):
    """One file holding the cube, the labels and an RGB preview, as the hyperspectral benchmarks ship."""
    rng = np.random.default_rng(0)
    cube = rng.integers(900, 9000, (9, 7, 20)).astype(np.uint16)
    gt = rng.integers(0, 4, (9, 7)).astype(np.uint8)
    rgb = rng.integers(0, 255, (9, 7, 3)).astype(np.uint8)
    savemat(tmp_path / name, {"indian_pines_corrected": cube, "indian_pines_gt": gt, "rgb": rgb})
    return tmp_path / name, cube, gt


def test_mat_with_several_arrays_is_chosen_by_key(tmp_path):
    path, cube, gt = _indian_pines_like(tmp_path)
    scene = lc.load_scene(path, data_key="indian_pines_corrected", label_key="indian_pines_gt")
    np.testing.assert_array_equal(scene.image, cube.astype(np.float32))
    np.testing.assert_array_equal(scene.labels, gt)
    scene = lc.load_scene(path, path, data_key="indian_pines_corrected")   # the label: the only 2-D array
    np.testing.assert_array_equal(scene.labels, gt)


def test_mat_ambiguous_choice_lists_every_variable(tmp_path):
    path, _, _ = _indian_pines_like(tmp_path)
    with pytest.raises(ValueError) as e:
        lc.load_scene(path, label_key="indian_pines_gt")    # two 3-D arrays: the cube and the RGB preview
    msg = str(e.value)
    for part in ("indian_pines_corrected (9×7×20 uint16)", "indian_pines_gt (9×7 uint8)", "rgb (9×7×3 uint8)",
                 "--data-key NAME", "ambiguous"):
        assert part in msg
    with pytest.raises(ValueError, match=r"no numeric variable 'labels' \(--label-key\); it holds: indian_pines"):
        lc.load_scene(path, data_key="rgb", label_key="labels")
    np.save(tmp_path / "x.npy", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="--data-key names a variable of a MATLAB .mat file"):
        lc.read_raster(tmp_path / "x.npy", key="cube")


def test_mat_variable_named_like_the_file_case_insensitively(tmp_path):
    cube = np.arange(5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6)
    savemat(tmp_path / "PaviaU.mat", {"paviaU": cube, "paviaU_rgb": cube[..., :3]})   # Pavia's lowercase p
    np.testing.assert_array_equal(lc.read_raster(tmp_path / "PaviaU.mat")[0], cube)


def _write_mat73(path, arrays):
    """A MATLAB v7.3 file: HDF5 behind a 512-byte MATLAB header, arrays stored column-major (transposed)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.ascontiguousarray(v.T))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Nov 30 12:00:00 2026 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")


def test_mat_v73_is_read_with_h5py(tmp_path):
    rng = np.random.default_rng(1)
    cube, gt = rng.random((6, 5, 4)).astype(np.float32), rng.integers(0, 3, (6, 5)).astype(np.uint8)
    _write_mat73(tmp_path / "houston.mat", {"data": cube, "labels": gt, "rgb": (cube[..., :3] * 255).astype(np.uint8)})
    with pytest.raises(ValueError, match=r"data \(6×5×4 float32\), labels \(6×5 uint8\), rgb \(6×5×3 uint8\)"):
        lc.load_scene(tmp_path / "houston.mat", label_key="labels")
    scene = lc.load_scene(tmp_path / "houston.mat", data_key="data", label_key="labels")
    np.testing.assert_array_equal(scene.image, cube)
    np.testing.assert_array_equal(scene.labels, gt)


def test_mat_v73_without_h5py_says_how_to_convert(tmp_path, monkeypatch):
    import sys

    _write_mat73(tmp_path / "v73.mat", {"data": np.zeros((3, 3, 2), np.float32)})
    monkeypatch.setitem(sys.modules, "h5py", None)      # as if h5py were not installed
    with pytest.raises(ValueError, match=r"MATLAB v7\.3 \(HDF5\).*pip install h5py.*'-v7'"):
        lc.read_raster(tmp_path / "v73.mat")


# ------------------------------------------------------------------------- NaN / inf (issue 18.12)

def test_nodata_values_are_counted_and_reported(tmp_path, capsys):
    img, lab = _scene(h=6, w=5, c=4)
    img[0, 0, 0] = np.nan
    img[0, 0, 2] = np.inf            # same pixel, another band
    img[3, 1, 2] = -9999.0
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "gt.npy", lab)
    scene = lc.load_scene(tmp_path / "img.npy", tmp_path / "gt.npy")
    assert scene.nodata == {"pixels": 2, "values": 3, "per_band": {0: 1, 2: 2}}
    err = capsys.readouterr().err
    assert "img.npy: 2 of 30 pixels had NaN/inf or < −1000 values (3 values in 2 of 4 bands: band 0: 1, band 2: 2)" in err
    assert "set to −1" in err and scene.image[0, 0, 0] == -1.0
    np.save(tmp_path / "clean.npy", np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0).clip(-1, None))
    lc.load_scene(tmp_path / "clean.npy", tmp_path / "gt.npy")
    assert capsys.readouterr().err == ""
    src = lc.RasterSource(tmp_path / "img.npy")
    src.read_rows(0, 3)
    src.read_rows(3, 6)
    assert src.nodata == {"pixels": 2, "values": 3, "per_band": {0: 1, 2: 2}}
