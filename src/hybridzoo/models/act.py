"""ACT: Rich CNN-Transformer Feature Aggregation Networks for Super-Resolution — Yoo et al., WACV 2023,
arXiv 2203.07682.

What is hybrid: a CNN branch (RCAN residual groups of channel-attention blocks) and a transformer
branch (3×3-pixel tokens, multi-head self-attention, then cross-scale token attention between small
tokens and overlapping 6×6 tokens) run in parallel on the same shallow features; after every stage a
fusion block concatenates both, mixes them with 1×1 convolutions and hands each branch the other's
channels. Official code: jinsuyoo/act `src/models/act_net.py`, `src/models/common.py`, defaults in
`configs/option.py`.

Deviations from the official code:
- Inputs whose sides are not multiples of the token size (3) or are smaller than a large token (6)
  are reflect-padded and the output is cropped back; the official code silently zeroes the
  remainder rows/columns in the transformer branch. For multiples of 3 the two are identical.
- Inputs are RGB in [0, 255] exactly as the official model (``rgb_range=255``); the mean shift
  adds/subtracts ``rgb_range · (0.4488, 0.4371, 0.4040)``.
- The official code builds a trailing 3×3 conv after the four residual groups of its CNN branch
  (``cnn_branch.4``, 36,928 parameters) and never calls it. We keep it, as ``unused_conv``, so that
  released checkpoints load strictly and the parameter count matches (46,177,435 for ×4); it is
  listed in the model card's ``unused_params``. The two mean shifts are frozen 1×1 convs (24
  parameters, ``requires_grad=False``) as in the official code, included in the count.
- Parameter names are ours (paper terms, timm-style ``qkv``/``proj``/``fc1``/``fc2``); the official
  layout is mapped by `convert_official`.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridzoo.layers.attention import Attention
from hybridzoo.layers.helpers import check_image_input
from hybridzoo.layers.mlp import Mlp
from hybridzoo.registry import register_model

__all__ = ["ACT", "convert_official"]

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, inherited from EDSR


def _conv(in_chs: int, out_chs: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=bias)


# ---------------------------------------------------------------------------------------------
# Tokenisation: non-overlapping k×k tokens are a reshape (the same (C, kh, kw) order as F.unfold,
# which the linear layers' weights depend on); overlapping 2k×2k tokens go through unfold/fold.
# ---------------------------------------------------------------------------------------------

def image_to_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """B×C×H×W → B×(H/k·W/k)×(C·k·k), identical to ``F.unfold(x, k, stride=k).transpose(1, 2)``."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // k, k, W // k, k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // k) * (W // k), C * k * k)


def tokens_to_image(t: torch.Tensor, size: tuple[int, int], k: int) -> torch.Tensor:
    """Inverse of `image_to_tokens` (``F.fold`` with stride = kernel, no overlap)."""
    B, _, D = t.shape
    H, W = size
    C = D // (k * k)
    t = t.reshape(B, H // k, W // k, C, k, k).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(B, C, H, W)


# ---------------------------------------------------------------------------------------------
# CNN branch (RCAN) and convolutional blocks
# ---------------------------------------------------------------------------------------------

class MeanShift(nn.Conv2d):
    """Frozen 1×1 conv adding (sign=+1) or subtracting (sign=-1) the dataset mean, EDSR-style."""

    def __init__(self, rgb_range: float, sign: int):
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(RGB_MEAN))
        self.requires_grad_(False)


class ResBlock(nn.Module):
    """conv → ReLU → conv + identity (EDSR); ACT's head uses 5×5 kernels."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv1 = _conv(dim, dim, kernel_size)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = _conv(dim, dim, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class ChannelAttention(nn.Module):
    """RCAN's CA layer: global average pool → 1×1 squeeze → ReLU → 1×1 excite → sigmoid gate."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, dim // reduction, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(dim // reduction, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(w))))


class RCAB(nn.Module):
    """Residual channel-attention block: conv3×3 → ReLU → conv3×3 → CA, plus identity."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        self.conv1 = _conv(dim, dim, 3)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = _conv(dim, dim, 3)
        self.ca = ChannelAttention(dim, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ca(self.conv2(self.act(self.conv1(x))))


class ResidualGroup(nn.Module):
    """`n_resblocks` RCABs and a 3×3 conv, with a group-level skip (one stage of the CNN branch)."""

    def __init__(self, dim: int, reduction: int, n_resblocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*[RCAB(dim, reduction) for _ in range(n_resblocks)])
        self.conv = _conv(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.blocks(x))


class FB(nn.Module):
    """Fusion block unit: 1×1 conv → ReLU → 1×1 conv (no biases) plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class FusionCNN(nn.Module):
    """conv3×3 → ReLU → conv3×3 applied to the channels the fusion block hands to the CNN branch."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = _conv(dim, dim, 3)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = _conv(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class NormMlp(nn.Module):
    """LayerNorm → Linear → GELU → Linear (used on large tokens in CSTA and after fusion)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


# ---------------------------------------------------------------------------------------------
# Transformer branch
# ---------------------------------------------------------------------------------------------

class MHSABlock(nn.Module):
    """Pre-norm transformer block over the 3×3 tokens. No position embedding (as the paper)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values from another, each LayerNorm'd separately."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, inner * 2, bias=False)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        B, N, _ = x_q.shape
        M = x_kv.shape[1]
        q = self.q(self.norm_q(x_q)).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(self.norm_kv(x_kv)).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class CSTABlock(nn.Module):
    """Cross-scale token attention.

    The token channels are split in half: `a` keeps the 3×3 tokens; `b` is folded back to an image
    and re-cut into overlapping 6×6 tokens at stride 3 (4× the pixels, embedded back to half width).
    Each half attends to the other (both from the pre-update copies), the large tokens are projected
    back to 6×6 pixels and folded — overlapping pixels are *summed*, as in the official code — and
    cut into 3×3 tokens again. A pre-norm FFN over the concatenation follows.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, token_size: int):
        super().__init__()
        self.token_size = token_size
        half = dim // 2
        head_dim = dim // num_heads
        self.large_embed = NormMlp(dim * 2, half, half)    # (C/2)·6·6 = 2·dim → dim/2
        self.attn_small = CrossAttention(half, num_heads // 2, head_dim)
        self.attn_large = CrossAttention(half, num_heads // 2, head_dim)
        self.large_unembed = NormMlp(half, half, dim * 2)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        k = self.token_size
        a, b = x.chunk(2, dim=-1)
        b = F.unfold(tokens_to_image(b, size, k), 2 * k, stride=k).transpose(1, 2)
        b = self.large_embed(b)
        a, b = a + self.attn_small(a, b), b + self.attn_large(b, a)
        b = F.fold(self.large_unembed(b).transpose(1, 2), size, 2 * k, stride=k)
        x = torch.cat((a, image_to_tokens(b, k)), dim=-1)
        return x + self.mlp(self.norm(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class ACT(nn.Module):
    """Aggregation of CNN and Transformer features for single-image super-resolution.

    Input: RGB images in [0, rgb_range] (B×3×H×W, any H, W ≥ 1); output B×3×(s·H)×(s·W) in the same range.
    """

    # `hybridzoo train` on the fast CPU path takes channels-last unless told otherwise, where its 3×3 convolutions
    # train by Winograd's tiles: ACT ×2 1.22x a step at 8 × 48², ACT-tiny ×2 level at 16 × 24² (beside the batch
    # split; benchmarks/RESULTS.md, session 38)
    train_channels_last = True

    def __init__(self, *, upscale: int = 4, in_chans: int = 3, n_feats: int = 64, num_stages: int = 4,
                 n_resblocks: int = 12, reduction: int = 16, token_size: int = 3, num_heads: int = 8,
                 mlp_ratio: int = 4, rgb_range: float = 255.0):
        super().__init__()
        if upscale not in (2, 3, 4, 8):
            raise ValueError(f"ACT supports upscale factors 2, 3, 4 and 8, got {upscale}")
        dim = n_feats * token_size ** 2
        if n_feats % 2 or dim % num_heads or num_heads % 2:
            raise ValueError(f"ACT needs an even n_feats ({n_feats}) and an even num_heads ({num_heads}) "
                             f"that divides the token dim {dim}")
        if n_feats // reduction < 1:
            raise ValueError(f"ACT: channel-attention reduction {reduction} leaves no channels of n_feats={n_feats}")
        self.upscale = upscale
        self.in_chans = in_chans
        self.n_feats = n_feats
        self.token_size = token_size
        self.num_stages = num_stages
        self.rgb_range = rgb_range
        self.grad_checkpointing = False

        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head = nn.Sequential(_conv(in_chans, n_feats, 3), ResBlock(n_feats, 5), ResBlock(n_feats, 5))

        # transformer branch
        self.linear_encoding = nn.Linear(dim, dim)
        self.mhsa_blocks = nn.ModuleList([MHSABlock(dim, num_heads, mlp_ratio) for _ in range(num_stages)])
        self.csta_blocks = nn.ModuleList([CSTABlock(dim, num_heads, mlp_ratio, token_size) for _ in range(num_stages)])

        # CNN branch
        self.cnn_branch = nn.ModuleList([ResidualGroup(n_feats, reduction, n_resblocks) for _ in range(num_stages)])
        self.unused_conv = _conv(n_feats, n_feats, 3)  # built, never called by the official code (see docstring)

        # fusion: after every stage; the hand-back MLP / convs after all but the last
        self.fusion_blocks = nn.ModuleList([nn.Sequential(*[FB(2 * n_feats) for _ in range(4)])
                                            for _ in range(num_stages)])
        self.fusion_mlps = nn.ModuleList([NormMlp(dim, dim * mlp_ratio, dim) for _ in range(num_stages - 1)])
        self.fusion_cnns = nn.ModuleList([FusionCNN(n_feats) for _ in range(num_stages - 1)])

        self.conv_last = _conv(2 * n_feats, n_feats, 3)
        up: list[nn.Module] = []
        if upscale == 3:
            up += [_conv(n_feats, 9 * n_feats, 3), nn.PixelShuffle(3)]
        else:
            for _ in range(upscale.bit_length() - 1):
                up += [_conv(n_feats, 4 * n_feats, 3), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*up)
        self.conv_out = _conv(n_feats, in_chans, 3)
        self.add_mean = MeanShift(rgb_range, sign=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        k = self.token_size
        H, W = x.shape[-2:]
        ph = max(-H % k, 2 * k - H)
        pw = max(-W % k, 2 * k - W)
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < H and pw < W else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def _stage(self, i: int, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        k = self.token_size
        t = self.mhsa_blocks[i](t)
        t = self.csta_blocks[i](t, size)
        x = self.cnn_branch[i](x)
        f = torch.cat((x, tokens_to_image(t, size, k)), dim=1)
        f = f + self.fusion_blocks[i](f)
        if i == self.num_stages - 1:
            return f, t
        # the fused channels from the CNN slot go to the transformer branch and vice versa (official order)
        f_t, f_c = f.split(self.n_feats, dim=1)
        t = t + self.fusion_mlps[i](image_to_tokens(f_t, k))
        x = x + self.fusion_cnns[i](f_c)
        return x, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self, self.in_chans)
        H, W = x.shape[-2:]
        x = self._pad(x)
        x = self.head(self.sub_mean(x))
        identity = x
        t = image_to_tokens(x, self.token_size)
        t = t + self.linear_encoding(t)
        for i in range(self.num_stages):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, t = checkpoint(self._stage, i, x, t, use_reentrant=False)
            else:
                x, t = self._stage(i, x, t)
        x = self.conv_last(x) + identity  # x is the last stage's fused map f
        x = self.add_mean(self.conv_out(self.upsample(x)))
        s = self.upscale
        return x[..., : H * s, : W * s]


# ---------------------------------------------------------------------------------------------
# Official checkpoint conversion
# ---------------------------------------------------------------------------------------------

# (official pattern, our replacement); applied in order to every key of jinsuyoo/act's `ACT` state dict
_OFFICIAL_RULES = [
    (r"^head\.(\d)\.body\.0\.", r"head.\1.conv1."),
    (r"^head\.(\d)\.body\.2\.", r"head.\1.conv2."),
    (r"^mhsa_block\.(\d+)\.0\.norm\.", r"mhsa_blocks.\1.norm1."),
    (r"^mhsa_block\.(\d+)\.0\.fn\.to_qkv\.", r"mhsa_blocks.\1.attn.qkv."),
    (r"^mhsa_block\.(\d+)\.0\.fn\.to_out\.0\.", r"mhsa_blocks.\1.attn.proj."),
    (r"^mhsa_block\.(\d+)\.1\.norm\.", r"mhsa_blocks.\1.norm2."),
    (r"^mhsa_block\.(\d+)\.1\.fn\.net\.0\.", r"mhsa_blocks.\1.mlp.fc1."),
    (r"^mhsa_block\.(\d+)\.1\.fn\.net\.3\.", r"mhsa_blocks.\1.mlp.fc2."),
    (r"^csta_block\.(\d+)\.0\.0\.", r"csta_blocks.\1.large_embed.norm."),
    (r"^csta_block\.(\d+)\.0\.1\.", r"csta_blocks.\1.large_embed.fc1."),
    (r"^csta_block\.(\d+)\.0\.3\.", r"csta_blocks.\1.large_embed.fc2."),
    (r"^csta_block\.(\d+)\.1\.", r"csta_blocks.\1.attn_small."),
    (r"^csta_block\.(\d+)\.2\.", r"csta_blocks.\1.attn_large."),
    (r"^csta_block\.(\d+)\.3\.0\.", r"csta_blocks.\1.large_unembed.norm."),
    (r"^csta_block\.(\d+)\.3\.1\.", r"csta_blocks.\1.large_unembed.fc1."),
    (r"^csta_block\.(\d+)\.3\.3\.", r"csta_blocks.\1.large_unembed.fc2."),
    (r"^csta_block\.(\d+)\.4\.norm\.", r"csta_blocks.\1.norm."),
    (r"^csta_block\.(\d+)\.4\.fn\.net\.0\.", r"csta_blocks.\1.mlp.fc1."),
    (r"^csta_block\.(\d+)\.4\.fn\.net\.3\.", r"csta_blocks.\1.mlp.fc2."),
    (r"\.attn_(small|large)\.norm\.", r".attn_\1.norm_q."),
    (r"\.attn_(small|large)\.norm2\.", r".attn_\1.norm_kv."),
    (r"\.attn_(small|large)\.fn\.to_q\.", r".attn_\1.q."),
    (r"\.attn_(small|large)\.fn\.to_kv\.", r".attn_\1.kv."),
    (r"\.attn_(small|large)\.fn\.to_out\.0\.", r".attn_\1.proj."),
    (r"^cnn_branch\.(\d+)\.body\.(\d+)\.body\.0\.", r"cnn_branch.\1.blocks.\2.conv1."),
    (r"^cnn_branch\.(\d+)\.body\.(\d+)\.body\.2\.", r"cnn_branch.\1.blocks.\2.conv2."),
    (r"^cnn_branch\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.0\.", r"cnn_branch.\1.blocks.\2.ca.fc1."),
    (r"^cnn_branch\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.2\.", r"cnn_branch.\1.blocks.\2.ca.fc2."),
    (r"^fusion_block\.(\d+)\.(\d+)\.body\.0\.", r"fusion_blocks.\1.\2.conv1."),
    (r"^fusion_block\.(\d+)\.(\d+)\.body\.2\.", r"fusion_blocks.\1.\2.conv2."),
    (r"^fusion_mlp\.(\d+)\.0\.", r"fusion_mlps.\1.norm."),
    (r"^fusion_mlp\.(\d+)\.1\.", r"fusion_mlps.\1.fc1."),
    (r"^fusion_mlp\.(\d+)\.3\.", r"fusion_mlps.\1.fc2."),
    (r"^fusion_cnn\.(\d+)\.0\.", r"fusion_cnns.\1.conv1."),
    (r"^fusion_cnn\.(\d+)\.2\.", r"fusion_cnns.\1.conv2."),
    (r"^tail\.0\.", r"upsample."),
    (r"^tail\.1\.", r"conv_out."),
]


def convert_official(state_dict: dict[str, torch.Tensor], model: ACT) -> dict[str, torch.Tensor]:
    """Map jinsuyoo/act's `ACT` state dict (released `act_sr_x*.pt`, or a Lightning checkpoint's
    ``net.``-prefixed `state_dict`) to our names.

    The residual groups' trailing conv ``cnn_branch.{i}.body.{n_resblocks}`` becomes
    ``cnn_branch.{i}.conv``, and the CNN branch's extra conv ``cnn_branch.{num_stages}`` (never called)
    becomes ``unused_conv``.
    """
    if state_dict and all(k.startswith("net.") for k in state_dict):
        state_dict = {k[4:]: v for k, v in state_dict.items()}
    n_blocks = len(model.cnn_branch[0].blocks)
    n_stages = model.num_stages
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r"^cnn_branch\.(\d+)\.((?:weight|bias))$", key)
        if m and int(m.group(1)) == n_stages:
            new = f"unused_conv.{m.group(2)}"
        m = re.match(r"^cnn_branch\.(\d+)\.body\.(\d+)\.(weight|bias)$", key)
        if m and int(m.group(2)) == n_blocks:
            new = f"cnn_branch.{m.group(1)}.conv.{m.group(3)}"
        for pattern, repl in _OFFICIAL_RULES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------

_TEST_KWARGS = dict(n_feats=8, num_stages=2, n_resblocks=1, reduction=4, num_heads=4, mlp_ratio=2)
_NOTES = ("Inputs RGB in [0, 255]. Trained in the paper on ImageNet (IPT regime), evaluated with Y-channel "
          "PSNR, border = scale. Released weights: github.com/jinsuyoo/ACT/releases (act_sr_x{2,3,4}.pt).")


def _act(upscale: int, defaults: dict, kwargs: dict) -> ACT:
    return ACT(**{"upscale": upscale, **defaults, **kwargs})


@register_model(paper="ACT", arxiv="2203.07682", task="super-resolution",
                reported=dict(params_m=46.0, resolution=48, scale=2),
                params=46_029_723, input_size=(3, 48, 48), test_kwargs=_TEST_KWARGS,
                test_input_size=(3, 12, 12), unused_params=("unused_conv",), notes=_NOTES)
def act_x2(**kwargs) -> ACT:
    return _act(2, {}, kwargs)


@register_model(paper="ACT", arxiv="2203.07682", task="super-resolution",
                reported=dict(params_m=46.2, resolution=48, scale=3),
                params=46_214_363, input_size=(3, 48, 48), test_kwargs=_TEST_KWARGS,
                test_input_size=(3, 12, 12), unused_params=("unused_conv",), notes=_NOTES)
def act_x3(**kwargs) -> ACT:
    return _act(3, {}, kwargs)


@register_model(paper="ACT", arxiv="2203.07682", task="super-resolution",
                reported=dict(params_m=46.2, resolution=48, scale=4),
                params=46_177_435, input_size=(3, 48, 48), test_kwargs=_TEST_KWARGS,
                test_input_size=(3, 12, 12), unused_params=("unused_conv",), notes=_NOTES)
def act_x4(**kwargs) -> ACT:
    return _act(4, {}, kwargs)


_TINY = dict(n_feats=16, num_stages=2, n_resblocks=2, reduction=4, num_heads=4, mlp_ratio=2)


@register_model(paper="ACT", arxiv="2203.07682", task="super-resolution",
                reported=dict(resolution=48, scale=2), params=884_075,  # our own count: no paper figure
                input_size=(3, 48, 48), test_kwargs=_TEST_KWARGS, test_input_size=(3, 12, 12),
                params_source="ours", unused_params=("unused_conv",), demo=True,
                notes="Reduced ACT for demos and the default built-in training run: 16 features, token dim "
                      "144, 2 stages of (MHSA, CSTA, residual group of 2 RCABs, fusion), 4 heads.")
def act_tiny_x2(**kwargs) -> ACT:
    return _act(2, _TINY, kwargs)
