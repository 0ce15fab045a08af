"""Image classification: the built-in digits, CIFAR-10/100 and image folders; DeiT's recipe and distillation.

    hybridzoo train                                                  # cvt_tiny_demo on the built-in digits
    hybridzoo train --model deit_tiny_patch16_224 --data ~/cifar-10-batches-py --img-size 224 \\
        --mixup 0.8 --cutmix 1.0 --reprob 0.25 --drop-path 0.1 --epochs 300 --lr 5e-4 --warmup-epochs 5
    hybridzoo train --model deit_tiny_distilled_patch16_224 --data ~/imagenette \\
        --teacher cvt_13 --teacher-checkpoint teacher.safetensors --distillation hard

Data (`--data`): nothing or `digits` → scikit-learn's handwritten digits (32×32 RGB, fixed 80/20
split); a CIFAR python folder → CIFAR-10/100; otherwise an image folder with train/ and val/.
Metrics: `loss` (plain cross-entropy), `top1`, `top5` (only with more than 5 classes) as fractions; the
baseline is the majority class.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, Mixup, RandomErasing, TrainTransform
from hybridzoo.engine.metrics import Metric
from hybridzoo.tasks.base import Task, TaskData, register_task, unwrap_model

__all__ = ["ClassificationTask", "ClassificationLoss", "ClassificationMetric", "build_classifier"]


class ClassificationLoss(nn.Module):
    """Cross-entropy with label smoothing for integer labels, soft cross-entropy for mixed targets."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.ndim == 2:
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


class ClassificationMetric(Metric):
    """Summed cross-entropy, top-1 and top-5 hits over the samples.

    Top-5 is reported only with more than 5 classes: with 5 or fewer it is 1.0 by construction.
    The class count comes from the data (`num_classes`), else from the width of the logits.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("sums", torch.zeros(4, dtype=torch.float64))  # loss, top1, top5, count

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == target[:, None]
        self.sums += torch.stack([F.cross_entropy(logits, target, reduction="sum").double(),
                                  hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                                  torch.tensor(float(target.numel()), dtype=torch.float64, device=logits.device)]).cpu()

    def compute(self) -> dict[str, float]:
        n = max(1.0, float(self.sums[3]))
        out = {"loss": float(self.sums[0]) / n, "top1": float(self.sums[1]) / n}
        if self.num_classes is not None and self.num_classes > 5:
            out["top5"] = float(self.sums[2]) / n
        return out


def _logits(out) -> torch.Tensor:
    # a distilled model left in training-style output: DeiT averages the two heads' logits at inference
    if isinstance(out, (tuple, list)):
        return (out[0] + out[1]) / 2
    return out


def _subnetwork_kwargs(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """--resolution / --keep-rate select a sub-network of a model that has them (SuperViT)."""
    import inspect

    wanted = {"img_size": getattr(args, "resolution", None), "keep_rate": getattr(args, "keep_rate", None)}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if not wanted:
        return {}
    core = unwrap_model(model)   # the model's own forward: a compiled wrapper's takes (*args, **kwargs)
    accepted = inspect.signature(core.forward).parameters
    missing = [k for k in wanted if k not in accepted]
    if missing:
        flags = {"img_size": "--resolution", "keep_rate": "--keep-rate"}
        raise ValueError(f"{getattr(core, 'model_name', type(core).__name__)} has no sub-networks to select with "
                         f"{', '.join(flags[k] for k in missing)} (SuperViT models do)")
    return wanted


def parse_model_kwargs(items: list[str] | dict | None) -> dict[str, Any]:
    """`--model-kwargs KEY=VALUE ...` → a dict, each value read as YAML (numbers, lists, strings)."""
    import yaml

    if not items:
        return {}
    if isinstance(items, dict):  # a run's saved args after a JSON round trip
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs expects KEY=VALUE items, got {item!r}")
        out[key] = None if value in ("None", "none") else yaml.safe_load(value)
    return out


def build_classifier(name: str, num_classes: int, in_chans: int = 3, img_size: int | None = None,
                     pretrained: str | None = None, **overrides: Any) -> nn.Module:
    """Build `name` for `num_classes` at `img_size`, loading `pretrained` weights if given.

    The resolution is passed as `img_size` only when it differs from the model card's (models whose
    design takes any resolution do not need it). Pretrained weights with another head width (e.g.
    ImageNet's 1000) are loaded into the backbone and the classifier is re-initialised.
    """
    from hybridzoo.factory import create_model, load_weights
    from hybridzoo.registry import get_card

    card = get_card(name)
    kwargs = dict(overrides)
    if img_size is not None and len(card.input_size) == 3 and tuple(card.input_size[1:]) != (img_size, img_size):
        kwargs["img_size"] = img_size
    try:
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError) as e:
        if "img_size" not in kwargs or (isinstance(e, ValueError) and "img_size" not in str(e)):
            raise
        # a model that accepts any input size has no img_size argument; one that resizes its input to a
        # trained resolution (SuperViT) refuses others and is built at its default
        kwargs.pop("img_size")
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained:
        try:
            load_weights(model, pretrained)
        except ValueError as first:
            if not hasattr(model, "reset_classifier"):
                raise
            # another head width (ImageNet's 1000 for 10 classes): build the checkpoint's width, load,
            # then re-initialise the classifier; the width comes from the published card, the raw
            # state dict's head, or the model's default
            from hybridzoo.hub.published import resolve_pretrained

            path, published = resolve_pretrained(name, pretrained)
            widths = [getattr(published, "num_classes", None), _head_width_or_none(path)]
            with torch.device("meta"):
                widths.append(getattr(create_model(name, in_chans=in_chans, **kwargs), "num_classes", None))
            for width in dict.fromkeys(w for w in widths if w and w != num_classes):
                try:
                    model = create_model(name, num_classes=width, in_chans=in_chans, **kwargs)
                    load_weights(model, path)
                except ValueError:
                    continue
                model.reset_classifier(num_classes)
                print(f"pretrained weights: the checkpoint's head has {width} classes and the data "
                      f"{num_classes}; the backbone is loaded and the classifier re-initialised")
                break
            else:
                raise first from None
    return model


def _head_width(weights: str) -> int:
    """The class count of a weights file: the rows of its last classifier."""
    from hybridzoo.factory import read_state_dict

    state = read_state_dict(weights)
    heads = [v for k, v in state.items() if k.endswith("head.weight") or k.endswith("classifier.weight")]
    if not heads:
        raise ValueError(f"cannot tell the number of classes of {weights!r}; train with hybridzoo or pass a run folder")
    return int(heads[-1].shape[0])


def _head_width_or_none(path: str) -> int | None:
    try:
        return _head_width(path)
    except ValueError:
        return None


@register_task
class ClassificationTask(Task):
    name = "classification"
    batch_split = True  # training_step: model(x), the loss on the whole batch's output
    default_model = "cvt_tiny_demo"
    headline_metric = "top1"
    higher_is_better = True
    default_epochs = 8
    default_batch_size = 64
    default_lr = 2e-3
    default_weight_decay = 0.05
    default_warmup_epochs = 1
    default_workers = 0

    def __init__(self):
        self.mixup: Mixup | None = None
        self.erasing: RandomErasing | None = None
        self.criterion: nn.Module = ClassificationLoss()
        self.teacher: nn.Module | None = None

    # --- command line -------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("classification")
        g.add_argument("--dataset", choices=("auto", "digits", "cifar", "folder"), default="auto",
                       help="how to read --data (auto: digits without --data, else CIFAR or image folder by layout)")
        g.add_argument("--img-size", type=int, default=None, help="input resolution (default: 32 for digits/CIFAR, "
                       "the model card's for image folders)")
        g.add_argument("--resolution", type=int, default=None,
                       help="SuperViT: evaluate the sub-network at this resolution (128/160/192/224)")
        g.add_argument("--keep-rate", type=float, default=None,
                       help="SuperViT: evaluate the sub-network with this token keep-rate (0.5/0.7/1.0)")
        g.add_argument("--crop-scale", type=float, default=None,
                       help="smallest area fraction of the random resized crop (default 0.08; 0.7 for digits)")
        g.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (default 0.5; 0 for digits)")
        g.add_argument("--crop-pct", type=float, default=0.875, help="centre-crop fraction at evaluation (folders)")
        g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
        g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (DeiT: 0.8); 0 disables")
        g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (DeiT: 1.0); 0 disables")
        g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
        g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
        g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability (DeiT: 0.25)")
        g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (DeiT: 0.1)")
        g.add_argument("--teacher", default=None, help="teacher model name for DeiT distillation")
        g.add_argument("--teacher-checkpoint", default=None, help="teacher weights (trained on the same classes)")
        g.add_argument("--distillation", choices=("none", "soft", "hard"), default="none")
        g.add_argument("--distillation-alpha", type=float, default=0.5)
        g.add_argument("--distillation-tau", type=float, default=1.0)
        g.add_argument("--topk", type=int, default=5, help="predict: how many classes to print per image")
        g.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE",
                       help="extra model arguments, values in YAML (layout=C-C-C-T 'dims=[16,32,64,64]')")
        g.add_argument("--teacher-model-kwargs", nargs="*", default=None, metavar="KEY=VALUE",
                       help="extra arguments for the teacher model, as --model-kwargs")

    # --- data ---------------------------------------------------------------------------------
    def build_data(self, args: argparse.Namespace) -> TaskData:
        from hybridzoo.data.cifar import CIFAR_LAYOUT, is_cifar_dir, load_cifar
        from hybridzoo.data.digits import DIGITS_CLASSES, TensorImageDataset, load_digits_split
        from hybridzoo.data.folder import FOLDER_LAYOUT, ImageFolder

        data, kind = getattr(args, "data", None), getattr(args, "dataset", "auto")
        if kind == "auto":
            if data in (None, "", "digits"):
                kind = "digits"
            elif not Path(data).exists():
                raise FileNotFoundError(f"data folder {data!r} does not exist; expected {FOLDER_LAYOUT}, or {CIFAR_LAYOUT}")
            else:
                kind = "cifar" if is_cifar_dir(data) else "folder"
        digits = kind == "digits"
        img_size = getattr(args, "img_size", None) or (32 if kind in ("digits", "cifar") else self._card_size(args))
        scale = (getattr(args, "crop_scale", None) or (0.7 if digits else 0.08), 1.0)
        ratio = (0.85, 1 / 0.85) if digits else (3 / 4, 4 / 3)
        hflip = getattr(args, "hflip", None)
        hflip = (0.0 if digits else 0.5) if hflip is None else hflip
        crop_pct = 1.0 if kind in ("digits", "cifar") else getattr(args, "crop_pct", 0.875)
        train_tf = TrainTransform(img_size, scale=scale, ratio=ratio, hflip_prob=hflip)
        val_tf = EvalTransform(img_size, crop_pct=crop_pct)
        if digits:
            xtr, ytr, xva, yva = load_digits_split(32)
            train = TensorImageDataset(xtr, ytr, train_tf, DIGITS_CLASSES)
            val = TensorImageDataset(xva, yva, val_tf, DIGITS_CLASSES)
            classes = DIGITS_CLASSES
        elif kind == "cifar":
            train, val, classes = load_cifar(data, train_tf, val_tf)
        else:
            train, val = ImageFolder.splits(data, train_tf, val_tf)
            classes = train.classes
        info = {"num_classes": len(classes), "class_names": list(classes), "in_chans": 3, "img_size": img_size,
                "crop_pct": crop_pct, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "dataset": "digits" if digits else kind, "train_size": len(train), "val_size": len(val)}
        return TaskData(train=train, val=val, info=info)

    @staticmethod
    def _card_size(args) -> int:
        from hybridzoo.registry import get_card

        size = get_card(args.model).input_size
        return int(size[-1]) if len(size) == 3 else 224

    # --- model and loss -----------------------------------------------------------------------
    def build_model(self, args: argparse.Namespace, data_info: dict[str, Any]) -> nn.Module:
        overrides = {}
        if getattr(args, "drop_path", None) is not None:
            overrides["drop_path_rate"] = args.drop_path
        overrides.update(parse_model_kwargs(getattr(args, "model_kwargs", None)))
        n = data_info["num_classes"]
        model = build_classifier(args.model, n, data_info.get("in_chans", 3), data_info.get("img_size"),
                                 getattr(args, "pretrained", None), **overrides)
        smoothing = getattr(args, "smoothing", 0.0)
        mixup_alpha, cutmix_alpha = getattr(args, "mixup", 0.0), getattr(args, "cutmix", 0.0)
        self.mixup = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and getattr(args, "mixup_prob", 1.0) > 0:
            self.mixup = Mixup(n, mixup_alpha, cutmix_alpha, getattr(args, "mixup_prob", 1.0),
                               getattr(args, "mixup_switch_prob", 0.5), smoothing)
        reprob = getattr(args, "reprob", 0.0)
        self.erasing = RandomErasing(reprob) if reprob > 0 else None
        base = ClassificationLoss(smoothing)
        self.criterion, self.teacher = base, None
        distillation = getattr(args, "distillation", "none") or "none"
        if distillation != "none":
            from hybridzoo.tasks._distillation import DistillationLoss  # lazy: written alongside DeiT

            if not getattr(args, "teacher", None) or not getattr(args, "teacher_checkpoint", None):
                raise ValueError("--distillation needs --teacher NAME and --teacher-checkpoint PATH (a teacher "
                                 "trained on the same classes)")
            teacher = build_classifier(args.teacher, n, data_info.get("in_chans", 3), data_info.get("img_size"),
                                       args.teacher_checkpoint,
                                       **parse_model_kwargs(getattr(args, "teacher_model_kwargs", None)))
            teacher.eval().requires_grad_(False)
            self.teacher = teacher
            self.criterion = DistillationLoss(base, teacher, distillation, args.distillation_alpha, args.distillation_tau)
            if hasattr(model, "set_distilled_training"):
                model.set_distilled_training(True)
        return model

    def training_step(self, model: nn.Module, batch, args: argparse.Namespace):
        x, y = batch
        if self.teacher is not None and next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        if self.erasing is not None:
            x = self.erasing(x)
        out = model(x)
        if self.teacher is not None:
            loss = self.criterion(x, out, target)
        elif isinstance(out, (tuple, list)):
            # a distilled model trained without a teacher: both heads learn the labels
            loss = (self.criterion(out[0], target) + self.criterion(out[1], target)) / 2
        else:
            loss = self.criterion(out, target)
        return loss, {}

    def build_metric(self, args: argparse.Namespace, data_info: dict[str, Any]) -> "ClassificationMetric":
        return ClassificationMetric(data_info.get("num_classes"))

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch, metric: "ClassificationMetric", args: argparse.Namespace) -> None:
        x, y = batch
        logits = _logits(model(x, **_subnetwork_kwargs(model, args))).float()
        metric.update(logits, y)

    def baselines(self, data: TaskData, args: argparse.Namespace) -> dict[str, float]:
        train_targets = torch.as_tensor(_targets(data.train))
        val_targets = torch.as_tensor(_targets(data.val))
        if train_targets.numel() == 0 or val_targets.numel() == 0:
            return {}
        majority = int(torch.bincount(train_targets).argmax())
        return {"val_top1_majority": float((val_targets == majority).double().mean())}

    # --- predict ------------------------------------------------------------------------------
    eval_options = ("dataset", "crop_pct", "resolution", "keep_rate")
    predict_options = ("topk",)

    def predict(self, args: argparse.Namespace) -> None:
        """Top-k classes of each image, printed (and with `--json`, written); the run's eval transform."""
        from hybridzoo.data.folder import load_image
        from hybridzoo.engine.run import expand_inputs, load_run_from_args

        files = expand_inputs(getattr(args, "inputs", None))
        run = load_run_from_args(args, self)
        info, model, device = run.data_info, run.model, run.device
        classes = run.class_names()
        n = len(classes)
        img_size = int(info.get("img_size") or run.input_size[-1])
        tf = EvalTransform(img_size, crop_pct=info.get("crop_pct", 0.875), mean=tuple(info.get("mean", IMAGENET_MEAN)),
                           std=tuple(info.get("std", IMAGENET_STD)))
        mode = "RGB" if int(info.get("in_chans", 3)) == 3 else "L"
        topk = max(1, min(int(run.args.topk or 5), n))
        to_stdout = getattr(args, "json", None) == "-"
        print(run.describe(), file=sys.stderr)
        results = []
        for path in files:
            x = tf(load_image(path, mode))[None].to(device)
            with torch.no_grad():
                probs = _logits(model(x)).float().softmax(-1)[0]
            p, idx = probs.topk(topk)
            top = [{"class": classes[i], "index": int(i), "prob": float(q)} for q, i in zip(p.tolist(), idx.tolist())]
            results.append({"image": os.fspath(path), "top": top})
            if not to_stdout:
                print(path)
                for t in top:
                    print(f"  {t['prob']:.4f}  {t['class']}")
        if getattr(args, "json", None):
            from hybridzoo.engine.logger import write_json_results

            write_json_results(args.json, results)


def _targets(ds) -> list[int]:
    if hasattr(ds, "targets"):
        return list(ds.targets)
    return [int(ds[i][1]) for i in range(len(ds))]
