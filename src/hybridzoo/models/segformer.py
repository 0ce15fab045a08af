"""SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers — Xie et al.,
NeurIPS 2021, arXiv 2105.15203.

What is hybrid: the hierarchical Mix Transformer (MiT) encoder has no position embedding — its
overlapping patch embeddings are strided convolutions and every Mix-FFN carries a 3×3 depthwise
convolution that leaks position; attention reduces keys/values with a strided convolution.
The all-MLP decoder projects the four stages to one width, upsamples to 1/4 and fuses them.

Here it is above all SCTNet's training teacher (`sctnet.py`, SIAM): that teacher is mmsegmentation's
re-implementation with a 256-wide decoder whose per-stage projections are conv+BN+ReLU
(`head_style="mmseg"`, stage order c1..c4) instead of the official linear layers
(`head_style="mlp"`, concatenated c4..c1 as NVlabs and HuggingFace do).
Official code: NVlabs/SegFormer (mmseg 0.x fork); mmseg `mit.py` + `segformer_head.py`;
HuggingFace `transformers` `SegformerForSemanticSegmentation`. `convert_official` reads the NVlabs,
mmseg (and SCTNet `teacher_*`) and HuggingFace (4.x and 5.x) layouts.
Deviations: the logits are upsampled to the input size inside `forward` (the other models of the
segmentation task do the same); layer-norm epsilons are arguments because the three official
codes differ (NVlabs: 1e-6 in blocks, 1e-5 in the embeddings; mmseg 1e-6; HuggingFace 1e-5).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import ConvFFN, DropPath, check_image_input, convert_conv_ffn, drop_path_rates
from hybridzoo.registry import register_model

__all__ = ["MixVisionTransformer", "SegFormerHead", "SegFormer", "convert_official", "segformer_b0", "segformer_b1",
           "segformer_b2", "segformer_b3", "segformer_b4", "segformer_b5"]


# ---------------------------------------------------------------------------------------- encoder

class OverlapPatchEmbed(nn.Module):
    """Strided k×k convolution with k//2 padding (k=7, s=4 first; k=3, s=2 after), then LayerNorm."""

    def __init__(self, in_chs: int, dim: int, patch_size: int, stride: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from an sr×sr strided conv of the map (sr > 1)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, eps: float, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        if self.sr_ratio > 1:
            kv_in = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            kv_in = self.norm(kv_in)
        else:
            kv_in = x
        k, v = self.kv(kv_in).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, eps: float, embed_eps: float,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, embed_eps, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop)   # Mix-FFN: PVTv2's block, shared with VVT

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MiTStage(nn.Module):
    def __init__(self, in_chs, dim, depth, num_heads, mlp_ratio, sr_ratio, patch_size, stride, eps, embed_eps,
                 drop, attn_drop, dprs):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chs, dim, patch_size, stride, embed_eps)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, sr_ratio, eps, embed_eps, drop, attn_drop, dprs[j])
                                     for j in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.patch_embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, h, w, use_reentrant=False)
            else:
                x = blk(x, h, w)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class MixVisionTransformer(nn.Module):
    """MiT encoder: four stages at 1/4, 1/8, 1/16, 1/32 of the input."""

    def __init__(self, *, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 320, 512),
                 num_heads: Sequence[int] = (1, 2, 5, 8), depths: Sequence[int] = (3, 4, 6, 3),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ln_eps: float = 1e-6,
                 embed_ln_eps: float = 1e-5):
        super().__init__()
        dprs = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        cur, prev = 0, in_chans
        for i in range(4):
            self.stages.append(MiTStage(prev, embed_dims[i], depths[i], num_heads[i], mlp_ratio, sr_ratios[i],
                                        7 if i == 0 else 3, 4 if i == 0 else 2, ln_eps, embed_ln_eps,
                                        drop_rate, attn_drop_rate, dprs[cur:cur + depths[i]]))
            cur += depths[i]
            prev = embed_dims[i]
        self.embed_dims = tuple(embed_dims)
        self.feature_info = [dict(num_chs=c, reduction=r) for c, r in zip(embed_dims, (4, 8, 16, 32))]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    # NVlabs mix_transformer._init_weights: trunc-normal linears, fan-out normal convs.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------- decoder

class ConvModule(nn.Module):
    """mmcv's ConvModule with BN: conv (no bias) → BN → ReLU (names `conv`, `bn` as mmcv)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """All-MLP decoder: per-stage projection to `channels`, upsample to 1/4, concat, fuse, classify.

    head_style "mlp": linear projections with bias, concatenated c4..c1 (NVlabs, HuggingFace).
    head_style "mmseg": conv+BN+ReLU projections, concatenated c1..c4 (mmseg, SCTNet's teacher).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, head_style: str = "mlp",
                 dropout: float = 0.1):
        super().__init__()
        if head_style not in ("mlp", "mmseg"):
            raise ValueError(f"head_style must be 'mlp' or 'mmseg', got {head_style!r}")
        self.head_style = head_style
        if head_style == "mlp":
            self.linear_c = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in in_channels])
        else:
            self.linear_c = nn.ModuleList([ConvModule(c, channels) for c in in_channels])
        self.linear_fuse = ConvModule(channels * len(in_channels), channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def concat(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        outs = [F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False) if i else proj(f)
                for i, (proj, f) in enumerate(zip(self.linear_c, feats))]
        return torch.cat(outs[::-1] if self.head_style == "mlp" else outs, dim=1)

    def classify(self, fused: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(fused))

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fused 1/4 feature, 1/4 logits, the concatenated 4×channels feature)."""
        cat = self.concat(feats)
        fused = self.linear_fuse(cat)
        return fused, self.classify(fused), cat


# ------------------------------------------------------------------------------------------ model

class SegFormer(nn.Module):
    """MiT encoder + all-MLP decoder; eval output: logits (B, K, H, W) at the input size."""

    def __init__(self, *, num_classes: int = 150, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 320, 512),
                 num_heads: Sequence[int] = (1, 2, 5, 8), depths: Sequence[int] = (3, 4, 6, 3),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), mlp_ratio: float = 4.0, decoder_dim: int = 768,
                 head_style: str = "mlp", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, decoder_dropout: float = 0.1, ln_eps: float = 1e-6,
                 embed_ln_eps: float = 1e-5):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.encoder = MixVisionTransformer(in_chans=in_chans, embed_dims=embed_dims, num_heads=num_heads,
                                            depths=depths, sr_ratios=sr_ratios, mlp_ratio=mlp_ratio,
                                            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                            drop_path_rate=drop_path_rate, ln_eps=ln_eps, embed_ln_eps=embed_ln_eps)
        self.decode_head = SegFormerHead(embed_dims, decoder_dim, num_classes, head_style, decoder_dropout)
        self.feature_info = self.encoder.feature_info

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.encoder.stages:
            s.grad_checkpointing = enable

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_image_input(x, self, self.in_chans, min_size=32)
        return self.encoder(x)

    def prune_for_features(self) -> None:
        self.decode_head = None

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at 1/4 of the input, as the official decoders return them."""
        return self.decode_head(self.forward_intermediates(x))[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_logits(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------- official checkpoints

def _split_kv(out: dict, prefix: str, k_w, k_b, v_w, v_b) -> None:
    out[f"{prefix}.kv.weight"] = torch.cat([k_w, v_w], 0)
    out[f"{prefix}.kv.bias"] = torch.cat([k_b, v_b], 0)


def _as_conv(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.ndim == 2 else t


def _convert_hf(sd: dict[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """HuggingFace 5.x (`segformer.stages.i...`) and 4.x (`segformer.encoder.block.i.j...`)."""
    out: dict[str, torch.Tensor] = {}
    v5 = any(k.startswith("segformer.stages.") for k in sd)
    for i, depth in enumerate(depths):
        s = f"encoder.stages.{i}"
        if v5:
            src = f"segformer.stages.{i}"
            pe, ln = f"{src}.patch_embeddings", f"{src}.layer_norm"
            blocks = [f"{src}.blocks.{j}" for j in range(depth)]
            names = dict(n1="layernorm_before", n2="layernorm_after", q="attention.q_proj", k="attention.k_proj",
                         v="attention.v_proj", o="attention.o_proj", sr="attention.sequence_reduction.sequence_reduction",
                         srn="attention.sequence_reduction.layer_norm", ffn="pvt")
        else:
            pe, ln = f"segformer.encoder.patch_embeddings.{i}", f"segformer.encoder.layer_norm.{i}"
            blocks = [f"segformer.encoder.block.{i}.{j}" for j in range(depth)]
            names = dict(n1="layer_norm_1", n2="layer_norm_2", q="attention.self.query", k="attention.self.key",
                         v="attention.self.value", o="attention.output.dense", sr="attention.self.sr",
                         srn="attention.self.layer_norm", ffn="hf")
        for t in ("weight", "bias"):
            out[f"{s}.patch_embed.proj.{t}"] = sd[f"{pe}.proj.{t}"]
            out[f"{s}.patch_embed.norm.{t}"] = sd[f"{pe}.layer_norm.{t}"]
            out[f"{s}.norm.{t}"] = sd[f"{ln}.{t}"]
        for j, b in enumerate(blocks):
            d = f"{s}.blocks.{j}"
            for t in ("weight", "bias"):
                out[f"{d}.norm1.{t}"] = sd[f"{b}.{names['n1']}.{t}"]
                out[f"{d}.norm2.{t}"] = sd[f"{b}.{names['n2']}.{t}"]
                out[f"{d}.attn.q.{t}"] = sd[f"{b}.{names['q']}.{t}"]
                out[f"{d}.attn.proj.{t}"] = sd[f"{b}.{names['o']}.{t}"]
                if f"{b}.{names['sr']}.{t}" in sd:
                    out[f"{d}.attn.sr.{t}"] = sd[f"{b}.{names['sr']}.{t}"]
                    out[f"{d}.attn.norm.{t}"] = sd[f"{b}.{names['srn']}.{t}"]
            out.update(convert_conv_ffn(sd, f"{b}.mlp", f"{d}.mlp", names["ffn"]))
            _split_kv(out, f"{d}.attn", sd[f"{b}.{names['k']}.weight"], sd[f"{b}.{names['k']}.bias"],
                      sd[f"{b}.{names['v']}.weight"], sd[f"{b}.{names['v']}.bias"])
    proj = "decode_head.linear_projections" if v5 else "decode_head.linear_c"
    for i in range(len(depths)):
        out[f"decode_head.linear_c.{i}.weight"] = _as_conv(sd[f"{proj}.{i}.proj.weight"])
        out[f"decode_head.linear_c.{i}.bias"] = sd[f"{proj}.{i}.proj.bias"]
    out["decode_head.linear_fuse.conv.weight"] = sd["decode_head.linear_fuse.weight"]
    for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if f"decode_head.batch_norm.{t}" in sd:
            out[f"decode_head.linear_fuse.bn.{t}"] = sd[f"decode_head.batch_norm.{t}"]
    out["decode_head.classifier.weight"] = sd["decode_head.classifier.weight"]
    out["decode_head.classifier.bias"] = sd["decode_head.classifier.bias"]
    return out


def _convert_mmseg(sd: dict[str, torch.Tensor], depths: Sequence[int], enc: str = "backbone",
                   head: str = "decode_head") -> dict[str, torch.Tensor]:
    """mmseg MiT + SegformerHead (`backbone.layers.i.{0,1,2}`, `decode_head.convs.i`), also SCTNet's
    teacher (`teacher_backbone`, `teacher_head`)."""
    out: dict[str, torch.Tensor] = {}
    for i, depth in enumerate(depths):
        s, src = f"encoder.stages.{i}", f"{enc}.layers.{i}"
        for t in ("weight", "bias"):
            out[f"{s}.patch_embed.proj.{t}"] = sd[f"{src}.0.projection.{t}"]
            out[f"{s}.patch_embed.norm.{t}"] = sd[f"{src}.0.norm.{t}"]
            out[f"{s}.norm.{t}"] = sd[f"{src}.2.{t}"]
        for j in range(depth):
            d, b = f"{s}.blocks.{j}", f"{src}.1.{j}"
            c = sd[f"{b}.attn.attn.in_proj_weight"].shape[1]
            w, bias = sd[f"{b}.attn.attn.in_proj_weight"], sd[f"{b}.attn.attn.in_proj_bias"]
            out[f"{d}.attn.q.weight"], out[f"{d}.attn.q.bias"] = w[:c], bias[:c]
            out[f"{d}.attn.kv.weight"], out[f"{d}.attn.kv.bias"] = w[c:], bias[c:]
            out.update(convert_conv_ffn(sd, f"{b}.ffn", f"{d}.mlp", "mmseg"))
            for t in ("weight", "bias"):
                out[f"{d}.norm1.{t}"] = sd[f"{b}.norm1.{t}"]
                out[f"{d}.norm2.{t}"] = sd[f"{b}.norm2.{t}"]
                out[f"{d}.attn.proj.{t}"] = sd[f"{b}.attn.attn.out_proj.{t}"]
                if f"{b}.attn.sr.{t}" in sd:
                    out[f"{d}.attn.sr.{t}"] = sd[f"{b}.attn.sr.{t}"]
                    out[f"{d}.attn.norm.{t}"] = sd[f"{b}.attn.norm.{t}"]
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for i in range(len(depths)):
        out[f"decode_head.linear_c.{i}.conv.weight"] = sd[f"{head}.convs.{i}.conv.weight"]
        for t in bn:
            if f"{head}.convs.{i}.bn.{t}" in sd:
                out[f"decode_head.linear_c.{i}.bn.{t}"] = sd[f"{head}.convs.{i}.bn.{t}"]
    out["decode_head.linear_fuse.conv.weight"] = sd[f"{head}.fusion_conv.conv.weight"]
    for t in bn:
        if f"{head}.fusion_conv.bn.{t}" in sd:
            out[f"decode_head.linear_fuse.bn.{t}"] = sd[f"{head}.fusion_conv.bn.{t}"]
    out["decode_head.classifier.weight"] = sd[f"{head}.conv_seg.weight"]
    out["decode_head.classifier.bias"] = sd[f"{head}.conv_seg.bias"]
    return out


def _convert_nvlabs(sd: dict[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """NVlabs/SegFormer: `backbone.patch_embed{1-4}`, `backbone.block{1-4}.j`, `decode_head.linear_c{1-4}`."""
    out: dict[str, torch.Tensor] = {}
    for i, depth in enumerate(depths):
        s, n = f"encoder.stages.{i}", i + 1
        for t in ("weight", "bias"):
            out[f"{s}.patch_embed.proj.{t}"] = sd[f"backbone.patch_embed{n}.proj.{t}"]
            out[f"{s}.patch_embed.norm.{t}"] = sd[f"backbone.patch_embed{n}.norm.{t}"]
            out[f"{s}.norm.{t}"] = sd[f"backbone.norm{n}.{t}"]
        for j in range(depth):
            b, d = f"backbone.block{n}.{j}", f"{s}.blocks.{j}"
            for t in ("weight", "bias"):
                for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.q", "attn.q"), ("attn.kv", "attn.kv"),
                                     ("attn.proj", "attn.proj"), ("attn.sr", "attn.sr"), ("attn.norm", "attn.norm")):
                    if f"{b}.{theirs}.{t}" in sd:
                        out[f"{d}.{ours}.{t}"] = sd[f"{b}.{theirs}.{t}"]
            out.update(convert_conv_ffn(sd, f"{b}.mlp", f"{d}.mlp", "pvt"))
    for i in range(len(depths)):
        out[f"decode_head.linear_c.{i}.weight"] = _as_conv(sd[f"decode_head.linear_c{i + 1}.proj.weight"])
        out[f"decode_head.linear_c.{i}.bias"] = sd[f"decode_head.linear_c{i + 1}.proj.bias"]
    out["decode_head.linear_fuse.conv.weight"] = sd["decode_head.linear_fuse.conv.weight"]
    for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if f"decode_head.linear_fuse.bn.{t}" in sd:
            out[f"decode_head.linear_fuse.bn.{t}"] = sd[f"decode_head.linear_fuse.bn.{t}"]
    out["decode_head.classifier.weight"] = sd["decode_head.linear_pred.weight"]
    out["decode_head.classifier.bias"] = sd["decode_head.linear_pred.bias"]
    return out


def convert_official(state_dict: dict[str, torch.Tensor], model: SegFormer) -> dict[str, torch.Tensor]:
    """Map an NVlabs, mmseg, SCTNet-teacher or HuggingFace SegFormer state dict to ours."""
    depths = [len(s.blocks) for s in model.encoder.stages]
    keys = set(state_dict)
    if any(k.startswith("segformer.") for k in keys):
        out = _convert_hf(state_dict, depths)
    elif any(k.startswith("teacher_backbone.layers.") for k in keys):
        out = _convert_mmseg(state_dict, depths, "teacher_backbone", "teacher_head")
    elif any(k.startswith("backbone.layers.") for k in keys):
        out = _convert_mmseg(state_dict, depths)
    elif any(k.startswith("backbone.patch_embed1.") for k in keys):
        out = _convert_nvlabs(state_dict, depths)
    else:
        return state_dict
    if model.decode_head is None:
        out = {k: v for k, v in out.items() if not k.startswith("decode_head.")}
    return out


# --------------------------------------------------------------------------------------- variants

_MIT = {  # embed dims, depths (heads 1/2/5/8, sr 8/4/2/1, mlp ratio 4 throughout)
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
_TEST = dict(embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 8), depths=(1, 1, 1, 1), decoder_dim=32, num_classes=5)


def _segformer(variant: str, **kwargs) -> SegFormer:
    dims, depths, dec = _MIT[variant]
    cfg = dict(embed_dims=dims, depths=depths, decoder_dim=dec)
    cfg.update(kwargs)
    return SegFormer(**cfg)


_CARD = dict(paper="SegFormer", arxiv="2105.15203", task="segmentation", input_size=(3, 512, 512),
             test_kwargs=_TEST, test_input_size=(3, 64, 64))
_NOTE = ("ADE20K, 150 classes, 512×512. params = the official NVlabs/HuggingFace model; macs_g = FlopCounterMode on "
         "HuggingFace SegformerForSemanticSegmentation (attention products included, the paper's counter leaves them out).")


@register_model(reported=dict(params_m=3.8, gflops=8.4, miou=37.4, resolution=512), params=3_752_694, macs_g=8.388,
                notes=_NOTE, **_CARD)
def segformer_b0(**kwargs):
    return _segformer("b0", **kwargs)


@register_model(reported=dict(params_m=13.7, gflops=15.9, miou=42.2, resolution=512), params=13_715_798, macs_g=15.878, notes=_NOTE, **_CARD)
def segformer_b1(**kwargs):
    return _segformer("b1", **kwargs)


@register_model(reported=dict(params_m=27.5, gflops=62.4, miou=46.5, resolution=512), params=27_461_974, macs_g=62.338, notes=_NOTE, **_CARD)
def segformer_b2(**kwargs):
    return _segformer("b2", **kwargs)


@register_model(reported=dict(params_m=47.3, gflops=79.0, miou=49.4, resolution=512), params=47_337_814, macs_g=78.963, notes=_NOTE, **_CARD)
def segformer_b3(**kwargs):
    return _segformer("b3", **kwargs)


@register_model(reported=dict(params_m=64.1, gflops=95.7, miou=50.3, resolution=512), params=64_108_374, macs_g=95.567, notes=_NOTE, **_CARD)
def segformer_b4(**kwargs):
    return _segformer("b4", **kwargs)


@register_model(reported=dict(params_m=84.7, gflops=183.3, miou=51.0, resolution=640), params=84_708_694, macs_g=183.141,
                notes=_NOTE.replace("512×512", "640×640 (B5's ADE20K setting)"), **{**_CARD, "input_size": (3, 640, 640)})
def segformer_b5(**kwargs):
    return _segformer("b5", **kwargs)
