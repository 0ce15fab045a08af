"""SuperViT: Super Vision Transformer — Lin et al., arXiv 2205.11397 (IJCV 2023).

What is hybrid: one DeiT-S is trained as a supernet over token grids (the input is bilinearly resized
to 128/160/192/224 px, i.e. 8×8 … 14×14 patches, each size with its own position embedding) and over
token-keeping rates: at blocks 3, 6 and 9 only the tokens the class token attends to most survive, so
one set of weights serves 12 (size, keep-rate) sub-networks from 0.74 to 4.6 GMACs.

Official code: lmbxmu/SuperViT `deit/super_deit.py` (model), `deit/engine.py` (training step).
Deviations from it:
- The per-size position embeddings are `pos_embed.{size}` (official `pos_embed_list.{i}`);
  `convert_official` renames them. A plain DeiT checkpoint (one `pos_embed`) is also accepted and
  resampled to every size, which is how a supernet is initialised from DeiT weights.
- Attention goes through fused SDPA; at the token-keeping blocks the class token's attention row is
  computed explicitly as well (the official code materialises the whole map there). Ranking and
  kept tokens are the same; the count of kept tokens follows the official ceil(r·N) with N including
  the class token.
- `forward` defaults to keep_rate=1.0 (official: 0.7) and picks the resolution from the input when it
  is one of the trained sizes; any other input is resized to `img_size` (default the largest).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridzoo.layers import (Attention, DropPath, Mlp, PatchEmbed, attention_weights, check_image_input,
                              drop_path_rates, init_weights_vit, resample_abs_pos_embed, trunc_normal_)
from hybridzoo.registry import register_model

__all__ = ["SuperViT", "convert_official", "supervit_training_losses", "sample_sub_networks"]

KEEP_RATES = (0.5, 0.7, 1.0)


class TokenKeepingAttention(Attention):
    """MHSA that can also return the class token's attention to every patch, averaged over heads."""

    def forward(self, x: torch.Tensor, return_cls_attn: bool = False):  # type: ignore[override]
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, N, C)))
        if not return_cls_attn:
            return y
        # the probabilities themselves are needed here, so the class row is formed explicitly
        cls_attn = attention_weights(q[:, :, :1], k, self.scale).mean(dim=1)[:, 0, 1:]
        return y, cls_attn


def keep_tokens(x: torch.Tensor, score: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Keep the class token and the ceil(r·N) patches with the highest class attention (N counts the cls)."""
    B, N, C = x.shape
    num_keep = min(math.ceil(keep_rate * N), N - 1)
    idx = score.topk(num_keep, dim=1).indices + 1
    idx = torch.cat([idx.new_zeros(B, 1), idx], dim=1)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))


class Block(nn.Module):
    """DeiT block; with keep_rate < 1 the tokens are pruned after attention, before the MLP."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenKeepingAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                          proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, keep_rate: float = 1.0) -> torch.Tensor:
        if keep_rate < 1.0:
            y, score = self.attn(self.norm1(x), return_cls_attn=True)
            x = keep_tokens(x + self.drop_path(y), score, keep_rate)
        else:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SuperViT(nn.Module):
    """DeiT supernet over input sizes (one position embedding each) and token-keeping rates."""

    def __init__(self, *, img_size_list: Sequence[int] = (128, 160, 192, 224), patch_size: int = 16,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, keep_layers: Sequence[int] = (3, 6, 9),
                 keep_rates: Sequence[float] = KEEP_RATES, img_size: int | None = None):
        super().__init__()
        self.img_size_list = tuple(int(s) for s in img_size_list)
        if not self.img_size_list or any(s % patch_size for s in self.img_size_list):
            raise ValueError(f"img_size_list {img_size_list} must be non-empty multiples of patch_size {patch_size}")
        if any(not 0 <= i < depth for i in keep_layers):
            raise ValueError(f"keep_layers {tuple(keep_layers)} must index blocks 0..{depth - 1}")
        self.img_size = int(img_size) if img_size is not None else max(self.img_size_list)
        if self.img_size not in self.img_size_list:
            raise ValueError(f"img_size {img_size} is not one of img_size_list {self.img_size_list}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_features = self.embed_dim = embed_dim
        self.keep_layers = tuple(keep_layers)
        self.keep_rates = tuple(keep_rates)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.ParameterDict({
            str(s): nn.Parameter(torch.zeros(1, (s // patch_size) ** 2 + 1, embed_dim)) for s in self.img_size_list})
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        for p in self.pos_embed.values():
            trunc_normal_(p, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights_vit)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} | {f"pos_embed.{s}" for s in self.img_size_list}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def sub_networks(self) -> list[tuple[int, float]]:
        """Every (input size, keep rate) pair the supernet was trained for, smallest first."""
        return [(s, r) for s in self.img_size_list for r in sorted(self.keep_rates, reverse=True)]

    def bench_configs(self) -> list[dict]:
        """The 12 sub-networks as `hybridzoo bench` / `eval` configurations.

        Each dict: `name`, `input_size` (C, s, s) and `forward_kwargs` for `model(x, **forward_kwargs)`.
        """
        return [dict(name=f"{s}px_keep{r:g}", input_size=(self.in_chans, s, s),
                     forward_kwargs=dict(img_size=s, keep_rate=r)) for s, r in self.sub_networks()]

    def eval_configs(self) -> list[dict]:
        """Same list as `bench_configs`: the paper reports top-1 for every (size, keep rate) pair."""
        return self.bench_configs()

    def _resolve(self, x: torch.Tensor, img_size: int | None, keep_rate: float) -> int:
        name = getattr(self, "model_name", type(self).__name__)
        if not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"{name}: keep_rate must be in (0, 1], got {keep_rate!r}")
        if img_size is None:
            h, w = x.shape[-2:]
            return int(h) if h == w and h in self.img_size_list else self.img_size
        if img_size not in self.img_size_list:
            raise ValueError(f"{name}: img_size must be one of {self.img_size_list}, got {img_size!r}")
        return int(img_size)

    def forward_features(self, x: torch.Tensor, keep_rate: float = 1.0, img_size: int | None = None) -> torch.Tensor:
        check_image_input(x, self, self.in_chans)
        size = self._resolve(x, img_size, keep_rate)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed[str(size)])
        for i, blk in enumerate(self.blocks):
            r = keep_rate if i in self.keep_layers else 1.0
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, r, use_reentrant=False)
            else:
                x = blk(x, r)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, keep_rate: float = 1.0, img_size: int | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, keep_rate=keep_rate, img_size=img_size))


# --- the paper's training step ---------------------------------------------------------------------

def sample_sub_networks(model: SuperViT, rng: random.Random | None = None) -> list[tuple[int, float]]:
    """The four sub-networks of one step (official `get_training_sub_network`).

    (largest size, 1), (largest, r), (s, 1), (s, r) with r drawn from the keep rates below 1 and s from
    the sizes below the largest, each draw independent.
    """
    rng = rng or random
    sizes, rates = sorted(model.img_size_list), sorted(r for r in model.keep_rates if r < 1.0)
    big = sizes[-1]
    small = rng.choice(sizes[:-1]) if len(sizes) > 1 else big
    r1 = rng.choice(rates) if rates else 1.0
    r2 = rng.choice(rates) if rates else 1.0
    return [(big, 1.0), (big, r1), (small, 1.0), (small, r2)]


def supervit_training_losses(model: SuperViT, images: torch.Tensor, labels: torch.Tensor,
                             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                             sub_networks: Sequence[tuple[int, float]] | None = None,
                             rng: random.Random | None = None, backward: bool = False,
                             return_parts: bool = False):
    """One SuperViT training step's loss (official `super_train_one_epoch`), summed over sub-networks.

    Sub-networks come in (teacher, student) pairs: a full-keep one trained with `criterion` against the
    labels, then a pruned one trained with KLDivLoss(batchmean) towards the teacher's detached softmax.
    By default (224, 1), (224, r), (s, 1), (s, r) as drawn by `sample_sub_networks`.

    backward: call `.backward()` on each sub-network's loss as soon as it is formed (the official
        gradient accumulation, which keeps one graph alive at a time); the returned total is then detached.
    return_parts: also return {"{size}_{rate}": loss} for logging.
    """
    if not isinstance(model, SuperViT):
        model = getattr(model, "module", model)  # DDP
    subs = list(sub_networks) if sub_networks is not None else sample_sub_networks(model, rng)
    if not subs or len(subs) % 2:
        raise ValueError(f"sub_networks must be (teacher, student) pairs, got {subs}")
    kl = nn.KLDivLoss(reduction="batchmean")
    total, parts, target = None, {}, None
    for i, (size, rate) in enumerate(subs):
        out = model(images, keep_rate=rate, img_size=size)
        if i % 2 == 0:
            loss = criterion(out, labels)
            target = F.softmax(out.detach().float(), dim=1)
        else:
            loss = kl(F.log_softmax(out.float(), dim=1), target)
        parts[f"{size}_{rate:g}"] = loss.detach()
        if backward:
            loss.backward()
            loss = loss.detach()
        total = loss if total is None else total + loss
    return (total, parts) if return_parts else total


# --- official checkpoints ----------------------------------------------------------------------------

def convert_official(state_dict: dict[str, torch.Tensor], model: SuperViT) -> dict[str, torch.Tensor]:
    """lmbxmu/SuperViT `super_deit_s` state dict → ours; a plain DeiT checkpoint also works.

    `pos_embed_list.{i}` becomes `pos_embed.{img_size_list[i]}`. A DeiT checkpoint's single `pos_embed`
    is resampled (bicubic, class token kept) to every size.
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise ValueError("not a SuperViT/DeiT checkpoint: no 'patch_embed.proj.weight'")
    out = {k: v for k, v in state_dict.items() if not k.startswith("pos_embed")}
    listed = sorted((k for k in state_dict if k.startswith("pos_embed_list.")), key=lambda k: int(k.split(".")[1]))
    if listed:
        if len(listed) != len(model.img_size_list):
            raise ValueError(f"checkpoint has {len(listed)} position embeddings, model sizes are {model.img_size_list}")
        for k, s in zip(listed, model.img_size_list):
            out[f"pos_embed.{s}"] = state_dict[k]
    elif "pos_embed" in state_dict:
        pos = state_dict["pos_embed"]
        side = math.isqrt(pos.shape[1] - 1)
        for s in model.img_size_list:
            g = s // model.patch_size
            out[f"pos_embed.{s}"] = resample_abs_pos_embed(pos, (g, g), old_size=(side, side))
    else:
        out.update({k: v for k, v in state_dict.items() if k.startswith("pos_embed.")})
    return out


_UNUSED = ("pos_embed.128", "pos_embed.160", "pos_embed.192")


@register_model(paper="SuperViT", arxiv="2205.11397", task="classification",
                reported=dict(params_m=22.2, gflops=4.6, top1=80.62, resolution=224),
                params=22_170_088, macs_g=4.599,
                test_kwargs=dict(patch_size=32, embed_dim=32, depth=4, num_heads=2, keep_layers=(1, 2, 3)),
                test_input_size=(3, 224, 224), unused_params=_UNUSED,
                notes=("One supernet, 12 sub-networks: see bench_configs(). The card's figures are the (224 px, "
                       "keep 1.0) one; 8×8 keep 0.5 is 0.742 GMACs, 73.75 top-1. A single forward uses only "
                       "its own size's position embedding, hence the unused ones."))
def supervit_deit_small(**kwargs) -> SuperViT:
    """SuperViT on DeiT-S: 384 dims, 6 heads, 12 blocks, sizes 128/160/192/224, keep rates 0.5/0.7/1."""
    return SuperViT(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})
