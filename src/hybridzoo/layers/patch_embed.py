"""Patch embeddings and positional-embedding resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers.helpers import to_2tuple


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution (ViT), names as timm (`proj`)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, norm_layer: type[nn.Module] | None = None, flatten: bool = True, bias: bool = True):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


def resample_abs_pos_embed(pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
                           num_prefix_tokens: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """Interpolate a (1, prefix+H·W, C) position embedding to a new H'×W' grid, prefix tokens kept."""
    num_new = new_size[0] * new_size[1]
    if pos_embed.shape[1] == num_new + num_prefix_tokens and (old_size is None or tuple(old_size) == tuple(new_size)):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_size is None:
        side = int(math.sqrt(grid.shape[1]))
        old_size = (side, side)
    C = grid.shape[-1]
    grid = grid.reshape(1, old_size[0], old_size[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_size), mode=mode, align_corners=False).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_new, C)
    return torch.cat([prefix, grid], dim=1)
