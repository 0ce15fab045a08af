"""Vicinity Vision Transformer — Sun et al., TPAMI 2023, arXiv 2206.10552.

What is hybrid: a PVTv2-style pyramid whose tokens come from overlapping strided convolutions and
whose feed-forward layers carry a depthwise 3×3 convolution, so locality is built in; the attention
is *vicinity attention*, a linear-complexity attention that re-weights query–key similarity by the
2D Manhattan distance of the two tokens (a convolution-like locality prior inside a global mixer).
Official code: OpenNLPLab/Vicinity-Vision-Transformer `classification/models/vvt/vvt.py`.
Deviations from it: none in the computation (the numerical clamps are kept; `clamp=False` drops
them). The spatial-reduction and "linear" PVT branches of the official attention are not built,
since every released variant runs with `sr_ratio=1, linear=False`. Parameter names differ by
structure only (`stages.i.*` instead of `patch_embed{i}`/`block{i}`/`norm{i}`); `convert_official`
maps them.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import (ConvFFN, DropPath, check_image_input, checkpoint_seq, convert_conv_ffn,
                              drop_path_rates, trunc_normal_)
from hybridzoo.registry import register_model

__all__ = ["VicinityVisionTransformer", "VicinityAttention", "vicinity_angles", "convert_official"]

_CLAMP_MIN, _CLAMP_MAX = 1e-4, 1e4


def abs_clamp(t: torch.Tensor) -> torch.Tensor:
    """Keep |t| within [1e-4, 1e4], sign preserved (zeros stay zero) — the official fp16 guard."""
    return t.abs().clamp(_CLAMP_MIN, _CLAMP_MAX) * t.sign()


def vicinity_angles(H: int, W: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column angles of the H·W tokens (row-major): a = π/2·row/H, b = π/2·col/W.

    cos(a_i − a_j) + cos(b_i − b_j) then decays with the Manhattan distance of tokens i and j.
    """
    idx = torch.arange(H * W, device=device)
    c = math.pi / 2
    a = c * (idx // W) / H
    b = c * (idx % W) / W
    return a, b


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: a k×k conv with stride s and padding k//2, then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # the official embedding keeps LayerNorm's default eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class FeaturePreservingConnection(nn.Module):
    """FPC: an SE-style channel gate computed from the block input (GAP → FC → ReLU → FC → σ)."""

    def __init__(self, dim: int, reduction: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // reduction, bias=False)
        self.fc2 = nn.Linear(dim // reduction, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(1)))))


class VicinityAttention(nn.Module):
    """Vicinity attention in linear form, with feature-reduction attention and the FPC.

    Feature reduction (FRA): q, k, v are projected to C/fr channels and the attention runs there;
    `out_proj` maps back to C. With φ = ReLU and q′ = [q cos a, q sin a, q cos b, q sin b] (k′ alike),
    q′·k′ = φ(q)·φ(k)·[cos(a_i−a_j) + cos(b_i−b_j)], so the output is
    (q′ (k′ᵀ v)) / (q′ · Σ_j k′_j + 1e-4): K′ᵀV is formed first and the cost is linear in tokens.
    """

    def __init__(self, dim: int, num_heads: int, fr_ratio: int = 2, se_ratio: int = 1, clamp: bool = True):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % fr_ratio:
            raise ValueError(f"dim {dim} must split into {num_heads} heads divisible by fr_ratio {fr_ratio}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads // fr_ratio
        inner = dim // fr_ratio
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.q_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)
        self.fpc = FeaturePreservingConnection(dim, se_ratio)
        self.clamp = clamp
        self.eps = 1e-4

    def _clamp(self, t: torch.Tensor) -> torch.Tensor:
        return abs_clamp(t) if self.clamp else t

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.fpc(x)
        h, d = self.num_heads, self.head_dim
        q = F.relu(self.q_proj(x)).view(B, N, h, d).transpose(1, 2)   # B, h, N, d
        k = F.relu(self.k_proj(x)).view(B, N, h, d).transpose(1, 2)
        v = self.v_proj(x).view(B, N, h, d).transpose(1, 2)

        a, b = vicinity_angles(H, W, device=x.device)
        a, b = a.to(q.dtype), b.to(q.dtype)
        # N×4×1 weights [cos a, sin a, cos b, sin b]: q′ = cat over the last dim, in that order
        trig = torch.stack([a.cos(), a.sin(), b.cos(), b.sin()], dim=-1).unsqueeze(-1)
        q_ = (q.unsqueeze(-2) * trig).flatten(-2)                     # B, h, N, 4d
        k_ = (k.unsqueeze(-2) * trig).flatten(-2)

        kv = self._clamp(k_.transpose(-2, -1) @ v)                     # B, h, 4d, d
        z = self._clamp(1.0 / ((q_ * k_.sum(-2, keepdim=True)).sum(-1) + self.eps))  # B, h, N
        out = self._clamp(q_ @ kv)
        out = self._clamp(out * z.unsqueeze(-1))
        out = out.transpose(1, 2).reshape(B, N, h * d)
        out = self._clamp(self.out_proj(out))
        # feature-preserving connection: the gate re-weights channels and the input is kept
        return self._clamp(out + out * gate.unsqueeze(1))


class Block(nn.Module):
    """Pre-norm transformer block: x + VicinityAttention(LN(x)), then x + ConvFFN(LN(x)) (PVTv2's FFN)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, fr_ratio: int, se_ratio: int,
                 drop: float = 0.0, drop_path: float = 0.0, clamp: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VicinityAttention(dim, num_heads, fr_ratio, se_ratio, clamp)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class Stage(nn.Module):
    def __init__(self, in_chs: int, dim: int, depth: int, first: bool, **block_kwargs):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chs, dim, 7 if first else 3, 4 if first else 2)
        dpr = block_kwargs.pop("dpr")
        self.blocks = nn.ModuleList([Block(dim, drop_path=dpr[j], **block_kwargs) for j in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x, H, W = self.patch_embed(x)
        x = checkpoint_seq(self.blocks, x, H, W, enabled=self.grad_checkpointing)
        x = self.norm(x)
        return x.view(B, H, W, -1).permute(0, 3, 1, 2)  # channels-last B×C×H×W


class VicinityVisionTransformer(nn.Module):
    """VVT: four stages of overlapping patch embedding + vicinity-attention blocks, mean-pool head."""

    def __init__(self, *, embed_dims=(96, 160, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 depths=(2, 2, 2, 2), fr_ratios=(2, 2, 2, 2), se_ratio: int = 1, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 clamp: bool = True, img_size: int | tuple[int, int] | None = None):
        super().__init__()
        del img_size  # any input size works: the vicinity angles are computed per forward
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        stages, cur, prev = [], 0, in_chans
        self.feature_info = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            stages.append(Stage(prev, dim, depth, first=i == 0, num_heads=num_heads[i], mlp_ratio=mlp_ratios[i],
                                fr_ratio=fr_ratios[i], se_ratio=se_ratio, drop=drop_rate,
                                dpr=dpr[cur:cur + depth], clamp=clamp))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
            cur += depth
            prev = dim
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official init: trunc_normal(.02) linears, fan-out normal convs, unit LayerNorms
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check(self, x: torch.Tensor) -> None:
        check_image_input(x, self, self.in_chans, min_size=32)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """OpenNLPLab checkpoint (`patch_embed{i}`, `block{i}`, `norm{i}`, `se_fc`, `dwconv.dwconv`) → ours."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed.", k)
        k = re.sub(r"^block(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", k)
        k = re.sub(r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm.", k)
        k = k.replace(".attn.se_fc.0.", ".attn.fpc.fc1.").replace(".attn.se_fc.2.", ".attn.fpc.fc2.")
        out[k] = v
    # the feed-forward blocks: PVTv2's layout (`mlp.dwconv.dwconv`) → the shared ConvFFN's
    for ffn in sorted({k[: -len(".dwconv.dwconv.weight")] for k in out if k.endswith(".mlp.dwconv.dwconv.weight")}):
        renamed = convert_conv_ffn(out, ffn, ffn, "pvt")
        for part in ("fc1", "dwconv.dwconv", "fc2"):
            out.pop(f"{ffn}.{part}.weight"), out.pop(f"{ffn}.{part}.bias")
        out.update(renamed)
    return out


_PAPER = "Vicinity Vision Transformer"
_ARXIV = "2206.10552"
_TEST = dict(embed_dims=(16, 24, 32, 48), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))
_NOTES = ("MACs: FlopCounterMode on the official model (the paper gives none); it counts the linear "
          "attention's K'ᵀV and Q'(K'ᵀV) products but not the element-wise re-weighting.")


@register_model(paper=_PAPER, arxiv=_ARXIV, task="classification",
                reported=dict(params_m=12.9, top1=79.2, resolution=224),
                params=12_882_440, macs_g=2.99, flops_rtol=0.02, input_size=(3, 224, 224),
                test_kwargs=_TEST, test_input_size=(3, 64, 64), notes=_NOTES)
def vvt_tiny(**kwargs):
    return VicinityVisionTransformer(**{**dict(depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4)), **kwargs})


@register_model(paper=_PAPER, arxiv=_ARXIV, task="classification",
                reported=dict(params_m=25.5, top1=82.6, resolution=224),
                params=25_492_264, macs_g=5.59, flops_rtol=0.02, input_size=(3, 224, 224),
                test_kwargs=_TEST, test_input_size=(3, 64, 64), notes=_NOTES)
def vvt_small(**kwargs):
    return VicinityVisionTransformer(**{**dict(depths=(3, 3, 9, 3), mlp_ratios=(8, 8, 4, 4)), **kwargs})


@register_model(paper=_PAPER, arxiv=_ARXIV, task="classification",
                reported=dict(params_m=47.9, top1=83.8, resolution=224),
                params=47_907_304, macs_g=9.39, flops_rtol=0.02, input_size=(3, 224, 224),
                test_kwargs=_TEST, test_input_size=(3, 64, 64), notes=_NOTES)
def vvt_medium(**kwargs):
    return VicinityVisionTransformer(**{**dict(depths=(3, 3, 27, 3), mlp_ratios=(8, 8, 4, 4)), **kwargs})


@register_model(paper=_PAPER, arxiv=_ARXIV, task="classification",
                reported=dict(params_m=61.8, top1=84.1, resolution=224),
                params=61_848_520, macs_g=10.78, flops_rtol=0.02, input_size=(3, 224, 224),
                test_kwargs=_TEST, test_input_size=(3, 64, 64), notes=_NOTES)
def vvt_large(**kwargs):
    return VicinityVisionTransformer(**{**dict(depths=(4, 4, 36, 4), mlp_ratios=(4, 4, 4, 4)), **kwargs})
