"""Readers for the exact on-disk layouts (files written here), augmentations, built-in scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hybridzoo.data.segmentation import (
    ADE20KSegmentation, CityscapesSegmentation, FolderSegmentation, SegTransform, SyntheticScenes,
    collate_segmentation, detect_layout, photometric_distortion,
)


def _save_rgb(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _save_mask(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_cityscapes_label_ids_map_to_19_train_ids(tmp_path):
    ids = np.array([[0, 7, 8, 11], [26, 33, 34, 4]], dtype=np.uint8)  # unlabeled, road, sidewalk, building / car, bicycle, ?, static
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        _save_rgb(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 2, 4)
        _save_mask(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
    assert detect_layout(tmp_path) == "cityscapes"
    ds = CityscapesSegmentation(tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 19
    np.testing.assert_array_equal(ds.raw_mask(0), [[255, 0, 1, 2], [13, 18, 255, 255]])
    img, mask, meta = ds[0]
    assert img.shape == (3, 2, 4) and mask.dtype == torch.long and meta.tolist() == [2, 4, 2, 4]


def test_ade20k_reduces_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for sub in ("training", "validation"):
        _save_rgb(root / "images" / sub / "ADE_x_00000001.jpg", 3, 3)
        _save_mask(root / "annotations" / sub / "ADE_x_00000001.png", np.array([[0, 1, 2], [150, 0, 75], [1, 1, 1]]))
    assert detect_layout(tmp_path) == "ade20k"
    ds = ADE20KSegmentation(tmp_path, "val")
    assert ds.num_classes == 150
    np.testing.assert_array_equal(ds.raw_mask(0), [[255, 0, 1], [149, 255, 74], [0, 0, 0]])


def test_folder_binary_masks_and_holdout(tmp_path):
    for i in range(5):
        _save_rgb(tmp_path / "images" / f"case{i}.png", 8, 8, seed=i)
        m = np.zeros((8, 8), np.uint8)
        m[2:5, 2:6] = 255
        _save_mask(tmp_path / "masks" / f"case{i}.png", m)
    assert detect_layout(tmp_path) == "folder"
    train, val = FolderSegmentation(tmp_path, "train"), FolderSegmentation(tmp_path, "val")
    assert (len(train), len(val)) == (4, 1)
    assert train.num_classes == 2 and train.class_names == ("background", "foreground")
    assert set(np.unique(val.raw_mask(0))) == {0, 1} and val.raw_mask(0).sum() == 12


def test_folder_indexed_masks_with_split_folders(tmp_path):
    for split in ("train", "val"):
        _save_rgb(tmp_path / split / "images" / "a.jpg", 4, 4)
        _save_mask(tmp_path / split / "masks" / "a.png", np.array([[0, 1, 2, 3]] * 3 + [[255, 255, 0, 0]]))
    ds = FolderSegmentation(tmp_path, "val")
    assert ds.num_classes == 4 and len(ds) == 1
    assert ds.raw_mask(0)[3, 0] == 255          # 255 stays "ignore" in an indexed mask


def test_missing_mask_is_a_clear_error(tmp_path):
    _save_rgb(tmp_path / "images" / "a.png", 4, 4)
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="a.png"):
        FolderSegmentation(tmp_path, "train")


def test_synthetic_scenes_are_deterministic_and_exact():
    a = SyntheticScenes(length=4, size=64, num_classes=5, seed=3)
    b = SyntheticScenes(length=4, size=64, num_classes=5, seed=3)
    c = SyntheticScenes(length=4, size=64, num_classes=5, seed=4)
    img_a, mask_a = a.scene(1)
    img_b, mask_b = b.scene(1)
    assert np.array_equal(img_a, img_b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(img_a, c.scene(1)[0])
    assert mask_a.max() < 5 and img_a.shape == (64, 64, 3)
    # exact masks: every labelled pixel was painted from that class's photograph, so the image
    # differs between the background and shapes on the pixels the mask says
    val = SyntheticScenes(length=4, size=64, num_classes=5, seed=3, split="val")
    assert not np.array_equal(val.scene(1)[1], mask_a)
    binary = SyntheticScenes(length=2, size=32, num_classes=2)
    assert set(np.unique(binary.scene(0)[1])) <= {0, 1}


def test_train_transform_crops_pads_and_keeps_labels_aligned():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255
    lab = np.zeros((40, 60), np.uint8)
    lab[:, 30:] = 1
    tf = SegTransform(train=True, crop_size=(32, 32), ratio_range=(0.5, 0.5), photometric=False, mean=(0, 0, 0),
                      std=(1, 1, 1), cat_max_ratio=1.0)
    x, y, meta = tf(img, lab, np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    # rescaled to 20×30, padded to 32×32 with ignore
    assert (y[20:] == 255).all() and (y[:, 30:] == 255).all()
    assert ((x[0][y == 1] > 127) == True).all() and ((x[0][y == 0] < 128) == True).all()  # noqa: E712
    assert meta.tolist() == [32, 32, 32, 32]


def test_photometric_distortion_stays_in_range_and_changes_image():
    img = torch.rand(3, 16, 16) * 255
    outs = [photometric_distortion(img, np.random.default_rng(s)) for s in range(8)]
    assert all(o.min() >= 0 and o.max() <= 255 for o in outs)
    assert any(not torch.allclose(o, img) for o in outs)


def test_val_transform_resizes_image_but_not_mask_and_collate_pads():
    ds = SyntheticScenes(length=2, size=48, num_classes=3, transform=SegTransform(train=False, test_scale=(24, 24)))
    x, y, meta = ds[0]
    assert x.shape == (3, 24, 24) and y.shape == (48, 48) and meta.tolist() == [24, 24, 48, 48]
    small = (torch.zeros(3, 10, 12), torch.zeros(10, 12, dtype=torch.long), torch.tensor([10, 12, 10, 12]))
    imgs, masks, metas = collate_segmentation([ds[0], small])
    assert imgs.shape == (2, 3, 24, 24) and masks.shape == (2, 48, 48)
    assert (masks[1, 10:] == 255).all() and (masks[1, :, 12:] == 255).all()
    assert metas[1].tolist() == [10, 12, 10, 12]


# ------------------------------------------------------------------------ void labels (issues 12.6, 18.7)

def _camvid_like(root, n=3):
    """CamVid's convention: classes 0..10, void = 11."""
    for i in range(n):
        _save_rgb(root / "images" / f"f{i}.png", 6, 6, seed=i)
        m = np.tile(np.arange(12, dtype=np.uint8), 3).reshape(6, 6)   # every class and the void value 11
        _save_mask(root / "masks" / f"f{i}.png", m)


def test_ignore_index_maps_the_datasets_void_value_to_the_engines(tmp_path):
    _camvid_like(tmp_path)
    ds = FolderSegmentation(tmp_path, "train", ignore_index=11)
    assert ds.num_classes == 11                         # inferred from 0..10; 11 is void, not a class
    m = ds.raw_mask(0)
    assert (m[np.tile(np.arange(12), 3).reshape(6, 6) == 11] == 255).all() and m[m != 255].max() == 10
    _, mask, _ = ds[0]
    assert int((mask == 255).sum()) == 3                # the engine's ignore value reaches the loss


def test_label_out_of_range_names_value_file_and_option(tmp_path):
    _camvid_like(tmp_path)
    with pytest.raises(ValueError, match=r"f0\.png: label value 11 is outside the 11 classes 0\.\.10.*--ignore-index 11"):
        FolderSegmentation(tmp_path, "train", num_classes=11)


def test_out_of_range_mask_after_the_scanned_ones_fails_on_load(tmp_path):
    _camvid_like(tmp_path, n=4)
    ds = FolderSegmentation(tmp_path, "train", num_classes=12, scan=1)
    ds.num_classes = 11          # as a validation set built with the training set's count
    with pytest.raises(ValueError, match=r"f1\.png.*label value 11"):
        ds[1]


def test_inferred_class_count_refuses_non_contiguous_values(tmp_path):
    # a 2-class mask whose foreground is 200: today this silently became 201 classes
    for i in range(3):
        _save_rgb(tmp_path / "images" / f"c{i}.png", 4, 4, seed=i)
        _save_mask(tmp_path / "masks" / f"c{i}.png", np.array([[0, 0, 1, 1]] * 2 + [[0, 200, 200, 1]] * 2))
    with pytest.raises(ValueError, match=r"\{0, 1, 200\}.*200 first occurs in .*c0\.png.*--ignore-index 200"):
        FolderSegmentation(tmp_path, "train")
    assert FolderSegmentation(tmp_path, "train", ignore_index=200).num_classes == 2
    assert FolderSegmentation(tmp_path, "train", num_classes=201).num_classes == 201   # explicit: the user's call


def test_binary_mask_with_a_border_void_value(tmp_path):
    for i in range(2):
        _save_rgb(tmp_path / "images" / f"p{i}.png", 4, 4, seed=i)
        _save_mask(tmp_path / "masks" / f"p{i}.png", np.array([[0, 255, 255, 128]] * 4))
    ds = FolderSegmentation(tmp_path, "train", ignore_index=128)
    assert ds.num_classes == 2
    np.testing.assert_array_equal(ds.raw_mask(0)[0], [0, 1, 1, 255])


def test_reduce_zero_label_as_mmsegmentation(tmp_path):
    for i in range(2):
        _save_rgb(tmp_path / "images" / f"r{i}.png", 2, 4, seed=i)
        _save_mask(tmp_path / "masks" / f"r{i}.png", np.array([[0, 1, 2, 3], [3, 255, 1, 0]]))
    ds = FolderSegmentation(tmp_path, "train", reduce_zero_label=True)
    np.testing.assert_array_equal(ds.raw_mask(0), [[255, 0, 1, 2], [2, 255, 0, 255]])
    assert ds.num_classes == 3
    with pytest.raises(ValueError, match=r"label value 3 \(stored value; 2 after --reduce-zero-label\)"):
        FolderSegmentation(tmp_path, "train", reduce_zero_label=True, num_classes=2)
