"""Tiny models for the engine / CLI / task tests — registered only when a test loads this file
(`hybridzoo.cli.load_plugin(path)` or `hybridzoo --plugin tests/hz_tiny_models.py ...`).

No batch norm (so 2 processes × half a batch equal 1 process × the batch; hz_tiny_bn excepted, for the batch
split's BatchNorm path) and no dropout.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from hybridzoo import register_model
from hybridzoo.layers import DropPath, check_image_input


class TinyViT(nn.Module):
    """Patch embedding → one pre-norm attention block → mean pool → head (optionally a distillation head)."""

    def __init__(self, *, num_classes: int = 10, in_chans: int = 3, dim: int = 32, patch: int = 8,
                 distilled: bool = False, drop_path_rate: float = 0.0, img_size: int | None = None):
        super().__init__()
        self.num_classes, self.num_features, self.in_chans, self.distilled = num_classes, dim, in_chans, distilled
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, bias=False, batch_first=True)  # no key bias: its true gradient is 0, and Adam would amplify float noise
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()  # --drop-path
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None
        self.distilled_training = False

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)
        if self.distilled:
            self.head_dist = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        check_image_input(x, self, self.in_chans)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(1)
        if pre_logits:
            return x
        if self.distilled:
            a, b = self.head(x), self.head_dist(x)
            return (a, b) if self.training and self.distilled_training else (a + b) / 2
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


_CARD = dict(paper="engine test model", arxiv=None, task="classification", input_size=(3, 32, 32),
             test_input_size=(3, 32, 32), demo=True, notes="test-only; registered by tests/hz_tiny_models.py")


@register_model(reported=dict(params_m=0.015018, gflops=None), params=15018, **_CARD)
def hz_tiny_vit(**kwargs):
    return TinyViT(**kwargs)


@register_model(reported=dict(params_m=0.015348, gflops=None), params=15348, **_CARD)
def hz_tiny_vit_distilled(**kwargs):
    return TinyViT(distilled=True, **kwargs)


class Exploding(TinyViT):
    """Returns NaN logits once its `explode_after` counter of training batches (of 16 samples) runs out.

    Counted in samples, under a lock: the batch split runs a batch as parts on several threads at once."""

    explode_after = 3
    _lock = threading.Lock()

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            with Exploding._lock:
                Exploding.explode_after -= x.shape[0] / 16
                boom = Exploding.explode_after < 0
            if boom:
                return out * float("nan")
        return out


@register_model(reported=dict(params_m=0.015018, gflops=None), params=15018, **_CARD)
def hz_tiny_exploding(**kwargs):
    return Exploding(**kwargs)


class BenchTiny(TinyViT):
    """Declares its own bench rows (the hook SuperViT uses for (resolution, keep-rate) pairs)."""

    def forward(self, x, pool: str = "mean"):
        feats = self.forward_features(x)
        return self.head(feats[:, 0] if pool == "cls" else feats.mean(1))

    def bench_configs(self):
        return [{"input_size": (3, 32, 32), "pool": "mean"}, {"input_size": (3, 64, 64), "pool": "cls", "name": "64px cls"}]


@register_model(reported=dict(params_m=0.015018, gflops=None), params=15018, **_CARD)
def hz_tiny_bench(**kwargs):
    return BenchTiny(**kwargs)


class TinyBN(TinyViT):
    """TinyViT with a BatchNorm2d on its patch map (channels-last in memory, as CvT's projection maps): the
    batch split's BatchNorm path in the trainer tests."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # no bias before the BatchNorm: its true gradient is 0, and Adam would amplify float noise
        pe = self.patch_embed
        self.patch_embed = nn.Conv2d(self.in_chans, self.num_features, pe.kernel_size, pe.stride, bias=False)
        self.bn = nn.BatchNorm2d(self.num_features)

    def forward_features(self, x):
        check_image_input(x, self, self.in_chans)
        x = self.bn(self.patch_embed(x).contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return self.norm(x)


@register_model(reported=dict(params_m=0.01505, gflops=None), params=15050, **_CARD)
def hz_tiny_bn(**kwargs):
    return TinyBN(**kwargs)


# --- one tiny model per other task (no batch norm, no dropout), for the engine tests of every task ---

class TinySeg(nn.Module):
    """Two convolutions at half resolution → per-pixel logits resized to the input."""

    def __init__(self, *, num_classes: int = 3, in_chans: int = 3, dim: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, dim, 3, 2, 1)
        self.body = nn.Conv2d(dim, dim, 3, 1, 1)
        self.head = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x):
        y = self.head(torch.relu(self.body(torch.relu(self.stem(x)))))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class TinySR(nn.Module):
    """Nearest upscaling plus a learned pixel-shuffle residual; RGB in [0, 255]."""

    def __init__(self, *, upscale: int = 2, dim: int = 8):
        super().__init__()
        self.upscale = upscale
        self.body = nn.Conv2d(3, dim, 3, 1, 1)
        self.tail = nn.Conv2d(dim, 3 * upscale * upscale, 3, 1, 1)

    def forward(self, x):
        res = nn.functional.pixel_shuffle(self.tail(torch.relu(self.body(x / 255.0))), self.upscale) * 255.0
        return nn.functional.interpolate(x, scale_factor=self.upscale, mode="nearest") + res


class TinyRec(nn.Module):
    """Mean of the history's item + position embeddings → a linear layer (the SequentialRecommender contract)."""

    def __init__(self, *, num_items: int, max_len: int = 10, hidden_size: int = 16):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.item_embedding = nn.Embedding(num_items, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, item_seq, item_seq_len):
        mask = (item_seq > 0).unsqueeze(-1).float()
        h = (self.item_embedding(item_seq) + self.position_embedding.weight[: item_seq.shape[1]]) * mask
        return torch.tanh(self.proj(h.sum(1) / mask.sum(1).clamp(min=1)))

    def scores(self, seq_output, items=None):
        if items is None:
            return seq_output @ self.item_embedding.weight.t()
        return torch.einsum("bd,bkd->bk", seq_output, self.item_embedding(items))


class TinyLandCover(nn.Module):
    """One convolution over the patch → mean pool → class logits."""

    def __init__(self, *, num_classes: int = 5, in_chans: int = 4, img_size: int = 8, dim: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_chans, dim, 3, 1, 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((-2, -1)))


_OTHER = dict(paper="engine test model", arxiv=None, demo=True, notes="test-only; registered by tests/hz_tiny_models.py")


@register_model(reported=dict(params_m=None, gflops=None), task="segmentation", input_size=(3, 32, 32), **_OTHER)
def hz_tiny_seg(**kwargs):
    return TinySeg(**kwargs)


@register_model(reported=dict(params_m=None, gflops=None), task="super-resolution", input_size=(3, 16, 16), **_OTHER)
def hz_tiny_sr_x2(**kwargs):
    return TinySR(upscale=2, **kwargs)


@register_model(reported=dict(params_m=None, gflops=None), task="recommendation", input_size=(10,), **_OTHER)
def hz_tiny_rec(**kwargs):
    return TinyRec(**kwargs)


@register_model(reported=dict(params_m=None, gflops=None), task="land-cover", input_size=(4, 8, 8), **_OTHER)
def hz_tiny_lc(**kwargs):
    return TinyLandCover(**kwargs)


@register_model(reported=dict(params_m=None, gflops=None), task="detection", input_size=(3, 64, 64), **_OTHER)
def hz_tiny_det(**kwargs):
    # MF-DETR's reduced test build (batch norm in its backbone: the engine tests compare evaluations, which
    # use the running statistics that DDP broadcasts from rank 0)
    from hybridzoo.models.mf_detr import MFDETR, _test_kwargs

    return MFDETR(**{**_test_kwargs(), **kwargs})
