"""Early Convolutions Help Transformers See Better — Xiao et al., NeurIPS 2021, arXiv 2106.14881.

What is hybrid: ViT_C replaces ViT's 16×16 "patchify" stem by a small convolutional stem — 3×3
conv-BN-ReLU layers (stride 2 doubling the channels, or stride 1 keeping them) ending in a 1×1 conv
to the hidden width — and drops one transformer block to keep the FLOPs, which makes optimisation
far more robust. ViT_P is the paper's patchify baseline, trained and initialised the same way.

Official code: facebookresearch/pycls `pycls/models/vit.py` (`ViTStemConv`, `init_weights_vit`).
The transformer is the ViT of `hybridzoo.models.vit` (same maths as pycls's, timm's names);
`convert_official` maps pycls checkpoints. Deviations: none in the architecture.

Counting: the paper's params and GFLOPs come from pycls's `complexity()`. Its parameter count equals
the official model's and ours exactly (each card's `params`). Its FLOPs also count bias additions,
which FlopCounterMode does not, so each card's `macs_g` is pycls's formula without them (the paper's
rounded figure stays in `reported`; ViT_C-1GF measures 1.076 G against "1.1", 2.2% under).
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Sequence

import torch
from torch import nn

from hybridzoo.layers.conv import ConvBnAct
from hybridzoo.layers.helpers import to_2tuple
from hybridzoo.layers.patch_embed import PatchEmbed
from hybridzoo.models.vit import VisionTransformer
from hybridzoo.registry import register_model

__all__ = ["ConvStem", "EarlyConvViT", "convert_official"]


# 1. the convolutional stem -------------------------------------------------------------------------

class ConvStem(nn.Module):
    """The paper's conv stem: 3×3 conv-BN-ReLU layers, then a 1×1 conv (with bias, no norm) to `embed_dim`.

    Returns a B×embed_dim×H/s×W/s map, s = the product of `strides` (it replaces the patch size).
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, widths: Sequence[int] = (24, 48, 96, 192),
                 strides: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f"conv stem: {len(widths)} widths but {len(strides)} strides")
        if math.prod(strides) != patch_size:
            raise ValueError(f"conv stem strides {tuple(strides)} multiply to {math.prod(strides)}, not the patch "
                             f"size {patch_size}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, c = [], in_chans
        for w, s in zip(widths, strides):
            layers.append(ConvBnAct(c, w, 3, stride=s, act_layer=partial(nn.ReLU, inplace=True)))
            c = w
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))


# 2. the model --------------------------------------------------------------------------------------

class EarlyConvViT(VisionTransformer):
    """ViT_C (`stem_widths` given) or ViT_P (`stem_widths=None`, a 16×16 patchify stem), pycls's init.

    pycls's transformer is a pre-norm ViT with a class token, LayerNorm eps 1e-5 and exact GELU: our
    `VisionTransformer` with `norm_eps=1e-5`.
    """

    def __init__(self, *, stem_widths: Sequence[int] | None = None, stem_strides: Sequence[int] | None = None,
                 patch_size: int = 16, norm_eps: float = 1e-5, **kwargs):
        if stem_widths is None:
            embed_layer = partial(PatchEmbed, flatten=False)
        else:
            embed_layer = partial(ConvStem, widths=tuple(stem_widths), strides=tuple(stem_strides or ()))
        self.conv_stem = stem_widths is not None
        super().__init__(patch_size=patch_size, norm_eps=norm_eps, embed_layer=embed_layer, **kwargs)

    def init_weights(self) -> None:
        # pycls init_weights_vit: the class token stays zero; PyTorch's defaults for norms and (in
        # nn.MultiheadAttention) xavier-uniform q/k/v, default-Linear output projection, zero biases.
        nn.init.normal_(self.pos_embed, mean=0.0, std=0.02)
        if self.conv_stem:
            for layer in self.patch_embed.convs:
                conv = layer[0]
                nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(2.0 / conv.out_channels))
            proj = self.patch_embed.proj
            nn.init.normal_(proj.weight, mean=0.0, std=math.sqrt(1.0 / proj.out_channels))
            nn.init.zeros_(proj.bias)
        else:
            proj = self.patch_embed.proj
            fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
            nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in))
            nn.init.zeros_(proj.bias)
        for blk in self.blocks:
            nn.init.xavier_uniform_(blk.attn.qkv.weight)
            nn.init.zeros_(blk.attn.qkv.bias)
            blk.attn.proj.reset_parameters()
            nn.init.zeros_(blk.attn.proj.bias)
            for fc in (blk.mlp.fc1, blk.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)


# 3. official checkpoint conversion -----------------------------------------------------------------

_PYCLS_BLOCK = {
    "ln_1.": "norm1.",
    "self_attention.block.in_proj_weight": "attn.qkv.weight",
    "self_attention.block.in_proj_bias": "attn.qkv.bias",
    "self_attention.block.out_proj.": "attn.proj.",
    "ln_2.": "norm2.",
    "mlp_block.linear_1.": "mlp.fc1.",
    "mlp_block.linear_2.": "mlp.fc2.",
}


def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a pycls ViT checkpoint (`stem.*`, `class_token`, `pos_embedding`, `encoder.block_N.*`,
    `head.head_fc`) to our names. nn.MultiheadAttention's `in_proj_weight` is already [q; k; v]."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        new = None
        if k.startswith("stem."):
            name = k[len("stem."):]
            m = re.match(r"cstem(\d+)_(conv|bn)\.(.+)$", name)
            if m:
                i, kind, rest = m.groups()
                new = f"patch_embed.convs.{i}.{0 if kind == 'conv' else 1}.{rest}"
            elif name.startswith(("cstem_last_conv.", "patchify.")):
                new = "patch_embed.proj." + name.split(".", 1)[1]
        elif k == "class_token":
            new = "cls_token"
        elif k == "pos_embedding":
            new = "pos_embed"
            if v.ndim == 3 and v.shape[1] == 1 and v.shape[0] > 1:  # pycls's sequence-first (L, 1, D)
                v = v.transpose(0, 1)
        elif k.startswith("encoder.ln."):
            new = "norm." + k[len("encoder.ln."):]
        elif k.startswith("head.head_fc."):
            new = "head." + k[len("head.head_fc."):]
        else:
            m = re.match(r"encoder\.block_(\d+)\.(.+)$", k)
            if m:
                i, name = m.groups()
                for old, ours in _PYCLS_BLOCK.items():
                    if name.startswith(old):
                        new = f"blocks.{i}.{ours}{name[len(old):]}"
                        break
        out[new if new is not None else k] = v
    return out


# 4. the variants -----------------------------------------------------------------------------------
# Paper Table 1. ViT_C: one block fewer than ViT_P; 1GF/4GF use MLP ratio 3.

_STEM_SMALL = (2, 2, 2, 2)
_STEM_LARGE = dict(stem_widths=(64, 128, 128, 256, 256, 512), stem_strides=(2, 2, 1, 2, 1, 2))
_TEST_C = dict(test_kwargs=dict(img_size=32, embed_dim=32, depth=2, num_heads=2, stem_widths=(8, 16, 16, 32),
                                stem_strides=(2, 2, 2, 2)), test_input_size=(3, 32, 32))
_TEST_P = dict(test_kwargs=dict(img_size=32, embed_dim=32, depth=2, num_heads=2), test_input_size=(3, 32, 32))
_CX = ("params: pycls complexity() (exact); macs_g: pycls complexity() FLOPs without bias additions "
       "(what FlopCounterMode counts).")


def _vitc(**kwargs) -> EarlyConvViT:
    return EarlyConvViT(**kwargs)


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=4.6, gflops=1.1, top1=75.3, resolution=224),
                params=4_567_936, macs_g=1.0759,
                params_rtol=0.02, flops_rtol=0.02, notes=_CX, **_TEST_C)
def vitc_1gf(**kwargs):
    return _vitc(**{**dict(embed_dim=192, depth=11, num_heads=3, mlp_ratio=3.0, stem_widths=(24, 48, 96, 192),
                           stem_strides=_STEM_SMALL), **kwargs})


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=17.8, gflops=4.0, top1=81.4, resolution=224),
                params=17_754_136, macs_g=3.9589,
                params_rtol=0.02, flops_rtol=0.02, notes=_CX, **_TEST_C)
def vitc_4gf(**kwargs):
    return _vitc(**{**dict(embed_dim=384, depth=11, num_heads=6, mlp_ratio=3.0, stem_widths=(48, 96, 192, 384),
                           stem_strides=_STEM_SMALL), **kwargs})


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=81.6, gflops=17.7, top1=83.0, resolution=224),
                params=81_573_160, macs_g=17.7115,
                params_rtol=0.02, flops_rtol=0.02, notes=_CX, **_TEST_C)
def vitc_18gf(**kwargs):
    return _vitc(**{**dict(embed_dim=768, depth=11, num_heads=12, mlp_ratio=4.0, **_STEM_LARGE), **kwargs})


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=167.8, gflops=35.0, top1=83.2, resolution=224),
                params=167_796_008, macs_g=35.002,
                params_rtol=0.02, flops_rtol=0.02, notes=_CX, **_TEST_C)
def vitc_36gf(**kwargs):
    return _vitc(**{**dict(embed_dim=1024, depth=13, num_heads=16, mlp_ratio=4.0, **_STEM_LARGE), **kwargs})


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=4.8, gflops=1.1, top1=72.3, resolution=224),
                params=4_830_376, macs_g=1.0794,
                params_rtol=0.02, flops_rtol=0.02, notes="ViT_P baseline (patchify stem). " + _CX, **_TEST_P)
def vitp_1gf(**kwargs):
    return _vitc(**{**dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=3.0), **kwargs})


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=18.5, gflops=3.9, top1=80.4, resolution=224),
                params=18_507_112, macs_g=3.9017,
                params_rtol=0.02, flops_rtol=0.02, notes="ViT_P baseline (patchify stem). " + _CX, **_TEST_P)
def vitp_4gf(**kwargs):
    return _vitc(**{**dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=3.0), **kwargs})


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=86.7, gflops=17.5, top1=82.1, resolution=224),
                params=86_567_656, macs_g=17.5638,
                params_rtol=0.02, flops_rtol=0.02, notes="ViT_P baseline (patchify stem) = ViT-B/16. " + _CX, **_TEST_P)
def vitp_18gf(**kwargs):
    return _vitc(**{**dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0), **kwargs})


@register_model(paper="ViT_C", arxiv="2106.14881", task="classification",
                reported=dict(params_m=178.4, gflops=35.9, top1=81.8, resolution=224),
                params=178_364_392, macs_g=35.9716,
                params_rtol=0.02, flops_rtol=0.02, notes="ViT_P baseline (patchify stem), ViT-L at 14 blocks. " + _CX,
                **_TEST_P)
def vitp_36gf(**kwargs):
    return _vitc(**{**dict(embed_dim=1024, depth=14, num_heads=16, mlp_ratio=4.0), **kwargs})
