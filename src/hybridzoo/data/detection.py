"""Object-detection data: COCO JSON and YOLO txt readers, box-aware augmentation, built-in scenes.

Every sample is an RGB uint8 image with boxes (x1, y1, x2, y2) in pixels and class indices
0..K-1. Readers:

- `CocoDetection`: a COCO-format JSON (what CVAT, Label Studio, Roboflow, ... export): `images`
  (id, file_name, width, height), `annotations` (image_id, category_id, bbox [x, y, w, h], area,
  iscrowd) and `categories` (id, name). Category ids are mapped to contiguous indices in id order;
  crowd boxes are kept for evaluation (pycocotools ignores them) but not trained on. Layout:
  `ROOT/annotations/instances_{train,val}*.json` with images in `ROOT/{train,val}*/` (COCO 2017),
  or `ROOT/{train,val}/_annotations.coco.json` with the images beside it (Roboflow).
- `YoloDetection`: `ROOT/images/{train,val}/*.jpg` with `ROOT/labels/{train,val}/*.txt`, one
  `class cx cy w h` line per box, normalised to 0..1 (Ultralytics); class names from
  `ROOT/data.yaml` (`names:` list or mapping) or `ROOT/classes.txt`, else "0", "1", ...
- `SyntheticDetection`: the built-in set — SYNTHETIC scenes of textured discs, rectangles and
  triangles (the class is the shape; the texture a crop of a scikit-image photograph) over a
  textured background, non-overlapping, with exact boxes; a sample depends only on
  (seed, split, index).

`DetTransform` letterboxes to a square (longest side → `size`, keeping the aspect ratio, padding
right and bottom), and in training adds a random crop (boxes clipped to it; boxes keeping less
than `min_visible` of their area are dropped), a horizontal flip and photometric jitter. The
boxes move with the pixels. Targets carry the scale back to the original image, so evaluation
and predictions are in original pixels. `collate_detection` stacks the images and keeps the
per-image targets (a variable number of boxes each) in a list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DetTransform", "CocoDetection", "YoloDetection", "SyntheticDetection",
    "collate_detection", "detect_layout", "read_image", "SYNTHETIC_CLASSES",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
SYNTHETIC_CLASSES = ("disc", "rectangle", "triangle")
_IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {os.fspath(path)!r}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except (OSError, Image.UnidentifiedImageError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not a readable image (expected PNG, JPEG, BMP, TIFF or WebP): {e}") from e


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if img.shape[:2] == (h, w):
        return img
    return np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))


class DetTransform:
    """Box-aware augmentation and letterboxing; returns (CHW float tensor, target dict)."""

    def __init__(self, size: int = 128, train: bool = False, flip: float = 0.5, crop: float = 0.5,
                 crop_scale: tuple[float, float] = (0.5, 1.0), min_visible: float = 0.5, photometric: bool = True):
        self.size, self.train, self.flip, self.crop = int(size), train, flip, crop
        self.crop_scale, self.min_visible, self.photometric = crop_scale, min_visible, photometric

    def __call__(self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 crowd: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels, np.int64).reshape(-1)
        crowd = np.zeros(len(labels), bool) if crowd is None else np.asarray(crowd, bool)
        orig_h, orig_w = img.shape[:2]
        if self.train:
            # the crowd flags stay aligned with boxes through the crop's keep mask
            img, boxes, labels, crowd = self._random_crop(img, boxes, labels, crowd, rng)
            if rng.random() < self.flip:
                img = img[:, ::-1]
                w = img.shape[1]
                boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1) if len(boxes) else boxes
            if self.photometric:
                img = _jitter(img, rng)
        h, w = img.shape[:2]
        scale = self.size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = np.array(_resize(np.ascontiguousarray(img), nh, nw))   # writable, for torch.from_numpy
        boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        out = torch.zeros(3, self.size, self.size)       # padding = the mean colour after normalisation
        out[:, :nh, :nw] = (x - mean) / std
        target = {
            "boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "crowd": torch.from_numpy(crowd.astype(bool)),
            # letterbox scale from the *original* image (validation is never cropped) and its size
            "scale": torch.tensor([nw / orig_w, nh / orig_h], dtype=torch.float32),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor([nh, nw], dtype=torch.int64),
        }
        return out, target

    def _random_crop(self, img, boxes, labels, crowd, rng):
        if rng.random() >= self.crop:
            return img, boxes, labels, crowd
        h, w = img.shape[:2]
        s = rng.uniform(*self.crop_scale)
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = img[y0:y0 + ch, x0:x0 + cw]
        if len(boxes):
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            b = boxes - np.array([x0, y0, x0, y0], np.float32)
            b[:, [0, 2]] = b[:, [0, 2]].clip(0, cw)
            b[:, [1, 3]] = b[:, [1, 3]].clip(0, ch)
            kept = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            keep = (kept >= self.min_visible * np.maximum(area, 1e-6)) & (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
            boxes, labels, crowd = b[keep], labels[keep], crowd[keep]
        return img, boxes, labels, crowd


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation, each ×U(0.7, 1.3) in random order (mmdet's PhotoMetricDistortion, lighter)."""
    x = img.astype(np.float32)
    for k in rng.permutation(3):
        f = rng.uniform(0.7, 1.3)
        if k == 0:
            x = x * f
        elif k == 1:
            x = (x - x.mean()) * f + x.mean()
        else:
            g = x.mean(-1, keepdims=True)
            x = (x - g) * f + g
    return x.clip(0, 255).astype(np.uint8)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Images stacked (all letterboxed to one size); targets a list with a variable number of boxes each."""
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


def _aug_rng(seed: int, epoch: int, i: int) -> np.random.Generator:
    # one draw from torch's generator: augmentations follow torch.manual_seed and change every epoch
    return np.random.default_rng([seed, epoch, i, int(torch.randint(0, 2**31 - 1, ()).item())])


class _DetDataset(Dataset):
    """Shared by the readers: `raw(i)` gives (image, boxes, labels, crowd); `annotation(i)` without the pixels."""

    class_names: list[str]

    def __init__(self, transform: DetTransform | None, seed: int):
        self.transform = transform or DetTransform()
        self.seed = seed
        self._epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        img, boxes, labels, crowd = self.raw(i)
        x, t = self.transform(img, boxes, labels, _aug_rng(self.seed, self._epoch, i), crowd)
        t["image_id"] = torch.tensor(i)
        return x, t


class CocoDetection(_DetDataset):
    """A COCO-format JSON file and its image folder (see the module docstring)."""

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, transform: DetTransform | None = None,
                 seed: int = 0, categories: Sequence[dict] | None = None):
        super().__init__(transform, seed)
        ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {os.fspath(ann_file)!r}")
        try:
            data = json.loads(ann_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(ann_file)!r} is not valid JSON: {e}") from e
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{os.fspath(ann_file)!r} is not a COCO detection file: no {key!r} list "
                                 "(expected 'images', 'annotations' and 'categories')")
        cats = sorted(categories if categories is not None else data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        index = {cid: k for k, cid in enumerate(self.category_ids)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        per_image: dict[int, list] = {int(im["id"]): [] for im in self.images}
        for a in data["annotations"]:
            if int(a["image_id"]) not in per_image:
                raise ValueError(f"{os.fspath(ann_file)!r}: annotation {a.get('id')} refers to unknown image {a['image_id']}")
            if int(a["category_id"]) not in index:
                raise ValueError(f"{os.fspath(ann_file)!r}: annotation {a.get('id')} has category {a['category_id']}, "
                                 f"expected one of {self.category_ids}")
            x, y, w, h = (float(v) for v in a["bbox"])
            if w <= 0 or h <= 0:
                continue  # degenerate boxes carry no object (COCO has a few)
            per_image[int(a["image_id"])].append((x, y, x + w, y + h, index[int(a["category_id"])],
                                                  bool(a.get("iscrowd", 0)), float(a.get("area", w * h))))
        self._anns = [per_image[int(im["id"])] for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def annotation(self, i: int) -> dict[str, np.ndarray]:
        rows = self._anns[i]
        im = self.images[i]
        arr = np.array([r[:4] for r in rows], np.float32).reshape(-1, 4)
        return {"boxes": arr, "labels": np.array([r[4] for r in rows], np.int64),
                "crowd": np.array([r[5] for r in rows], bool), "area": np.array([r[6] for r in rows], np.float32),
                "size": (int(im.get("height", 0)), int(im.get("width", 0)))}

    def raw(self, i: int):
        a = self.annotation(i)
        img = read_image(self.image_dir / self.images[i]["file_name"])
        return img, a["boxes"], a["labels"], a["crowd"]

    def __getitem__(self, i: int):
        x, t = super().__getitem__(i)
        if not self.transform.train:   # COCO's own areas (of the masks) decide small / medium / large
            t["area"] = torch.from_numpy(self.annotation(i)["area"])
        return x, t


class YoloDetection(_DetDataset):
    """Ultralytics' layout: `images/<split>/*.jpg` with `labels/<split>/*.txt` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: DetTransform | None = None,
                 seed: int = 0, class_names: Sequence[str] | None = None):
        super().__init__(transform, seed)
        root = Path(root)
        img_dir, lab_dir = root / "images" / split, root / "labels" / split
        if not img_dir.is_dir():
            raise FileNotFoundError(f"YOLO layout: {os.fspath(img_dir)!r} not found (expected ROOT/images/{split}/ "
                                    f"and ROOT/labels/{split}/)")
        self.files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in _IMG_EXTS)
        if not self.files:
            raise FileNotFoundError(f"no images in {os.fspath(img_dir)!r}")
        self._labels = []
        max_cls = -1
        for f in self.files:
            rows = []
            txt = lab_dir / (f.stem + ".txt")
            if txt.is_file():   # an image without a label file has no objects (Ultralytics' convention)
                for n, line in enumerate(txt.read_text().splitlines(), 1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) != 5:
                        raise ValueError(f"{os.fspath(txt)}:{n}: expected 'class cx cy w h' (5 numbers), got {line!r}")
                    try:
                        c, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:])
                    except ValueError as e:
                        raise ValueError(f"{os.fspath(txt)}:{n}: expected 'class cx cy w h', got {line!r}") from e
                    if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
                        raise ValueError(f"{os.fspath(txt)}:{n}: coordinates must be normalised to 0..1, got {line!r}")
                    rows.append((c, cx, cy, w, h))
                    max_cls = max(max_cls, c)
            self._labels.append(rows)
        self.class_names = list(class_names) if class_names else _yolo_names(root) or [str(k) for k in range(max_cls + 1)]
        if max_cls >= len(self.class_names):
            raise ValueError(f"YOLO labels under {os.fspath(lab_dir)!r} use class {max_cls}, but only "
                             f"{len(self.class_names)} class names are given")
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def _size(self, i: int) -> tuple[int, int]:
        if i not in self._sizes:
            from PIL import Image

            with Image.open(self.files[i]) as im:
                self._sizes[i] = (im.height, im.width)
        return self._sizes[i]

    def annotation(self, i: int) -> dict[str, np.ndarray]:
        h, w = self._size(i)
        rows = np.array(self._labels[i], np.float32).reshape(-1, 5)
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)
        return {"boxes": boxes, "labels": rows[:, 0].astype(np.int64), "crowd": np.zeros(len(rows), bool),
                "area": (bw * bh).astype(np.float32), "size": (h, w)}

    def raw(self, i: int):
        img = read_image(self.files[i])
        self._sizes[i] = img.shape[:2]
        a = self.annotation(i)
        return img, a["boxes"], a["labels"], a["crowd"]


def _yolo_names(root: Path) -> list[str] | None:
    if (root / "data.yaml").is_file():
        import yaml

        names = (yaml.safe_load((root / "data.yaml").read_text()) or {}).get("names")
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names, key=int)]
        if isinstance(names, list):
            return [str(n) for n in names]
    if (root / "classes.txt").is_file():
        return [ln.strip() for ln in (root / "classes.txt").read_text().splitlines() if ln.strip()]
    return None


class SyntheticDetection(_DetDataset):
    """SYNTHETIC built-in scenes: 1..max_objects non-overlapping textured shapes, exact boxes, deterministic."""

    def __init__(self, length: int = 512, size: int = 128, split: str = "train", seed: int = 0,
                 transform: DetTransform | None = None, max_objects: int = 4, num_classes: int = 3):
        super().__init__(transform, seed)
        if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"SyntheticDetection supports 1..{len(SYNTHETIC_CLASSES)} classes, got {num_classes}")
        self.length, self.size, self.split, self.max_objects = length, size, split, max_objects
        self.scene_seed = seed
        self.class_names = list(SYNTHETIC_CLASSES[:num_classes])
        self._cache: dict[int, tuple] = {}   # drawing a scene costs ~0.1 s; 512 scenes of 128² are 25 MB

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i not in self._cache:
            self._cache[i] = self._draw(i)
        img, boxes, labels = self._cache[i]
        return img.copy(), boxes.copy(), labels.copy()

    def _draw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from skimage.draw import disk, polygon

        from hybridzoo.data.segmentation import _BACKGROUNDS, _PHOTOS, _photo, _random_crop

        rng = np.random.default_rng([self.scene_seed, 0 if self.split == "train" else 1, i, 7])
        s = self.size
        bg = _random_crop(_photo(_BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]), s, rng).astype(np.float32)
        image = (bg * rng.uniform(0.5, 0.9, size=3)).astype(np.uint8)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            for _attempt in range(20):   # rejection sampling: objects never overlap, so boxes stay exact
                cls = int(rng.integers(self.num_classes))
                r = rng.uniform(0.07, 0.2) * s
                cy, cx = rng.uniform(r + 1, s - r - 1, size=2)
                if cls == 0:
                    rr, cc = disk((cy, cx), r, shape=(s, s))
                elif cls == 1:
                    h, w = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.5, 1.0)
                    rr, cc = polygon([cy - h, cy - h, cy + h, cy + h], [cx - w, cx + w, cx + w, cx - w], shape=(s, s))
                else:
                    ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
                    rr, cc = polygon(cy + r * np.sin(ang), cx + r * np.cos(ang), shape=(s, s))
                if len(rr) < 9:
                    continue
                box = np.array([cc.min(), rr.min(), cc.max() + 1, rr.max() + 1], np.float32)
                if any(_overlap(box, b, margin=2) for b in boxes):
                    continue
                texture = _random_crop(_photo(_PHOTOS[int(rng.integers(len(_PHOTOS)))]), s, rng)
                image[rr, cc] = texture[rr, cc]
                boxes.append(box)
                labels.append(cls)
                break
        return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)

    def annotation(self, i: int) -> dict[str, np.ndarray]:
        _, boxes, labels = self.scene(i)
        return {"boxes": boxes, "labels": labels, "crowd": np.zeros(len(labels), bool),
                "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32),
                "size": (self.size, self.size)}

    def raw(self, i: int):
        img, boxes, labels = self.scene(i)
        return img, boxes, labels, np.zeros(len(labels), bool)


def _overlap(a: np.ndarray, b: np.ndarray, margin: float = 0.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def detect_layout(root: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """('coco', {train: (json, images), val: ...}) or ('yolo', {}) for a --data path; a clear error otherwise."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"--data path not found: {os.fspath(root)!r}")
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "yolo", {}
    splits: dict[str, tuple[Path, Path]] = {}
    ann = root / "annotations"
    for split in ("train", "val"):
        if ann.is_dir():
            files = sorted(ann.glob(f"instances_{split}*.json"))
            if files:
                stem = files[0].stem[len("instances_"):]
                img_dir = root / stem if (root / stem).is_dir() else root / "images" / stem
                splits[split] = (files[0], img_dir)
                continue
        robo = root / split / "_annotations.coco.json"
        if robo.is_file():
            splits[split] = (robo, robo.parent)
    if "val" not in splits and (root / "valid" / "_annotations.coco.json").is_file():
        splits["val"] = (root / "valid" / "_annotations.coco.json", root / "valid")
    if "train" in splits and "val" in splits:
        return "coco", splits
    raise ValueError(f"cannot tell the detection layout of {os.fspath(root)!r}: expected COCO "
                     "(annotations/instances_train*.json + instances_val*.json with train*/ and val*/ image folders, "
                     "or train/_annotations.coco.json + val/_annotations.coco.json) or YOLO (images/{train,val}/ + "
                     "labels/{train,val}/)")
