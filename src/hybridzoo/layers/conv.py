"""Convolutional building blocks shared by several models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import native


class ConvBnAct(nn.Sequential):
    """Conv (no bias) → BatchNorm → activation; `act_layer=None` leaves it linear."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 groups: int = 1, dilation: int = 1, act_layer: type[nn.Module] | None = nn.ReLU,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d, bias: bool = False):
        if padding is None:
            padding = ((kernel_size - 1) // 2) * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=bias),
            norm_layer(out_chs),
        ]
        if act_layer is not None:
            layers.append(act_layer())
        super().__init__(*layers)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise k×k conv → BN → act → pointwise 1×1 conv → BN (→ act), MobileNet's separable conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1,
                 act_layer: type[nn.Module] = nn.ReLU, pw_act: bool = False):
        super().__init__()
        self.conv_dw = ConvBnAct(in_chs, in_chs, kernel_size, stride, groups=in_chs, act_layer=act_layer)
        self.conv_pw = ConvBnAct(in_chs, out_chs, 1, act_layer=act_layer if pw_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


class _GatedByMeanFn(torch.autograd.Function):
    """y = x · gate(mean(x)) for a squeeze-excitation's training step, the gradient in two passes over the map.

    Autograd's backward of the same formula makes six: the product's two gradients (dy·g, and dy·x then summed
    for the gate), the mean's, a map of dm / HW, and the sum of the two gradients of x. Here the first pass sums
    dy·x per channel (`native.channel_dot` where the kernels are loaded, one read of each map), the gate's own
    backward (its small MLP on the (B, C) means) gives dm, and the second pass writes dx = dy·g + dm / HW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, se: SqueezeExcite, *params: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():   # the gate's graph, from the means, for the backward's torch.autograd.grad
            mean = x.detach().mean((2, 3)).requires_grad_()
            gate = se.gate_of_mean(mean)
        ctx.save_for_backward(x)
        ctx.mean, ctx.gate, ctx.params = mean, gate, params
        return x * gate.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, = ctx.saved_tensors
        fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        grad = grad.contiguous(memory_format=fmt)
        if native.available() and x.dtype == torch.float32:   # (x is contiguous or channels-last: the forward's gate)
            dgate = native.channel_dot(grad, x)
        else:
            dgate = (grad * x).sum((2, 3))
        wanted = [ctx.mean, *(p for p in ctx.params if p.requires_grad)]
        grads = iter(torch.autograd.grad(ctx.gate, wanted, dgate.view_as(ctx.gate)))
        dmean = next(grads)
        dx = torch.addcmul((dmean / (x.shape[2] * x.shape[3]))[:, :, None, None], grad, ctx.gate.detach())
        ctx.mean = ctx.gate = None
        return (dx, None, *(next(grads) if p.requires_grad else None for p in ctx.params))


class SqueezeExcite(nn.Module):
    """Channel attention: global pool → 1×1 reduce → act → 1×1 expand → sigmoid gate."""

    # set by `optimize_for_cpu_training`: the training step through `_GatedByMeanFn` (the gradient in two passes
    # over the map instead of six)
    native_training = False

    def __init__(self, chs: int, rd_chs: int, act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(chs, rd_chs, 1, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_chs, chs, 1, bias=bias)
        self.gate = gate_layer()

    def gate_of(self, x: torch.Tensor) -> torch.Tensor:
        """The B×C×1×1 gate for x."""
        return self.gate_of_mean(x.mean((2, 3)))

    def gate_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The B×C×1×1 gate for a map whose channel means (B, C) are `mean`."""
        return self.gate(self.fc2(self.act(self.fc1(mean[:, :, None, None]))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.native_training and self.training and torch.is_grad_enabled() and x.requires_grad
                and x.dim() == 4 and x.device.type == "cpu" and not torch.compiler.is_compiling()
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
            return _GatedByMeanFn.apply(x, self, *self.parameters())
        return x * self.gate_of(x)

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        return _FrozenSqueezeExcite(self)


class _FrozenSqueezeExcite(nn.Module):
    """SqueezeExcite for the oneDNN inference path: its two 1×1 convolutions, which see the pooled 1×1 map, as
    products on the pooled (B, C) rows. As frozen convolutions (each with its layout checks, permutes and a
    one-row product) the gate's tail took 0.24 ms at CoAtNet-0's S1, as two `F.linear` 0.04 ms (Zen 3, 2 threads;
    benchmarks/RESULTS.md, session 19)."""

    def __init__(self, m: SqueezeExcite):
        super().__init__()
        self.act, self.gate = m.act, m.gate
        for name, fc in (("1", m.fc1), ("2", m.fc2)):
            self.register_buffer(f"w{name}", fc.weight.detach().float().reshape(fc.out_channels, -1).contiguous(),
                                 persistent=False)
            self.register_buffer(f"b{name}", None if fc.bias is None else fc.bias.detach().float().contiguous(),
                                 persistent=False)

    def gate_of(self, x: torch.Tensor) -> torch.Tensor:
        """The B×C×1×1 gate for x."""
        return self.gate_of_mean(x.mean((2, 3)))

    def gate_of_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The B×C×1×1 gate for a map whose channel means (B, C) are `mean`."""
        g = self.gate(F.linear(self.act(F.linear(mean, self.w1, self.b1)), self.w2, self.b2))
        return g.view(*g.shape, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate_of(x)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B×C×H×W map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = super().forward(x)
        return x.permute(0, 3, 1, 2)
