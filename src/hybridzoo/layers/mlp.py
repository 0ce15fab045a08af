"""Feed-forward blocks."""

from __future__ import annotations

import torch
from torch import nn


class _QuickGELUFn(torch.autograd.Function):
    """x·σ(1.702x) with a two-pass backward.

    QuickGELU(x) = SiLU(1.702x)/1.702, so its derivative is SiLU'(1.702x) exactly: the backward is one
    multiply and `silu_backward`, where autograd through mul-sigmoid-mul takes five passes and keeps σ too.
    The forward is the in-place sequence below, bitwise the plain output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.mul(x, 1.702).sigmoid_().mul_(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: silu_backward has no derivative, use the formula
            s = torch.sigmoid(1.702 * x)
            return grad_out * (s + 1.702 * x * s * (1 - s))
        # Written into the temporary 1.702x (elementwise, so the full alias is safe): one hidden-sized
        # allocation fewer per call, whose fresh pages cost as much as the pass itself on CPU.
        t = torch.mul(x, 1.702)
        return torch.ops.aten.silu_backward.grad_input(grad_out, t, grad_input=t)


class QuickGELU(nn.Module):
    """x·σ(1.702x), the GELU approximation CvT (and CLIP) use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFn.apply(x)
        # Without autograd: the same three operations in place on one fresh buffer (bitwise the same
        # result, two fewer full-size temporaries; ~25% faster on CPU).
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


class Mlp(nn.Module):
    """Linear → act → drop → Linear → drop, the transformer FFN. Names match timm (`fc1`, `fc2`)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
