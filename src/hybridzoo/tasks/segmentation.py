"""Semantic segmentation: data, losses, mmsegmentation-style metrics, inference, pictures, predict.

Metrics follow mmsegmentation's `IoUMetric`: per class, intersections and unions are *summed over
the whole dataset* (pixels labelled 255 excluded) before dividing; mIoU is the mean over classes
whose union is not empty; `acc` is pixel accuracy (aAcc). For two classes the task also reports
the foreground Dice and IoU, pooled over the dataset (smp's "micro") and per image averaged
("micro-imagewise", empty/empty = 1).

Models return logits (B, K, H, W) at the input size in eval. In training they may return a dict:
`logits` (at the input size, or at the head's own smaller size, which the loss resizes to the labels as
mmseg's decode heads do: SCTNet returns its 1/8 maps), optional `aux_logits` (a tensor or a list, weighted
by the model's `aux_loss_weights`, default 0.4 each as SCTNet's auxiliary head) and any number of
ready-made `loss_*` terms (SCTNet's SIAM alignment loss), which are added as they are.

Inference: whole image (the SCTNet configs' `test_cfg=dict(mode='whole')`) or sliding window
(`--inference slide`, crop and stride as mmseg's `slide_inference`); logits are resized to the
label's original resolution before the argmax.

Training launch recipes are the engine's (`hybridzoo train --task segmentation --model sctnet_s_seg50`).
The poly learning-rate schedule (power 1.0, linear warm-up) is offered by `build_scheduler`; the
engine uses it when it supports a task-supplied scheduler.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from hybridzoo.data.segmentation import (
    IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, ADE20KSegmentation, CityscapesSegmentation, FolderSegmentation,
    SegTransform, SyntheticScenes, collate_segmentation, dataset_info, detect_layout, palette,
)
from hybridzoo.engine.metrics import Metric
from hybridzoo.tasks.base import Task, TaskData, register_task, unwrap_model

__all__ = [
    "SegmentationTask", "SegMetrics", "class_map", "intersect_and_union", "pixel_stats", "segmentation_loss",
    "slide_inference", "whole_inference", "poly_lr_lambda", "colorize", "overlay", "legend_handles", "overlay_figure",
]


# ------------------------------------------------------------------------------------------ metrics

def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, ...]:
    """Per-class (intersection, union, predicted area, label area) of one prediction, as mmseg.

    Pixels labelled `ignore_index` (or outside 0..K-1) are excluded from every count.
    """
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
    pred, label = pred[keep], label[keep]
    inter = torch.bincount(label[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    union = area_pred + area_label - inter
    return inter.double(), union.double(), area_pred.double(), area_label.double()


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """N×K×H×W logits → N×H×W class indices: `argmax(1)` (the first maximum, NaN counted largest), taken as
    `max(1).indices`, which gives the same indices faster on the CPU: 3-5× at Cityscapes' K = 19 and 1024×2048,
    16-36× at K = 2, level at ADE20K's 150 (torch 2.13 and 2.14, NCHW; benchmarks/RESULTS.md, session 33)."""
    return logits.max(1).indices


def _check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        values = sorted({int(v) for v in bad.unique()[:8]})
        pixels = f"{bad.numel()} pixels have labels" if bad.numel() > 1 else "a pixel has the label"
        raise ValueError(f"segmentation: {pixels} {values} outside the {num_classes} classes "
                         f"0..{num_classes - 1} and not the ignore label {ignore_index}; remap them (to "
                         f"{ignore_index} for void) or give the right --num-classes")


def pixel_stats(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                ignore_index: int = IGNORE_INDEX, native: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """What evaluation needs from logits (B, K, h, w) against labels (B, H, W): counts (B, 3, K) float64, per class the
    intersection, predicted area and label area of `intersect_and_union` on `class_map(logits)`, and loss (B, 2)
    float64, the summed cross-entropy of the labelled pixels and their number. Logits of another size are resized
    to the labels first (bilinear, as `eval_step` always did); the native pass does so a row at a time.

    On the CPU in float32 one pass of the native kernels (`layers.native.seg_eval_stats`) reads the logits once, in
    any layout, for all of it: 8.6× (NCHW) and 11× (channels-last) the three passes apart at 19 × 1024 × 2048
    (benchmarks/RESULTS.md, session 34). Elsewhere, or without the kernels, `F.cross_entropy`, `class_map` and
    `intersect_and_union` (also where the logits have more classes than the metric: their class map is clamped to
    the metric's last class, as `intersect_and_union` counts it; and with native=False, `--no-fast-cpu`). A label
    neither `ignore_index` nor in [0, K) is an error that names it, either way."""
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"pixel_stats: logits (B, K, H, W) and labels (B, H, W) of the same batch expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    labels = labels.long()
    if native and logits.shape[1] == num_classes and _native_kernels_take(logits):
        from hybridzoo.layers import native
        counts, loss = native.seg_eval_stats(logits, labels, ignore_index)
        if loss[:, 2].any():
            _check_labels(labels, num_classes, ignore_index)
        return counts.double(), loss[:, :2].clone()
    _check_labels(labels, num_classes, ignore_index)
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    keep = labels != ignore_index
    rows = []
    for pred, label in zip(class_map(logits), labels):
        inter, _, area_pred, area_label = intersect_and_union(pred, label, num_classes, ignore_index)
        rows.append(torch.stack([inter, area_pred, area_label]))
    loss = torch.stack([ce.flatten(1).double().sum(1), keep.flatten(1).sum(1).double()], 1)
    return torch.stack(rows).cpu(), loss.cpu()


class SegMetrics(Metric):
    """Pooled intersections/unions over a dataset (and per-image Dice/IoU sums for binary tasks), plus
    the summed pixel cross-entropy when `update` is given logits' loss (`loss`, per labelled pixel)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names=None):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        zeros = torch.zeros(num_classes, dtype=torch.float64)
        for name in ("inter", "union", "area_pred", "area_label"):
            self.add_state(name, zeros)
        # binary tasks: per-image Dice and IoU summed, and the image count
        self.add_state("image_sums", torch.zeros(3, dtype=torch.float64))
        # summed cross-entropy over labelled pixels, and their count (filled by the task's eval_step)
        self.add_state("loss_sums", torch.zeros(2, dtype=torch.float64))

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: one image (H×W) or a batch (B×H×W) of class indices."""
        if pred.ndim == 2:
            pred, label = pred[None], label[None]
        for p, l in zip(pred, label):
            i, _, ap, al = (t.cpu() for t in intersect_and_union(p, l, self.num_classes, self.ignore_index))
            self.add_counts(i, ap, al)

    def add_counts(self, inter: torch.Tensor, area_pred: torch.Tensor, area_label: torch.Tensor) -> None:
        """One image's per-class intersection, predicted area and label area (`intersect_and_union`, `pixel_stats`):
        the pooled counts, and for two classes the image's own Dice and IoU."""
        i, ap, al = (t.double().cpu() for t in (inter, area_pred, area_label))
        u = ap + al - i
        self.inter += i
        self.union += u
        self.area_pred += ap
        self.area_label += al
        if self.num_classes == 2:
            denom = ap[1] + al[1]
            dice = 1.0 if denom == 0 else float(2 * i[1] / denom)
            iou = 1.0 if u[1] == 0 else float(i[1] / u[1])
            self.image_sums += torch.tensor([dice, iou, 1.0], dtype=torch.float64)

    def add_loss(self, loss_sum: float, n_pixels: int) -> None:
        self.loss_sums += torch.tensor([float(loss_sum), float(n_pixels)], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = (self.inter / self.union).numpy()          # NaN where a class is absent from both
            acc_per_class = (self.inter / self.area_label).numpy()
        out = {
            "miou": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
            "acc": float(self.inter.sum() / self.area_label.sum().clamp(min=1) * 100),
            "macc": float(np.nanmean(acc_per_class) * 100) if np.isfinite(acc_per_class).any() else float("nan"),
        }
        if self.num_classes == 2:
            i, ap, al, u = self.inter[1], self.area_pred[1], self.area_label[1], self.union[1]
            out["dice"] = float(2 * i / (ap + al) * 100) if ap + al > 0 else 100.0
            out["iou_fg"] = float(i / u * 100) if u > 0 else 100.0
            n_img = float(self.image_sums[2])
            out["dice_img"] = float(self.image_sums[0]) / n_img * 100 if n_img else float("nan")
            out["iou_img"] = float(self.image_sums[1]) / n_img * 100 if n_img else float("nan")
        if self.num_classes <= 32:
            for name, v in zip(self.class_names, iou):
                out[f"iou_{_safe(name)}"] = float(v * 100)
        return out

    def per_class_iou(self) -> list[float]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return [float(v * 100) for v in (self.inter / self.union).numpy()]


class _SegEvalMetric(SegMetrics):
    """SegMetrics with the validation loss (cross-entropy per labelled pixel) among its results."""

    def compute(self) -> dict[str, float]:
        out = super().compute()
        out["loss"] = float(self.loss_sums[0]) / max(float(self.loss_sums[1]), 1.0)
        return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


# ------------------------------------------------------------------------------------------- losses

def _native_kernels_take(logits: torch.Tensor) -> bool:
    """The one-pass kernels (`layers.native`) can take these logits: float32 on a CPU they run on, outside a tracer
    or compiler (to which they are opaque calls)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from hybridzoo.layers import native
    return native.load() and native.attention_supported()


class _PixelCrossEntropy(torch.autograd.Function):
    """scale · Σ cross-entropy over the labelled pixels in one pass of `native.seg_cross_entropy`, which writes the
    gradient, scale · (softmax − one-hot), in the same pass. ATen takes log_softmax and its backward, the gathers
    and the mean in ~7 passes over the logits: 110 ms forward and backward at 2 × 19 × 512 × 1024 on two Zen 4 cores,
    against 37 ms here, most of it the fresh 80 MB gradient's page faults. Logits smaller than the labels (a decode
    head's 1/8) are resized on the way, a row at a time, and the gradient comes back at their size: 202 ms for
    F.interpolate and the loss, forward and backward, from 64 × 128 against 46 ms (benchmarks/RESULTS.md, session
    34)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, scale: float) -> torch.Tensor:
        from hybridzoo.layers import native
        sums, grad = native.seg_cross_entropy(logits, target, ignore_index, scale, ctx.needs_input_grad[0])
        if sums[:, 2].any():
            _check_labels(target, logits.shape[1], ignore_index)
        ctx.save_for_backward(grad)
        return logits.new_tensor(float(sums[:, 0].sum()) * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        grad, = ctx.saved_tensors
        # the loss backpropagated as it is (g = 1: a weight is folded into the scale) needs no pass over the gradient
        return grad if bool(g == 1) else grad * g, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  avg_non_ignore: bool = False, weight: float = 1.0, native: bool = True) -> torch.Tensor:
    """weight × pixel-wise CE; logits are resized to the target first (bilinear, as mmseg's decode heads).

    avg_non_ignore=False divides by all pixels, ignored ones included: mmseg 0.26's default, which
    the SCTNet recipes train with. On the CPU in float32 one pass of the native kernels computes the loss and its
    gradient (`_PixelCrossEntropy`), resizing the logits a row at a time on the way; the value and the gradient
    equal F.interpolate's and `F.cross_entropy`'s to fp32 rounding. native=False (`--no-fast-cpu`): ATen's ops.
    """
    count = None if not avg_non_ignore else (target != ignore_index).sum().clamp(min=1)
    if native and target.dtype == torch.long and target.dim() == 3 and logits.device.type == "cpu":
        x = logits.float()   # (itself when float32)
        if _native_kernels_take(x):
            # the kernel resizes the logits to the labels a row at a time on its way (never the whole map)
            denom = target.numel() if count is None else int(count)
            return _PixelCrossEntropy.apply(x, target, ignore_index, weight / max(denom, 1))
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.float()
    if logits.device.type == "cpu":   # ATen's "Target 9 is out of bounds" names neither the classes nor the fix
        _check_labels(target, logits.shape[1], ignore_index)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    loss = loss.mean() if count is None else loss.sum() / count
    return loss if weight == 1.0 else weight * loss


def segmentation_loss(output: Any, target: torch.Tensor, model: nn.Module | None = None,
                      ignore_index: int = IGNORE_INDEX, avg_non_ignore: bool = False,
                      native: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of a model output (tensor or dict, see the module docstring) and its parts (detached 0-d tensors
    on the loss's device: the trainer reads them once an epoch, not once a step)."""
    if isinstance(output, torch.Tensor):
        loss = cross_entropy(output, target, ignore_index, avg_non_ignore, native=native)
        return loss, {"loss_ce": loss.detach()}
    logs: dict[str, torch.Tensor] = {}
    loss = cross_entropy(output["logits"], target, ignore_index, avg_non_ignore, native=native)
    logs["loss_ce"] = loss.detach()
    aux = output.get("aux_logits")
    if aux is not None:
        aux = [aux] if isinstance(aux, torch.Tensor) else list(aux)
        weights = list(getattr(model, "aux_loss_weights", None) or [0.4] * len(aux))
        for k, (a, w) in enumerate(zip(aux, weights)):
            if w:   # the weight inside: the one-pass gradient comes out scaled (no pass over it in backward)
                wla = cross_entropy(a, target, ignore_index, avg_non_ignore, weight=float(w), native=native)
                loss = loss + wla
                logs[f"loss_aux{k}"] = wla.detach() / float(w)
            else:
                la = cross_entropy(a, target, ignore_index, avg_non_ignore, native=native)
                loss = loss + w * la
                logs[f"loss_aux{k}"] = la.detach()
    for key, value in output.items():
        if key.startswith("loss_"):
            loss = loss + value
            logs[key] = value.detach()
    return loss, logs


# ---------------------------------------------------------------------------------------- inference

def _logits(out: Any) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out


def whole_inference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits at the images' size; images are zero-padded (the mean colour after normalisation) to
    the model's `size_divisor` when it has one (U-Net: 16, SegNetr: 32) and the logits cropped."""
    h, w = images.shape[-2:]
    d = int(getattr(model, "size_divisor", 1))
    ph, pw = (-h) % d, (-w) % d
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph))
    logits = _logits(model(images))
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :h, :w]


def slide_inference(model: nn.Module, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
                    num_classes: int) -> torch.Tensor:
    """mmseg's slide_inference: overlapping crops, logits averaged where they overlap."""
    b, _, h, w = images.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = images.new_zeros((b, num_classes, h, w))
    count = images.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, h - ch), min(c * sw, w - cw)
            out[:, :, y1:y1 + ch, x1:x1 + cw] += whole_inference(model, images[:, :, y1:y1 + ch, x1:x1 + cw])
            count[:, :, y1:y1 + ch, x1:x1 + cw] += 1
    return out / count


def poly_lr_lambda(total_steps: int, warmup_steps: int = 0, power: float = 1.0, warmup_ratio: float = 1e-6,
                   min_lr_ratio: float = 0.0):
    """mmcv's poly policy with linear warm-up, as a LambdaLR factor of the base learning rate."""
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        poly = (1 - min(step, total) / total) ** power * (1 - min_lr_ratio) + min_lr_ratio
        if step < warmup_steps:
            k = (1 - step / warmup_steps) * (1 - warmup_ratio)
            return poly * (1 - k)
        return poly

    return factor


# ------------------------------------------------------------------------------------------ pictures

def colorize(mask: np.ndarray, pal: np.ndarray) -> np.ndarray:
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    valid = mask < len(pal)
    out[valid] = pal[mask[valid]]
    return out


def overlay(image: np.ndarray, mask: np.ndarray, pal: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-coded mask over an RGB image (ignored pixels keep the image)."""
    col = colorize(mask, pal).astype(np.float32)
    img = image.astype(np.float32)
    blend = np.where((mask < len(pal))[..., None], (1 - alpha) * img + alpha * col, img)
    return blend.clip(0, 255).astype(np.uint8)


def legend_handles(pal: np.ndarray, class_names=None, present=None, limit: int = 20) -> list:
    """matplotlib legend patches, one per class in its overlay colour: every class when there are at
    most `limit`, else only the classes in `present` (150 ADE20K entries would hide the picture)."""
    from matplotlib.patches import Patch

    k = len(pal)
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    if k <= limit or present is None:
        idx = range(k)
    else:
        idx = sorted({int(c) for c in np.asarray(present).ravel().tolist() if 0 <= int(c) < k})
    return [Patch(facecolor=pal[i] / 255.0, edgecolor="k", linewidth=0.3, label=names[i]) for i in idx]


def overlay_figure(panels, pal: np.ndarray, class_names=None, cols: int | None = None, panel_inches: float = 3.0):
    """A figure of (title, RGB picture) panels in rows of `cols`, with one colour legend of class names
    below them; class maps of the panels (H×W ints, optional third element) decide which classes a
    long class list shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = cols or len(panels)
    rows = -(-len(panels) // cols)
    present = np.unique(np.concatenate([np.asarray(p[2]).ravel() for p in panels if len(p) > 2] or [np.zeros(0, int)]))
    handles = legend_handles(pal, class_names, present if present.size else None)
    ncol = min(len(handles), 6) or 1
    legend_rows = -(-len(handles) // ncol)
    legend_inches = 0.3 * legend_rows + 0.2
    height = panel_inches * rows + legend_inches
    fig, axes = plt.subplots(rows, cols, figsize=(panel_inches * cols, height), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, panel in enumerate(panels):
        ax = axes[i // cols][i % cols]
        ax.imshow(panel[1])
        ax.set_title(panel[0], fontsize=9)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    return fig


def _denormalize(img: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(3, 1, 1)
    return (img * std + mean).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()


# --------------------------------------------------------------------------------------------- task

def _pair(v, name: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    vals = [int(x) for x in (v.replace("x", ",").split(",") if isinstance(v, str) else v)]
    if len(vals) == 1:
        return (vals[0], vals[0])
    if len(vals) != 2:
        raise ValueError(f"--{name}: expected H,W or a single size, got {v!r}")
    return (vals[0], vals[1])


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# defaults per dataset layout: (crop, base scale (short, long), ratio range, test scale)
_DATA_DEFAULTS = {
    "cityscapes": ((512, 1024), (1024, 2048), (0.5, 2.0), (512, 1024)),
    "ade20k": ((512, 512), (512, 2048), (0.5, 2.0), (512, 2048)),
    "folder": ((256, 256), None, (0.5, 2.0), None),
    # built-in scenes: 64×64 keeps each default run (SCTNet-S, SegNetr) to a few minutes on 2 CPU cores
    "synthetic": ((64, 64), None, (0.5, 2.0), None),
}


@register_task
class SegmentationTask(Task):
    """Semantic segmentation (SCTNet, SegFormer, SegNetr, U-Net) on Cityscapes, ADE20K, folders or built-in scenes."""

    name = "segmentation"
    batch_split_off = ("SCTNet-S measured 0.54-1.0x the whole batch by batch split, U-Net 0.83-1.06x, SegNetr "
                       "0.98-1.53x: the parts meet at every BatchNorm and run their Python under one GIL "
                       "(benchmarks/RESULTS.md, session 32)")
    default_model = "sctnet_s_seg50"
    headline_metric = "miou"
    higher_is_better = True
    default_epochs = 10
    default_batch_size = 8
    default_lr = 4e-4                # SCTNet Cityscapes recipe: AdamW 4e-4, wd 0.0125, heads ×10
    default_weight_decay = 0.0125

    # -------------------------------------------------------------------------------- arguments
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        # Options the engine already defines (--output, --pretrained, ...) are left to it.
        g = parser.add_argument_group("segmentation")
        for names, kw in (
            (("--dataset",), dict(default="auto", choices=["auto", "synthetic", "cityscapes", "ade20k", "folder"],
                                  help="layout under --data (auto-detected); synthetic when --data is not given")),
            (("--num-classes",), dict(type=int, default=None, help="classes of a folder dataset / synthetic scenes")),
            (("--ignore-index",), dict(type=int, default=None, metavar="V",
                                       help="folder masks: the value that marks void pixels in the mask files "
                                            "(CamVid: 11); excluded from loss and metrics (default: 255)")),
            (("--reduce-zero-label",), dict(action="store_true",
                                            help="folder masks: 0 is void and labels 1..K become 0..K-1 "
                                                 "(mmsegmentation's option; ADE20K does this already)")),
            (("--crop-size",), dict(default=None, help="training crop H,W (default per dataset)")),
            (("--base-scale",), dict(default=None, help="short,long size the random ratio applies to")),
            (("--ratio-range",), dict(default="0.5,2.0", help="random rescale ratio range")),
            (("--test-scale",), dict(default=None, help="short,long size validation images are resized to")),
            (("--inference",), dict(default="whole", choices=["whole", "slide"], help="whole-image or sliding-window")),
            (("--slide-stride",), dict(default=None, help="sliding-window stride H,W (default 2/3 of the crop)")),
            (("--no-photometric",), dict(action="store_true", help="disable photometric distortion")),
            (("--avg-non-ignore",), dict(action="store_true", help="average CE over labelled pixels only")),
            (("--teacher",), dict(default=None, help="SCTNet: SegFormer teacher weights; enables SIAM alignment")),
            (("--teacher-model",), dict(default=None, help="SCTNet teacher (default segformer-b2 for S, b3 for B)")),
            (("--synthetic-size",), dict(type=int, default=64, help="side of a built-in scene")),
            (("--synthetic-train",), dict(type=int, default=64, help="built-in training scenes")),
            (("--synthetic-val",), dict(type=int, default=32, help="built-in validation scenes")),
            (("--head-lr-mult",), dict(type=float, default=10.0, help="lr multiplier of parameters under a 'head'")),
            (("--warmup-steps",), dict(type=int, default=None, help="poly schedule warm-up steps")),
        ):
            if not any(n in parser._option_string_actions for n in names):
                g.add_argument(*names, **kw)
        for names, kw in ((("--pretrained",), dict(default=None, help="weights to load")),):
            if not any(n in parser._option_string_actions for n in names):
                g.add_argument(*names, **kw)

    @staticmethod
    def _arg(args, name, default=None):
        v = getattr(args, name, default)
        return default if v is None else v

    # ------------------------------------------------------------------------------------- data
    def _layout(self, args) -> str:
        kind = self._arg(args, "dataset", "auto")
        data = getattr(args, "data", None)
        if kind == "auto":
            kind = "synthetic" if not data else detect_layout(data)
        if kind != "synthetic" and not data:
            raise ValueError(f"--dataset {kind} needs --data PATH")
        return kind

    def _transforms(self, args, kind):
        crop, base, ratio, test = _DATA_DEFAULTS[kind]
        model = str(getattr(args, "model", "") or "")
        if kind == "cityscapes" and model.startswith("sctnet"):
            # SCTNet's Seg50/75/100 *is* the test resolution (512×1024, 768×1536, 1024×2048): its card's input size
            from hybridzoo.registry import get_card

            test = tuple(get_card(model).input_size[1:])
        crop = _pair(self._arg(args, "crop_size", None), "crop-size") or crop
        base = _pair(self._arg(args, "base_scale", None), "base-scale") or base
        test = _pair(self._arg(args, "test_scale", None), "test-scale") or test
        r = self._arg(args, "ratio_range", "0.5,2.0")
        ratio = tuple(float(x) for x in r.split(",")) if isinstance(r, str) else tuple(r)
        photometric = not self._arg(args, "no_photometric", False)
        train = SegTransform(train=True, crop_size=crop, scale=base, ratio_range=ratio, photometric=photometric)
        val = SegTransform(train=False, test_scale=test)
        return train, val

    def build_data(self, args: argparse.Namespace) -> TaskData:
        kind = self._layout(args)
        if kind != "folder":
            # the other layouts define their void labels themselves (Cityscapes: label ids outside the
            # 19 train ids, ADE20K: 0); a second rule on top would silently drop real classes
            for opt, on in (("--ignore-index", getattr(args, "ignore_index", None) is not None),
                            ("--reduce-zero-label", bool(getattr(args, "reduce_zero_label", False)))):
                if on:
                    raise ValueError(f"{opt} applies to images/ + masks/ folders, not to the {kind} layout "
                                     "(which maps its own void labels)")
        train_tf, val_tf = self._transforms(args, kind)
        seed = int(self._arg(args, "seed", 0))
        if kind == "synthetic":
            k = int(self._arg(args, "num_classes", 5))
            size = int(self._arg(args, "synthetic_size", 64))
            train = SyntheticScenes(int(self._arg(args, "synthetic_train", 64)), size, k, "train", seed, train_tf)
            val = SyntheticScenes(int(self._arg(args, "synthetic_val", 32)), size, k, "val", seed, val_tf)
        elif kind == "cityscapes":
            train = CityscapesSegmentation(args.data, "train", train_tf, seed)
            val = CityscapesSegmentation(args.data, "val", val_tf, seed)
        elif kind == "ade20k":
            train = ADE20KSegmentation(args.data, "train", train_tf, seed)
            val = ADE20KSegmentation(args.data, "val", val_tf, seed)
        else:
            k = getattr(args, "num_classes", None)
            void = dict(ignore_index=getattr(args, "ignore_index", None),
                        reduce_zero_label=bool(getattr(args, "reduce_zero_label", False)))
            train = FolderSegmentation(args.data, "train", train_tf, seed, num_classes=k, **void)
            val = FolderSegmentation(args.data, "val", val_tf, seed, num_classes=k or train.num_classes, **void)
        info = dataset_info(train)
        info["layout"] = kind
        return TaskData(train=train, val=val, info=info, collate_fn=collate_segmentation)

    # ------------------------------------------------------------------------------------ model
    def build_model(self, args: argparse.Namespace, data_info: dict[str, Any]) -> nn.Module:
        from hybridzoo.factory import create_model, load_weights

        k = int(data_info.get("num_classes", 19))
        model = create_model(args.model, num_classes=k, in_chans=int(data_info.get("in_chans", 3)))
        weights = getattr(args, "pretrained", None)
        if weights:
            load_weights(model, weights)
        teacher = getattr(args, "teacher", None)
        if teacher:
            if not hasattr(model, "enable_siam"):
                raise ValueError(f"--teacher is only used by SCTNet models, not {args.model}")
            model.enable_siam(teacher=teacher, teacher_model=getattr(args, "teacher_model", None))
        return model

    def build_optimizer(self, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer | None:
        """AdamW as the SCTNet recipes: every parameter decays; names containing 'head' get lr × 10.

        mmcv's `custom_keys` match substrings of the full name, so the official ×10 reaches the
        decode head, the auxiliary head and the SIAM projections (ours are named `siam.*`).
        """
        lr = float(self._arg(args, "lr", self.default_lr))
        wd = float(self._arg(args, "weight_decay", self.default_weight_decay))
        mult = float(self._arg(args, "head_lr_mult", 10.0))
        heads, rest = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (heads if "head" in n or n.startswith("siam.") else rest).append(p)
        groups = [{"params": rest, "lr": lr, "lr_mult": 1.0}]
        if heads:
            groups.append({"params": heads, "lr": lr * mult, "lr_mult": mult})
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=wd)

    def lr_factor(self, step: int, total_steps: int, steps_per_epoch: int, args: argparse.Namespace) -> float:
        """Poly (power 1) with mmcv's linear warm-up (the SCTNet recipes: 1500 of 160k iterations), per step."""
        warm = self._arg(args, "warmup_steps", None)
        warm = int(warm) if warm is not None else min(1500, total_steps // 20)
        return poly_lr_lambda(total_steps, warm, 1.0, 1e-6)(step)

    # ---------------------------------------------------------------------------------- training
    def training_step(self, model: nn.Module, batch: Any,
                      args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = _to_device(batch, _model_device(model))
        images, masks = batch[0], batch[1]
        out = model(images)
        # the model's own auxiliary weights, through the trainer's wrappers (DDP, torch.compile)
        # (the loss's one-pass kernel is part of the fast CPU path: --no-fast-cpu takes ATen's ops)
        loss, logs = segmentation_loss(out, masks, unwrap_model(model),
                                       avg_non_ignore=bool(self._arg(args, "avg_non_ignore", False)),
                                       native=bool(getattr(args, "fast_cpu", True)))
        logs["loss"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def predict_logits(self, model: nn.Module, images: torch.Tensor, args: argparse.Namespace, num_classes: int) -> torch.Tensor:
        if self._arg(args, "inference", "whole") == "slide":
            crop = _pair(self._arg(args, "crop_size", None), "crop-size") or (512, 512)
            stride = _pair(self._arg(args, "slide_stride", None), "slide-stride") or (crop[0] * 2 // 3, crop[1] * 2 // 3)
            return slide_inference(model, images, crop, stride, num_classes)
        return whole_inference(model, images)

    def build_metric(self, args: argparse.Namespace, data_info: dict[str, Any]) -> SegMetrics:
        k = int(data_info.get("num_classes") or getattr(args, "num_classes", 0) or 0)
        if k < 1:
            raise ValueError("segmentation metric: the number of classes is unknown (give --num-classes)")
        return _SegEvalMetric(k, IGNORE_INDEX, data_info.get("class_names"))

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Any, metric: SegMetrics, args: argparse.Namespace) -> None:
        images, masks, meta = _to_device(batch, _model_device(model))
        logits = self.predict_logits(model, images, args, metric.num_classes)
        for j in range(images.shape[0]):
            ih, iw, mh, mw = (int(v) for v in meta[j])
            lg = logits[j:j + 1, :, :ih, :iw]
            target = masks[j:j + 1, :mh, :mw]
            # cross-entropy, class map and counts in one pass over the logits on the CPU, resizing them to the
            # label's size on the way where it differs (pixel_stats)
            counts, loss = pixel_stats(lg, target, metric.num_classes, metric.ignore_index,
                                       native=bool(getattr(args, "fast_cpu", True)))
            metric.add_loss(float(loss[0, 0]), int(loss[0, 1]))
            metric.add_counts(*counts[0])

    def baselines(self, data: TaskData, args: argparse.Namespace) -> dict[str, float]:
        """mIoU of two trivial predictors fitted on raw training labels (at most 500 images).

        majority: the most frequent training class at every pixel. prior: per pixel position, the
        most frequent training class at that (relative) position, on a 64×64 grid.
        """
        train, val = data.train, data.val
        k = int(data.info["num_classes"])
        grid = 64
        counts = torch.zeros(k, dtype=torch.float64)
        pos = torch.zeros(k, grid, grid, dtype=torch.float64)
        for i in range(min(len(train), 500)):
            m = torch.from_numpy(train.raw_mask(i).astype(np.int64))
            valid = m[m != IGNORE_INDEX]
            counts += torch.bincount(valid, minlength=k)[:k].double()
            small = F.interpolate(m[None, None].float(), size=(grid, grid), mode="nearest")[0, 0].long()
            ok = small != IGNORE_INDEX
            pos += F.one_hot(small.clamp(0, k - 1), k).permute(2, 0, 1).double() * ok
        majority = int(counts.argmax())
        prior = pos.argmax(0)
        m_major, m_prior = SegMetrics(k), SegMetrics(k)
        for i in range(min(len(val), 500)):
            m = torch.from_numpy(val.raw_mask(i).astype(np.int64))
            m_major.update(torch.full_like(m, majority), m)
            p = F.interpolate(prior[None, None].float(), size=m.shape, mode="nearest")[0, 0].long()
            m_prior.update(p, m)
        out = {"val_miou_majority": m_major.compute()["miou"], "val_miou_prior": m_prior.compute()["miou"],
               "val_acc_majority": m_major.compute()["acc"]}
        if k == 2:
            out["val_dice_majority"] = m_major.compute()["dice"]
        return out

    # ---------------------------------------------------------------------------------- pictures
    @torch.no_grad()
    def on_train_end(self, run_dir: Path, model: nn.Module, data: TaskData, args: argparse.Namespace) -> None:
        """`overlays.png`: image, ground truth and prediction overlays for the first validation images,
        with a colour legend of the class names."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        val = data.val
        n = min(4, len(val))
        if n == 0:
            return
        k = int(data.info["num_classes"])
        names = data.info.get("class_names")
        pal = palette(k, names)
        was_training = model.training
        model.eval()
        device = _model_device(model)
        panels = []
        for r in range(n):
            img, mask, meta = val[r]
            logits = self.predict_logits(model, img[None].to(device), args, k)
            mh, mw = int(meta[2]), int(meta[3])
            logits = F.interpolate(logits, size=(mh, mw), mode="bilinear", align_corners=False)
            pred = class_map(logits)[0].cpu().numpy()
            raw = val.raw_image(r)
            gt = mask.numpy().astype(np.int64)
            panels += [("image", raw), ("ground truth", overlay(raw, gt, pal), gt[gt != IGNORE_INDEX]),
                       ("prediction", overlay(raw, pred, pal), pred)]
        fig = overlay_figure(panels, pal, names, cols=3)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(run_dir) / "overlays.png", dpi=100)
        plt.close(fig)
        model.train(was_training)

    # ----------------------------------------------------------------------------------- predict
    eval_options = ("dataset", "test_scale", "inference", "crop_size", "slide_stride")
    predict_options = ("test_scale", "inference", "crop_size", "slide_stride")

    @torch.no_grad()
    def predict(self, args: argparse.Namespace) -> None:
        """Segment images (files or folders): `<stem>_mask.png` (class indices), `<stem>_overlay.png` (the
        input's size) and `<stem>_overlay_legend.png` (the overlay with a colour legend of class names) in the
        output folder, with the run's validation transform and inference mode."""
        from PIL import Image

        from hybridzoo.engine.run import expand_inputs, load_run_from_args, output_dir, read_image_file, report_stream

        files = expand_inputs(getattr(args, "inputs", None))
        run = load_run_from_args(args, self)
        info, model, device = run.data_info, run.model, run.device
        k = int(info.get("num_classes") or getattr(model, "num_classes", 0))
        if not k:
            raise ValueError(f"{run.weights!r} does not say its classes; use a run folder or weights written by "
                             "`hybridzoo train`")
        names = info.get("class_names")
        pal = palette(k, names)
        _, tf = self._transforms(run.args, info.get("layout", "folder"))
        out_dir = output_dir(args, run)
        log = report_stream(args)
        print(run.describe(), file=log)
        results = []
        for f in files:
            raw = np.asarray(read_image_file(f, "RGB"))
            img, _, _ = tf(raw, np.zeros(raw.shape[:2], np.uint8), np.random.default_rng(0))
            logits = self.predict_logits(model, img[None].to(device), run.args, k)
            logits = F.interpolate(logits, size=raw.shape[:2], mode="bilinear", align_corners=False)
            pred = class_map(logits)[0].cpu().numpy().astype(np.uint8 if k <= 256 else np.int32)
            mask_path, overlay_path = out_dir / f"{f.stem}_mask.png", out_dir / f"{f.stem}_overlay.png"
            Image.fromarray(pred).save(mask_path)
            blend = overlay(raw, pred, pal)
            Image.fromarray(blend).save(overlay_path)                     # pixel-aligned with the input
            legend_path = out_dir / f"{f.stem}_overlay_legend.png"
            _save_legend_figure(legend_path, f.name, blend, pred, pal, names)
            counts = np.bincount(pred.ravel(), minlength=k)
            results.append({"image": str(f), "mask": str(mask_path), "overlay": str(overlay_path), "legend": str(legend_path),
                            "class_pixels": {str(names[c] if names else c): int(counts[c]) for c in range(k)}})
            print(f"{f} → {mask_path}, {overlay_path}, {legend_path}", file=log)
        if getattr(args, "json", None):
            from hybridzoo.engine.logger import write_json_results

            write_json_results(args.json, results)


def _save_legend_figure(path: Path, title: str, blend: np.ndarray, pred: np.ndarray, pal: np.ndarray, names) -> None:
    import matplotlib.pyplot as plt

    fig = overlay_figure([(title, blend, pred)], pal, names, panel_inches=float(np.clip(max(pred.shape) / 100, 4, 12)))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
