"""U-Net: Convolutional Networks for Biomedical Image Segmentation — Ronneberger et al., MICCAI 2015,
arXiv 1505.04597. The "vanilla U-Net" baseline SegNetr compares against (not a hybrid).

Four max-pool downsamplings of double 3×3 convolutions (64 → 1024 channels), four 2×2 transposed-
convolution upsamplings, each concatenated with the encoder map of the same resolution.
Reference code: milesial/Pytorch-UNet (`unet/unet_model.py`, `unet_parts.py`, `bilinear=False`),
whose module names we keep, so its checkpoints load as they are.
Deviations from the 2015 paper (as in that reference and the medical-segmentation literature):
padded convolutions (output size = input size) and BatchNorm after every convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridzoo.layers import check_image_input
from hybridzoo.registry import register_model

__all__ = ["UNet", "unet", "convert_official"]


class DoubleConv(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 3, padding=1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True),
            nn.Conv2d(out_chs, out_chs, 3, padding=1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))


class Down(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_chs, out_chs))


class Up(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_chs, in_chs // 2, 2, 2)
        self.conv = DoubleConv(in_chs, out_chs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], 1))


class UNet(nn.Module):
    """Vanilla U-Net; logits (B, K, H, W) at the input size (H, W multiples of 16)."""

    size_divisor = 16
    # `hybridzoo train` on the fast CPU path takes channels-last unless told otherwise: a step 1.17-1.27x at
    # 4 x 256², level at 8 x 64² (benchmarks/RESULTS.md, session 34)
    train_channels_last = True

    def __init__(self, *, num_classes: int = 2, in_chans: int = 3, base_channels: int = 64):
        super().__init__()
        c = base_channels
        self.num_classes, self.in_chans = num_classes, in_chans
        self.inc = DoubleConv(in_chans, c)
        self.down1, self.down2 = Down(c, 2 * c), Down(2 * c, 4 * c)
        self.down3, self.down4 = Down(4 * c, 8 * c), Down(8 * c, 16 * c)
        self.up1, self.up2 = Up(16 * c, 8 * c), Up(8 * c, 4 * c)
        self.up3, self.up4 = Up(4 * c, 2 * c), Up(2 * c, c)
        self.outc = nn.Sequential()
        self.outc.conv = nn.Conv2d(c, num_classes, 1)
        self.feature_info = [dict(num_chs=c * 2 ** i, reduction=2 ** i) for i in range(5)]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_image_input(x, self, self.in_chans, divisor=self.size_divisor)
        feats = [self.inc(x)]
        for down in (self.down1, self.down2, self.down3, self.down4):
            feats.append(down(feats[-1]))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3, x4, x5 = self.forward_intermediates(x)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        return self.outc(self.up4(x, x1))


def convert_official(state_dict: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """milesial/Pytorch-UNet checkpoints share our names; only a stray `mask_values` entry is dropped."""
    return {k: v for k, v in state_dict.items() if k != "mask_values"}


@register_model(paper="U-Net", arxiv="1505.04597", task="segmentation",
                reported=dict(params_m=31.04, gflops=48.17, resolution=256), params=31_043_586,
                macs_g=48.172, input_size=(3, 256, 256), test_kwargs=dict(base_channels=8),
                test_input_size=(3, 32, 32),
                notes="Vanilla U-Net (milesial/Pytorch-UNet layout, 3 → 2 classes), the baseline of SegNetr's "
                      "'59% fewer parameters, 76% fewer GFLOPs' at 256×256. Figures measured on the reference code (FlopCounterMode), not from a paper.")
def unet(**kwargs):
    return UNet(**kwargs)
