"""A float32 CPU training path whose linear layers take the fastest GEMM route for each product.

A linear layer's training step is three matrix products: the forward y = x·Wᵀ, the input gradient
dx = dy·W and the weight gradient dW = dyᵀ·x. On x86 CPUs `nn.Linear` runs all three through MKL's sgemm.
`FastLinear` sends the forward (bias fused) and the input gradient to the native panel kernel
(`layers.native.rows_linear`, the weight packed at each call; `_FastLinearFn` with `native_route`) on CPUs where
PyTorch runs AVX-512 or AVX2 kernels, and to oneDNN's inner product (through a contiguous Wᵀ for dx) where that is
chosen (`PRODUCTS`, `HYBRIDZOO_TRAIN_PRODUCTS`) and, on AVX-512 CPUs, for the layers the panel kernel does not take
(widths not in 16s, narrower than `NATIVE_MIN_FEATURES`, under `torch.compile`); elsewhere those are `F.linear`.
The weight gradient dW = dyᵀ·x, a contraction over all the batch's tokens, runs on the native kernel
`native.weight_grad` (both operands read as they lie) on AVX-512 CPUs and on MKL's `mm` elsewhere
(`WEIGHT_GRADS`, `HYBRIDZOO_TRAIN_WEIGHT_GRADS`). The benchmarks/RESULTS.md lever tables have the per-product
figures: on AMD Zen 4 oneDNN's inner product ran 1.1-1.25x MKL's sgemm, the panel kernel 1.0-1.1x oneDNN's at
DeiT-S's shapes; on AVX2-only AMD Zen 3 MKL's products beat oneDNN's at one thread and the panel kernel beat both.

`optimize_for_cpu_training(model)` switches every exact `nn.Linear` of a model with at least 128×128 weights
(smaller ones run faster on MKL) to `FastLinear` *in place*
(the class only: the same Parameter objects, state dict, hooks and optimiser references), every 1×1 stride-1
`nn.Conv2d` to `FastPointwiseConv2d` (the same products over a channels-last map's pixels), and every dense 3×3
stride-1 one to `FastConv3x3` (Winograd's tiles on a channels-last map, both ways), so it can be
applied before or after the optimiser is built, and checkpoints are unchanged. `FastLinear` computes the
same function and gradients as `nn.Linear` (fp32 rounding aside: the two libraries sum in different
orders). It takes its routes only in training mode, when a gradient is to be taken, from an fp32 CPU
tensor outside autocast; everywhere else (eval mode, no autograd, tracing, other dtypes or devices, oneDNN
missing) it is `F.linear`, so evaluation and export see the plain operator bit for bit.

Under `torch.compile` (`hybridzoo train --compile`) the same products are the registered custom operator
`hybridzoo::onednn_linear` (with its autograd formula and a shape-only fake kernel), so inductor keeps oneDNN's
forward and input-gradient products as opaque calls and fuses the element-wise work around them (bias
gradient, activations, residual adds, LayerNorm) instead of falling back to MKL's `addmm`.

`BatchSplitTraining(model)` (what `hybridzoo train` uses on the CPU) trains one share of each batch per
intra-op thread, each share's forward and backward on one thread, with the whole batch's loss and gradients;
BatchNorm2d layers normalise every share with the whole batch's statistics (the shares meet at each of them).
See its docstring and `split_training_blocker`.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from hybridzoo.layers import native
from hybridzoo.layers.fused import use_fused_cpu
from hybridzoo.layers.mlp import QuickGELU
from hybridzoo.layers.onednn import run_on_threads

__all__ = ["FastLinear", "FastPointwiseConv2d", "FastConv3x3", "FastGELU", "FastQuickGELU", "optimize_for_cpu_training",
           "fast_training_available", "fast_linear", "onednn_linear", "MIN_WEIGHT_NUMEL", "BatchSplitTraining",
           "split_training_blocker"]


# Decided once: dynamo refuses to trace `torch.backends.mkldnn.is_available` (a graph break per layer).
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fast_training_available() -> bool:
    return _AVAILABLE


def _default_products() -> str:
    """Where `FastLinear` sends its forward and input-gradient products on this CPU: "native", the native panel kernel
    (`native.rows_linear`, the weight packed at each call), where PyTorch runs AVX-512 or AVX2 kernels. On an AVX2-only
    AMD Zen 3, at one thread (the batch split's), it ran 1.1-1.35x MKL's products, which ran 1.05-1.1x oneDNN's
    (sessions 17, 21); on AMD Zen 4 (AVX-512) 1.0-1.1x oneDNN's at DeiT-S's shapes, whose products ran 1.1-1.25x
    MKL's, and a DeiT-S step 1.02-1.05x (session 25; there the layers it does not take go to oneDNN,
    `ONEDNN_BESIDE_NATIVE`). "mkl" elsewhere; where the native kernels do not build, the layers take oneDNN (AVX-512)
    or MKL. HYBRIDZOO_TRAIN_PRODUCTS=onednn|native|mkl overrides; the choice is fixed per process, so a run's
    steps are the same bits on every run on one machine."""
    env = os.environ.get("HYBRIDZOO_TRAIN_PRODUCTS", "").strip().lower()
    if env in ("onednn", "native", "mkl"):
        return env
    if env:
        warnings.warn(f"HYBRIDZOO_TRAIN_PRODUCTS={env!r} is not one of onednn, native, mkl; choosing by the CPU",
                      stacklevel=2)
    capability = torch.backends.cpu.get_cpu_capability()
    return "native" if capability.startswith("AVX512") or capability == "AVX2" else "mkl"


# "onednn", "native" or "mkl" (see _default_products); read at every call, so a benchmark may switch it
PRODUCTS = _default_products()

# On the native route, where oneDNN's products beat MKL's (AVX-512 CPUs), the layers the panel kernel does not take
# or takes slower go to oneDNN, not to `F.linear`: narrower than NATIVE_MIN_FEATURES inputs or outputs (CvT-13's
# first stage, 64 wide, ran its forward and input gradient at 0.8x oneDNN's on the kernel on Zen 4, session 25),
# under `torch.compile` (the custom operator), or with widths not in 16s. Elsewhere those stay `F.linear`.
ONEDNN_BESIDE_NATIVE = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
NATIVE_MIN_FEATURES = 128


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _default_weight_grads() -> str:
    """Where `FastLinear` takes its weight gradient dW = dyᵀ·x on this CPU: "native" (`native.weight_grad`, both
    operands read as they lie) where PyTorch runs AVX-512 kernels, "mkl" (`mm` on the transposed view) elsewhere.
    HYBRIDZOO_TRAIN_WEIGHT_GRADS=native|mkl overrides; fixed per process like `PRODUCTS`."""
    env = os.environ.get("HYBRIDZOO_TRAIN_WEIGHT_GRADS", "").strip().lower()
    if env in ("native", "mkl"):
        return env
    if env:
        warnings.warn(f"HYBRIDZOO_TRAIN_WEIGHT_GRADS={env!r} is not one of native, mkl; choosing by the CPU",
                      stacklevel=2)
    return "native" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "mkl"


# "native" or "mkl" (see _default_weight_grads); read at every call, so a benchmark may switch it
WEIGHT_GRADS = _default_weight_grads()


def _weight_grad(g2: torch.Tensor, x2: torch.Tensor, eager: bool) -> torch.Tensor:
    """dW = g2ᵀ·x2 for g2 (T, O) and x2 (T, I): on the native kernel where `WEIGHT_GRADS` says so and it applies
    (eager mode: the compiled path's backward is traced, and the kernel has no fake version), else MKL's `mm`."""
    if eager and WEIGHT_GRADS == "native" and x2.shape[-1] % 16 == 0 and native.load() and native.attention_supported():
        return native.weight_grad(g2.contiguous(), x2.contiguous())
    return g2.t().mm(x2)


def _linear_grads(ctx, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, linear, dense_t: bool = True,
                  eager: bool = True):
    """dx through `linear` (dx = dy·W is a linear layer with weight Wᵀ: dense for oneDNN, `dense_t`), dW = dyᵀ·x
    through `_weight_grad` and db as a column sum."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dx = linear(grad_out, weight.t().contiguous() if dense_t else weight.t(), None) if need_x else None
    dw = _weight_grad(g2, x.reshape(-1, x.shape[-1]), eager) if need_w else None
    db = g2.sum(0) if need_b and ctx.has_bias else None
    return dx, dw, db


def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # the weight packed at each call: 0.3-0.5 ms for 384 × 1536 against ~24 ms for a product of 1,576 rows (one thread)
    return native.rows_linear(x, native.pack_panels(weight), bias, "none", "")


def _native_fits(weight: torch.Tensor) -> bool:
    """Both products on the panel kernel: their output widths (out and in features) in 16s, at least
    NATIVE_MIN_FEATURES where oneDNN stands beside the kernel, the kernels loaded."""
    return (weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
            and (not ONEDNN_BESIDE_NATIVE or min(weight.shape) >= NATIVE_MIN_FEATURES)
            and native.load() and native.attention_supported())


class _FastLinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b: forward and dx through oneDNN, or with `native_route` through the native panel kernel; dW by
    `_weight_grad`, db as a column sum (eager mode)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                native_route: bool = False) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.native_route = native_route
        return (_native_linear if native_route else _onednn_linear)(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        # the native route takes Wᵀ as it lies: pack_panels reads a transposed weight without a transposed copy
        linear = _native_linear if ctx.native_route else _onednn_linear
        return (*_linear_grads(ctx, x, weight, grad_out, linear, dense_t=not ctx.native_route), None)


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
    return _linear_grads(ctx, x, weight, grad_out, onednn_linear, eager=False)


onednn_linear.register_autograd(_op_backward, setup_context=_op_setup_context)


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and fast_training_available())


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with the native/oneDNN/MKL routing of `FastLinear` where a gradient is to be taken.

    Without autograd (evaluation, inference) and while tracing or scripting it is exactly `F.linear`, so
    validation figures and exports see the plain operator; under `torch.compile` it is the custom operator
    `hybridzoo::onednn_linear` (oneDNN's products, see the module docstring) where oneDNN is the route or beside
    it (`ONEDNN_BESIDE_NATIVE`), else `F.linear`."""
    route = _product_route(x, weight, bias)
    if route is None:
        return F.linear(x, weight, bias)
    if route == "native":
        return _FastLinearFn.apply(x, weight, bias, True)
    if route == "op":
        return onednn_linear(x, weight, bias)
    if x.dim() > 2:
        # oneDNN's product of more than 2-D rows returns a view of its output, and a view made inside an autograd
        # Function may not be written in place (a ReLU(inplace=True) after the layer): 2-D rows in, a fresh output
        return _FastLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return _FastLinearFn.apply(x, weight, bias)


def _product_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Where `fast_linear` sends x·Wᵀ + b: "native", "onednn", "op" (the custom operator, under torch.compile) or
    None (`F.linear`)."""
    if (not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
            or torch.jit.is_tracing() or torch.jit.is_scripting() or PRODUCTS not in ("onednn", "native")
            or not _applies(x, weight)):
        return None
    if PRODUCTS == "native":
        if not torch.compiler.is_compiling() and _native_fits(weight):
            return "native"
        if not ONEDNN_BESIDE_NATIVE:
            return None
    return "op" if torch.compiler.is_compiling() else "onednn"


class FastLinear(nn.Linear):
    """`nn.Linear` whose products take the fastest of the native kernels, oneDNN and MKL on the CPU (see the module
    docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # eval mode is plain `nn.Linear`, bit for bit, with or without autograd
            return F.linear(x, self.weight, self.bias)
        return fast_linear(x, self.weight, self.bias)

    def output_slice(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """`self(x)[..., lo:hi]` from weight rows lo:hi only (`layers.attention.linear_rows`)."""
        w, b = self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi]
        return F.linear(x, w, b) if not self.training else fast_linear(x, w, b)


class FastPointwiseConv2d(nn.Conv2d):
    """A 1×1, stride-1 `nn.Conv2d` whose training products on a channels-last map are `FastLinear`'s over its pixels:
    the map's NHWC storage is already the (B·H·W, C) rows of a linear layer, so the forward, input gradient and
    weight gradient take the native kernels as a token product does (a channels-last BoT50 step 1.08× oneDNN's
    convolutions; benchmarks/RESULTS.md, session 36). An NCHW map, eval mode and everything `fast_linear` leaves to
    `F.linear` are the convolution itself, bit for bit."""

    plain_in_eval = True   # the frozen inference path folds it as it does an nn.Conv2d (`onednn.supports_conv`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.dim() == 4:
            rows, weight = x.permute(0, 2, 3, 1), self.weight.flatten(1)
            if rows.is_contiguous() and _product_route(rows, weight, self.bias) is not None:
                return fast_linear(rows, weight, self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


def _pointwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.padding == (0, 0) and m.groups == 1)


class _Winograd3x3Fn(torch.autograd.Function):
    """A 3×3 stride-1 padding-1 convolution of a channels-last map whose forward, input gradient and weight gradient
    run by Winograd's minimal filtering on the native kernels (`native.winograd3x3`, `native.winograd_weight_grad`);
    the bias gradient is dy's sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, tile):
        ctx.save_for_backward(x, weight)
        ctx.tile, ctx.has_bias = tile, bias is not None
        return native.winograd3x3(x, native.winograd_weight(weight, tile, exact=False), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = native.winograd3x3(dy, native.winograd_weight(weight, ctx.tile, transposed=True, exact=False),
                                    None)
        if ctx.needs_input_grad[1]:
            dw = native.winograd_weight_grad(x, dy, ctx.tile)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


class FastConv3x3(nn.Conv2d):
    """A dense 3×3, stride-1, padding-1 `nn.Conv2d` whose training forward, input gradient and weight gradient on a
    channels-last fp32 map run by Winograd's F(4×4, 3×3) or F(2×2, 3×3) on the native kernels: 4x or 2.25x fewer
    multiplies than the direct convolution, its weight transformed at each call in float32
    (`native.winograd_weight(..., exact=False)`), on maps large enough to pay for the transforms (`MIN_VALUES`).
    Outputs and gradients agree with the convolution's to fp32 rounding of the transforms (relative ~1e-5 with 4×4
    tiles). NCHW maps, smaller maps, eval mode, no gradient, autocast, tracing and compiling are the convolution
    itself, bit for bit."""

    plain_in_eval = True   # the frozen inference path folds it as it does an nn.Conv2d (`onednn.supports_conv`)
    # 4×4 tiles up to this many channel pairs (Cin·Cout), 2×2 above, as the inference copy chooses
    # (`onednn.OneDNNConv2d.WINOGRAD_TILE4_MAX_PAIRS`): at BoT50's 256 channels and 14² maps the 4×4 tiles' forward
    # ran 7.2 ms against 8.4 (8 images, one thread), but their weight transform, at each call, 2-3x as long
    TILE4_MAX_PAIRS = 128 * 128
    # Winograd from this many input values (pixels × channels) on, twice that for 32 input channels and 4x for 16:
    # below, the transforms of the weight (per call, ∝ channels²) and of the data (∝ pixels × channels) cost more
    # than the fewer multiplies save (∝ pixels × channels²). A layer's forward and backward broke even at 30-130 K
    # values for 64-256 channels on one thread, 130-260 K on two, and 130-520 K for 32 (AMD Zen 4; 0.4-0.97x
    # below, up to 2.7x above: benchmarks/RESULTS.md, session 38)
    MIN_VALUES = 256 * 1024
    WINOGRAD = True   # False: the convolution (benchmarks/train_levers.py's and winograd_train.py's A/B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.WINOGRAD and self.training and torch.is_grad_enabled() and x.dim() == 4
                and x.numel() >= self.MIN_VALUES * max(1, 64 // self.in_channels)
                and use_fused_cpu(x) and type(x) is torch.Tensor and x.is_contiguous(memory_format=torch.channels_last)
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            tile = 4 if self.in_channels * self.out_channels <= self.TILE4_MAX_PAIRS else 2
            return _Winograd3x3Fn.apply(x, self.weight, self.bias, tile)
        return super().forward(x)


def _dense3x3(m: nn.Module) -> bool:
    """An exact 3×3 stride-1 padding-1 convolution that `native.winograd3x3` takes both ways (channels in 16s)."""
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.padding == (1, 1) and m.groups == 1 and m.padding_mode == "zeros" and m.in_channels % 16 == 0
            and m.out_channels % 16 == 0)


class _NativeGELUFn(torch.autograd.Function):
    """Exact GELU, or QuickGELU (`quick`), through the native kernels, forward and backward (`layers.native.gelu`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quick: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.quick = quick
        return native.gelu(x, quick=quick)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return native.gelu(x, grad_out.contiguous(), quick=ctx.quick), None


def _native_gelu_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """A training step with a gradient, on a plain fp32 CPU tensor, eager, where the kernels run."""
    return (module.training and torch.is_grad_enabled() and x.requires_grad and use_fused_cpu(x)
            and type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and native.attention_supported())


def _native_gelu(x: torch.Tensor, quick: bool) -> torch.Tensor:
    """The native activation of x in x's own layout: a channels-last map goes through as its dense NHWC view, where
    a contiguous copy would cost a pass each way and leave BatchNorm's backward to mix two layouts (3× slower)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return _NativeGELUFn.apply(x.permute(0, 2, 3, 1), quick).permute(0, 3, 1, 2)
    return _NativeGELUFn.apply(x.contiguous(), quick)


class FastGELU(nn.GELU):
    """`nn.GELU` (exact) whose training forward and backward run on the native kernels: one pass over memory each
    way, where ATen's erf and exp per value cost 2–3× that on a CPU thread. Its erf is a rational approximation
    (absolute error below 5e-7: the values differ from ATen's by fp32 rounding). Eval mode, no gradient, tracing,
    compiling, other dtypes and CPUs without the kernels get `F.gelu`, bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "none" and _native_gelu_applies(self, x):
            return _native_gelu(x, False)
        return F.gelu(x, approximate=self.approximate)


class FastQuickGELU(QuickGELU):
    """`QuickGELU` (CvT's x·σ(1.702x)) whose training forward and backward run on the native kernels: one pass over
    memory each way, where the module's own takes three forward (1.702x written out, σ in place, the product) and
    two back (values within fp32 rounding of ATen's sigmoid). Otherwise `QuickGELU`, bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_gelu_applies(self, x):
            return _native_gelu(x, True)
        return super().forward(x)


# Below this many weights (in × out) oneDNN's per-call overhead loses to MKL: a 64×64 or 32×32 layer trained
# 10–17% slower through FastLinear, 64×256 and larger 7–14% faster (1 thread, CPU time, AMD Zen 4).
MIN_WEIGHT_NUMEL = 128 * 128


def optimize_for_cpu_training(model: nn.Module, min_weight_numel: int | None = None,
                              native_attention: bool = True, native_gelu: bool = True) -> nn.Module:
    """Switch every exact `nn.Linear` of `model` with at least `min_weight_numel` weights (default
    `MIN_WEIGHT_NUMEL`) to `FastLinear`, and every exact 1×1 stride-1 `nn.Conv2d` of that many to
    `FastPointwiseConv2d` (its products `FastLinear`'s on a channels-last map), in place; returns `model`.

    `native_attention`: the attention modules that can (`layers.attention.Attention`, ConViT's GPSA, CvT's,
    CoAtNet's relative attention with its bias) run through the native forward and backward kernels (`layers.native.attend`; compiled at the first call of a
    process that has none cached, about 30 s), where they build and the CPU has AVX-512 or AVX2; elsewhere SDPA
    stays.

    Where the native kernels build, every exact 3×3 stride-1 padding-1 dense `nn.Conv2d` with channels in 16s
    becomes `FastConv3x3`: on a channels-last map in training its forward and both gradients run by Winograd's
    tiles (BoT50's step 1.13×, U-Net's 1.49×).

    Modules with a training kernel of their own (a class attribute `native_training`: Mobile-Former's dynamic
    ReLU, the squeeze-excitation's two-pass gradient) are told to use it, where the native kernels build and the
    CPU has AVX-512 or AVX2.

    `native_gelu`: every exact `nn.GELU` (approximate="none") becomes `FastGELU`, and every `QuickGELU`
    `FastQuickGELU`, in place (the class only), where the native kernels build and the CPU has AVX-512 or AVX2.

    Subclasses of `nn.Linear` are left alone (they may override forward). Parameters, buffers, the state
    dict and an optimiser built on the model are unaffected. Without oneDNN this is a no-op."""
    if not fast_training_available():
        return model
    min_weight_numel = MIN_WEIGHT_NUMEL if min_weight_numel is None else min_weight_numel
    for m in model.modules():
        if type(m) is nn.Linear and m.in_features * m.out_features >= min_weight_numel:
            m.__class__ = FastLinear
        elif _pointwise(m) and m.in_channels * m.out_channels >= min_weight_numel:
            m.__class__ = FastPointwiseConv2d
    if native_attention:
        _use_native_attention(model)
    if not (native.load() and native.attention_supported()):
        return model
    for m in model.modules():
        if hasattr(type(m), "native_training"):   # a training kernel of its own (Mobile-Former's DyReLU)
            m.native_training = True
        elif _dense3x3(m):
            m.__class__ = FastConv3x3
        elif native_gelu and type(m) is nn.GELU and m.approximate == "none":
            m.__class__ = FastGELU
        elif native_gelu and type(m) is QuickGELU:
            m.__class__ = FastQuickGELU
    return model


def _use_native_attention(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(type(m), "native_attention") and hasattr(m, "num_heads"):
            m.native_attention = native.attention_ready(getattr(m, "head_dim", None)
                                                        or m.proj.in_features // m.num_heads)


# --- Batch split ------------------------------------------------------------------------------------------
# With N intra-op threads, each of N threads runs the forward and backward of 1/N of the batch with one
# intra-op thread: no OpenMP fork/join at each of the ~600 parallel regions of a ViT step, no second thread
# idling through the small ops (LayerNorm, GELU, adds, softmax). Only for models whose output row i depends on
# input row i alone in training mode, apart from BatchNorm2d (whose batch statistics the parts combine, below);
# no other batch statistics, no other running buffers.


# --- BatchNorm across the parts of a split ---------------------------------------------------------------
# While a split step runs, every BatchNorm2d in training mode is `_split_bn_forward` (an instance attribute set
# by `BatchSplitTraining` for the call and removed after it; the class, state dict and checkpoints are
# untouched). The parts run the same layers in the same order, so the k-th meeting of part 0 is the k-th of
# every other part: each part posts its per-channel partial results into the slot of that meeting, waits at
# the call's barrier, and combines every part's entries in part order (the same bits on every part).
# Forward: count, mean and M2 per part, combined with Chan's formula in float64; backward: Σdy and Σdy·x̂.


def split_batchnorm_supported(m: nn.Module) -> bool:
    """True for the BatchNorm layers whose batch statistics the batch split combines across its parts: BatchNorm2d
    and subclasses that keep its forward."""
    return (isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.modules.batchnorm._BatchNorm.forward
            and "forward" not in vars(m))


class _PartsMeeting:
    """What the parts of one split forward (or backward) share: a barrier and one slot per meeting."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n)
        self.slots: dict[int, list] = {}
        self.lock = threading.Lock()

    def meet(self, part: int, key: int, tag, value) -> list:
        """Post (tag, value) as part `part` of meeting `key`, wait for every part, return every part's value in
        part order. Parts at different meetings (a layer mismatch) raise on every part instead of mixing."""
        with self.lock:
            slot = self.slots.setdefault(key, [None] * self.n)
        slot[part] = (tag, value)
        self.barrier.wait()
        tags = [e[0] for e in slot]
        if any(t != tags[0] for t in tags):
            raise RuntimeError(f"BatchSplitTraining: the parts went out of step at meeting {key}: "
                               f"{', '.join(f'part {i} at {t}' for i, t in enumerate(tags))} (the batch split needs "
                               "every part to run the same BatchNorm layers in the same order)")
        return [e[1] for e in slot]


class _PartState(threading.local):
    meeting: _PartsMeeting | None = None
    part = 0
    count = 0


_PART = _PartState()


def _run_parts(run, n: int, meeting: _PartsMeeting | None) -> list:
    """`run_on_threads(run, n)`, each part bound to `meeting` (its BatchNorms meet there) and ending with one
    meeting of its own, so a part that ran fewer BatchNorms than the others raises instead of leaving them
    waiting. A part that fails breaks the barrier (nothing waits forever); every part is waited for, then the
    first error that is not a broken barrier is raised."""
    if meeting is None:
        return run_on_threads(run, n)
    errors: list = [None] * n

    def part(i):
        _PART.meeting, _PART.part, _PART.count = meeting, i, 0
        try:
            out = run(i)
            meeting.meet(i, _PART.count, "the end of its part", None)
            return out
        except BaseException as e:  # noqa: BLE001 - raised below, once every part has stopped
            meeting.barrier.abort()
            errors[i] = e
            return None
        finally:
            _PART.meeting = None

    outs = run_on_threads(part, n)
    failed = [e for e in errors if e is not None]
    if failed:
        raise next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)), failed[0])
    return outs


def _meet(m: nn.Module, phase: str, value) -> list:
    state = _PART
    key = state.count
    state.count += 1
    return state.meeting.meet(state.part, key, (phase, m.__class__.__name__, id(m)), value)


class _SplitBatchNormFn(torch.autograd.Function):
    """BatchNorm in training mode on one part of a split batch, with the whole batch's statistics and the whole
    batch's backward. Inputs: x (N×C×…), weight, bias (or None); `m` the module (its eps and running buffers),
    `factor` the running-average factor (None: no running statistics to update)."""

    @staticmethod
    def forward(ctx, x, weight, bias, m, factor):
        # per-part mean and biased variance in one fused pass (channels-last too), combined in float64
        mean_p, var_p = torch.batch_norm_update_stats(x, None, None, 0.0)
        count_p = x.numel() // x.shape[1]
        parts = _meet(m, "forward", (count_p, mean_p.double(), var_p.double()))
        count = sum(c for c, _, _ in parts)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} values per channel "
                             f"over the whole batch (input of {type(m).__name__} with {x.shape[1]} channels)")
        mean = sum(c * mu for c, mu, _ in parts) / count
        m2 = sum(c * v + c * (mu - mean).square() for c, mu, v in parts)   # Chan et al.: ΣM2ₚ + Σnₚ(μₚ − μ)²
        # the statistics in the precision PyTorch's kernels keep them: float32, float64 for a float64 input
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean32, var32 = mean.to(dtype), (m2 / count).to(dtype)
        if factor is not None and _PART.part == 0:   # once per step, as nn.BatchNorm2d does (unbiased variance)
            with torch.no_grad():
                m.running_mean.mul_(1 - factor).add_(mean.to(m.running_mean.dtype), alpha=factor)
                m.running_var.mul_(1 - factor).add_((m2 / (count - 1)).to(m.running_var.dtype), alpha=factor)
        # the normalisation with the whole batch's mean and variance: the eval-mode kernel, one pass
        y = torch.batch_norm(x, weight, bias, mean32, var32, False, 0.0, m.eps, False)
        invstd = (var32 + m.eps).rsqrt()
        ctx.save_for_backward(x, weight, mean32, invstd)
        ctx.m, ctx.count = m, count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        m, count = ctx.m, ctx.count
        if _PART.meeting is None:
            raise RuntimeError("BatchSplitTraining: the backward of a split BatchNorm ran outside the split backward")
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 \
            else torch.contiguous_format
        dy = dy.contiguous(memory_format=fmt)   # the kernels below take slow paths on mixed layouts
        # this part's Σdy·x̂ and Σdy per channel (x̂ with the whole batch's mean and 1/σ), one fused pass
        _, sum_dyxhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, m.eps, [False, True, True])
        parts = _meet(m, "backward", (sum_dyxhat, sum_dy))
        dx = None
        if ctx.needs_input_grad[0]:
            total_dyxhat, total_dy = parts[0][0].clone(), parts[0][1].clone()
            for a, b in parts[1:]:
                total_dyxhat.add_(a)
                total_dy.add_(b)
            # dx = w/σ · (dy − mean(dy) − x̂·mean(dy·x̂)) = a·dy + b·x + c per channel
            a = invstd if weight is None else weight * invstd
            b = -a * invstd * (total_dyxhat / count)
            c = -a * (total_dy / count) - b * mean
            shape = (1, -1) + (1,) * (x.dim() - 2)
            dx = torch.addcmul(c.view(shape), x, b.view(shape), out=torch.empty_like(x))
            dx.addcmul_(dy, a.view(shape))
        # dγ and dβ: this part's sums; the parts' parameter gradients are added by BatchSplitTraining._backward
        return (dx, sum_dyxhat if ctx.needs_input_grad[1] else None,
                sum_dy if ctx.needs_input_grad[2] else None, None, None)


_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def _split_bn_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward a BatchNorm2d has while a split step runs (see `_SplitBatchNormFn`); calls from threads that
    are not parts of the split, and calls that do not use batch statistics (eval mode with running
    statistics), are the module's own forward."""
    if _PART.meeting is None or not (m.training or m.running_mean is None):
        return _BN_FORWARD(m, x)
    m._check_input_dim(x)
    factor = None   # part 0 alone updates the running statistics, once, with the whole batch's
    if _PART.part == 0 and m.training and m.track_running_stats and m.running_mean is not None:
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
        if m.momentum is not None:
            factor = m.momentum
        else:   # a cumulative average, as nn.BatchNorm2d
            factor = 1.0 / float(m.num_batches_tracked) if m.num_batches_tracked is not None else 0.0
    return _SplitBatchNormFn.apply(x, m.weight, m.bias, m, factor)


def split_training_blocker(model: nn.Module) -> str | None:
    """Why `model` cannot be trained by batch split (`BatchSplitTraining`), or None when it can.

    BatchNorm2d is split (the parts meet at each one and use the whole batch's statistics, see
    `_SplitBatchNormFn`). Blocked: other layers with batch statistics (BatchNorm1d / 3d, SyncBatchNorm,
    BatchNorm2d subclasses with a forward of their own) or running buffers (a part's statistics are not the
    batch's), dropout drawn from the global generator (the threads would draw in a timing-dependent order;
    DropPath draws from a per-part generator and is fine), activation checkpointing (its recompute restores
    the global generator, not the per-part one, and would meet the other parts twice at each BatchNorm)."""
    for name, m in model.named_modules():
        where = name or type(model).__name__
        if split_batchnorm_supported(m):
            pass   # its running buffers are updated once per step, by part 0, with the whole batch's statistics
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            return (f"{where} ({type(m).__name__}) normalises with batch statistics (the batch split combines "
                    "them across its parts for BatchNorm2d only)")
        elif any(b.split(".")[-1].startswith("running_") for b, _ in m.named_buffers(recurse=False)):
            return f"{where} ({type(m).__name__}) keeps running statistics"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{where} ({type(m).__name__}, p={m.p}) draws from the global generator"
        drop = m.dropout if isinstance(m, nn.MultiheadAttention) else getattr(m, "attn_drop", None)
        if isinstance(drop, float) and drop > 0:
            return f"{where} ({type(m).__name__}) uses attention dropout {drop}, drawn from the global generator"
        if getattr(m, "grad_checkpointing", False):
            return f"{where} ({type(m).__name__}) uses activation checkpointing"
    return None


def _flat_outputs(out) -> list[torch.Tensor] | None:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    return None


class _JoinParts(torch.autograd.Function):
    """The parts' outputs (detached leaves) concatenated along the batch; its backward hands each part its
    slice of the gradient and runs the parts' backward passes in parallel (`BatchSplitTraining._backward`)."""

    @staticmethod
    def forward(ctx, owner, sizes, n_out, *leaves):
        ctx.owner, ctx.sizes, ctx.n_out = owner, sizes, n_out
        n_parts = len(sizes)
        return tuple(torch.cat(leaves[k * n_parts:(k + 1) * n_parts]) for k in range(n_out))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        ctx.owner._backward([g.split(ctx.sizes) if g is not None else None for g in grads])
        return (None, None, None) + (None,) * (len(ctx.sizes) * ctx.n_out)


class BatchSplitTraining(nn.Module):
    """`model` in training with its batch cut into one part per intra-op thread (see `split_training_blocker`
    for the models it applies to).

    `wrapper(x)` runs each part's forward on a thread of its own with one intra-op thread and returns the
    concatenated output, whose gradient is the whole batch's: the loss is computed on the whole batch (label
    smoothing, mixup targets, distillation as they are), and its backward runs the parts' backward passes in
    parallel, again one thread each. The parameter gradients are summed in part order, so the step is the
    whole-batch step (fp32 rounding aside) and the same bits on every run with the same thread count.

    BatchNorm2d layers in training mode normalise every part with the whole batch's mean and variance, update
    their running statistics once per step with the whole batch's values (as `nn.BatchNorm2d`), and their
    backward is the whole batch's: the parts meet at each of them, in forward and in backward (`_PartsMeeting`;
    for the call only, through an instance `forward` removed afterwards). A part that fails or runs out of
    step with the others raises in the caller; none is left waiting.

    Drop-path masks come from one generator per part, seeded from the global generator once per call: the
    same bits on every run, though not the masks the whole-batch model would draw. The wrapper is the
    training call only; the state dict, evaluation and checkpoints are the model's (`wrapper.module`). Calls
    it cannot split (one thread, a batch of one, no gradient, eval mode, keyword arguments, outputs that are
    not per-sample tensors) run `model` as it is."""

    def __init__(self, model: nn.Module, threads: int | None = None):
        super().__init__()
        blocker = split_training_blocker(model)
        if blocker is not None:
            raise ValueError(f"BatchSplitTraining: {type(model).__name__} cannot be trained by batch split: {blocker}")
        self.module = model
        self.threads = threads
        from hybridzoo.layers.drop import DropPath
        self._draws = any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules())
        self._bns = [m for m in model.modules() if split_batchnorm_supported(m)]
        self._pending: list | None = None
        self._ok = True

    def _n_parts(self, x) -> int:
        threads = self.threads or torch.get_num_threads()
        if (not self._ok or not self.module.training or not torch.is_grad_enabled() or threads < 2
                or not isinstance(x, torch.Tensor) or x.dim() == 0 or torch.jit.is_tracing()
                or torch.compiler.is_compiling()):
            return 1
        return min(threads, x.shape[0])

    def forward(self, *args, **kwargs):
        n = self._n_parts(args[0]) if len(args) == 1 and not kwargs else 1
        if n < 2:
            return self.module(*args, **kwargs)
        from hybridzoo.layers.drop import use_generator

        x = args[0]
        parts = x.tensor_split(n)
        seeds = (torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64).tolist() if self._draws else [None] * n)
        rng_before = torch.get_rng_state()
        grad_mode = torch.is_grad_enabled()

        def run(i):
            gen = torch.Generator().manual_seed(seeds[i]) if seeds[i] is not None else None
            with torch.set_grad_enabled(grad_mode), use_generator(gen):
                return self.module(parts[i])

        meeting = _PartsMeeting(n) if self._bns else None
        saved = [b.clone() for b in self._bn_buffers()]
        for m in self._bns:   # for this call only; the class, state dict and eval forward stay nn.BatchNorm2d's
            m.__dict__["forward"] = _split_bn_forward.__get__(m)
        try:
            outs = _run_parts(run, n, meeting)
        except BaseException:
            self._restore_bn_buffers(saved)
            raise
        finally:
            for m in self._bns:
                m.__dict__.pop("forward", None)
        if not torch.equal(torch.get_rng_state(), rng_before):
            # something in the model drew from the global generator on the worker threads: correct for this
            # step, but in a timing-dependent order; whole batches from now on
            self._ok = False
            print(f"note: {type(self.module).__name__} draws random numbers from the global generator; "
                  "training continues without the batch split to stay reproducible")
        flat = [_flat_outputs(o) for o in outs]
        if any(f is None for f in flat) or len({len(f) for f in flat}) != 1 or not all(
                t.dim() > 0 and t.shape[0] == p.shape[0] for f, p in zip(flat, parts) for t in f):
            self._ok = False  # outputs that are not per-sample tensors: run the whole batch, now and from now on
            print(f"note: {type(self.module).__name__} returns outputs that are not per-sample tensors; "
                  "training continues without the batch split")
            self._restore_bn_buffers(saved)   # the whole batch updates the running statistics instead
            return self.module(*args)
        n_out = len(flat[0])
        self._pending = [f for f in flat]
        leaves = [flat[i][k].detach().requires_grad_(flat[i][k].requires_grad)
                  for k in range(n_out) for i in range(n)]
        joined = _JoinParts.apply(self, [p.shape[0] for p in parts], n_out, *leaves)
        if isinstance(outs[0], torch.Tensor):
            return joined[0]
        return type(outs[0])(joined)

    def _bn_buffers(self) -> list[torch.Tensor]:
        return [b for m in self._bns for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]

    def _restore_bn_buffers(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for b, v in zip(self._bn_buffers(), saved):
                b.copy_(v)

    def _backward(self, grads) -> None:
        """The parts' backward passes, one thread each: part 0 accumulates into `.grad`, the others return
        their gradients, added in part order (a fixed order of sums: the same bits on every run)."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("BatchSplitTraining: backward through a split forward ran twice")
        params = [p for p in self.module.parameters() if p.requires_grad]

        def part(i):
            outs, gs = [], []
            for k, o in enumerate(pending[i]):
                if grads[k] is not None and o.requires_grad:
                    outs.append(o)
                    gs.append(grads[k][i])
            if not outs:
                return None
            if i == 0:
                torch.autograd.backward(outs, gs)
                return None
            return torch.autograd.grad(outs, params, gs, allow_unused=True)

        results = _run_parts(part, len(pending), _PartsMeeting(len(pending)) if self._bns else None)
        for res in results[1:]:
            if res is None:
                continue
            for p, g in zip(params, res):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
