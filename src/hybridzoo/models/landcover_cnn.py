"""A plain 2-D CNN baseline for patch-based land-cover classification (hybridzoo's own, no paper).

What it is: the convolution-only reference WetMapFormer is compared against in this library —
two VGG-style stages of 3×3 conv → BN → ReLU (×2, max-pool between them) over the multi-band
patch, global average pooling and a linear head for the patch's labelled pixel. It has no spectral
3-D convolutions and no attention, so a gap between it and `wetmapformer_*` on the same split is
what the hybrid design buys. The WetMapFormer paper's own CNN baselines could not be retrieved,
so this is not one of them: its card quotes no paper figures, and `params` is our exact count.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridzoo.layers import ConvBnAct, check_image_input, checkpoint_seq
from hybridzoo.registry import register_model

__all__ = ["LandCoverCNN", "convert_official"]


class LandCoverCNN(nn.Module):
    """[conv3×3-BN-ReLU ×2] → max-pool 2 → [conv3×3-BN-ReLU ×2] → global average pool → dropout → linear.

    `widths` sets the stages (one conv group per entry); any number of bands and classes.
    """

    def __init__(self, *, in_chans: int = 16, num_classes: int = 7, widths: tuple[int, ...] = (64, 128),
                 convs_per_stage: int = 2, drop_rate: float = 0.2, img_size: int | tuple[int, int] | None = None):
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        stages, prev, self.feature_info = [], in_chans, []
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
            for _ in range(convs_per_stage):
                layers.append(ConvBnAct(prev, w, 3))
                prev = w
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=w, reduction=2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.min_size = 2 ** (len(widths) - 1)
        self.num_features = prev
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_image_input(x, self, self.in_chans, min_size=self.min_size)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self, self.in_chans, min_size=self.min_size)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Our own baseline: there is no other layout to convert from."""
    if set(state_dict) != set(model.state_dict()):
        raise ValueError("cnn2d_landcover is hybridzoo's own baseline; only weights saved by hybridzoo load into it")
    return state_dict


@register_model(paper="2-D CNN baseline (hybridzoo; no paper)", arxiv=None, task="land-cover",
                reported=dict(params_m=0.269, gflops=None, oa=None, aa=None, kappa=None, resolution=8),
                params=268_935, input_size=(16, 8, 8), test_kwargs=dict(widths=(8, 16)), test_input_size=(16, 8, 8),
                params_source="ours", notes="hybridzoo's convolution-only baseline for the land-cover task (not from the WetMapFormer paper, "
                      "whose baselines could not be retrieved). params / params_m are OUR exact count at 16 bands, "
                      "7 classes; 6.49 M MACs per 8×8 patch.")
def cnn2d_landcover(**kwargs):
    return LandCoverCNN(**kwargs)
