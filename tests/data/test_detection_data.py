"""Detection readers on files written in the exact COCO JSON and YOLO layouts; boxes moving with pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hybridzoo.data.detection import (
    CocoDetection, DetTransform, SyntheticDetection, YoloDetection, collate_detection, detect_layout,
)


def _image(path, w, h, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _coco(root):
    """COCO 2017 layout: annotations/instances_{train,val}2017.json + {train,val}2017/ images."""
    for split in ("train", "val"):
        _image(root / f"{split}2017" / "a.jpg", 40, 20)
        _image(root / f"{split}2017" / "b.jpg", 30, 30)
        data = {
            "info": {"description": "test"}, "licenses": [],
            "images": [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 20},
                       {"id": 3, "file_name": "b.jpg", "width": 30, "height": 30}],
            # category ids are not contiguous (COCO's go up to 90): 5 → index 0, 11 → index 1
            "categories": [{"id": 11, "name": "dog", "supercategory": "animal"},
                           {"id": 5, "name": "cat", "supercategory": "animal"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 11, "bbox": [2.0, 3.0, 10.0, 5.0], "area": 40.0, "iscrowd": 0,
                 "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]},
                {"id": 2, "image_id": 7, "category_id": 5, "bbox": [20, 4, 8, 8], "area": 64, "iscrowd": 1,
                 "segmentation": {"counts": [0, 1], "size": [20, 40]}},
                {"id": 3, "image_id": 3, "category_id": 5, "bbox": [0, 0, 0, 5], "area": 0, "iscrowd": 0},
            ],
        }
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


def test_coco_reader(tmp_path):
    _coco(tmp_path)
    kind, splits = detect_layout(tmp_path)
    assert kind == "coco" and splits["val"][0].name == "instances_val2017.json"
    ds = CocoDetection(*splits["train"])
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [5, 11]
    # images sorted by id: b.jpg (id 3) first; its zero-width box is dropped
    assert len(ds) == 2 and ds.annotation(0)["boxes"].shape == (0, 4)
    a = ds.annotation(1)
    assert a["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0], [20.0, 4.0, 28.0, 12.0]]
    assert a["labels"].tolist() == [1, 0] and a["crowd"].tolist() == [False, True]
    assert a["area"].tolist() == [40.0, 64.0] and a["size"] == (20, 40)
    x, t = ds[1]
    # letterbox to 128: the 40×20 image is scaled ×3.2 and padded below
    assert x.shape == (3, 128, 128) and t["scale"].tolist() == pytest.approx([3.2, 3.2])
    assert t["boxes"][0].tolist() == pytest.approx([6.4, 9.6, 38.4, 25.6])
    assert t["orig_size"].tolist() == [20, 40] and int(t["image_id"]) == 1


def test_coco_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO annotation file"):
        CocoDetection(tmp_path / "none.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        CocoDetection(bad, tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "categories": [{"id": 1}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match="category 9"):
        CocoDetection(bad, tmp_path)
    with pytest.raises(ValueError, match="cannot tell the detection layout"):
        detect_layout(tmp_path)


def _yolo(root):
    for split in ("train", "val"):
        _image(root / "images" / split / "one.png", 100, 50)
        _image(root / "images" / split / "empty.png", 20, 20)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split / "one.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.2 0.1 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: person\n  1: car\n")


def test_yolo_reader(tmp_path):
    _yolo(tmp_path)
    assert detect_layout(tmp_path)[0] == "yolo"
    ds = YoloDetection(tmp_path, "train")
    assert ds.class_names == ["person", "car"] and len(ds) == 2
    assert ds.annotation(0)["boxes"].shape == (0, 4)           # empty.png has no label file
    a = ds.annotation(1)                                         # one.png, 100 × 50
    assert np.allclose(a["boxes"], [[40.0, 15.0, 60.0, 35.0], [5.0, 5.0, 15.0, 15.0]])
    assert a["labels"].tolist() == [1, 0]
    (tmp_path / "labels" / "train" / "one.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match="one.txt:1: expected 'class cx cy w h'"):
        YoloDetection(tmp_path, "train")
    (tmp_path / "labels" / "train" / "one.txt").write_text("1 50 25 20 20\n")
    with pytest.raises(ValueError, match="normalised"):
        YoloDetection(tmp_path, "train")
    (tmp_path / "labels" / "train" / "one.txt").write_text("4 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="class 4"):
        YoloDetection(tmp_path, "train")


def test_augmentation_moves_boxes_with_pixels():
    # a white 20×10 block at (30, 40) on black: after flip / crop / letterbox, the box is still its bounding box
    img = np.zeros((80, 120, 3), np.uint8)
    img[40:50, 30:50] = 255
    boxes = np.array([[30, 40, 50, 50], [0, 0, 4, 4]], np.float32)
    tf = DetTransform(64, train=True, flip=1.0, crop=1.0, crop_scale=(0.7, 0.7), photometric=False)
    seen_drop = False
    for seed in range(12):
        x, t = tf(img, boxes, np.array([0, 1]), np.random.default_rng(seed))
        std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
        mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
        pix = (x * std + mean)[0]
        bright = (pix > 128).nonzero()
        if 0 in t["labels"].tolist():
            b = t["boxes"][t["labels"].tolist().index(0)]
            if bright.numel():
                y0, x0 = bright.min(0).values.tolist()
                y1, x1 = bright.max(0).values.tolist()
                assert b.tolist() == pytest.approx([x0, y0, x1 + 1, y1 + 1], abs=1.5)
        seen_drop |= 1 not in t["labels"].tolist()
        assert len(t["boxes"]) == len(t["labels"]) == len(t["crowd"])
    assert seen_drop, "the random crop never dropped the corner box"


def test_synthetic_is_deterministic_and_exact():
    a = SyntheticDetection(4, 96, "train", seed=3)
    b = SyntheticDetection(4, 96, "train", seed=3)
    img, boxes, labels = a.scene(2)
    img2, boxes2, labels2 = b.scene(2)
    assert np.array_equal(img, img2) and np.array_equal(boxes, boxes2) and np.array_equal(labels, labels2)
    assert not np.array_equal(img, SyntheticDetection(4, 96, "val", seed=3).scene(2)[0])
    assert 1 <= len(boxes) <= 4 and set(labels.tolist()) <= {0, 1, 2}
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
    images, targets = collate_detection([a[i] for i in range(4)])
    assert images.shape == (4, 3, 128, 128) and len(targets) == 4
    assert [len(t["boxes"]) for t in targets] == [len(a.scene(i)[1]) for i in range(4)]
