"""PVTv2's feed-forward block, shared by SegFormer (its Mix-FFN) and VVT, and its checkpoint layouts.

Linear → 3×3 depthwise conv → GELU → Linear on B×N×C tokens of an H×W map: the depthwise conv
gives the tokens their position, in place of position embeddings (PVTv2 §3, SegFormer §3.1).
Parameter names are timm's and the ones both models always had (`fc1`, `dwconv`, `fc2`), so
weights saved by either model before the block was shared load unchanged. Official checkpoints
name the same tensors differently; `convert_conv_ffn` renames one block's keys from each of them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvFFN", "CONV_FFN_LAYOUTS", "convert_conv_ffn"]


class ConvFFN(nn.Module):
    """fc1 → depthwise 3×3 conv → GELU → drop → fc2 → drop, on (B, N = H·W, C) tokens."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, _ = x.shape
        if N != H * W:
            raise ValueError(f"ConvFFN: {N} tokens do not form a {H}×{W} map")
        x = self.fc1(x)
        # B×N×C tokens viewed as a channels-last B×C×H×W map: no copy either way
        x = self.dwconv(x.view(B, H, W, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, N, -1)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


# ours ← theirs, relative to the block's FFN prefix
CONV_FFN_LAYOUTS: dict[str, dict[str, str]] = {
    "ours": {"fc1": "fc1", "dwconv": "dwconv", "fc2": "fc2"},
    # PVTv2, NVlabs SegFormer, OpenNLPLab VVT, HuggingFace 5.x: the conv inside a `DWConv` wrapper
    "pvt": {"fc1": "fc1", "dwconv": "dwconv.dwconv", "fc2": "fc2"},
    # HuggingFace transformers 4.x `SegformerMixFFN`
    "hf": {"fc1": "dense1", "dwconv": "dwconv.dwconv", "fc2": "dense2"},
    # mmsegmentation `MixFFN`: a Sequential of 1×1 conv, depthwise conv, GELU, dropout, 1×1 conv
    "mmseg": {"fc1": "layers.0", "dwconv": "layers.1", "fc2": "layers.4"},
}


def convert_conv_ffn(state_dict: dict[str, torch.Tensor], src: str, dst: str, layout: str) -> dict[str, torch.Tensor]:
    """One block's FFN tensors from `state_dict` under prefix `src` (in `layout`) as ConvFFN keys under `dst`.

    1×1 convolution weights (mmseg) become linear weights. A missing key raises KeyError naming it,
    as the model converters expect of a checkpoint that does not fit.
    """
    if layout not in CONV_FFN_LAYOUTS:
        raise ValueError(f"unknown ConvFFN checkpoint layout {layout!r}; expected one of {sorted(CONV_FFN_LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in CONV_FFN_LAYOUTS[layout].items():
        for t in ("weight", "bias"):
            v = state_dict[f"{src}.{theirs}.{t}"]
            if ours != "dwconv" and v.ndim == 4:
                v = v.flatten(1)
            out[f"{dst}.{ours}.{t}"] = v
    return out
