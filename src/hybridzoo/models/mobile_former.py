"""Mobile-Former: Bridging MobileNet and Transformer — Chen et al., CVPR 2022, arXiv 2108.05895.

What is hybrid: a MobileNet-style "Mobile" branch on the image and a tiny "Former" transformer on a
handful of learnable global tokens run in parallel, joined by a two-way cross-attention bridge
(Mobile→Former reads the local map with no key/value projection, Former→Mobile writes back with no
query projection); the tokens also drive the Mobile branch's dynamic ReLU.
Official code: AAboys/MobileFormer `mobile_former.py`, `dna_blocks.py` (timm-0.3-style; its
checkpoints load through `convert_official`).
Deviations from it: tokens are kept batch-first (B×T×d, official T×B×d), so stochastic depth on the
bridge drops whole samples where the official code drops whole tokens across the batch; the attention
products go through `scaled_dot_product_attention` (same arithmetic up to rounding).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import native
from hybridzoo.layers.conv import ConvBnAct
from hybridzoo.layers.drop import DropPath
from hybridzoo.layers.helpers import check_image_input, checkpoint_seq
from hybridzoo.layers.onednn import _native_call
from hybridzoo.registry import register_model

__all__ = ["MobileFormer", "convert_official"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (g, C/g) → (C/g, g) over the channel axis."""
    if groups <= 1:
        return x
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


class _DynamicReLUFn(torch.autograd.Function):
    """max(s1·x, s2·x) on the native kernels in training: the forward one pass, the backward one pass for dx and the
    slopes' gradients together, where autograd's products, maximum and its backward (comparisons, masks, halves at
    ties) take about a dozen over the map. The same gradients as autograd's `torch.maximum`, ties included."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, s1, s2)
        return native.dyrelu(x, s1, s2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, s1, s2 = ctx.saved_tensors
        fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
        return native.dyrelu_backward(x, grad.contiguous(memory_format=fmt), s1, s2)


class DynamicReLU(nn.Module):
    """Dynamic ReLU whose two per-channel slopes come from the first global token.

    An MLP (d → d/4 → 2C, hard sigmoid) gives h1, h2 ∈ [0, 1]; the slopes are a1 = 2·h1 ∈ [0, 2] and
    a2 = 2·h2 − 1 ∈ [−1, 1], and the output is max(a1·x, a2·x) (no intercepts, as the official code).
    """

    # set by `optimize_for_cpu_training` where the native kernels run: the training step's max(s1·x, s2·x) and its
    # backward each in one pass over the map (`_DynamicReLUFn`)
    native_training = False

    def __init__(self, channels: int, token_dim: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(token_dim, token_dim // reduction)
        self.fc2 = nn.Linear(token_dim // reduction, 2 * channels)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        h = F.hardsigmoid(self.fc2(F.relu(self.fc1(token))))
        a1, a2 = h[:, :, None, None].chunk(2, dim=1)
        s1, s2 = (a1 - 0.5) * 2.0 + 1.0, (a2 - 0.5) * 2.0
        if torch.is_grad_enabled() and (x.requires_grad or h.requires_grad):
            if (self.native_training and self.training and x.device.type == "cpu" and _native_call(x) and x.dim() == 4
                    and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
                return _DynamicReLUFn.apply(x, s1.flatten(1), s2.flatten(1))
            return torch.maximum(x * s1, x * s2)
        # without autograd the maximum goes into the first product's buffer: one full-size allocation
        # less (measured 1.1–4.7× faster for this element-wise step on CPU; bitwise the same result)
        y = x * s1
        return torch.maximum(y, x * s2, out=y)

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        return _FrozenDynamicReLU(self, batch_hint)


class _FrozenDynamicReLU(nn.Module):
    """DynamicReLU for the oneDNN inference path (`optimize_for_cpu_inference`); overwrites its input.

    The slope MLP runs as two packed products with ReLU fused into the first; 2·hsigmoid(z) =
    clamp(z/3 + 1, 0, 2) and 2·hsigmoid(z) − 1 = clamp(z/3, −1, 1), so fc2 is scaled by 1/3 (exact
    algebra; fp32 rounding moves). max(s1·x, s2·x) is then computed in x's own buffer — its callers pass a
    dead convolution output — by one native kernel (`layers.native.dyrelu_`: one read and one write of the map;
    1.08× on the whole model at batch 32, 1.05× at batch 1, session 11) when it is built. Otherwise in ATen,
    with a per-thread scratch buffer for the one temporary, where the eager formula
    makes two fresh full-size ones (fresh large buffers page-fault on every call). With one intra-op thread (each
    part of the batch split) the three passes run one image at a time (`PER_IMAGE`): the second and third then read
    the image's map from the caches (measured 1.07× on the whole model at batch 32, 2 threads; with an OpenMP team
    the loop would multiply its parallel regions — 3× slower at two threads on a loaded machine, session 5). Tried
    and slower: PReLU(p·x, n/p) (p, n the larger and smaller slope).
    """

    def __init__(self, act: DynamicReLU, batch_hint: int | None):
        super().__init__()
        from hybridzoo.layers.onednn import OneDNNLinear
        self.channels = act.fc2.out_features // 2
        self.fc1 = OneDNNLinear(act.fc1, "relu", batch_hint=batch_hint)
        self.fc2 = OneDNNLinear(act.fc2, batch_hint=batch_hint, scale=1.0 / 3.0)
        native.load()   # compiles the fused kernel on first use (cached); without it the ATen passes below

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return self.apply_slopes(x, self.fc2(self.fc1(token)))

    # with one intra-op thread (a part of the batch split, or a one-thread caller) and a batch of several images,
    # the three passes run one image at a time, so that the second and third find the image's map in the caches
    PER_IMAGE = True

    def slopes(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two slopes (B×C each) from u = fc2(fc1(token)) (B×2C, fc2 already scaled by 1/3)."""
        C = self.channels
        return (u[:, :C] + 1.0).clamp_(0.0, 2.0), u[:, C:].clamp(-1.0, 1.0)

    def apply_slopes(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """max(s1·x, s2·x) in x's buffer from u = fc2(fc1(token)) (B×2C, fc2 already scaled by 1/3)."""
        if native.available() and x.dtype == torch.float32 and x.dim() == 4 \
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            return native.dyrelu_(x, *self.slopes(u))   # one read and one write of the map
        s1, s2 = (s[:, :, None, None] for s in self.slopes(u))
        if self.PER_IMAGE and x.shape[0] > 1 and torch.get_num_threads() == 1:
            t = _scratch(x[:1])
            for i in range(x.shape[0]):
                xi = x[i:i + 1]
                torch.mul(xi, s2[i:i + 1], out=t)
                torch.maximum(xi.mul_(s1[i:i + 1]), t, out=xi)
            return x
        t = _scratch(x)
        torch.mul(x, s2, out=t)
        return torch.maximum(x.mul_(s1), t, out=x)


# One scratch buffer per thread for the frozen dynamic ReLUs' temporary, grown to the largest map met (e.g.
# 58 MB for Mobile-Former-294M at batch 32): a fresh buffer of that size page-faults on every call (glibc
# hands large freed blocks back to the kernel). Per thread, so that concurrent calls cannot share it.
_SCRATCH = threading.local()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    buf = getattr(_SCRATCH, "buf", None)
    # a buffer made under inference_mode cannot be written outside it (a call under no_grad after one under
    # inference_mode): a new one then
    if (buf is None or buf.numel() < like.numel() or buf.dtype != like.dtype
            or buf.is_inference() and not torch.is_inference_mode_enabled()):
        buf = _SCRATCH.buf = torch.empty(like.numel(), dtype=like.dtype)
    return buf[:like.numel()].as_strided(like.shape, like.stride())


def _conv_output_size(size, kernel, padding, stride, dilation) -> tuple[int, ...]:
    """A zero-padded convolution's output size along each spatial dimension of `size`."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, p, s, d in zip(size, kernel, padding, stride, dilation))


def _is_multiplier_conv(seq: nn.Module) -> bool:
    """A ConvBnAct whose convolution is depthwise with a channel multiplier m > 1 (groups = in_channels, m outputs
    per input channel: the Mobile-Former dw1 / dw2 of the downsampling blocks and the lite block's dw)."""
    if not (isinstance(seq, nn.Sequential) and len(seq) >= 2 and type(seq[0]) is nn.Conv2d
            and isinstance(seq[1], nn.BatchNorm2d) and seq[1].track_running_stats):
        return False
    conv = seq[0]
    return (conv.groups == conv.in_channels > 1 and conv.out_channels % conv.in_channels == 0
            and conv.out_channels > conv.in_channels and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _multiplier_order(channels: int, multiplier: int) -> torch.Tensor:
    """perm with perm[j·C + g] = g·m + j: where `_MultiplierDepthwise`'s output channel j·C + g comes from."""
    return torch.arange(channels * multiplier).view(channels, multiplier).t().reshape(-1)


class _MultiplierDepthwise(nn.Module):
    """A depthwise convolution with a channel multiplier m (C → m·C, groups = C; BatchNorm and activation folded)
    for the oneDNN inference path, as m plain depthwise convolutions C → C (weights w[j::m]) concatenated.

    oneDNN has no multiplier in its depthwise kernel: the grouped convolution runs in its generic kernel, which
    pads every 1-in / m-out group to a 16×16 block (measured 2.2× the m depthwise convolutions plus the
    concatenation at 16→32, 112², 1 thread, batch 16). The output channels come out in the order j·C + g instead
    of g·m + j (`_multiplier_order`): the caller permutes whatever reads them (the dynamic ReLU's slopes, the next
    pointwise convolution's input channels), so no interleaving copy is needed.

    Small maps (fewer than PARTS_MIN_ELEMENTS output elements per part: batch 1 below 28², where m calls cost more
    than the padding) run the grouped convolution instead, its output copied into the order j·C + g.

    Where the native kernels are built and the parts are native depthwise convolutions (C a multiple of 16, an
    activation the kernel has), all of it is one call of `native.depthwise3x3` with the multiplier, on any map
    (`taps`, `NATIVE`).
    """

    PARTS_MIN_ELEMENTS = 1 << 15

    def __init__(self, seq: nn.Sequential, batch_hint: int | None):
        super().__init__()
        from hybridzoo.layers.onednn import OneDNNConv2d, conv_post_op, fold_batch_norm
        conv, bn = seq[0], seq[1]
        act = seq[2] if len(seq) > 2 else None
        if conv_post_op(act) is None:
            raise ValueError(f"no oneDNN post-op for {type(act).__name__} after a multiplier depthwise convolution")
        C, self.multiplier = conv.in_channels, conv.out_channels // conv.in_channels
        self.in_channels, self.out_channels = C, conv.out_channels
        w, b = fold_batch_norm(conv.weight.detach().float(), None if conv.bias is None else conv.bias.detach().float(),
                               bn)
        # the parts' geometry only: skip_init draws no initial weights (building a frozen copy leaves the global
        # generator alone, so validating on it inside `hybridzoo train` does not move the training's random stream)
        shape = nn.utils.skip_init(nn.Conv2d, C, C, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                   groups=C, bias=False)
        m = self.multiplier
        self.parts = nn.ModuleList(
            OneDNNConv2d(shape, None, act, batch_hint, weight=w[j::m].contiguous(), bias=b[j::m].contiguous())
            for j in range(m))
        self.grouped = OneDNNConv2d(conv, None, act, batch_hint, weight=w, bias=b)
        # the native depthwise kernel with its multiplier: all m parts in one call, straight into the j·C + g order
        p = self.parts[0]
        self.taps = self.taps_bias = None
        if (p.depthwise_taps is not None and self.NATIVE
                and all(part.depthwise_taps is not None for part in self.parts)):
            self.taps = torch.cat([part.depthwise_taps for part in self.parts], dim=1).contiguous()
            self.taps_bias = torch.cat([part.packed_bias for part in self.parts]).contiguous()

    # one native call where the parts are native depthwise convolutions (C a multiple of 16, an activation the
    # kernel has): 294M at batch 1, 2 threads, Zen 3: the five such convolutions ran on oneDNN's grouped kernel
    # (small maps) at ~2 ms of the forward (benchmarks/RESULTS.md, session 16)
    NATIVE = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parts[0]
        if self.taps is not None and self.NATIVE and _native_call(x):
            return native.depthwise3x3(x.contiguous(memory_format=torch.channels_last), self.taps, self.taps_bias,
                                       p.stride[0], p.attr, p.algorithm, self.multiplier)
        rows, cols = _conv_output_size(x.shape[2:], p.kernel_size, p.padding, p.stride, p.dilation)
        if x.shape[0] * rows * cols * self.in_channels >= self.PARTS_MIN_ELEMENTS:
            return torch.cat([part(x) for part in self.parts], dim=1)
        y = self.grouped(x).permute(0, 2, 3, 1)   # channels-last: B×H×W×(C·m), channel g·m + j
        B, H, W, _ = y.shape
        return (y.reshape(B, H, W, self.in_channels, self.multiplier).transpose(3, 4)
                .reshape(B, H, W, self.out_channels).permute(0, 3, 1, 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, as {self.multiplier} depthwise, channels j·C + g"


@torch.no_grad()
def _split_multiplier(owner: nn.Module, name: str, readers: list[tuple[torch.Tensor, int]],
                      batch_hint: int | None, native_only: bool = False) -> bool:
    """Replace owner.<name> (a multiplier ConvBnAct) by `_MultiplierDepthwise` and permute, in place, the tensors
    that read its output channels: (tensor, dim) with the channels along dim (a dynamic ReLU's fc2 rows hold two
    slopes per channel: both halves permuted). False (nothing changed) where the convolution is not one, or, with
    `native_only`, where the native kernel would not take it in one call."""
    seq = getattr(owner, name)
    if not _is_multiplier_conv(seq):
        return False
    frozen = _MultiplierDepthwise(seq, batch_hint)
    if native_only and frozen.taps is None:
        return False
    perm = _multiplier_order(frozen.in_channels, frozen.multiplier)
    n = frozen.out_channels
    for t, dim in readers:
        order = perm if t.shape[dim] == n else torch.cat([perm + i * n for i in range(t.shape[dim] // n)])
        t.copy_(t.index_select(dim, order))
    setattr(owner, name, frozen)
    return True


class MobileToFormer(nn.Module):
    """Mobile→Former bridge: the tokens query the local map; keys = values = the raw map (no projection).

    Heads split the map's channels; the attended result is gated by 2·hsigmoid(Linear(tokens)) (the
    official `gbr_dynamic[0]`), projected to the token width, added and post-LayerNormed.
    """

    def __init__(self, channels: int, token_dim: int, num_heads: int = 2, dynamic: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.q = nn.Linear(token_dim, channels)
        self.alpha = nn.Linear(token_dim, channels) if dynamic else None
        self.proj = nn.Linear(channels, token_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        T = z.shape[1]
        q = self.q(z).view(B, T, self.num_heads, -1).transpose(1, 2)                # B×h×T×c
        kv = x.flatten(2).view(B, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2)  # B×h×HW×c
        out = F.scaled_dot_product_attention(q, kv, kv, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, T, C)
        if self.alpha is not None:
            out = out * (2.0 * F.hardsigmoid(self.alpha(z)))
        return self.norm(z + self.drop_path(self.proj(out)))


class Former(nn.Module):
    """The Former: post-LN self-attention over the tokens (only queries projected) and an FFN (×2, GELU)."""

    def __init__(self, token_dim: int, num_heads: int = 4, mlp_ratio: int = 2, drop_path: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (token_dim // num_heads) ** -0.5
        self.q = nn.Linear(token_dim, token_dim)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm1 = nn.LayerNorm(token_dim)
        self.fc1 = nn.Linear(token_dim, token_dim * mlp_ratio)
        self.fc2 = nn.Linear(token_dim * mlp_ratio, token_dim)
        self.norm2 = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, D = z.shape
        q = self.q(z).view(B, T, self.num_heads, -1).transpose(1, 2)
        kv = z.view(B, T, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv, kv, scale=self.scale).transpose(1, 2).reshape(B, T, D)
        z = self.norm1(z + self.drop_path(self.proj(out)))
        # the official FFN residual has no stochastic depth
        return self.norm2(z + self.fc2(F.gelu(self.fc1(z))))


class FormerToMobile(nn.Module):
    """Former→Mobile bridge: every pixel queries the tokens with its raw features (no query projection)."""

    def __init__(self, channels: int, token_dim: int, num_heads: int = 2, drop_path: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.k = nn.Linear(token_dim, channels)
        self.v = nn.Linear(token_dim, channels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        T = z.shape[1]
        # the pixels as B×HW×h×c, heads moved next to the batch by a transpose like k and v: inductor's
        # attention pattern matcher (torch 2.13–2.14) crashed at batch 1 on the B×h×c×HW view transposed
        # on its last two axes; channels-last x makes this reshape a view
        q = x.permute(0, 2, 3, 1).reshape(B, H * W, self.num_heads, C // self.num_heads).transpose(1, 2)
        k = self.k(z).view(B, T, self.num_heads, -1).transpose(1, 2)
        v = self.v(z).view(B, T, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)                   # B×h×HW×c
        # back to B×C×H×W in channels-last memory (one copy)
        out = out.permute(0, 2, 1, 3).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.drop_path(out)


class Mobile(nn.Module):
    """The Mobile sub-block: pw expand → dynamic ReLU → k×k depthwise (stride) → dynamic ReLU → pw linear."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int, token_dim: int, groups: int = 1):
        super().__init__()
        hidden = round(in_chs * expand)
        self.groups = groups
        self.pw1 = ConvBnAct(in_chs, hidden, 1, groups=groups, act_layer=None)
        self.act1 = DynamicReLU(hidden, token_dim)
        self.dw = ConvBnAct(hidden, hidden, 3, stride, groups=hidden, act_layer=None)
        self.act2 = DynamicReLU(hidden, token_dim)
        self.pw2 = ConvBnAct(hidden, out_chs, 1, groups=groups, act_layer=None)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        x = self.act1(channel_shuffle(self.pw1(x), self.groups), token)
        x = self.act2(self.dw(x), token)
        return channel_shuffle(self.pw2(x), self.groups)


class MobileDown(nn.Module):
    """The downsampling Mobile sub-block: dw (stride, ×e1) → dyReLU → pw → dw (×e2) → dyReLU → pw.

    As in the official `DnaBlock3`, the second dw–pw pair is residual around the first pw's output.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: tuple[int, int], token_dim: int,
                 groups: int = 1, drop_path: float = 0.0):
        super().__init__()
        hidden1, hidden2 = round(in_chs * expand[0]), round(out_chs * expand[1])
        self.groups, self.in_chs, self.out_chs = groups, in_chs, out_chs
        self.dw1 = ConvBnAct(in_chs, hidden1, 3, stride, groups=in_chs, act_layer=None)
        self.act1 = DynamicReLU(hidden1, token_dim)
        self.pw1 = ConvBnAct(hidden1, out_chs, 1, groups=groups, act_layer=None)
        self.dw2 = ConvBnAct(out_chs, hidden2, 3, 1, groups=out_chs, act_layer=None)
        self.act2 = DynamicReLU(hidden2, token_dim)
        self.pw2 = ConvBnAct(hidden2, out_chs, 1, groups=groups, act_layer=None)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        # with grouped pw convs, the dw expansions are interleaved across the groups (official quirk)
        shuffle = self.groups > 1
        x = self.dw1(x)
        x = self.pw1(self.act1(channel_shuffle(x, self.in_chs) if shuffle else x, token))
        y = self.dw2(x)
        y = self.pw2(self.act2(channel_shuffle(y, self.out_chs) if shuffle else y, token))
        return x + self.drop_path(y)


class LiteBottleneck(nn.Module):
    """The first block: depthwise 3×3 (×e) → BN → ReLU6 → pointwise linear; no bridge, tokens untouched."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int, groups: int = 1):
        super().__init__()
        self.in_chs, self.groups = in_chs, groups
        self.dw = ConvBnAct(in_chs, in_chs * expand, 3, stride, groups=in_chs, act_layer=nn.ReLU6)
        self.pw = ConvBnAct(in_chs * expand, out_chs, 1, groups=groups, act_layer=None)
        self.identity = stride == 1 and in_chs == out_chs

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, z = state
        out = self.dw(x)
        out = self.pw(channel_shuffle(out, self.in_chs) if self.groups > 1 else out)
        return (out + x if self.identity else out), z

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        # called on optimize_for_cpu_inference's copy, so it may change this module in place: the dw with a
        # channel multiplier (16 → 32 in 294M) as plain depthwise convolutions, pw reading their channel order
        if self.groups == 1 and _FrozenMobileFormerBlock.SPLIT_MULTIPLIER:
            _split_multiplier(self, "dw", [(self.pw[0].weight, 1)], batch_hint)
        return self


class MobileFormerBlock(nn.Module):
    """Mobile→Former, Former, Mobile (dynamic ReLU driven by the updated first token), Former→Mobile."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: tuple[int, int], downsample: bool,
                 token_dim: int, groups: int = 1, bridge_heads: int = 2, former_heads: int = 4,
                 drop_path: float = 0.0):
        super().__init__()
        self.downsample = downsample
        self.identity = stride == 1 and in_chs == out_chs
        self.mobile_former = MobileToFormer(in_chs, token_dim, bridge_heads, dynamic=True, drop_path=drop_path)
        self.former = Former(token_dim, former_heads, drop_path=drop_path)
        if downsample:
            self.mobile = MobileDown(in_chs, out_chs, stride, expand, token_dim, groups, drop_path)
        else:
            self.mobile = Mobile(in_chs, out_chs, stride, expand[0], token_dim, groups)
        self.former_mobile = FormerToMobile(out_chs, token_dim, bridge_heads, drop_path=drop_path)
        self.drop_path = DropPath(drop_path)

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, z = state
        z = self.former(self.mobile_former(x, z))
        out = self.mobile(x, z[:, 0])
        # the two official block types place the block residual on either side of Former→Mobile
        if self.downsample:
            out = self.former_mobile(out, z)
            if self.identity:
                out = out + x
        else:
            if self.identity:
                out = x + self.drop_path(out)
            out = self.former_mobile(out, z)
        return out, z

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        return _FrozenMobileFormerBlock(self, batch_hint)


@torch.no_grad()
def _stacked_weights(*linears: nn.Linear, scales: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of one product whose output is the given layers' outputs side by side (each optionally scaled)."""
    scales = scales or (1.0,) * len(linears)
    return (torch.cat([lin.weight.detach().float() * s for lin, s in zip(linears, scales)]).contiguous(),
            torch.cat([lin.bias.detach().float() * s for lin, s in zip(linears, scales)]).contiguous())


# the branch parallelism's second thread (keyed by process: a forked child inherits the dict, not the thread)
_BESIDE: dict[int, ThreadPoolExecutor] = {}
_BESIDE_LOCK = threading.Lock()


def _beside() -> ThreadPoolExecutor:
    with _BESIDE_LOCK:
        pool = _BESIDE.get(os.getpid())
        if pool is None:
            pool = _BESIDE[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="hybridzoo-mf-tokens")
        return pool


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """A channels-last B×C×H×W map as a B×heads×HW×(C/heads) view (the pixels as queries); raises if not a view."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).view(B, H * W, heads, C // heads).transpose(1, 2)


class _FrozenMobileFormerBlock(nn.Module):
    """MobileFormerBlock for the oneDNN inference path (`optimize_for_cpu_inference`).

    The token side is gathered in one function (`tokens`): Mobile→Former, the Former, both dynamic-ReLU slope
    MLPs and Former→Mobile's keys and values all depend on the tokens and the block input only, so with fewer
    products — q|α of Mobile→Former, the two slope MLPs' first layers (ReLU fused) and k|v of Former→Mobile
    each run as one product; α is pre-scaled by 1/3 so that 2·hsigmoid(α) = clamp(α/3 + 1, 0, 2) is one
    clamp (exact algebra; fp32 rounding moves).
    Where the native kernels are built, the whole token side is one call instead (`native.former_tokens`,
    `NATIVE_TOKENS`), with the same function.

    Branch parallelism (`PARALLEL`, off by default — slower on an idle machine, see the attribute; one image
    with ≥ 2 intra-op threads): the Mobile sub-block's first
    convolution needs the block input but not the tokens (only its dynamic ReLU does; same order in the official
    `DnaBlock.forward`: `conv1(features)` before `hyper1(tokens)`), so the token side runs on a second Python
    thread while the caller runs that convolution, each with one intra-op thread (torch ops release the GIL);
    then each thread runs the rest of the block on one half of the map's rows (`_rest_rows`; `SPLIT_ROWS`), or,
    on maps too small to split, the caller runs it with its own threads. A batch of several images already has
    both threads busy (one part of the batch per thread, `split_batch_forward`) and runs it in sequence.

    The Mobile side's depthwise convolutions with a channel multiplier run as m plain depthwise ones
    (`_MultiplierDepthwise`, `SPLIT_MULTIPLIER`), and Former→Mobile on large maps as two batched products
    (`_former_to_mobile_products`, `F2M_BLOCK_DIAGONAL`).
    """

    # Off by default: on the idle 2-vCPU EPYC the hand-offs cost more than the overlap gives (whole model at
    # batch 1, 2 threads, 21 interleaved rounds: branches 0.87x, branches + halves 0.66x the serial frozen
    # block's wall time; benchmarks/RESULTS.md, session 6). It wins only while other processes load the cores
    # (the one-thread teams no longer wait for a descheduled OpenMP thread).
    PARALLEL = False
    # with PARALLEL: the rest of the block (after the first convolution) as two halves of the map, one per thread,
    # on maps of at least SPLIT_MIN_ROWS rows (7: all of Mobile-Former-294M's blocks at 224²; smaller maps run
    # with the caller's intra-op threads)
    SPLIT_ROWS = True
    SPLIT_MIN_ROWS = 7
    # the downsampling blocks' depthwise convolutions with a channel multiplier (dw1: ×6, stride 2; dw2: ×4) as m
    # plain depthwise convolutions (`_MultiplierDepthwise`; ungrouped variants), except strided ones on fewer than
    # MULTIPLIER_MIN_CHANNELS_STRIDED input channels: 294M's first dw1 (16 → 96 at 112², stride 2) measured 1.4×
    # slower as six 16-channel convolutions that each read the whole input (1 thread, batch 16). Those split only
    # where the native kernel takes them in one call (`_MultiplierDepthwise.taps`).
    SPLIT_MULTIPLIER = True
    MULTIPLIER_MIN_CHANNELS_STRIDED = 24
    # Former→Mobile as two batched products with block-diagonal keys and values (`_former_to_mobile_products`) on
    # maps of at least this many pixels over the batch; SDPA below
    F2M_BLOCK_DIAGONAL = True
    F2M_BLOCK_DIAGONAL_MIN_PIXELS = 128

    def __init__(self, blk: MobileFormerBlock, batch_hint: int | None):
        super().__init__()
        m2f, mob, f2m = blk.mobile_former, blk.mobile, blk.former_mobile
        if m2f.alpha is None:
            raise ValueError("the frozen Mobile-Former block expects a dynamic (gated) Mobile→Former bridge")
        self.downsample, self.identity = blk.downsample, blk.identity
        self.m2f_heads, self.m2f_scale, self.m2f_channels = m2f.num_heads, m2f.scale, m2f.q.out_features
        # the merged token products as plain weights through MKL: a few token rows against a small weight, where
        # MKL's fixed cost per call is below oneDNN's (see OneDNNLinear's tiny-product route)
        self.m2f_qa_w, self.m2f_qa_b = _stacked_weights(m2f.q, m2f.alpha, scales=(1.0, 1.0 / 3.0))
        self.m2f_proj, self.m2f_norm = m2f.proj, m2f.norm
        self.former = blk.former
        self.mobile = mob
        self.reduced = mob.act1.fc1.out_features
        self.slope_fc1_w, self.slope_fc1_b = _stacked_weights(mob.act1.fc1, mob.act2.fc1)
        self.f2m_heads, self.f2m_scale, self.f2m_channels = f2m.num_heads, f2m.scale, f2m.k.out_features
        self.f2m_kv_w, self.f2m_kv_b = _stacked_weights(f2m.k, f2m.v)
        first = mob.dw1[0] if self.downsample else mob.pw1[0]
        self.first_geometry = (first.kernel_size, first.padding, first.stride, first.dilation)
        if self.downsample and mob.groups == 1 and self.SPLIT_MULTIPLIER:
            # the block's own module tree (optimize_for_cpu_inference's copy): permuted in place
            _split_multiplier(mob, "dw1", [(mob.act1.fc2.weight, 0), (mob.act1.fc2.bias, 0), (mob.pw1[0].weight, 1)],
                              batch_hint, native_only=(mob.dw1[0].stride != (1, 1)
                                                       and mob.in_chs < self.MULTIPLIER_MIN_CHANNELS_STRIDED))
            _split_multiplier(mob, "dw2", [(mob.act2.fc2.weight, 0), (mob.act2.fc2.bias, 0),
                                           (mob.pw2[0].weight, 1)], batch_hint)
        # the whole token side as one native call (after the permutations above, which the slope MLPs' fc2 read)
        self.native_tokens = self._native_tokens(m2f, blk.former, mob, f2m) if self.NATIVE_TOKENS else None

    # the token side as one native call (`native.former_tokens`), one image per thread: ~25 operators of tens of µs
    # each on 6 tokens otherwise. Whole 294M, 2 threads, Zen 3, 9 interleaved rounds: 1.34× at batch 1, 1.54× at 2,
    # 1.23× at 8, 1.10× at 32 (benchmarks/RESULTS.md, session 16)
    NATIVE_TOKENS = True

    @torch.no_grad()
    def _native_tokens(self, m2f: MobileToFormer, former: Former, mob: nn.Module, f2m: FormerToMobile):
        """`native.former_tokens`' parameters (weights in strips of 16 outputs, K × 16 each, their outputs padded to a
        multiple of 16 with zeros, the attention scales folded into the queries, the slope MLPs' fc2 pre-scaled by
        1/3), sizes and eps; None where the kernels are not built or the sizes do not fit them."""
        D = former.q.in_features
        if not (native.load() and native.attention_supported()) or D % 16 or former.fc1.out_features % 16:
            return None

        def linear(*lins: nn.Linear, scales: tuple[float, ...] | None = None) -> list[torch.Tensor]:
            # the layers' outputs side by side (W: N × K), as N/16 strips of 16 outputs, each K × 16 contiguous, N
            # padded with zero rows; the bias padded alike
            w, b = _stacked_weights(*lins, scales=scales)
            k, pad = w.shape[1], (-w.shape[0]) % 16
            strips = F.pad(w, (0, 0, 0, pad)).view(-1, 16, k).transpose(1, 2).contiguous()
            return [strips, F.pad(b, (0, pad)).contiguous()]

        def norm(ln: nn.LayerNorm) -> list[torch.Tensor]:
            return [ln.weight.detach().float().contiguous(), ln.bias.detach().float().contiguous()]

        act1, act2 = mob.act1, mob.act2
        params = (linear(m2f.q, m2f.alpha, scales=(m2f.scale, 1.0 / 3.0)) + linear(m2f.proj) + norm(m2f.norm)
                  + linear(former.q, scales=(former.scale,)) + linear(former.proj) + norm(former.norm1)
                  + linear(former.fc1) + linear(former.fc2) + norm(former.norm2)
                  + linear(act1.fc1, act2.fc1) + linear(act1.fc2, scales=(1.0 / 3.0,))
                  + linear(act2.fc2, scales=(1.0 / 3.0,)) + linear(f2m.k, f2m.v))
        sizes = [m2f.num_heads, former.num_heads, act1.fc1.out_features, act1.fc2.out_features,
                 act2.fc2.out_features, 2 * f2m.k.out_features]
        return params, sizes, [m2f.norm.eps, former.norm1.eps, former.norm2.eps]

    def tokens(self, x: torch.Tensor, z: torch.Tensor):
        """(z after Mobile→Former and the Former, slopes u1 and u2 of the two dynamic ReLUs, Former→Mobile's k|v)."""
        if (self.native_tokens is not None and self.NATIVE_TOKENS and _native_call(x)
                and z.dtype == torch.float32 and z.is_contiguous()
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
            return native.former_tokens(x, z, *self.native_tokens)
        B, C, H, W = x.shape
        T, h = z.shape[1], self.m2f_heads
        qa = F.linear(z, self.m2f_qa_w, self.m2f_qa_b)
        q = qa[..., :C].reshape(B, T, h, -1).transpose(1, 2)
        kv = x.flatten(2).view(B, h, C // h, H * W).transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, kv, kv, scale=self.m2f_scale).transpose(1, 2).reshape(B, T, C)
        out.mul_((qa[..., C:] + 1.0).clamp_(0.0, 2.0))
        z = self.former(self.m2f_norm(self.m2f_proj(out).add_(z)))
        hid = F.linear(z[:, 0], self.slope_fc1_w, self.slope_fc1_b).relu_()
        u1 = self.mobile.act1.fc2(hid[:, :self.reduced])
        u2 = self.mobile.act2.fc2(hid[:, self.reduced:])
        return z, u1, u2, F.linear(z, self.f2m_kv_w, self.f2m_kv_b)

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        return self.mobile.dw1(x) if self.downsample else self.mobile.pw1(x)

    def _mobile_rest(self, y: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        mob = self.mobile
        if self.downsample:   # MobileDown.forward after dw1
            shuffle = mob.groups > 1
            y = mob.pw1(mob.act1.apply_slopes(channel_shuffle(y, mob.in_chs) if shuffle else y, u1))
            t = mob.dw2(y)
            t = mob.pw2(mob.act2.apply_slopes(channel_shuffle(t, mob.out_chs) if shuffle else t, u2))
            return t.add_(y)
        y = mob.act1.apply_slopes(channel_shuffle(y, mob.groups), u1)   # Mobile.forward after pw1
        y = mob.act2.apply_slopes(mob.dw(y), u2)
        return channel_shuffle(mob.pw2(y), mob.groups)

    def _former_to_mobile(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        T, h = kv.shape[1], self.f2m_heads
        if self.F2M_BLOCK_DIAGONAL and B * H * W >= self.F2M_BLOCK_DIAGONAL_MIN_PIXELS:
            return self._former_to_mobile_products(x, kv)
        q = x.permute(0, 2, 3, 1).reshape(B, H * W, h, C // h).transpose(1, 2)
        k = kv[..., :C].reshape(B, T, h, -1).transpose(1, 2)
        v = kv[..., C:].reshape(B, T, h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.f2m_scale)
        # a fresh channels-last B×C×H×W copy: the residual goes into it
        return out.permute(0, 2, 1, 3).reshape(B, H, W, C).permute(0, 3, 1, 2).add_(x)

    def _former_to_mobile_products(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x + Former→Mobile(x) as two batched products over all heads at once, the residual accumulated by the second.

        Keys and values as block-diagonal h·T × C matrices (head i's T rows read only its c = C/h channels, zero
        elsewhere: h× the multiply-adds of the per-head products, which are tiny), so that the scores are one
        product with the pixels as they lie in the channels-last map: S = K'·Xᵀ (h·T × HW, pixels contiguous), a
        softmax over each head's T rows (an inner axis: vectorised over the pixels, where SDPA's kernel and a softmax
        over a last axis of 6 are not), and out = X + Sᵀ·V' (`baddbmm`) written straight as the channels-last map.
        Measured (1 thread) 3.5× SDPA + residual at 56²×24 and batch 16, 1.6× at 7²×192; at batch 1 3.3× at 56²,
        slower below ~128 pixels (F2M_BLOCK_DIAGONAL_MIN_PIXELS)."""
        B, C, H, W = x.shape
        T, h = kv.shape[1], self.f2m_heads
        c = C // h
        keys, values = x.new_zeros(B, h * T, C), x.new_zeros(B, h * T, C)
        # the diagonal blocks [i·T:(i+1)·T, i·c:(i+1)·c] of B × h × T × h × c views, as B × T × c × h
        torch.mul(kv[..., :C].view(B, T, h, c).permute(0, 1, 3, 2), self.f2m_scale,
                  out=keys.view(B, h, T, h, c).diagonal(0, 1, 3))
        values.view(B, h, T, h, c).diagonal(0, 1, 3).copy_(kv[..., C:].view(B, T, h, c).permute(0, 1, 3, 2))
        pixels = x.permute(0, 2, 3, 1).reshape(B, H * W, C)   # a view of the channels-last map
        scores = torch.bmm(keys, pixels.transpose(1, 2)).view(B, h, T, H * W)
        probs = torch.softmax(scores, dim=2).view(B, h * T, H * W)
        return torch.baddbmm(pixels, probs.transpose(1, 2), values).view(B, H, W, C).permute(0, 3, 1, 2)

    def _first_size(self, x: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the first convolution's output."""
        if not self.downsample:
            return x.shape[2], x.shape[3]   # pw1: 1×1, stride 1
        return _conv_output_size(x.shape[2:], *self.first_geometry)

    def _can_split_rows(self, rows: int) -> bool:
        # ungrouped pointwise convolutions (no channel shuffle) and a stride-1 depthwise after the first
        # convolution, on a map tall enough that the halo row is a small share of each half
        mob = self.mobile
        return (self.SPLIT_ROWS and rows >= self.SPLIT_MIN_ROWS and mob.groups == 1
                and (self.downsample or tuple(mob.dw[0].stride) == (1, 1)))

    def _rest_rows(self, y: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, kv: torch.Tensor, x: torch.Tensor,
                   rows: tuple[int, int], barrier: threading.Barrier, out: torch.Tensor) -> None:
        """The block after the first convolution, for output rows [r0, r1) only, written into out[:, :, r0:r1].

        Every step is per pixel (pointwise products, dynamic ReLU, Former→Mobile's pixel queries, residuals)
        except the 3×3 stride-1 depthwise convolution, which reads one row above and below: it runs on the
        rows r0 − 1 … r1 (zero padding at a slab edge only spoils the halo row's own output, which is cut
        off). The first dynamic ReLU works in place in y, so each thread applies it to its own rows and waits
        for the other (`barrier`) before reading the halo row."""
        mob, (r0, r1), H = self.mobile, rows, y.shape[2]
        mob.act1.apply_slopes(y[:, :, r0:r1], u1)
        barrier.wait()
        a0, a1 = max(r0 - 1, 0), min(r1 + 1, H)
        if self.downsample:   # MobileDown.forward after dw1, on a slab with the halo rows
            x1 = mob.pw1(y[:, :, a0:a1])
            t = mob.pw2(mob.act2.apply_slopes(mob.dw2(x1)[:, :, r0 - a0:r1 - a0], u2)).add_(x1[:, :, r0 - a0:r1 - a0])
        else:                 # Mobile.forward after act1
            t = mob.pw2(mob.act2.apply_slopes(mob.dw(y[:, :, a0:a1])[:, :, r0 - a0:r1 - a0], u2))
            if self.identity:
                t = t.add_(x[:, :, r0:r1])
        dst = out[:, :, r0:r1]
        # Former→Mobile on these pixels, the residual added straight into the output rows
        B, C, h, W = t.shape
        heads = self.f2m_heads
        T = kv.shape[1]
        q = _heads_view(t, heads)
        k = kv[..., :C].reshape(B, T, heads, -1).transpose(1, 2)
        v = kv[..., C:].reshape(B, T, heads, -1).transpose(1, 2)
        torch.add(F.scaled_dot_product_attention(q, k, v, scale=self.f2m_scale), q, out=_heads_view(dst, heads))
        if self.downsample and self.identity:
            dst.add_(x[:, :, r0:r1])

    def _forward_two_threads(self, x: torch.Tensor, z: torch.Tensor, threads: int):
        """One image on two threads, one intra-op thread each, one hand-off: the second thread runs the token side,
        then (maps of at least SPLIT_MIN_ROWS rows) the lower half of the rest; this thread the first convolution,
        then the upper half. Returns (out, z) when the halves ran, else (None, z, u1, u2, kv, y) for the caller
        to finish the block with its own threads."""
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        H, W = self._first_size(x)
        split = self._can_split_rows(H)
        half = (H + 1) // 2
        shared: dict = {}
        tokens_ready, y_ready = threading.Event(), threading.Event()
        barrier = threading.Barrier(2)
        out = torch.empty(1, self.f2m_channels, H, W).contiguous(memory_format=torch.channels_last) if split else None

        def side():
            torch.set_num_threads(1)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                try:
                    shared["tokens"] = self.tokens(x, z)
                finally:
                    tokens_ready.set()
                if split:
                    y_ready.wait()
                    if "y" not in shared:
                        barrier.abort()
                        return
                    try:
                        _, u1, u2, kv = shared["tokens"]
                        self._rest_rows(shared["y"], u1, u2, kv, x, (half, H), barrier, out)
                    except BaseException:
                        barrier.abort()   # the other thread must not wait for this one forever
                        raise

        future = _beside().submit(side)
        torch.set_num_threads(1)
        try:
            try:
                y = shared["y"] = self._first(x)
            finally:
                y_ready.set()
            tokens_ready.wait()
            if "tokens" not in shared:
                future.result()   # raises the second thread's error
            z, u1, u2, kv = shared["tokens"]
            if not split:
                future.result()
                return None, z, u1, u2, kv, y
            try:
                self._rest_rows(y, u1, u2, kv, x, (0, half), barrier, out)
            except threading.BrokenBarrierError:
                future.result()   # the other thread failed first: raise its error
                raise
            future.result()
            return out, z
        except BaseException:
            # the other thread must not wait at the barrier forever, and must have finished before this one
            # returns: its torch.set_num_threads(1) also sets the process-wide default that a thread reads at its
            # first parallel op, so a second thread still starting up after an error here could leave a later
            # caller with one thread (seen as a flaky thread-count check)
            barrier.abort()
            wait([future])
            raise
        finally:
            torch.set_num_threads(threads)

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, z = state
        threads = torch.get_num_threads()
        if self.PARALLEL and x.shape[0] == 1 and threads > 1:
            result = self._forward_two_threads(x, z, threads)
            if result[0] is not None:
                return result
            z, u1, u2, kv, y = result[1:]
        else:
            z, u1, u2, kv = self.tokens(x, z)
            y = self._first(x)
        out = self._mobile_rest(y, u1, u2)
        # the two official block types place the block residual on either side of Former→Mobile
        if self.downsample:
            out = self._former_to_mobile(out, kv)
            if self.identity:
                out = out.add_(x)
        else:
            if self.identity:
                out = out.add_(x)
            out = self._former_to_mobile(out, kv)
        return out, z


class MobileFormer(nn.Module):
    """Mobile-Former: a MobileNet branch and a few-token transformer in parallel, bridged both ways.

    blocks: rows (type, e1, out_chs, stride, e2) with type "lite" (the first block), "down"
    (dw→pw→dw→pw, official `DnaBlock3`) or "mobile" (pw→dw→pw, official `DnaBlock`).
    `forward_features` returns the pair (local map, tokens) that the head merges.
    """

    # `hybridzoo train` on the fast CPU path takes channels-last unless told otherwise: a Mobile-Former-294M step
    # 1.15x (batch 16, 224²; benchmarks/RESULTS.md, session 36)
    train_channels_last = True

    def __init__(self, *, blocks: tuple, stem_chs: int, num_tokens: int, token_dim: int, num_features: int,
                 groups: int = 1, head_expand: int = 6, bridge_heads: int = 2, former_heads: int = 4,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = num_features
        self.token_dim = token_dim
        self.grad_checkpointing = False

        self.tokens = nn.Parameter(torch.empty(num_tokens, token_dim))
        self.stem = ConvBnAct(in_chans, stem_chs, 3, 2, act_layer=nn.ReLU6)

        layers, chs, reduction = [], stem_chs, 2
        stage_ends = {2: (-1, stem_chs)}          # reduction → (index of the last block there, channels)
        for i, (kind, e1, out_chs, stride, e2) in enumerate(blocks):
            dpr = drop_path_rate * (i + 1) / len(blocks)
            if kind == "lite":
                layers.append(LiteBottleneck(chs, out_chs, stride, e1, groups))
            else:
                layers.append(MobileFormerBlock(chs, out_chs, stride, (e1, e2), kind == "down", token_dim,
                                                groups, bridge_heads, former_heads, dpr))
            chs, reduction = out_chs, reduction * stride
            stage_ends[reduction] = (i, out_chs)
        self.blocks = nn.ModuleList(layers)
        self._feature_blocks = [stage_ends[r][0] for r in sorted(stage_ends)]
        self.feature_info = [dict(num_chs=stage_ends[r][1], reduction=r) for r in sorted(stage_ends)]

        self.bridge = MobileToFormer(chs, token_dim, bridge_heads, dynamic=True, drop_path=drop_path_rate)
        self.head_groups = groups
        self.conv_head = ConvBnAct(chs, chs * head_expand, 1, groups=groups, act_layer=nn.ReLU6)
        self.pre_logits = nn.Sequential(nn.Linear(chs * head_expand + token_dim, num_features),
                                        nn.BatchNorm1d(num_features), nn.Hardswish())
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # official init: conv N(0, √(2/(k²·out))) without dividing by groups, Linear N(0, 0.01),
        # the tokens N(0, 1) (nn.Embedding's default), norms at identity
        nn.init.normal_(self.tokens, 0.0, 1.0)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- contract -------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def prune_for_features(self) -> None:
        """For `features_only`: drop the last bridge and the head, which the feature maps never reach."""
        self.bridge = self.conv_head = self.pre_logits = self.head = None

    def _check(self, x: torch.Tensor) -> None:
        check_image_input(x, self, self.in_chans, min_size=32)

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a copy, not a view: a view of a parameter made under no_grad confuses autograd hooks
        z = self.tokens.unsqueeze(0).repeat(x.shape[0], 1, 1)
        return self.stem(x), z

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        x, z = checkpoint_seq(self.blocks, self._stem(x), enabled=self.grad_checkpointing)
        return x, self.bridge(x, z)

    def forward_head(self, feats: tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        x, z = feats
        x = self.conv_head(channel_shuffle(x, self.head_groups))
        x = F.hardswish(x.mean((2, 3)))
        # the head sees the pooled local features next to the first global token
        x = self.pre_logits(torch.cat([x, z[:, 0]], dim=1))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The Mobile branch's maps at strides 2, 4, 8, 16, 32 (the last block at each stride)."""
        self._check(x)
        state = self._stem(x)
        feats = [state[0]] if self._feature_blocks[0] == -1 else []
        for i, blk in enumerate(self.blocks):
            state = checkpoint_seq([blk], state, enabled=self.grad_checkpointing)
            if i in self._feature_blocks:
                feats.append(state[0])
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- official checkpoint conversion ---------------------------------------------------------------

_BRIDGE_M2F = {"q": "q", "alpha.0": "alpha", "proj": "proj", "layer_norm": "norm"}
_FORMER = {"q": "q", "channel_mlp": "proj", "layer_norm": "norm1", "ffn.0": "fc1", "ffn.2": "fc2",
           "ffn_norm": "norm2"}
_BRIDGE_F2M = {"k": "k", "proj": "v"}
_DOWN = {"conv1": "dw1", "conv2": "pw1", "conv3": "dw2", "conv4": "pw2", "hyper1": "act1", "hyper3": "act2"}
_MOBILE = {"conv1": "pw1", "conv2": "dw", "conv3": "pw2", "hyper1": "act1", "hyper2": "act2"}
_HEAD = {"classifier.conv.1.": "conv_head.0.", "classifier.conv.2.": "conv_head.1.",
         "classifier.fc.0.": "pre_logits.0.", "classifier.fc.1.": "pre_logits.1.",
         "classifier.classifier.1.": "head.", "local_global.": "bridge."}


def _sub(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def _convert_block_key(blk: nn.Module, rest: str) -> str | None:
    if isinstance(blk, LiteBottleneck):
        if not rest.startswith("conv."):
            return None
        idx, _, tail = rest[len("conv."):].partition(".")
        sub = {"0": "dw.0", "1": "dw.1", "4": "pw.0", "5": "pw.1"}.get(idx)
        return sub and f"{sub}.{tail}"
    part, _, tail = rest.partition(".")
    for name, ours, table in (("local_global", "mobile_former", _BRIDGE_M2F), ("global_block", "former", _FORMER),
                              ("global_local", "former_mobile", _BRIDGE_F2M)):
        if part == name:
            sub = _sub(tail, table)
            return sub and f"{ours}.{sub}"
    sub = _sub(rest, _DOWN if blk.downsample else _MOBILE)
    # the dynamic-ReLU hyper-networks: official `hyperN.hyper.0/2` → our `actN.fc1/fc2`
    return sub and "mobile." + sub.replace(".hyper.0.", ".fc1.").replace(".hyper.2.", ".fc2.")


def convert_official(state_dict: dict[str, torch.Tensor], model: MobileFormer) -> dict[str, torch.Tensor]:
    """Map an AAboys/MobileFormer checkpoint (timm 0.3 layout: `features.N.conv1.0.weight`, ...) to ours."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        if key == "tokens.weight":
            new = "tokens"
        elif key.startswith("stem."):
            new = key
        elif key.startswith("features."):
            _, idx, rest = key.split(".", 2)
            if int(idx) < len(model.blocks):
                sub = _convert_block_key(model.blocks[int(idx)], rest)
                new = sub and f"blocks.{idx}.{sub}"
        else:
            for old, repl in _HEAD.items():
                if key.startswith(old):
                    rest = key[len(old):]
                    new = repl + (_sub(rest, _BRIDGE_M2F) or rest) if old == "local_global." else repl + rest
                    break
        out[new or key] = value
    return out


# -- variants ---------------------------------------------------------------------------------------
# rows: (type, e1, out_chs, stride, e2) as in the official tables; "lite" is the first block, "down" the
# official DnaBlock3 (dw→pw→dw→pw), "mobile" the official DnaBlock (pw→dw→pw, which ignores e2)

_MF_CARD = dict(paper="Mobile-Former", arxiv="2108.05895", task="classification", flops_rtol=0.01,
                test_input_size=(3, 64, 64))


def _test_kwargs(groups: int = 1) -> dict:
    blocks = (("lite", 2, 8, 1, 0), ("down", 3, 16, 2, 2), ("mobile", 2, 16, 1, 2), ("down", 3, 24, 2, 2),
              ("mobile", 2, 32, 1, 2))
    return dict(blocks=blocks, stem_chs=8, num_tokens=3, token_dim=32, num_features=64, groups=groups)


def _build(cfg: dict, kwargs: dict) -> MobileFormer:
    return MobileFormer(**{**cfg, **kwargs})


_MF_9_BLOCKS = (("lite", 3, 12, 2, 0), ("mobile", 3, 12, 1, 3), ("down", 6, 24, 2, 4), ("mobile", 3, 24, 1, 3),
                ("down", 6, 48, 2, 4), ("mobile", 4, 48, 1, 4), ("mobile", 6, 64, 1, 4), ("down", 6, 96, 2, 4),
                ("mobile", 6, 96, 1, 4))


@register_model(**_MF_CARD, reported=dict(params_m=14.0, gflops=0.508, top1=79.3, resolution=224),
                params=13_976_976, macs_g=0.4985, test_kwargs=_test_kwargs())
def mobile_former_508m(**kwargs):
    blocks = (("lite", 2, 24, 1, 0), ("down", 6, 40, 2, 4), ("mobile", 3, 40, 1, 3), ("down", 6, 72, 2, 4),
              ("mobile", 3, 72, 1, 3), ("down", 6, 128, 2, 4), ("mobile", 4, 128, 1, 4), ("mobile", 6, 176, 1, 4),
              ("mobile", 6, 176, 1, 4), ("down", 6, 240, 2, 4), ("mobile", 6, 240, 1, 4), ("mobile", 6, 240, 1, 4))
    return _build(dict(blocks=blocks, stem_chs=24, num_tokens=6, token_dim=192, num_features=1920), kwargs)


@register_model(**_MF_CARD, reported=dict(params_m=11.4, gflops=0.294, top1=77.9, resolution=224),
                params=11_422_648, macs_g=0.2867, test_kwargs=_test_kwargs())
def mobile_former_294m(**kwargs):
    blocks = (("lite", 2, 16, 1, 0), ("down", 6, 24, 2, 4), ("mobile", 4, 24, 1, 4), ("down", 6, 48, 2, 4),
              ("mobile", 4, 48, 1, 4), ("down", 6, 96, 2, 4), ("mobile", 4, 96, 1, 4), ("mobile", 6, 128, 1, 4),
              ("mobile", 6, 128, 1, 4), ("down", 6, 192, 2, 4), ("mobile", 6, 192, 1, 4), ("mobile", 6, 192, 1, 4))
    return _build(dict(blocks=blocks, stem_chs=16, num_tokens=6, token_dim=192, num_features=1920), kwargs)


@register_model(**_MF_CARD, reported=dict(params_m=9.4, gflops=0.214, top1=76.7, resolution=224),
                params=9_425_920, macs_g=0.2084, test_kwargs=_test_kwargs())
def mobile_former_214m(**kwargs):
    blocks = (("lite", 2, 12, 1, 0), ("down", 6, 20, 2, 4), ("mobile", 3, 20, 1, 4), ("down", 6, 40, 2, 4),
              ("mobile", 4, 40, 1, 4), ("down", 6, 80, 2, 4), ("mobile", 4, 80, 1, 4), ("mobile", 6, 112, 1, 4),
              ("mobile", 6, 112, 1, 4), ("down", 6, 160, 2, 4), ("mobile", 6, 160, 1, 4), ("mobile", 6, 160, 1, 4))
    return _build(dict(blocks=blocks, stem_chs=12, num_tokens=6, token_dim=192, num_features=1600), kwargs)


@register_model(**_MF_CARD, reported=dict(params_m=7.6, gflops=0.151, top1=75.2, resolution=224),
                params=7_595_828, macs_g=0.1462, test_kwargs=_test_kwargs())
def mobile_former_151m(**kwargs):
    blocks = (("lite", 2, 12, 1, 0), ("down", 6, 16, 2, 4), ("mobile", 3, 16, 1, 3), ("down", 6, 32, 2, 4),
              ("mobile", 3, 32, 1, 3), ("down", 6, 64, 2, 4), ("mobile", 4, 64, 1, 4), ("mobile", 6, 88, 1, 4),
              ("mobile", 6, 88, 1, 4), ("down", 6, 128, 2, 4), ("mobile", 6, 128, 1, 4), ("mobile", 6, 128, 1, 4))
    return _build(dict(blocks=blocks, stem_chs=12, num_tokens=6, token_dim=192, num_features=1280), kwargs)


@register_model(**_MF_CARD, reported=dict(params_m=4.6, gflops=0.096, top1=72.8, resolution=224),
                params=4_585_252, macs_g=0.0920, test_kwargs=_test_kwargs())
def mobile_former_96m(**kwargs):
    blocks = (("lite", 2, 12, 1, 0), ("down", 6, 16, 2, 4), ("down", 6, 32, 2, 4), ("mobile", 3, 32, 1, 3),
              ("down", 6, 64, 2, 4), ("mobile", 4, 64, 1, 4), ("mobile", 6, 88, 1, 4), ("down", 6, 128, 2, 4),
              ("mobile", 6, 128, 1, 4))
    return _build(dict(blocks=blocks, stem_chs=12, num_tokens=4, token_dim=128, num_features=1280), kwargs)


@register_model(**_MF_CARD, reported=dict(params_m=3.5, gflops=0.052, top1=68.7, resolution=224),
                params=3_469_092, macs_g=0.0493, test_kwargs=_test_kwargs())
def mobile_former_52m(**kwargs):
    return _build(dict(blocks=_MF_9_BLOCKS, stem_chs=8, num_tokens=3, token_dim=128, num_features=1024), kwargs)


@register_model(**_MF_CARD, reported=dict(params_m=3.2, gflops=0.026, top1=64.0, resolution=224),
                params=3_232_788, macs_g=0.0236, test_kwargs=_test_kwargs(groups=4),
                notes="grouped (4) pointwise convolutions with channel shuffle")
def mobile_former_26m(**kwargs):
    return _build(dict(blocks=_MF_9_BLOCKS, stem_chs=8, num_tokens=3, token_dim=128, num_features=1024, groups=4),
                  kwargs)
