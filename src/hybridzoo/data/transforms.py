"""Augmentations of the DeiT recipe, written with torch ops (no torchvision).

Per-sample transforms (`TrainTransform`, `EvalTransform`) run in the data loader on one C×H×W
float image in [0, 1]. Batch transforms (`Mixup`, `RandomErasing`) run on the device inside the
task's training step, where a whole batch is at hand. Every random draw goes through torch's
global generator, so a seeded run — and a resumed one — sees the same augmentations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "normalize", "resize", "random_resized_crop_box", "random_resized_crop",
    "hflip", "TrainTransform", "EvalTransform", "one_hot", "Mixup", "RandomErasing", "SoftTargetCrossEntropy",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def normalize(img: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std over the channel axis (dim -3); one channel takes the first mean/std."""
    c = img.shape[-3]
    m = torch.as_tensor(mean[:c], dtype=img.dtype, device=img.device).view(c, 1, 1)
    s = torch.as_tensor(std[:c], dtype=img.dtype, device=img.device).view(c, 1, 1)
    return (img - m) / s


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a C×H×W image to `size` (h, w)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    antialias = size[0] < img.shape[-2] or size[1] < img.shape[-1]
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]


def random_resized_crop_box(h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering `scale` of the area with aspect `ratio` (Inception)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()).item())
            left = int(torch.randint(0, w - cw + 1, ()).item())
            return top, left, ch, cw
    # fallback: the largest centred crop within the ratio range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(img: torch.Tensor, size: tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    top, left, ch, cw = random_resized_crop_box(img.shape[-2], img.shape[-1], scale, ratio)
    return resize(img[..., top:top + ch, left:left + cw], size)


def hflip(img: torch.Tensor) -> torch.Tensor:
    return img.flip(-1)


class TrainTransform:
    """Random resized crop → horizontal flip → normalise, on one C×H×W float image in [0, 1]."""

    def __init__(self, img_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip_prob: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = (img_size, img_size)
        self.scale, self.ratio, self.hflip_prob = tuple(scale), tuple(ratio), hflip_prob
        self.mean, self.std = mean, std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.scale[0] >= 1.0:  # the whole image: no crop to draw
            img = resize(img, self.size)
        else:
            img = random_resized_crop(img, self.size, self.scale, self.ratio)
        if self.hflip_prob > 0 and torch.rand(()).item() < self.hflip_prob:
            img = hflip(img)
        return normalize(img, self.mean, self.std)


class EvalTransform:
    """Resize the shorter side to img_size / crop_pct, centre crop img_size, normalise (DeiT eval)."""

    def __init__(self, img_size: int, crop_pct: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.img_size, self.crop_pct, self.mean, self.std = img_size, crop_pct, mean, std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        short = int(math.floor(self.img_size / self.crop_pct))
        if (h, w) != (self.img_size, self.img_size):
            nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
            img = resize(img, (nh, nw))
            top, left = (nh - self.img_size) // 2, (nw - self.img_size) // 2
            img = img[..., top:top + self.img_size, left:left + self.img_size]
        return normalize(img, self.mean, self.std)


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Smoothed one-hot targets: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class Mixup:
    """Mixup (Zhang et al.) and CutMix (Yun et al.) on a batch, with label smoothing, as DeiT uses them.

    Each call draws one λ ~ Beta(α, α) for the whole batch and pairs every sample with the batch
    reversed. With both enabled, CutMix is chosen with probability `switch_prob`. CutMix corrects λ
    to the exact pasted area, so the target weights always equal the pixel fractions and sum to 1.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1):
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, label_smoothing

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _beta(self, alpha: float) -> float:
        return float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = 1.0
        if self.enabled and torch.rand(()).item() < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or torch.rand(()).item() < self.switch_prob)
            if use_cutmix:
                lam = self._beta(self.cutmix_alpha)
                top, left, bh, bw = cutmix_box(x.shape[-2], x.shape[-1], lam)
                x = x.clone()
                x[..., top:top + bh, left:left + bw] = x.flip(0)[..., top:top + bh, left:left + bw]
                lam = 1.0 - bh * bw / (x.shape[-2] * x.shape[-1])
            else:
                lam = self._beta(self.mixup_alpha)
                x = x * lam + x.flip(0) * (1.0 - lam)
        y1 = one_hot(labels, self.num_classes, self.smoothing)
        y2 = one_hot(labels.flip(0), self.num_classes, self.smoothing)
        return x, y1 * lam + y2 * (1.0 - lam)


def cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """A box covering about (1 - λ) of the image, centred uniformly at random and clipped to it."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, ()).item())
    cx = int(torch.randint(0, w, ()).item())
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, x0, y1 - y0, x1 - x0


class RandomErasing:
    """Random erasing (Zhong et al.) on a normalised batch: per sample, with probability `prob`, one
    rectangle of 2%–1/3 of the area, aspect in [0.3, 3.3], is replaced by N(0, 1) noise ("pixel" mode,
    as DeiT uses it). Boxes are drawn on the CPU and applied as one mask, without a loop over pixels."""

    def __init__(self, prob: float = 0.25, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)):
        self.prob, self.scale, self.ratio = prob, scale, ratio

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob <= 0:
            return x
        b, _, h, w = x.shape
        boxes = torch.zeros(b, 4, dtype=torch.long)  # top, left, height, width (0 = no erase)
        apply = torch.rand(b) < self.prob
        for i in torch.nonzero(apply).flatten().tolist():
            for _ in range(10):
                area = h * w * _uniform(*self.scale)
                aspect = math.exp(_uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
                eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if eh < h and ew < w:
                    top = int(torch.randint(0, h - eh + 1, ()).item())
                    left = int(torch.randint(0, w - ew + 1, ()).item())
                    boxes[i] = torch.tensor([top, left, eh, ew])
                    break
        if not boxes[:, 2].any():
            return x
        boxes = boxes.to(x.device)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        t, l_, bh, bw = (boxes[:, k].view(b, 1, 1) for k in range(4))
        mask = (ys >= t) & (ys < t + bh) & (xs >= l_) & (xs < l_ + bw)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        return torch.where(mask[:, None], noise, x)


class SoftTargetCrossEntropy(torch.nn.Module):
    """Cross-entropy against a probability vector per sample (mixup / cutmix / smoothed targets)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
