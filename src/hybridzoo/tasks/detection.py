"""Object detection: data, losses (the model's own), COCO metrics by pycocotools, baseline, pictures, predict.

    hybridzoo train --task detection                                   # RetinaNet demo on SYNTHETIC scenes
    hybridzoo train --task detection --model mf_detr_demo              # the end-to-end MF-DETR
    hybridzoo train --model retinanet_mf_508m --backbone coatnet_0 --data ~/coco --img-size 800
    hybridzoo eval --run runs/RUN
    hybridzoo predict --run runs/RUN street.jpg --output preds         # <stem>_boxes.png + detections.json

Models (RetinaNet, MF-DETR) return a dict of tensors from `forward` and define `loss(out, targets,
image_size)`, `postprocess(out, image_size)` and `select_image(out, i)` (image i's outputs as a batch
of one: `val_loss` is the mean of every image's own loss, whatever the batching or sharding); the task
only moves data and scores.

Metrics: COCO box AP (IoU .50:.95), AP50, AP75, AP small / medium / large and AR@100, computed by
pycocotools' COCOeval on the whole validation set in the original image coordinates, ×100, as
`map`, `map50`, `map75`, `map_small`, `map_medium`, `map_large`, `mar100` (-1 from pycocotools, a
size range without objects, becomes NaN). The metric's state is two concatenated tables
(detections and ground truth, one row per box), so sharded evaluation is exact. The baseline puts
one box per image — the most frequent training class at the mean normalised training box — with
score 1 (`val_map_trivial`, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hybridzoo.data.detection import (
    CocoDetection, DetTransform, SyntheticDetection, YoloDetection, collate_detection, detect_layout, read_image,
)
from hybridzoo.engine.metrics import Metric
from hybridzoo.tasks.base import Task, TaskData, register_task, unwrap_model

__all__ = ["DetectionTask", "CocoMetric", "coco_summary", "draw_detections"]

_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar1", "mar10", "mar100")
_STATS = (0, 1, 2, 3, 4, 5, 6, 7, 8)   # indices in COCOeval.stats


def coco_summary(gts: np.ndarray, dets: np.ndarray, image_ids: np.ndarray, num_classes: int) -> dict[str, float]:
    """COCO box metrics from plain tables, by pycocotools.

    gts: rows (image, x1, y1, x2, y2, label, crowd, area); dets: rows (image, x1, y1, x2, y2, score, label);
    image_ids: every evaluated image (also those without boxes). Returns the keys of `_KEYS` ×100.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ValueError("the detection metrics need pycocotools: pip install 'hybridzoo[detection]'") from e

    images = [{"id": int(i)} for i in np.unique(image_ids.astype(np.int64))]
    anns = []
    for k, r in enumerate(gts):
        w, h = float(r[3] - r[1]), float(r[4] - r[2])
        anns.append({"id": k + 1, "image_id": int(r[0]), "category_id": int(r[5]) + 1, "bbox": [float(r[1]), float(r[2]), w, h],
                     "area": float(r[7]), "iscrowd": int(r[6])})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    if len(dets) == 0 or len(anns) == 0:
        # nothing detected (or nothing to find): every AP and AR is 0, except for size ranges
        # without ground truth, which pycocotools reports as -1 (NaN here)
        area = gts[gts[:, 6] == 0, 7] if len(gts) else np.zeros(0)
        present = {"map_small": (area < 32 ** 2).any(), "map_medium": ((area >= 32 ** 2) & (area < 96 ** 2)).any(),
                   "map_large": (area >= 96 ** 2).any()}
        return {k: (0.0 if present.get(k, len(area) > 0) else float("nan")) for k in _KEYS}
    res = [{"image_id": int(r[0]), "category_id": int(r[6]) + 1,
            "bbox": [float(r[1]), float(r[2]), float(r[3] - r[1]), float(r[4] - r[2])], "score": float(r[5])}
           for r in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(res)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float("nan") if ev.stats[i] < 0 else float(ev.stats[i]) * 100) for k, i in zip(_KEYS, _STATS)}


class CocoMetric(Metric):
    """Detections and ground truth as concatenated tables (reduce="cat"), the loss as a sum."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("dets", reduce="cat")
        self.add_state("gts", reduce="cat")
        self.add_state("images", reduce="cat")
        self.add_state("loss", torch.zeros(2, dtype=torch.float64))

    def update(self, image_ids: torch.Tensor, detections: list[dict[str, torch.Tensor]], targets: list[dict],
               loss: float | None = None, n: int = 0) -> None:
        """detections / targets per image, already in original-image coordinates."""
        self.images.append(image_ids.detach().double().cpu().reshape(-1))
        for i, d, t in zip(image_ids.tolist(), detections, targets):
            k = len(d["scores"])
            self.dets.append(torch.cat([torch.full((k, 1), float(i), dtype=torch.float64),
                                        d["boxes"].double().cpu().reshape(k, 4), d["scores"].double().cpu().reshape(k, 1),
                                        d["labels"].double().cpu().reshape(k, 1)], 1))
            g = len(t["labels"])
            b = t["boxes"].double().cpu().reshape(g, 4)
            area = t["area"].double().cpu().reshape(g, 1) if "area" in t else \
                ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).reshape(g, 1)
            crowd = t["crowd"].double().cpu().reshape(g, 1) if "crowd" in t else torch.zeros(g, 1, dtype=torch.float64)
            self.gts.append(torch.cat([torch.full((g, 1), float(i), dtype=torch.float64), b,
                                       t["labels"].double().cpu().reshape(g, 1), crowd, area], 1))
        if loss is not None:
            self.loss += torch.tensor([float(loss) * n, float(n)], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        st = self.state_dict()
        gts = st["gts"].reshape(-1, 8).numpy()
        dets = st["dets"].reshape(-1, 7).numpy()
        out = coco_summary(gts, dets, st["images"].reshape(-1).numpy(), self.num_classes)
        if float(self.loss[1]) > 0:
            out["loss"] = float(self.loss[0] / self.loss[1])
        return out


def _to_original(det: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Letterboxed-input boxes → original image pixels (validation is only resized and padded)."""
    sx, sy = (float(v) for v in target["scale"])
    b = det["boxes"] / torch.tensor([sx, sy, sx, sy], device=det["boxes"].device, dtype=det["boxes"].dtype)
    oh, ow = (float(v) for v in target["orig_size"])
    b[:, 0::2] = b[:, 0::2].clamp(0, ow)
    b[:, 1::2] = b[:, 1::2].clamp(0, oh)
    return {"boxes": b, "scores": det["scores"], "labels": det["labels"]}


def _arg(args, name, default=None):
    v = getattr(args, name, default)
    return default if v is None else v


def draw_detections(image: np.ndarray, det: dict[str, Any], class_names: list[str], path: str | os.PathLike) -> None:
    """The image with one coloured, labelled rectangle per detection (Pillow)."""
    from PIL import Image, ImageDraw

    from hybridzoo.data.segmentation import palette

    pal = palette(max(len(class_names), 3))
    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
        colour = tuple(int(c) for c in pal[int(label) % len(pal)])
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{class_names[int(label)] if int(label) < len(class_names) else label} {float(score):.2f}"
        tw = draw.textlength(text)
        draw.rectangle([x1, max(0, y1 - 11), x1 + tw + 4, max(0, y1 - 11) + 11], fill=colour)
        draw.text((x1 + 2, max(0, y1 - 11)), text, fill=(0, 0, 0))
    im.save(path)


@register_task
class DetectionTask(Task):
    """Object detection (RetinaNet on any zoo backbone, MF-DETR) on COCO JSON, YOLO txt or built-in scenes."""

    name = "detection"
    default_model = "retinanet_mf_demo"
    batch_split_off = ("the detectors return a dict, RetinaNet's with the anchors every image shares, which the "
                       "split does not cut into per-image parts")
    headline_metric = "map"
    higher_is_better = True
    default_epochs = 12
    default_batch_size = 16
    default_lr = 1e-3
    default_weight_decay = 1e-4
    default_warmup_epochs = 0.5
    # the engine evaluates a shard per process and CocoMetric.sync() gathers the tables: exact COCO AP

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("detection")
        opts = (
            (("--dataset",), dict(default="auto", choices=["auto", "synthetic", "coco", "yolo"],
                                  help="layout under --data (auto-detected); synthetic without --data")),
            (("--img-size",), dict(type=int, default=None, help="letterbox side (default 128 synthetic, 640 otherwise)")),
            (("--backbone",), dict(default=None, help="RetinaNet/MF-DETR backbone: any features_only zoo model")),
            (("--num-classes",), dict(type=int, default=None, help="synthetic scenes: 1..3 classes")),
            (("--synthetic-train",), dict(type=int, default=None, help="synthetic training images (512)")),
            (("--synthetic-val",), dict(type=int, default=None, help="synthetic validation images (128)")),
            (("--synthetic-seed",), dict(type=int, default=None,
                                         help="seed of the synthetic scenes (0; --seed only drives training)")),
            (("--no-photometric",), dict(action="store_true", help="no brightness/contrast/saturation jitter")),
            (("--score-thresh",), dict(type=float, default=None, help="detections below this score are dropped")),
            (("--nms-iou",), dict(type=float, default=None, help="RetinaNet: NMS IoU threshold (0.5)")),
            (("--box-loss",), dict(default=None, choices=["smooth_l1", "giou"], help="RetinaNet box regression loss")),
            (("--draw-thresh",), dict(type=float, default=0.3,
                                      help="predict: boxes drawn at this score or above (the JSON has them all)")),
        )
        for names, kw in opts:
            if not any(n in parser._option_string_actions for n in names):
                g.add_argument(*names, **kw)

    # --- data
    def build_data(self, args: argparse.Namespace) -> TaskData:
        kind = _arg(args, "dataset", "auto")
        data = getattr(args, "data", None)
        seed = int(_arg(args, "seed", 0))
        photometric = not _arg(args, "no_photometric", False)
        if kind == "auto":
            kind = "synthetic" if not data else detect_layout(data)[0]
        if kind != "synthetic" and not data:
            raise ValueError(f"--dataset {kind} needs --data PATH")
        size = int(_arg(args, "img_size", 128 if kind == "synthetic" else 640))
        train_tf = DetTransform(size, train=True, photometric=photometric)
        val_tf = DetTransform(size, train=False)
        info: dict[str, Any] = {}
        if kind == "synthetic":
            k = int(_arg(args, "num_classes", 3))
            n_train, n_val = int(_arg(args, "synthetic_train", 512)), int(_arg(args, "synthetic_val", 128))
            scene_seed = int(_arg(args, "synthetic_seed", 0))
            train = SyntheticDetection(n_train, 128, "train", scene_seed, train_tf, num_classes=k)
            val = SyntheticDetection(n_val, 128, "val", scene_seed, val_tf, num_classes=k)
            train.seed = val.seed = seed        # augmentation streams follow --seed, the scenes do not
            info.update(synthetic_train=n_train, synthetic_val=n_val, synthetic_seed=scene_seed, num_classes=k)
        elif kind == "coco":
            layout, splits = detect_layout(data)
            if layout != "coco":
                raise ValueError(f"--dataset coco: {data!r} has the {layout} layout")
            train = CocoDetection(*splits["train"], transform=train_tf, seed=seed)
            val = CocoDetection(*splits["val"], transform=val_tf, seed=seed, categories=[
                {"id": i, "name": n} for i, n in zip(train.category_ids, train.class_names)])
        else:
            train = YoloDetection(data, "train", train_tf, seed)
            val = YoloDetection(data, "val", val_tf, seed, class_names=train.class_names)
        info.update({"num_classes": train.num_classes, "class_names": list(train.class_names), "in_chans": 3,
                     "img_size": size, "layout": kind, "synthetic": kind == "synthetic"})
        backbone = getattr(args, "backbone", None)
        if backbone:
            info["backbone"] = backbone
        if kind == "synthetic" and os.environ.get("RANK", "0") == "0":   # once under torchrun
            print(f"detection: SYNTHETIC scenes ({len(train)} train / {len(val)} val, {info['num_classes']} classes "
                  f"{info['class_names']}, {size}×{size})")
        return TaskData(train=train, val=val, info=info, collate_fn=collate_detection)

    # --- model
    def build_model(self, args: argparse.Namespace, data_info: dict[str, Any]) -> nn.Module:
        from hybridzoo.factory import load_weights

        weights = getattr(args, "pretrained", None)
        backbone = data_info.get("backbone") or getattr(args, "backbone", None)
        model = self._create(args.model, int(data_info.get("num_classes", 3)), backbone, args)
        if weights:
            try:
                load_weights(model, weights)       # a trained detector of the same layout ...
            except ValueError:
                from hybridzoo.models.retinanet import load_backbone_weights

                backbone_mod = getattr(model, "backbone", None)
                if backbone_mod is None:
                    raise
                load_backbone_weights(backbone_mod, weights)   # ... or classification weights for its backbone
                print(f"detection: loaded {weights} into the {model.backbone_name} backbone")
        return model

    @staticmethod
    def _create(name: str, num_classes: int, backbone: str | None, args) -> nn.Module:
        from hybridzoo.factory import create_model
        from hybridzoo.registry import get_card

        if get_card(name).task != "detection":
            raise ValueError(f"{name} is a {get_card(name).task} model; detection models: "
                             f"{', '.join(__import__('hybridzoo').list_models(task='detection'))}")
        kw: dict[str, Any] = {"num_classes": num_classes}
        if backbone:
            kw["backbone"] = backbone
        for opt, key in (("score_thresh", "score_thresh"), ("nms_iou", "nms_iou"), ("box_loss", "box_loss")):
            v = getattr(args, opt, None)
            if v is not None:
                kw[key] = v
        try:
            return create_model(name, **kw)
        except TypeError as e:
            raise ValueError(f"{name}: {e}") from e

    def build_optimizer(self, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer | None:
        """AdamW; the backbone at 0.1× the learning rate (DETR's recipe) — the engine's schedule scales both."""
        lr = float(_arg(args, "lr", self.default_lr))
        wd = float(_arg(args, "weight_decay", self.default_weight_decay))
        back, rest = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (back if n.startswith("backbone.") else rest).append(p)
        mult = 0.1 if getattr(args, "pretrained", None) else 1.0   # a randomly initialised backbone learns at full rate
        return torch.optim.AdamW([{"params": rest, "lr": lr, "lr_mult": 1.0},
                                  {"params": back, "lr": lr * mult, "lr_mult": mult}], lr=lr, weight_decay=wd)

    # --- training / evaluation
    def training_step(self, model: nn.Module, batch: Any, args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        out = model(images)
        loss, logs = unwrap_model(model).loss(out, targets, image_size=tuple(images.shape[-2:]))
        return loss, logs

    def build_metric(self, args: argparse.Namespace, data_info: dict[str, Any]) -> Metric:
        return CocoMetric(int(data_info.get("num_classes") or 0))

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Any, metric: Metric, args: argparse.Namespace) -> None:
        images, targets = batch
        core = unwrap_model(model)
        if not metric.num_classes:
            metric.num_classes = int(core.num_classes)
        out = model(images)
        size = tuple(images.shape[-2:])
        # each image's own loss: both detectors normalise by the boxes (or positive anchors) of the whole
        # batch, so a batch loss would depend on how the set is batched and sharded
        loss = sum(float(core.loss(core.select_image(out, i), [t], image_size=size)[0]) for i, t in enumerate(targets))
        loss = loss / max(1, len(targets))
        dets = [_to_original(d, t) for d, t in zip(core.postprocess(out, size), targets)]
        gts = []
        for t in targets:
            g = {"boxes": t["boxes"] / t["scale"].repeat(2).to(t["boxes"]), "labels": t["labels"], "crowd": t["crowd"]}
            if "area" in t:
                g["area"] = t["area"]
            gts.append(g)
        ids = torch.stack([t["image_id"] for t in targets])
        metric.update(ids, dets, gts, float(loss), len(targets))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, args: argparse.Namespace,
                 data_info: dict[str, Any] | None = None) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            return super().evaluate(model, loader, args, data_info)
        finally:
            model.train(was)

    def baselines(self, data: TaskData, args: argparse.Namespace) -> dict[str, float]:
        """One box per image: the most frequent training class at the mean normalised training box, score 1."""
        train, val = data.train, data.val
        k = int(data.info["num_classes"])
        counts, boxes = np.zeros(k), []
        for i in range(min(len(train), 1000)):
            a = train.annotation(i)
            h, w = a["size"]
            counts += np.bincount(a["labels"], minlength=k)[:k]
            if len(a["boxes"]) and h and w:
                boxes.append(a["boxes"] / np.array([w, h, w, h], np.float32))
        if not boxes:
            return {}
        cls = int(counts.argmax())
        mean = np.concatenate(boxes).mean(0)
        gts, dets, ids = [], [], []
        for i in range(len(val)):
            a = val.annotation(i)
            h, w = a["size"]
            ids.append(i)
            for b, lab, c, ar in zip(a["boxes"], a["labels"], a["crowd"], a["area"]):
                gts.append([i, *b, lab, float(c), ar])
            dets.append([i, *(mean * np.array([w, h, w, h])), 1.0, cls])
        s = coco_summary(np.array(gts, np.float64).reshape(-1, 8), np.array(dets, np.float64).reshape(-1, 7),
                         np.array(ids), k)
        return {f"val_{m}_trivial": v for m, v in s.items() if m in ("map", "map50", "mar100")}

    # --- pictures
    @torch.no_grad()
    def on_train_end(self, run_dir: Path, model: nn.Module, data: TaskData, args: argparse.Namespace) -> None:
        """`detections.png`: ground truth (white) and predictions (coloured) on the first validation images."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        val = data.val
        n = min(6, len(val))
        if n == 0:
            return
        core = unwrap_model(model)
        was = core.training
        core.eval()
        device = next(core.parameters()).device
        names = data.info.get("class_names") or []
        fig, axes = plt.subplots(2, 3, figsize=(10, 7), squeeze=False)
        for r in range(6):
            ax = axes[r // 3][r % 3]
            ax.axis("off")
            if r >= n:
                continue
            x, t = val[r]
            out = core(x[None].to(device))
            det = _to_original(core.postprocess(out, tuple(x.shape[-2:]))[0], t)
            img, gt_boxes, _, _ = val.raw(r)
            ax.imshow(img)
            for b in gt_boxes:
                ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="white", lw=1, ls="--"))
            keep = det["scores"] >= 0.3
            for b, s, lab in zip(det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()):
                colour = plt.cm.tab10(int(lab) % 10)
                ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=colour, lw=1.5))
                label = names[int(lab)] if int(lab) < len(names) else str(int(lab))
                ax.text(float(b[0]), float(b[1]) - 1, f"{label} {float(s):.2f}", color="black", fontsize=6,
                        bbox=dict(facecolor=colour, pad=0.5, lw=0))
        fig.suptitle("validation: ground truth dashed white, detections with score ≥ 0.3")
        fig.tight_layout()
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(run_dir) / "detections.png", dpi=100)
        plt.close(fig)
        core.train(was)

    # --- predict
    eval_options = ("dataset", "img_size", "score_thresh", "nms_iou")
    predict_options = ("score_thresh", "nms_iou", "draw_thresh")

    @torch.no_grad()
    def predict(self, args: argparse.Namespace) -> None:
        """`<stem>_boxes.png` (labelled boxes scoring ≥ --draw-thresh) per image and `detections.json`
        (every detection above the model's score threshold) in the output folder (`--output`, default the run
        folder's predictions/)."""
        from hybridzoo.engine.run import expand_inputs, load_run_from_args, output_dir, report_stream

        files = expand_inputs(getattr(args, "inputs", None))
        run = load_run_from_args(args, self)
        info, model, device = run.data_info, run.model, run.device
        names = run.class_names()
        size = int(info.get("img_size") or getattr(run.args, "img_size", None) or 640)
        tf = DetTransform(size, train=False)
        out_dir = output_dir(args, run)
        log = report_stream(args)
        print(run.describe(), file=log)
        results = []
        for path in files:
            img = read_image(path)
            x, t = tf(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.random.default_rng(0))
            out = model(x[None].to(device))
            det = _to_original(model.postprocess(out, (size, size))[0], t)
            det = {k: v.cpu() for k, v in det.items()}
            pic = out_dir / f"{Path(path).stem}_boxes.png"
            shown = det["scores"] >= float(_arg(run.args, "draw_thresh", 0.3))
            draw_detections(img, {k: v[shown] for k, v in det.items()}, names, pic)
            boxes = [{"class": names[int(l)], "index": int(l), "score": round(float(s), 5),
                      "box_xyxy": [round(float(v), 2) for v in b]}
                     for b, s, l in zip(det["boxes"], det["scores"], det["labels"])]
            results.append({"image": os.fspath(path), "picture": os.fspath(pic), "detections": boxes})
            print(f"{path}: {len(boxes)} detections → {pic}", file=log)
            for d in boxes[:10]:
                print(f"  {d['score']:.3f}  {d['class']:<12} {d['box_xyxy']}", file=log)
        from hybridzoo.engine.checkpoint import atomic_write

        text = (json.dumps(results, indent=2) + "\n").encode()
        atomic_write(out_dir / "detections.json", lambda f: f.write(text))
        if getattr(args, "json", None):
            from hybridzoo.engine.logger import write_json_results

            write_json_results(args.json, results)
