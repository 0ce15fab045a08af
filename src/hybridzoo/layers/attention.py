"""Multi-head self-attention through `scaled_dot_product_attention` (fused kernels on CPU and GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import native


class Attention(nn.Module):
    """ViT multi-head self-attention with a fused qkv projection (timm's names: `qkv`, `proj`).

    `scale` defaults to head_dim**-0.5; models whose official code scales differently pass it.

    In the copy `optimize_for_cpu_inference` makes, and in training through `optimize_for_cpu_training` (what
    `hybridzoo train` does on the CPU), attention without a mask or dropout runs through the native kernels
    (`layers.native.attend`, forward and backward) where they are built: same function, to fp32 rounding.
    """

    native_attention = False   # set by freeze_for_cpu_inference / optimize_for_cpu_training

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                num_queries: int | None = None) -> torch.Tensor:
        """B×N×C → B×N×C; with `num_queries` = n, only the first n tokens query (all N are keys and values)
        and the output is B×n×C — the rows a classifier on the prefix tokens reads from the last block."""
        B, N, C = x.shape
        if num_queries is None:
            n = N
            qkv = self.qkv(x)
            if (self.native_attention and attn_mask is None and not (self.training and self.attn_drop > 0)
                    and native.packed_attention_applies(qkv, self.num_heads)):
                # the heads read in place, and in training the product's gradient written in its own layout
                return self.proj_drop(self.proj(native.attend_packed(qkv, self.num_heads, self.scale)))
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            n = check_num_queries(num_queries, N)
            q = linear_rows(self.qkv, x[:, :n], 0, C).reshape(B, n, self.num_heads, self.head_dim).transpose(1, 2)
            k, v = linear_rows(self.qkv, x, C, 3 * C).reshape(B, N, 2, self.num_heads, self.head_dim).permute(
                2, 0, 3, 1, 4).unbind(0)
            if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == N:
                attn_mask = attn_mask[..., :n, :]
        if (self.native_attention and attn_mask is None and not (self.training and self.attn_drop > 0)
                and native.attention_applies(q, k, v)):
            x = native.attend(q, k, v, self.scale)   # tokens first already
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
            x = x.transpose(1, 2).reshape(B, n, C)
        return self.proj_drop(self.proj(x))

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        """The inference path's module: this one (its linear layers are then packed by the caller), with the
        native attention kernel switched on where it is built for this head dim."""
        self.native_attention = native.attention_ready(self.head_dim)
        return self


def check_num_queries(num_queries, tokens: int) -> int:
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or not 1 <= num_queries <= tokens:
        raise ValueError(f"num_queries must be an int in [1, {tokens}] (the leading tokens that query), "
                         f"got {num_queries!r}")
    return num_queries


def linear_rows(layer: nn.Module, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """`layer(x)[..., lo:hi]` without computing the other output features.

    A layer that knows how (`output_slice`: the training `FastLinear`, the frozen `OneDNNLinear`) is asked; an
    exact `nn.Linear` uses its weight rows; anything else (a subclass with its own forward) runs whole."""
    part = getattr(layer, "output_slice", None)
    if part is not None:
        return part(x, lo, hi)
    if type(layer) is nn.Linear:
        return F.linear(x, layer.weight[lo:hi], None if layer.bias is None else layer.bias[lo:hi])
    return layer(x)[..., lo:hi]


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale) for the places that need the map itself (token ranking, visualisation)."""
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
