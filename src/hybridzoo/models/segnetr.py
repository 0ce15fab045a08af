"""SegNetr: Rethinking the local-global interactions and skip connections in U-shaped networks —
Cheng, Gao, Wang, Zhu, MICCAI 2023, arXiv 2307.02953.

What is hybrid: a U-shaped CNN of MBConvs whose every block adds transformer-style local and global
interactions (parallel branches over non-overlapping local patches and over shifted, "global"
2P×2P partitions, fused by a weighted sum, then norm + FFN + residual) at linear cost; the
information-retention skip connections (IRSC) carry encoder features to the decoder through a
parameter-free patch merging / patch reverse pair instead of plain concatenation.

No code was published: this follows the paper's description as summarised in
/work/shared/PAPERS.md and the seed article. Choices the text leaves open, made here:
- Interactions: the channel-averaged P×P (local) or 2P×2P (global) patch is flattened, passed
  through a two-layer FFN over its positions (hidden width = number of positions, GELU), and the
  softmax over positions reweights every channel of the MBConv output; LR/GR (the inverse
  partitions) therefore act on the weight maps. Fusion weights are two learnable scalars (init 1).
- Global shift: along each axis, patches are counted from 1 as in the paper; odd patches move one
  window left/up and even ones right/down, cyclically, so every 2P block gathers patches three
  windows apart (a pair-swap of neighbours would leave the 2P blocks unchanged).
- MBConv: pre-BN, 1×1 expand ×4, BN-GELU, 3×3 depthwise, BN-GELU, squeeze-excitation (¼ of the input
  width), 1×1 project, with a 1×1 shortcut when the width changes (CoAtNet/MaxViT style). Norm before
  the FFN: LayerNorm over channels; FFN ratio 4.
- Layout: a 3×3 conv stem (16 channels) at full resolution, then patch merging (PM, 2× down, 4×
  channels, no parameters) before each of the four encoder stages (widths 64/128/256/512 at 1/2 …
  1/16; each stage's MBConv reduces the merged 4C channels to its width). Decoder stages at 1/8, 1/4,
  1/2 upsample with a 2×2 transposed conv to half the skip width, concatenate the IRSC output
  (PR of the alternate half of the PM channels = half the encoder channels at full detail) and run a
  SegNetr block with the encoder's patch sizes. The last IRSC (from the stem) joins the PR of the
  final decoder map at full resolution, followed by a 1×1 classifier.
Input sides must be multiples of 32 (the 2P = 16 global blocks at 1/2).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hybridzoo.layers import LayerNorm2d, SqueezeExcite, check_image_input
from hybridzoo.registry import register_model

__all__ = ["SegNetr", "SegNetrBlock", "MBConv", "patch_merging", "patch_reverse", "irsc", "global_shift_perm",
           "segnetr"]


# ------------------------------------------------------------------------- parameter-free ops

def patch_merging(x: torch.Tensor) -> torch.Tensor:
    """PM: B×C×H×W → B×4C×H/2×W/2, position-major (x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2])."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 5, 3, 1, 2, 4)   # b, dx, dy, c, h/2, w/2
    return x.reshape(b, 4 * c, h // 2, w // 2)


def patch_reverse(x: torch.Tensor) -> torch.Tensor:
    """PR, the exact inverse of PM: B×4C×h×w → B×C×2h×2w."""
    b, c4, h, w = x.shape
    x = x.reshape(b, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 2, 5, 1)       # b, c, h, dy, w, dx
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def irsc(x_pm: torch.Tensor) -> torch.Tensor:
    """Information retention skip: PR of the alternate half of PM's channels (full detail, C/2 channels)."""
    return patch_reverse(x_pm[:, 0::2])


def global_shift_perm(n: int, device=None) -> torch.Tensor:
    """Source patch of every position after the GP shift (patches counted from 1: odd ones move one
    window left/up, even ones right/down, cyclically). `n` (patches per axis) must be even."""
    p = torch.arange(n, device=device)
    return torch.where(p % 2 == 1, p + 1, p - 1) % n


# ----------------------------------------------------------------------------- SegNetr block

class MBConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, expand: int = 4, se_ratio: float = 0.25):
        super().__init__()
        mid = out_chs * expand
        self.pre_norm = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.act = nn.GELU()
        self.se = SqueezeExcite(mid, max(1, int(in_chs * se_ratio)), act_layer=nn.SiLU)
        self.conv3 = nn.Conv2d(mid, out_chs, 1)
        self.shortcut = nn.Identity() if in_chs == out_chs else nn.Conv2d(in_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(self.pre_norm(x))))
        y = self.se(self.act(self.norm2(self.conv2(y))))
        return self.shortcut(x) + self.conv3(y)


class SpatialInteraction(nn.Module):
    """Softmax weights over the positions of each P×P window, from the channel-averaged map."""

    def __init__(self, window: int):
        super().__init__()
        n = window * window
        self.window = window
        self.ffn = nn.Sequential(nn.Linear(n, n), nn.GELU(), nn.Linear(n, n))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        """m: B×H×W channel means → B×H×W weights (each window sums to 1)."""
        b, h, w = m.shape
        p = self.window
        t = m.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, h // p, w // p, p * p)  # LP
        t = self.ffn(t).softmax(-1)
        return t.reshape(b, h // p, w // p, p, p).permute(0, 1, 3, 2, 4).reshape(b, h, w)                 # LR


class SegNetrBlock(nn.Module):
    """MBConv → parallel local (P) and global (shifted, 2P) interactions → weighted sum → residual →
    norm → FFN → residual. Cost per pixel is constant: linear in the number of pixels."""

    def __init__(self, in_chs: int, out_chs: int, patch: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch = patch
        self.mbconv = MBConv(in_chs, out_chs)
        self.local_branch = SpatialInteraction(patch)
        self.global_branch = SpatialInteraction(2 * patch)
        self.fuse_weight = nn.Parameter(torch.ones(2))
        self.norm = LayerNorm2d(out_chs)
        hidden = int(out_chs * mlp_ratio)
        self.ffn = nn.Sequential(nn.Conv2d(out_chs, hidden, 1), nn.GELU(), nn.Conv2d(hidden, out_chs, 1))

    def _global_weights(self, m: torch.Tensor) -> torch.Tensor:
        b, h, w = m.shape
        p = self.patch
        perm_h, perm_w = global_shift_perm(h // p, m.device), global_shift_perm(w // p, m.device)
        tiles = m.reshape(b, h // p, p, w // p, p)
        shifted = tiles[:, perm_h][:, :, :, perm_w].reshape(b, h, w)                  # GP: shift patches
        wts = self.global_branch(shifted).reshape(b, h // p, p, w // p, p)           # 2P partitions, GR
        inv_h, inv_w = torch.argsort(perm_h), torch.argsort(perm_w)
        return wts[:, inv_h][:, :, :, inv_w].reshape(b, h, w)                         # undo the shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconv(x)
        m = x.mean(1)
        weights = self.fuse_weight[0] * self.local_branch(m) + self.fuse_weight[1] * self._global_weights(m)
        x = x + x * weights[:, None]
        return x + self.ffn(self.norm(x))


# ------------------------------------------------------------------------------------ model

class SegNetr(nn.Module):
    """SegNetr: logits (B, K, H, W) at the input size; H, W multiples of 32."""

    size_divisor = 32

    def __init__(self, *, num_classes: int = 2, in_chans: int = 3, stem_chs: int = 16,
                 dims: Sequence[int] = (64, 128, 256, 512), patch_sizes: Sequence[int] = (8, 4, 2, 1),
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False), nn.BatchNorm2d(stem_chs), nn.ReLU())
        ins = [4 * stem_chs] + [4 * d for d in dims[:-1]]
        self.encoder = nn.ModuleList([SegNetrBlock(i, d, p, mlp_ratio) for i, d, p in zip(ins, dims, patch_sizes)])
        # decoder stage k (deepest first) works at the resolution of encoder stage k-1
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for k in range(len(dims) - 1, 0, -1):
            skip = dims[k - 1] // 2          # IRSC of PM_k (4·dims[k-1] channels) → dims[k-1]/2
            self.up.append(nn.ConvTranspose2d(dims[k], skip, 2, 2))
            self.decoder.append(SegNetrBlock(2 * skip, dims[k - 1], patch_sizes[k - 1], mlp_ratio))
        self.head = nn.Conv2d(dims[0] // 4 + stem_chs // 2, num_classes, 1)
        self.feature_info = [dict(num_chs=d, reduction=2 ** (i + 1)) for i, d in enumerate(dims)]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._encode(x)[0]

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        check_image_input(x, self, self.in_chans, divisor=self.size_divisor)
        x = self.stem(x)
        feats, skips = [], []
        for block in self.encoder:
            x_pm = patch_merging(x)
            skips.append(irsc(x_pm))
            x = block(x_pm)
            feats.append(x)
        return feats, skips

    def prune_for_features(self) -> None:
        self.up, self.decoder, self.head = nn.ModuleList(), nn.ModuleList(), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, skips = self._encode(x)
        y = feats[-1]
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[1:])):
            y = block(torch.cat([up(y), skip], 1))
        y = torch.cat([patch_reverse(y), skips[0]], 1)
        return self.head(y)


@register_model(paper="SegNetr", arxiv="2307.02953", task="segmentation",
                # no absolute figures published: 41% of U-Net's params and 24% of its MACs at 256×256 (`unet`)
                reported=dict(params_m=round(0.41 * 31.043586, 2), gflops=round(0.24 * 48.172, 2), resolution=256),
                params=None, params_rtol=0.15, flops_rtol=0.25, input_size=(3, 256, 256),
                test_kwargs=dict(stem_chs=8, dims=(16, 16, 32, 32)), test_input_size=(3, 64, 64),
                notes="No official code or absolute figures: the paper reports 59% fewer params and 76% fewer GFLOPs "
                      "than a vanilla U-Net at equal input. The reported figures here are derived from `unet` at "
                      "256×256; the widths and the details the paper leaves open are ours (module docstring), so the "
                      "tolerances are wide: ours is 11.31 M params (−64%) and 9.12 GMACs (−81%).")
def segnetr(**kwargs):
    return SegNetr(**kwargs)
