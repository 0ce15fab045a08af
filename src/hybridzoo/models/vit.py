"""ViT and DeiT — Dosovitskiy et al., ICLR 2021, arXiv 2010.11929; Touvron et al., ICML 2021, arXiv 2012.12877.

What is hybrid: ViT is the pure-transformer baseline the hybrids are measured against. DeiT brings a
convolutional network in through training: a *distillation token* travels through the transformer
next to the class token and its own head learns from a CNN teacher (RegNetY-16GF), so the
convolution's inductive bias is transferred by attention. The losses live in
`hybridzoo.tasks._distillation`.

Official code: facebookresearch/deit `models.py` (timm's `VisionTransformer` with LayerNorm eps 1e-6,
qkv bias, and `DistilledVisionTransformer`). Parameter names follow it, so its checkpoints load
without conversion; `convert_official` maps the HuggingFace transformers layouts (ViT, DeiT and
DeiT-with-teacher, both the hub's legacy names and transformers 5's).

Deviations: none in the architecture. A distilled model returns `(cls_logits, dist_logits)` whenever
it is in training mode and the average of both heads in eval mode, as the official code does (timm
needs `set_distilled_training`). Inputs of any size that is a multiple of the patch size are
accepted: the position embedding is then resampled bicubically (as HuggingFace's
`interpolate_pos_encoding` does), while inputs at `img_size` use it unchanged.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable

import torch
from torch import nn

from hybridzoo.layers.attention import Attention
from hybridzoo.layers.drop import DropPath, drop_path_rates
from hybridzoo.layers.helpers import check_image_input, checkpoint_seq, run_blocks_for_prefix, to_2tuple
from hybridzoo.layers.mlp import Mlp
from hybridzoo.layers.patch_embed import PatchEmbed, resample_abs_pos_embed
from hybridzoo.layers.weight_init import init_weights_vit, trunc_normal_
from hybridzoo.registry import register_model

__all__ = ["Block", "VisionTransformer", "convert_official", "default_out_indices"]


# 1. the encoder block ------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (ViT eq. 2–3)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """B×N×C → B×N×C; with `num_queries` = n only the first n rows are computed (B×n×C): attention still
        reads every token's key and value, the rest of the block is row-wise."""
        if num_queries is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        else:
            x = x[:, :num_queries] + self.drop_path(self.attn(self.norm1(x), num_queries=num_queries))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks whose outputs are the feature maps: the ends of the four quarters (3, 6, 9, 12 of 12)."""
    return tuple(sorted({max(depth * (k + 1) // 4 - 1, 0) for k in range(4)}))


# 2. the model --------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT / DeiT: patch embedding, [class (+ distillation) token], learned position embedding,
    `depth` pre-norm blocks, final LayerNorm, linear head(s) on the prefix token(s).

    Args:
        distilled: add DeiT's distillation token (after the class token) and its head `head_dist`.
        embed_layer: builds the tokeniser, called as `embed_layer(img_size=, patch_size=, in_chans=,
            embed_dim=)`; it must return a B×C×H'×W' map and expose `grid_size` (ViT_C's conv stem
            plugs in here).
        out_indices: blocks whose outputs `forward_intermediates` returns (default: quarter ends).
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, distilled: bool = False,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, embed_layer: Callable[..., nn.Module] | None = None,
                 out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.patch_size = patch_size
        self.img_size = to_2tuple(img_size)
        self.grad_checkpointing = False
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        if embed_layer is None:
            embed_layer = partial(PatchEmbed, flatten=False)
        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(depth)
        if not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} out of range for depth {depth}")
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in self.out_indices]
        self.init_weights()

    def init_weights(self) -> None:
        # timm 0.3 as DeiT used it: trunc-normal(.02) tokens, position embedding and linears,
        # PyTorch's default init for the patch projection.
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_weights_vit)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.distilled:
            self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward ------------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        check_image_input(x, self, self.in_chans, divisor=self.patch_size, min_size=self.patch_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image → tokens with prefix token(s) and position embedding (resampled for a new grid)."""
        x = self.patch_embed(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if grid != tuple(self.patch_embed.grid_size):
            pos = resample_abs_pos_embed(pos, grid, self.patch_embed.grid_size,
                                         num_prefix_tokens=self.num_prefix_tokens)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + pos
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → normalised tokens B×(prefix + H/p·W/p)×D."""
        self._check(x)
        x = self._embed(x)
        x = checkpoint_seq(self.blocks, x, enabled=self.grad_checkpointing)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if not self.distilled:
            x = x[:, 0]
            return x if pre_logits else self.head(x)
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.training:
            return x, x_dist
        # DeiT's inference: the average of the two heads' logits.
        return (x + x_dist) / 2

    def forward(self, x: torch.Tensor):
        # = forward_head(forward_features(x)); the head reads only the prefix token(s), so the last block
        # computes only their rows
        self._check(x)
        x = run_blocks_for_prefix(self.blocks, self._embed(x), self.num_prefix_tokens,
                                  checkpointing=self.grad_checkpointing)
        return self.forward_head(self.norm(x))

    def forward_intermediates(self, x: torch.Tensor, indices: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """Patch-token maps B×D×H/p×W/p after the blocks in `indices` (default `out_indices`), no prefix tokens."""
        self._check(x)
        indices = self.out_indices if indices is None else tuple(indices)
        H, W = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self._embed(x)
        out = []
        for i, blk in enumerate(self.blocks[: max(indices) + 1]):
            x = checkpoint_seq([blk], x, enabled=self.grad_checkpointing)
            if i in indices:
                t = x[:, self.num_prefix_tokens:]
                out.append(t.transpose(1, 2).reshape(t.shape[0], -1, H, W))
        return out

    def prune_for_features(self) -> None:
        """Drop what `features_only` never uses: blocks after the last output, the final norm, the heads."""
        self.blocks = self.blocks[: max(self.out_indices) + 1]
        self.norm = nn.Identity()
        self.reset_classifier(0)


# 3. official checkpoint conversion -----------------------------------------------------------------

# HuggingFace transformers (hub checkpoints, legacy names; transformers 5 renames some on load).
_HF_LAYER_RENAMES = [
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]
_HF_TO_OURS = {
    "attention.o_proj.": "attn.proj.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}


def _convert_hf(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    emb = f"{prefix}embeddings."
    for k, v in state_dict.items():
        if k.startswith(emb):
            name = k[len(emb):]
            ours = {"cls_token": "cls_token", "distillation_token": "dist_token", "position_embeddings": "pos_embed",
                    "patch_embeddings.projection.weight": "patch_embed.proj.weight",
                    "patch_embeddings.projection.bias": "patch_embed.proj.bias"}.get(name)
            if ours is not None:
                out[ours] = v
            elif name != "mask_token":  # only used for masked-image-modelling
                out[k] = v
            continue
        m = re.match(rf"{re.escape(prefix)}(?:encoder\.layer|layers)\.(\d+)\.(.+)$", k)
        if m:
            i, name = m.groups()
            for old, new in _HF_LAYER_RENAMES:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            qm = re.match(r"attention\.([qkv])_proj\.(weight|bias)$", name)
            if qm:
                qkv.setdefault((i, qm.group(2)), {})[qm.group(1)] = v
                continue
            for old, new in _HF_TO_OURS.items():
                if name.startswith(old):
                    out[f"blocks.{i}.{new}{name[len(old):]}"] = v
                    break
            else:
                out[k] = v
            continue
        head = {f"{prefix}layernorm.": "norm.", "classifier.": "head.", "cls_classifier.": "head.",
                "distillation_classifier.": "head_dist."}
        for old, new in head.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            if not k.startswith(f"{prefix}pooler."):  # pooler only exists in the headless ViTModel
                out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            for p, t in parts.items():
                out[f"blocks.{i}.attn.{p}_proj.{kind}"] = t
            continue
        # timm's fused projection: rows [q; k; v], each head-major, exactly HF's separate projections stacked.
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official checkpoint to our names.

    facebookresearch/deit and timm checkpoints already use our names (the `{'model': ...}` wrapper is
    removed by `factory.read_state_dict`). HuggingFace's `ViTForImageClassification`,
    `DeiTForImageClassificationWithTeacher` (and the headless `ViTModel`/`DeiTModel`) are renamed and
    their separate q/k/v projections fused. A position embedding for another grid is resampled.
    """
    prefix = next((p for p in ("deit.", "vit.", "") if any(k.startswith(f"{p}embeddings.") for k in state_dict)), None)
    out = _convert_hf(state_dict, prefix) if prefix is not None else dict(state_dict)
    pos, own = out.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is not None and own is not None and pos.shape != own.shape and pos.shape[-1] == own.shape[-1]:
        n_prefix = model.num_prefix_tokens
        old = int(round((pos.shape[1] - n_prefix) ** 0.5))
        if old * old == pos.shape[1] - n_prefix:
            out["pos_embed"] = resample_abs_pos_embed(pos, tuple(model.patch_embed.grid_size), (old, old),
                                                      num_prefix_tokens=n_prefix)
    return out


# 4. the variants -----------------------------------------------------------------------------------

_VIT_NOTE = ("ViT-Ti/S are not in the ViT paper (it starts at ViT-B); they are DeiT's/timm's widths. "
             "Same architecture as the DeiT variant of the same width; weights differ.")
_TEST = dict(test_kwargs=dict(img_size=32, embed_dim=64, depth=2, num_heads=2), test_input_size=(3, 32, 32))


def _vit(distilled: bool = False, **kwargs) -> VisionTransformer:
    return VisionTransformer(distilled=distilled, **kwargs)


@register_model(paper="ViT", arxiv="2010.11929", task="classification",
                reported=dict(params_m=5.7, gflops=1.3, resolution=224), params=5_717_416, notes=_VIT_NOTE, **_TEST)
def vit_tiny_patch16_224(**kwargs):
    return _vit(**{**dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs})


@register_model(paper="ViT", arxiv="2010.11929", task="classification",
                reported=dict(params_m=22.1, gflops=4.6, resolution=224), params=22_050_664, notes=_VIT_NOTE, **_TEST)
def vit_small_patch16_224(**kwargs):
    return _vit(**{**dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs})


@register_model(paper="ViT", arxiv="2010.11929", task="classification",
                reported=dict(params_m=86.6, gflops=17.6, resolution=224), params=86_567_656,
                notes="ViT-B/16 fine-tuned layout (no pre-logits layer).", **_TEST)
def vit_base_patch16_224(**kwargs):
    return _vit(**{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=5.7, gflops=1.3, top1=72.2, resolution=224), params=5_717_416, **_TEST)
def deit_tiny_patch16_224(**kwargs):
    return _vit(**{**dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs})


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=22.1, gflops=4.6, top1=79.8, resolution=224), params=22_050_664, **_TEST)
def deit_small_patch16_224(**kwargs):
    return _vit(**{**dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs})


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=86.6, gflops=17.6, top1=81.8, resolution=224), params=86_567_656, **_TEST)
def deit_base_patch16_224(**kwargs):
    return _vit(**{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=86.9, top1=83.1, resolution=384), params=86_859_496, macs_g=55.48,
                input_size=(3, 384, 384),
                notes="Fine-tuned at 384 from DeiT-B. The paper gives no FLOPs at 384; macs_g is the analytic "
                      "count of the official architecture (convs and matmuls, attention included).", **_TEST)
def deit_base_patch16_384(**kwargs):
    return _vit(**{**dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})


_DIST_NOTE = ("Training mode returns (cls_logits, dist_logits); eval mode their average. GFLOPs: the paper "
              "quotes the non-distilled figure (one extra token adds < 1%).")


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=5.9, gflops=1.3, top1=74.5, resolution=224), params=5_910_800,
                notes=_DIST_NOTE, **_TEST)
def deit_tiny_distilled_patch16_224(**kwargs):
    return _vit(distilled=True, **{**dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs})


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=22.4, gflops=4.6, top1=81.2, resolution=224), params=22_436_432,
                notes=_DIST_NOTE, **_TEST)
def deit_small_distilled_patch16_224(**kwargs):
    return _vit(distilled=True, **{**dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs})


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=87.3, gflops=17.6, top1=83.4, resolution=224), params=87_338_192,
                notes=_DIST_NOTE, **_TEST)
def deit_base_distilled_patch16_224(**kwargs):
    return _vit(distilled=True, **{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})


@register_model(paper="DeiT", arxiv="2012.12877", task="classification",
                reported=dict(params_m=87.6, top1=85.2, resolution=384), params=87_630_032, macs_g=55.59,
                input_size=(3, 384, 384),
                notes=_DIST_NOTE + " 85.2: the released 1000-epoch model (README). "
                      "params: DeiT-B-384 + dist_token + one position row + head_dist (official layout). "
                      "macs_g: analytic count, as for deit_base_patch16_384.", **_TEST)
def deit_base_distilled_patch16_384(**kwargs):
    return _vit(distilled=True,
                **{**dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})
