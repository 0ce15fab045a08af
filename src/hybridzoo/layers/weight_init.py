"""Weight initialisation helpers (timm-compatible semantics)."""

from __future__ import annotations

import math

import torch
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """Truncated normal with *absolute* bounds a, b (as timm's `trunc_normal_`), mean 0."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=a, b=b)


def init_weights_vit(module: nn.Module) -> None:
    """timm ViT/DeiT init: Linear trunc_normal(.02) and zero bias; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_conv_fan_out_(conv: nn.Conv2d) -> None:
    """He-normal by fan-out (ResNet/MobileNet convention): N(0, sqrt(2 / (k·k·out/groups)))."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
