"""CoAtNet: Marrying Convolution and Attention for All Data Sizes — Dai et al., NeurIPS 2021, arXiv 2106.04803.

What is hybrid: a C-C-T-T network — a convolutional stem, two stages of MBConv blocks (depthwise
convolution with squeeze-excitation) and two stages of Transformer blocks whose relative attention
adds a learned, input-independent bias w[i−j] to the attention logits before the softmax, so the
attention stages keep the translation-equivariant prior of a depthwise convolution.
Official code: none was released. The reference is timm's paper-like `coatnet_N_224` (maxxvit.py):
same stem, widths, depths, MBConv (expansion 4 of the output width, SE 0.25 with SiLU, GELU, pre-norm
BN), pre-norm LN transformer blocks (head dim 32, FFN ×4, expansion in the qkv projection) and head
(global average pool → LayerNorm → Linear+tanh pre-logits → classifier), so the parameter counts are
timm's exactly; `convert_official` reads timm's layout.
Deviations from timm's `coatnet_N_224`: downsampling pools on both branches, as the paper's
x ← Proj(Pool(x)) + Block(Pool(Norm(x))) says, where timm strides the MBConv depthwise convolution
(timm's `stride_mode="pool"`); this is what brings the MACs to the paper's figures. The pooling is a
2×2 average (timm's choice; `pool_type="max"` gives max pooling). At a resolution other than the one
built for, the relative-bias tables are resized bicubically (timm uses BEiT's geometric interpolation;
the two agree to ~1e-3 on the features at 256 px).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import native
from hybridzoo.layers.conv import SqueezeExcite
from hybridzoo.layers.drop import DropPath, drop_path_rates
from hybridzoo.layers.helpers import check_image_input, checkpoint_seq, to_2tuple
from hybridzoo.layers.mlp import Mlp
from hybridzoo.layers.weight_init import init_conv_fan_out_, trunc_normal_
from hybridzoo.registry import register_model

__all__ = ["CoAtNet", "convert_official"]


def _pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    return F.max_pool2d(x, 2) if pool_type == "max" else F.avg_pool2d(x, 2)


def _pool_nhwc(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    # the permutes are views: pooling runs on a channels-last NCHW tensor
    return _pool(x.permute(0, 3, 1, 2), pool_type).permute(0, 2, 3, 1)


class Stem(nn.Module):
    """S0: 3×3 conv (stride 2) → BN → GELU → 3×3 conv; the next MBConv's pre-norm follows."""

    def __init__(self, in_chans: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 2, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.act = nn.GELU()   # a module, not F.gelu: the fast CPU training path swaps it for its one-pass kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.norm1(self.conv1(x))))

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        from hybridzoo.layers.onednn import OneDNNConv2d
        return nn.Sequential(OneDNNConv2d(self.conv1, self.norm1, nn.GELU(), batch_hint),
                             OneDNNConv2d(self.conv2, batch_hint=batch_hint))


class MBConv(nn.Module):
    """Pre-norm MBConv: BN → 1×1 expand (×4 of the output width) → 3×3 depthwise → SE → 1×1 project.

    The first block of a stage downsamples both branches: x ← Proj(Pool(x)) + MBConv(Pool(BN(x))).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: int = 4, se_ratio: float = 0.25,
                 drop_path: float = 0.0, pool_type: str = "avg"):
        super().__init__()
        if stride == 1 and in_chs != out_chs:
            raise ValueError("a stride-1 MBConv keeps its width")
        mid = out_chs * expand_ratio
        self.stride, self.pool_type = stride, pool_type
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()
        self.pre_norm = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, 1, 1, groups=mid, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, int(se_ratio * out_chs), act_layer=nn.SiLU)
        self.conv3 = nn.Conv2d(mid, out_chs, 1)
        self.drop_path = DropPath(drop_path)
        self.act = nn.GELU()   # a module, not F.gelu: the fast CPU training path swaps it for its one-pass kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre_norm(x)
        if self.stride == 2:
            x, y = _pool(x, self.pool_type), _pool(y, self.pool_type)
        y = self.act(self.norm1(self.conv1(y)))
        y = self.se(self.act(self.norm2(self.conv2(y))))
        return self.shortcut(x) + self.drop_path(self.conv3(y))

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        return _FrozenMBConv(self, batch_hint)


class _FrozenMBConv(nn.Module):
    """MBConv for the oneDNN inference path: every BN folded, GELUs and the residual add fused.

    The pre-norm folds into the input side of the unpadded 1×1 `conv1` (W·diag(s), b + W·t); with a
    stride-2 average pool in between it still does (averaging commutes with a per-channel affine), so
    both branches share one pooled input. A max pool does not commute with a negative scale: there the
    pre-norm stays a BatchNorm of its own. The residual add is conv3's sum post-op, written into the
    shortcut's buffer when that is fresh (projection or pooled) or owned by the stage (`InplaceChain`).
    """

    reuses_input = True

    def __init__(self, m: MBConv, batch_hint: int | None):
        super().__init__()
        from hybridzoo.layers.onednn import OneDNNConv2d, fold_batch_norm
        self.stride, self.pool_type = m.stride, m.pool_type
        self.pre_norm = m.pre_norm if m.stride == 2 and m.pool_type == "max" else None
        w, b = m.conv1.weight.detach().float(), None
        if self.pre_norm is None:
            # conv1(s·x + t) = (W·s)·x + W·t  (1×1, no padding, no bias of its own)
            s, t = fold_batch_norm(torch.ones(m.pre_norm.num_features, 1), None, m.pre_norm)
            b = (w[:, :, 0, 0].double() @ t.double()).float()
            w = w * s.view(1, -1, 1, 1)
        self.conv1 = OneDNNConv2d(m.conv1, m.norm1, nn.GELU(), batch_hint, weight=w, bias=b)
        self.conv2 = OneDNNConv2d(m.conv2, m.norm2, nn.GELU(), batch_hint)
        self.se = m.se
        self.conv3 = OneDNNConv2d(m.conv3, batch_hint=batch_hint)
        self.shortcut = m.shortcut

    def pooled_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the shortcut's input, the residual branch's input), both pooled where the block downsamples."""
        if self.pre_norm is not None:
            return _pool(x, self.pool_type), _pool(self.pre_norm(x), self.pool_type)
        if self.stride == 2:
            x = _pool(x, self.pool_type)
        return x, x

    def forward(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        x, y = self.pooled_inputs(x)
        # the SE's pooling summed by the depthwise kernel as it stores conv2's output (no second pass over it)
        y, pooled = self.conv2.forward_pooled(self.conv1(y))
        fresh = owned or self.stride == 2 or not isinstance(self.shortcut, nn.Identity)
        # the SE gate scales conv3's input: for one image folded into conv3's packed weight, else applied to
        # conv2's output in place (it is ours: no second buffer)
        return self.conv3.forward_gated(y, self.se.gate_of_mean(pooled), self.shortcut(x), inplace=fresh,
                                        x_owned=True)


def relative_position_index(height: int, width: int, device=None) -> torch.Tensor:
    """N×N indices into a (2H−1)(2W−1) table: (Δrow + H − 1)·(2W − 1) + (Δcol + W − 1)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    d_row = rows[:, None] - rows[None, :] + height - 1
    d_col = cols[:, None] - cols[None, :] + width - 1
    return d_row * (2 * width - 1) + d_col


class RelativeAttention(nn.Module):
    """Multi-head self-attention over all positions with a learned relative bias: softmax(qkᵀ/√d + w[i−j]).

    The table holds one value per head for every 2-D offset at the construction grid; at another grid
    it is resized (bicubic) to the new range of offsets. The bias reaches the fused attention kernel as
    a float `attn_mask`, i.e. it is added to the logits before the softmax. On the fast CPU training path
    (`optimize_for_cpu_training` sets `native_attention`) the native kernels take it, forward and backward,
    with the bias's gradient from the same pass: SDPA with a float mask trains on its math path.
    """

    native_attention = False

    def __init__(self, dim: int, dim_out: int, feat_size: tuple[int, int], dim_head: int = 32,
                 attn_drop: float = 0.0):
        super().__init__()
        if dim_out % dim_head:
            raise ValueError(f"width {dim_out} is not a multiple of the head width {dim_head}")
        self.num_heads = dim_out // dim_head
        self.dim_head = dim_head
        self.feat_size = tuple(feat_size)
        self.attn_drop = attn_drop
        # the qkv projection widens dim → dim_out (the paper's expansion at a stage's first block)
        self.qkv = nn.Linear(dim, 3 * dim_out)
        h, w = self.feat_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), self.num_heads))
        self.register_buffer("relative_position_index", relative_position_index(h, w).flatten(), persistent=False)
        self.proj = nn.Linear(dim_out, dim_out)

    def relative_bias(self, height: int, width: int) -> torch.Tensor:
        """The heads×N×N bias for an H×W grid."""
        table = self.relative_position_bias_table
        if (height, width) == self.feat_size:
            index = self.relative_position_index
        else:
            h, w = self.feat_size
            grid = table.t().reshape(1, self.num_heads, 2 * h - 1, 2 * w - 1)
            grid = F.interpolate(grid, size=(2 * height - 1, 2 * width - 1), mode="bicubic", align_corners=False)
            table = grid.reshape(self.num_heads, -1).t()
            index = relative_position_index(height, width, device=table.device).flatten()
        n = height * width
        # heads first and contiguous, as the kernels read it; gathered along the table's transpose, whose
        # backward (index_add) ran 2.6x faster than table[index]'s (index_put with accumulation)
        return table.t().contiguous().index_select(1, index).view(self.num_heads, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x)
        # a 4-D mask: with a 3-D one PyTorch's CPU SDPA leaves its fused kernel for the slow math path
        bias = self.relative_bias(H, W).to(qkv.dtype).unsqueeze(0)
        if self.native_attention and not (self.training and self.attn_drop > 0):
            packed = qkv.reshape(B, H * W, -1)
            if (native.packed_attention_applies(packed, self.num_heads)
                    and native.attention_bias_applies(bias, packed, self.num_heads)):
                x = native.attend_packed(packed, self.num_heads, self.dim_head ** -0.5, bias=bias)
                return self.proj(x.view(B, H, W, -1))
        q, k, v = qkv.view(B, H * W, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, H, W, -1))

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        return _FrozenRelativeAttention(self)


class _FrozenRelativeAttention(nn.Module):
    """RelativeAttention for inference: the bias of the built grid is gathered once (it does not depend
    on the input), not at every call; other grids resize the table as the original does. Where the native
    attention kernel runs (`layers.native`: fp32 on a CPU with AVX-512 or AVX2), it takes the bias before its
    softmax and writes the output tokens first, as `proj` reads it (SDPA with a float mask and a transpose before)."""

    def __init__(self, m: RelativeAttention):
        super().__init__()
        self.native_attention = native.attention_ready(m.dim_head)
        self.qkv, self.proj = m.qkv, m.proj
        self.num_heads, self.dim_head, self.feat_size = m.num_heads, m.dim_head, m.feat_size
        # what RelativeAttention.relative_bias reads, for inputs of another size
        self.relative_position_bias_table = m.relative_position_bias_table
        self.register_buffer("relative_position_index", m.relative_position_index, persistent=False)
        self.register_buffer("bias", m.relative_bias(*m.feat_size).detach().unsqueeze(0).contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.bias if (H, W) == self.feat_size else RelativeAttention.relative_bias(self, H, W).unsqueeze(0)
        if self.native_attention and native.attention_applies(q, k, v):
            x = native.attention(q, k, v, None, self.dim_head ** -0.5, bias.contiguous())   # B×HW×C
            return self.proj(x.view(B, H, W, -1))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, H, W, -1))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block with relative attention on a B×H×W×C map.

    The first block of a stage downsamples both branches: x ← Proj(Pool(x)) + Attention(Pool(LN(x))).
    """

    def __init__(self, dim: int, dim_out: int, feat_size: tuple[int, int], stride: int = 1, dim_head: int = 32,
                 mlp_ratio: int = 4, drop_path: float = 0.0, attn_drop: float = 0.0, pool_type: str = "avg"):
        super().__init__()
        if stride == 1 and dim != dim_out:
            raise ValueError("a stride-1 transformer block keeps its width")
        self.stride, self.pool_type = stride, pool_type
        self.shortcut = nn.Linear(dim, dim_out) if dim != dim_out else nn.Identity()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelativeAttention(dim, dim_out, feat_size, dim_head, attn_drop)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, dim_out * mlp_ratio, act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.stride == 2:
            x, y = _pool_nhwc(x, self.pool_type), _pool_nhwc(y, self.pool_type)
        x = self.shortcut(x) + self.drop_path(self.attn(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CoAtNet(nn.Module):
    """CoAtNet: stem (S0), MBConv stages S1–S2, relative-attention Transformer stages S3–S4, each at stride 2.

    `layout` builds the paper's other stackings with the same widths and depths (C-C-C-C, C-C-C-T,
    C-T-T-T, ...): `create_model("coatnet_0", layout="C-C-C-T")`.

    The transformer stages run on channels-last (B×H×W×C) tensors; feature maps come out as B×C×H×W views.
    img_size sets the grid the relative-bias tables are built for; other input sizes (multiples of 32)
    resize the tables on the fly.
    """

    # `hybridzoo train` on the fast CPU path takes channels-last unless told otherwise: a step 1.08x (batch 16,
    # 224², beside the batch split; benchmarks/RESULTS.md, session 36)
    train_channels_last = True

    def __init__(self, *, dims: tuple[int, int, int, int], depths: tuple[int, int, int, int], stem_width: int,
                 head_hidden_size: int | None = None, dim_head: int = 32, expand_ratio: int = 4, mlp_ratio: int = 4,
                 se_ratio: float = 0.25, pool_type: str = "avg", img_size: int | tuple[int, int] = 224,
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, layout: str = "C-C-T-T"):
        super().__init__()
        if pool_type not in ("avg", "max"):
            raise ValueError(f"pool_type must be 'avg' or 'max', got {pool_type!r}")
        # the paper's stacking ablation (Sec. 3.2, Fig. 2): which of S1–S4 are MBConv (C) or Transformer (T)
        kinds = tuple(layout.upper().replace("-", ""))
        if len(kinds) != 4 or set(kinds) - {"C", "T"}:
            raise ValueError(f"layout must name 4 stages with C (MBConv) or T (Transformer), e.g. 'C-C-T-T'; "
                             f"got {layout!r}")
        self.layout, self.stage_kinds = "-".join(kinds), kinds
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.num_features = head_hidden_size or dims[-1]
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, stem_width)
        self.feature_info = [dict(num_chs=stem_width, reduction=2)]
        dpr = iter(drop_path_rates(drop_path_rate, sum(depths)))
        feat = [s // 2 for s in self.img_size]
        stages, chs = [], stem_width
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            feat = [s // 2 for s in feat]
            blocks = []
            for j in range(depth):
                stride, dim_in = (2, chs) if j == 0 else (1, dim)
                if kinds[i] == "C":
                    blocks.append(MBConv(dim_in, dim, stride, expand_ratio, se_ratio, next(dpr), pool_type))
                else:
                    blocks.append(TransformerBlock(dim_in, dim, tuple(feat), stride, dim_head, mlp_ratio, next(dpr),
                                                   attn_drop_rate, pool_type))
            stages.append(nn.Sequential(*blocks))
            chs = dim
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2)))
        self.stages = nn.ModuleList(stages)

        # head: global average pool → LayerNorm → (Linear + tanh pre-logits) → classifier
        self.norm = nn.LayerNorm(chs, eps=1e-6)
        self.pre_logits = (nn.Sequential(OrderedDict(fc=nn.Linear(chs, head_hidden_size), act=nn.Tanh()))
                           if head_hidden_size else nn.Identity())
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's "vit_eff" scheme: EfficientNet fan-out normal for convolutions, Xavier-uniform for the
        # transformer projections (FFN biases ~N(0, 1e-6)), trunc-normal(0.02) bias tables
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_fan_out_(m)
            elif isinstance(m, RelativeAttention):
                trunc_normal_(m.relative_position_bias_table, std=0.02)
        for kind, stage in zip(self.stage_kinds, self.stages):
            if kind != "T":
                continue
            for name, m in stage.named_modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if "mlp" in name:
                        nn.init.normal_(m.bias, std=1e-6)
                    else:
                        nn.init.zeros_(m.bias)

    # -- contract -------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def prune_for_features(self) -> None:
        """For `features_only`: the head (norm, pre-logits, classifier) is never reached."""
        self.norm = self.pre_logits = self.head = None

    def _stages(self, x: torch.Tensor, keep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        check_image_input(x, self, self.in_chans, divisor=32, min_size=32)
        x = self.stem(x)
        feats = [x] if keep else []
        nhwc = False
        for kind, stage in zip(self.stage_kinds, self.stages):
            if (kind == "T") != nhwc:    # the transformer stages work on B×H×W×C, MBConv on B×C×H×W
                x = x.permute(0, 2, 3, 1).contiguous() if kind == "T" else x.permute(0, 3, 1, 2).contiguous()
                nhwc = kind == "T"
            x = checkpoint_seq(stage, x, enabled=self.grad_checkpointing)
            if keep:
                feats.append(x.permute(0, 3, 1, 2) if nhwc else x)
        return (x.permute(0, 3, 1, 2) if nhwc else x), feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.norm(x.mean((2, 3))))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's map and each stage's (strides 2, 4, 8, 16, 32), as B×C×H×W."""
        return self._stages(x, keep=True)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- timm checkpoint conversion ---------------------------------------------------------------------

def convert_official(state_dict: dict[str, torch.Tensor], model: CoAtNet) -> dict[str, torch.Tensor]:
    """Map timm's `maxxvit` CoAtNet layout (`coatnet_N_224`: `stages.S.blocks.B.conv1_1x1.weight`, ...) to ours.

    timm's 1×1 convolutions of the transformer stages become our Linear layers, and its head-first qkv
    channel order (per head: q, k, v) becomes ours (q, k, v, each over all heads).

    timm's default `coatnet_N_224` strides the MBConv depthwise convolution (`stride_mode="dw"`), a
    different function from the paper's pooling that this model computes; its state dict has exactly
    the same names and shapes as one trained with `stride_mode="pool"`, so a timm-layout checkpoint is
    refused unless the caller states how it was trained: set `model.timm_stride_mode = "pool"` before
    loading (a "dw" checkpoint has no matching variant here and is always refused).
    """
    timm_layout = any(".conv2_kxk." in k or ".conv1_1x1." in k for k in state_dict)
    mode = getattr(model, "timm_stride_mode", None)
    if timm_layout and mode != "pool":
        raise ValueError(
            "this is timm's CoAtNet layout; timm's default coatnet_N_224 strides the MBConv depthwise conv "
            "(stride_mode='dw'), a different function from the paper's pooling this model implements, and the "
            "file cannot tell the two apart. If the checkpoint was trained with timm's stride_mode='pool', set "
            "model.timm_stride_mode = 'pool' and load it again; a stride_mode='dw' checkpoint has no matching "
            "model here" + (f" (model.timm_stride_mode is {mode!r})" if mode else ""))
    out: dict[str, torch.Tensor] = {}
    renames = (("shortcut.expand.", "shortcut."), ("norm1.norm.", "norm1."), ("conv1_1x1.", "conv1."),
               ("conv2_kxk.", "conv2."), ("conv3_1x1.", "conv3."), ("attn.rel_pos.", "attn."))
    for key, value in state_dict.items():
        new = key
        if key.startswith("stages."):
            _, s, blocks, b, rest = key.split(".", 4)
            if blocks != "blocks":
                out[key] = value
                continue
            for old, repl in renames:
                if rest.startswith(old):
                    rest = repl + rest[len(old):]
            new = f"stages.{s}.{b}.{rest}"
            if int(s) >= 2 and value.ndim == 4:
                value = value.flatten(1)          # 1×1 conv → Linear
            if int(s) >= 2 and rest.startswith("attn.qkv."):
                heads = model.stages[int(s)][int(b)].attn.num_heads
                value = value.reshape(heads, 3, -1, *value.shape[1:]).transpose(0, 1).reshape(value.shape)
        elif key.startswith("head.norm."):
            new = "norm." + key[len("head.norm."):]
        elif key.startswith("head.pre_logits."):
            new = key[len("head."):]
        elif key.startswith("head.fc."):
            new = "head." + key[len("head.fc."):]
        out[new] = value
    return out


# -- variants ---------------------------------------------------------------------------------------

_CARD = dict(paper="CoAtNet", arxiv="2106.04803", task="classification", flops_rtol=0.05,
             test_kwargs=dict(dims=(16, 32, 64, 64), depths=(1, 2, 2, 1), stem_width=16, head_hidden_size=64,
                              dim_head=16, img_size=64),
             test_input_size=(3, 64, 64))


@register_model(**_CARD, reported=dict(params_m=25.0, gflops=4.2, top1=81.6, resolution=224),
                notes="timm's paper-like coatnet_0_224 has 25,036,820 parameters (ours: identical)")
def coatnet_0(**kwargs):
    return CoAtNet(**{**dict(dims=(96, 192, 384, 768), depths=(2, 3, 5, 2), stem_width=64, head_hidden_size=768),
                      **kwargs})


@register_model(**_CARD, reported=dict(params_m=42.0, gflops=8.4, top1=83.3, resolution=224),
                notes="timm's paper-like coatnet_1_224 has 42,225,776 parameters (ours: identical)")
def coatnet_1(**kwargs):
    return CoAtNet(**{**dict(dims=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=64, head_hidden_size=768),
                      **kwargs})


@register_model(**_CARD, reported=dict(params_m=75.0, gflops=15.7, top1=84.1, resolution=224),
                notes="timm's paper-like coatnet_2_224 has 74,684,744 parameters (ours: identical)")
def coatnet_2(**kwargs):
    return CoAtNet(**{**dict(dims=(128, 256, 512, 1024), depths=(2, 6, 14, 2), stem_width=128,
                             head_hidden_size=1024), **kwargs})


@register_model(**_CARD, reported=dict(params_m=168.0, gflops=34.7, top1=84.5, resolution=224),
                notes="timm's paper-like coatnet_3_224 has 166,966,264 parameters (ours: identical)")
def coatnet_3(**kwargs):
    return CoAtNet(**{**dict(dims=(192, 384, 768, 1536), depths=(2, 6, 14, 2), stem_width=192,
                             head_hidden_size=1536), **kwargs})


@register_model(**_CARD, reported=dict(params_m=275.0, resolution=224),
                notes="the paper reports CoAtNet-4 only with ImageNet-21K pre-training at 384/512; 275M "
                      "parameters; timm's coatnet_4_224 has 275,425,288 (ours: identical)")
def coatnet_4(**kwargs):
    return CoAtNet(**{**dict(dims=(192, 384, 768, 1536), depths=(2, 12, 28, 2), stem_width=192,
                             head_hidden_size=1536), **kwargs})
