"""A float32 CPU training path whose linear layers take the fastest GEMM route for each product.

A linear layer's training step is three matrix products: the forward y = x·Wᵀ, the input gradient
dx = dy·W and the weight gradient dW = dyᵀ·x. On x86 CPUs `nn.Linear` runs all three through MKL's sgemm.
On CPUs where oneDNN's inner-product kernels outrun MKL (AMD Zen 4: ≈ 210 vs 169 GFLOP/s on 2 threads,
benchmarks/results_peak_epyc.json), `FastLinear` sends the forward (bias fused) and the input gradient
(through a contiguous Wᵀ, a few hundred KB copied per call) to oneDNN and keeps the weight gradient —
a contraction over all the batch's tokens, where MKL measured as fast or faster on the transformer shapes
at one thread (split at two) — on MKL.
The benchmarks/RESULTS.md lever table has the per-product figures.

`optimize_for_cpu_training(model)` switches every exact `nn.Linear` of a model with at least 128×128 weights
(smaller ones run faster on MKL) to `FastLinear` *in place*
(the class only: the same Parameter objects, state dict, hooks and optimiser references), so it can be
applied before or after the optimiser is built, and checkpoints are unchanged. `FastLinear` computes the
same function and gradients as `nn.Linear` (fp32 rounding aside: the two libraries sum in different
orders). It takes the oneDNN route only in training mode, when a gradient is to be taken, from an fp32 CPU
tensor outside autocast; everywhere else (eval mode, no autograd, tracing, other dtypes or devices, oneDNN
missing) it is `F.linear`, so evaluation and export see the plain operator bit for bit.

Under `torch.compile` (`hybridzoo train --compile`) the same products are the registered custom operator
`hybridzoo::onednn_linear` (with its autograd formula and a shape-only fake kernel), so inductor keeps oneDNN's
forward and input-gradient products as opaque calls and fuses the element-wise work around them (bias
gradient, activations, residual adds, LayerNorm) instead of falling back to MKL's `addmm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["FastLinear", "optimize_for_cpu_training", "fast_training_available", "fast_linear", "onednn_linear",
           "MIN_WEIGHT_NUMEL"]


# Decided once: dynamo refuses to trace `torch.backends.mkldnn.is_available` (a graph break per layer).
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fast_training_available() -> bool:
    return _AVAILABLE


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _linear_grads(ctx, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, linear):
    """dx through `linear` (oneDNN: dx = dy·W is a linear layer with weight Wᵀ, which oneDNN wants dense),
    dW = dyᵀ·x through MKL (faster there, see the module docstring) and db as a column sum."""
    need_x, need_w, need_b = ctx.needs_input_grad
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dx = linear(grad_out, weight.t().contiguous(), None) if need_x else None
    dw = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
    db = g2.sum(0) if need_b and ctx.has_bias else None
    return dx, dw, db


class _FastLinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b: forward and dx through oneDNN, dW through MKL, db as a column sum (eager mode)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        return _linear_grads(ctx, x, weight, grad_out, _onednn_linear)


# The same products as a custom operator, for `torch.compile`: dynamo cannot trace into oneDNN's call from an
# autograd.Function's Python, but it keeps a registered operator (with a fake kernel for shapes) as one node.
# Eager mode keeps `_FastLinearFn`, whose dispatch costs ~100 µs less per layer and step.
@torch.library.custom_op("hybridzoo::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·Wᵀ + b through oneDNN's inner product (fp32 CPU tensors)."""
    return _onednn_linear(x, weight, bias)


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _op_setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _op_backward(ctx, grad_out: torch.Tensor):
    x, weight = ctx.saved_tensors
    return _linear_grads(ctx, x, weight, grad_out, onednn_linear)


onednn_linear.register_autograd(_op_backward, setup_context=_op_setup_context)


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and fast_training_available())


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with the oneDNN/MKL routing of `FastLinear` where a gradient is to be taken.

    Without autograd (evaluation, inference) and while tracing or scripting it is exactly `F.linear`, so
    validation figures and exports see the plain operator; under `torch.compile` it is the custom operator
    `hybridzoo::onednn_linear` (same products, see the module docstring)."""
    if (not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
            or torch.jit.is_tracing() or torch.jit.is_scripting() or not _applies(x, weight)):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return onednn_linear(x, weight, bias)
    return _FastLinearFn.apply(x, weight, bias)


class FastLinear(nn.Linear):
    """`nn.Linear` whose products take the faster of oneDNN / MKL on the CPU (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # eval mode is plain `nn.Linear`, bit for bit, with or without autograd
            return F.linear(x, self.weight, self.bias)
        return fast_linear(x, self.weight, self.bias)


# Below this many weights (in × out) oneDNN's per-call overhead loses to MKL: a 64×64 or 32×32 layer trained
# 10–17% slower through FastLinear, 64×256 and larger 7–14% faster (1 thread, CPU time, AMD Zen 4).
MIN_WEIGHT_NUMEL = 128 * 128


def optimize_for_cpu_training(model: nn.Module, min_weight_numel: int | None = None) -> nn.Module:
    """Switch every exact `nn.Linear` of `model` with at least `min_weight_numel` weights (default
    `MIN_WEIGHT_NUMEL`) to `FastLinear`, in place; returns `model`.

    Subclasses of `nn.Linear` are left alone (they may override forward). Parameters, buffers, the state
    dict and an optimiser built on the model are unaffected. Without oneDNN this is a no-op."""
    if not fast_training_available():
        return model
    min_weight_numel = MIN_WEIGHT_NUMEL if min_weight_numel is None else min_weight_numel
    for m in model.modules():
        if type(m) is nn.Linear and m.in_features * m.out_features >= min_weight_numel:
            m.__class__ = FastLinear
    return model
