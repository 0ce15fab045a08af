"""CeiT: Incorporating Convolution Designs into Visual Transformers — Yuan et al., ICCV 2021,
arXiv 2103.11816.

What is hybrid: tokens come from a small convolutional stem (Image-to-Tokens: conv 7×7/2, BN,
max-pool, then a 4×4 patch convolution) instead of 16×16 patches of raw pixels, and every block's
feed-forward is a Locally-enhanced Feed-Forward (LeFF) that runs a depthwise 3×3 convolution on the
patch tokens laid back out as a grid. A final Layer-wise Class-token Attention (LCA) attends from the
last layer's class token over the class tokens of all layers.

Official code: coeusguo/ceit `ceit_model.py` (weights linked from its README). LCA follows its
current `AttentionLCA` (only the last class token is the query), which gives the same output as the
first commit's full self-attention over all class tokens read at the last row. Deviations from it:
- The stem's parameters are `i2t.conv / i2t.bn / i2t.proj` (official: `i2t.backbone.conv`,
  `i2t.backbone.bn`, `i2t.proj`) and LCA's feed-forward is `lca.mlp` (official `lca.feedforward`);
  `convert_official` renames them.
- Attention goes through fused SDPA (same MAC count as the official explicit product).
- Variable input size: the position embedding is interpolated and LeFF reshapes to the real H×W grid
  (the official code assumes a square grid of the training size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridzoo.layers import (Attention, DropPath, Mlp, check_image_input, drop_path_rates, init_weights_vit,
                              resample_abs_pos_embed, to_2tuple, trunc_normal_)
from hybridzoo.registry import register_model

__all__ = ["I2T", "LeFF", "LCAttention", "CeiT", "convert_official"]


class I2T(nn.Module):
    """Image-to-Tokens: conv 7×7/2 (no bias) → BN → max-pool 3×3/2 → 4×4/4 patch conv. No activation."""

    def __init__(self, *, in_chans: int = 3, stem_chans: int = 64, embed_dim: int = 192, patch_size: int = 4,
                 kernel_size: int = 7, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, stem_chans, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(stem_chans)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.reduction = stride * 2 * patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W image → B×D×(H/16)×(W/16) token grid."""
        return self.proj(self.maxpool(self.bn(self.conv(x))))


class LeFF(nn.Module):
    """Locally-enhanced Feed-Forward: 1×1 expand → BN → GELU → dw 3×3 → BN → GELU → 1×1 → BN.

    The class token is not convolved: it is passed through unchanged, so the block adds the
    *normalised* class token (LN2(x_cls)) to its residual — the official behaviour, kept.
    """

    def __init__(self, dim: int, hidden_dim: int, *, kernel_size: int = 3, act_layer=nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=(kernel_size - 1) // 2, groups=hidden_dim)
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.conv3 = nn.Conv2d(hidden_dim, dim, 1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.act = act_layer()

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = grid_size
        cls_token, tokens = x[:, :1], x[:, 1:]
        # the patch tokens as a channels-last map (B×H×W×C in memory, viewed as B×C×H×W): the 1×1 convolutions are
        # then products over the token rows and the map needs no transposed copy on the way in or out
        y = tokens.reshape(B, H, W, C).contiguous().permute(0, 3, 1, 2)
        y = self.act(self.bn1(self.conv1(y)))
        y = self.act(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.cat([cls_token, y.permute(0, 2, 3, 1).reshape(B, H * W, C)], dim=1)

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        if not (all(bn.track_running_stats for bn in (self.bn1, self.bn2, self.bn3)) and type(self.act) is nn.GELU):
            return self   # batch statistics in eval mode, or an activation oneDNN has no post-op for
        return _FrozenLeFF(self, batch_hint)


class _FrozenLeFF(LeFF):
    """LeFF for the oneDNN inference path: each BatchNorm folded into the convolution before it and the GELUs into
    their epilogues, so the hidden map is written once per convolution (the 1×1 ones as products on the panel
    kernel, the depthwise one on its native kernel) instead of three more passes for BN, GELU and BN."""

    def __init__(self, m: LeFF, batch_hint: int | None):
        nn.Module.__init__(self)
        from hybridzoo.layers.onednn import OneDNNConv2d
        self.conv1 = OneDNNConv2d(m.conv1, m.bn1, nn.GELU(approximate=m.act.approximate), batch_hint)
        self.conv2 = OneDNNConv2d(m.conv2, m.bn2, nn.GELU(approximate=m.act.approximate), batch_hint)
        self.conv3 = OneDNNConv2d(m.conv3, m.bn3, batch_hint=batch_hint)
        self.bn1 = self.bn2 = self.bn3 = self.act = nn.Identity()

    freeze_for_cpu_inference = None   # frozen already: `optimize_for_cpu_inference` leaves it as it is


class Block(nn.Module):
    """Pre-norm block: MHSA, then LeFF on the patch grid."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, kernel_size: int = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.leff = LeFF(dim, int(dim * mlp_ratio), kernel_size=kernel_size)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.leff(self.norm2(x), grid_size))


class LCAttention(nn.Module):
    """Attention whose only query is the last class token; keys and values are all layers' class tokens.

    `qkv` keeps the official (3·dim, dim) layout: the first `dim` rows make the query.
    """

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, -1:], w[:C], None if b is None else b[:C])
        kv = F.linear(x, w[C:], None if b is None else b[C:])
        q = q.reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, 1, C)))


class LCABlock(nn.Module):
    """Layer-wise class-token attention block (no drop path), standard MLP; returns the last token."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LCAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        """(B, depth, C) class tokens → (B, C)."""
        x = cls_tokens[:, -1:] + self.attn(self.norm1(cls_tokens))
        x = x + self.mlp(self.norm2(x))
        return x[:, 0]


class CeiT(nn.Module):
    """I2T stem → class token + position embedding → LeFF blocks → LCA over per-layer class tokens → head."""

    def __init__(self, *, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, stem_chans: int = 64, patch_size: int = 4, leff_kernel_size: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.i2t = I2T(in_chans=in_chans, stem_chans=stem_chans, embed_dim=embed_dim, patch_size=patch_size)
        img_size = to_2tuple(img_size)
        r = self.i2t.reduction
        self.grid_size = (img_size[0] // r, img_size[1] // r)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], kernel_size=leff_kernel_size)
            for i in range(depth)])
        self.pos_layer_embed = nn.Parameter(torch.zeros(1, depth, embed_dim))
        self.lca = LCABlock(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                            drop=drop_rate, attn_drop=attn_drop_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # as the official code: pos_layer_embed stays zero; convolutions keep PyTorch's default init
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights_vit)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image → the normalised LCA output (B, C), the representation the head reads."""
        r = self.i2t.reduction
        check_image_input(x, self, self.in_chans, divisor=r, min_size=r)
        x = self.i2t(x)
        grid = (x.shape[-2], x.shape[-1])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = self.pos_drop(x + resample_abs_pos_embed(self.pos_embed, grid, old_size=self.grid_size))
        cls_tokens = []
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
            cls_tokens.append(x[:, 0])
        x = self.lca(torch.stack(cls_tokens, dim=1) + self.pos_layer_embed)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_RENAMES = (("i2t.backbone.", "i2t."), ("lca.feedforward.", "lca.mlp."))


def convert_official(state_dict: dict[str, torch.Tensor], model: CeiT) -> dict[str, torch.Tensor]:
    """coeusguo/ceit `CeIT` state dict → ours (stem and LCA feed-forward renamed, pos_embed resampled)."""
    if not any(k.startswith("i2t.") for k in state_dict):
        raise ValueError("not a CeiT checkpoint: no 'i2t.*' keys")
    out = {}
    for k, v in state_dict.items():
        for old, new in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        n = pos.shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot resample a non-square pos_embed with {n} patch entries")
        out["pos_embed"] = resample_abs_pos_embed(pos, model.grid_size, old_size=(side, side))
    return out


def _ceit(dim: int, heads: int, /, **kwargs) -> CeiT:
    return CeiT(**{"embed_dim": dim, "num_heads": heads, **kwargs})


_TEST = dict(test_kwargs=dict(embed_dim=24, num_heads=2, depth=2, stem_chans=8, img_size=64),
             test_input_size=(3, 64, 64))
_NOTE = ("macs_g: the official model measured with FlopCounterMode (the paper's figure leaves out the "
         "attention products).")


@register_model(paper="CeiT", arxiv="2103.11816", task="classification",
                reported=dict(params_m=6.4, gflops=1.2, top1=76.4, resolution=224),
                params=6_356_904, macs_g=1.3953, notes=_NOTE, **_TEST)
def ceit_tiny(**kwargs) -> CeiT:
    """CeiT-T: 192 dims, 3 heads."""
    return _ceit(192, 3, **kwargs)


@register_model(paper="CeiT", arxiv="2103.11816", task="classification",
                reported=dict(params_m=24.2, gflops=4.5, top1=82.0, resolution=224),
                params=24_204_840, macs_g=4.7595, notes=_NOTE, **_TEST)
def ceit_small(**kwargs) -> CeiT:
    """CeiT-S: 384 dims, 6 heads."""
    return _ceit(384, 6, **kwargs)


@register_model(paper="CeiT", arxiv="2103.11816", task="classification",
                reported=dict(params_m=94.4, top1=82.5, resolution=224),
                params=94_405_416, macs_g=17.7489,
                notes=_NOTE + " The paper gives no FLOPs for CeiT-B; the README's top-1 is 82.5 after 150 epochs "
                              "(81.9 after 100).", **_TEST)
def ceit_base(**kwargs) -> CeiT:
    """CeiT-B: 768 dims, 12 heads."""
    return _ceit(768, 12, **kwargs)


@register_model(paper="CeiT", arxiv="2103.11816", task="classification",
                reported=dict(params_m=6.4, gflops=3.6, top1=78.8, resolution=384),
                params=6_429_864, macs_g=5.1028, input_size=(3, 384, 384),
                notes=_NOTE + " The README's 3.6 G at 384 is far below the 5.10 G the official model measures.",
                **_TEST)
def ceit_tiny_384(**kwargs) -> CeiT:
    """CeiT-T fine-tuned at 384×384 (24×24 tokens)."""
    return _ceit(192, 3, **{"img_size": 384, **kwargs})


@register_model(paper="CeiT", arxiv="2103.11816", task="classification",
                reported=dict(params_m=24.2, gflops=12.9, top1=83.3, resolution=384),
                params=24_350_760, macs_g=15.9802, input_size=(3, 384, 384),
                notes=_NOTE + " The README's 12.9 G at 384 is below the 15.98 G the official model measures.",
                **_TEST)
def ceit_small_384(**kwargs) -> CeiT:
    """CeiT-S fine-tuned at 384×384."""
    return _ceit(384, 6, **{"img_size": 384, **kwargs})


@register_model(paper="CeiT", arxiv="2103.11816", task="classification",
                reported=dict(params_m=94.7, resolution=384),
                params=94_697_256, macs_g=56.099, input_size=(3, 384, 384),
                notes=_NOTE + " No reported accuracy at 384 for CeiT-B; the official code has no "
                              "ceit_base_patch16_384 entry (built here as ceit_base with img_size=384).", **_TEST)
def ceit_base_384(**kwargs) -> CeiT:
    """CeiT-B at 384×384."""
    return _ceit(768, 12, **{"img_size": 384, **kwargs})
