"""A frozen CPU inference path whose matrix products go through oneDNN.

On x86 CPUs `nn.Linear` dispatches fp32 products to MKL's sgemm; oneDNN's inner-product primitive with
a weight packed once into its blocked layout can apply the bias and an element-wise activation in the
same pass over the output. `optimize_for_cpu_inference` makes a frozen copy of a model in which

- every `nn.Linear` is a `OneDNNLinear` holding the packed weight (tiny products — a few rows against a
  small weight, e.g. Mobile-Former's 6 tokens at batch 1 — go to MKL instead, whose fixed cost per call is
  lower; the activation then follows as its own pass);
- the activation of a transformer MLP (`layers.Mlp`: fc1 → act → fc2) is fused into fc1 when oneDNN
  has it as a post-op: exact or tanh GELU, ReLU, SiLU, and QuickGELU x·σ(1.702x). oneDNN's swish
  post-op is x·σ(x) with a fixed α = 1, but QuickGELU(z) = swish(1.702·z) / 1.702, so fc1's weight
  and bias are scaled by 1.702 and fc2's weight by 1/1.702 — exact algebra, only fp32 rounding moves; the
  frozen MLP (`FrozenMlp`) runs inputs whose hidden layer would exceed 32 MB in row chunks of ~2 MB of hidden
  layer (CvT-13's stage-1/2 MLPs at batch 32), so the hidden layer stays in the cache;
- every `nn.Conv2d` is a `OneDNNConv2d` (1×1 ones run as packed inner products over the channels-last
  pixels, the others as oneDNN convolutions with the weight packed for the actual input shape, once per
  shape), with the BatchNorm that follows it
  folded into its weight and bias (W·γ/σ, (b−μ)·γ/σ+β: exact algebra in eval mode) and the activation
  after that fused as a post-op, wherever the pattern is visible: consecutive children of an
  `nn.Sequential` (`ConvBnAct`, ResNet stems and shortcuts), and the blocks that know their own
  layout through a `freeze_for_cpu_inference(batch_hint)` method returning a frozen replacement
  (CoAtNet's MBConv, BoTNet's bottlenecks, ConViT's GPSA, Mobile-Former's dynamic ReLU, ...; they may
  also precompute what does not depend on the input, such as relative-position bias tables or
  positional attention maps);
- residual blocks add their shortcut inside the last convolution (oneDNN's sum post-op, ReLU after it), and
  in a chain of such blocks (`InplaceChain`: BoTNet's stages, CoAtNet's MBConv stages) write the result into
  the shortcut's buffer instead of a fresh one; the chain's own input is never written;
- with `channels_last=True` (default) convolution weights are stored channels-last, so oneDNN
  convolutions run in NHWC without reordering their input and output at every call;
- with `split_batch=True` (default; the bf16 copy too, under the caller's autocast) `model(x)` on a batch cuts it
  into one part per intra-op thread and runs each part on a thread of its own with one intra-op thread
  (`split_batch_forward`): the same function, without the OpenMP fork/join (and the wait for the slower thread)
  at every LayerNorm, add, softmax and product of the forward, which on the 2-vCPU EPYC cost more than the
  products gain from sharing threads.
  A part whose largest tensor would exceed glibc's mmap threshold (32 MiB) runs in sub-batches that stay under
  it (`images_per_call`: one input's forward under a dispatch mode at the first call per input shape), so its
  activations are reused heap memory instead of fresh mappings faulted in at every call (CoAtNet-0 at batch 32:
  ~210,000 page faults per forward without, 1.11× with); with one intra-op thread the batch runs in the same
  sub-batches.
- with `split_tokens=True` (default, fp32) one image through the transformer blocks that support it (ViT / DeiT,
  ConViT; CvT's, whose convolutional projections make the threads meet twice per block) may run as one share of
  its token rows per intra-op thread, each on one thread, the threads meeting once per block where attention
  needs every key (`layers.onednn_tokens`): batch 1 has no batch to split. Both
  ways are timed at the first call for each token count and the faster is kept. Mobile-Former's frozen block
  (models/mobile_former.py) can run one image's token side beside its first convolution and the rest as two
  halves of the map, one thread each (`PARALLEL`, off by default: slower on the idle machine).

With `dtype=torch.bfloat16` the linear weights are packed in bf16, convolution weights are stored in
bf16, and a call of the copy (`model(x)`) runs under CPU autocast (bf16 products, fp32 or bf16-in/fp32-accumulate
for normalisation and softmax, as autocast decides) and returns fp32 tensors. On CPUs with AVX512-BF16
or AMX the products run about twice as fast as fp32; elsewhere oneDNN emulates bf16 and it is slower, and on
CPUs for which oneDNN has no bf16 kernels at all (AVX2 only: AMD Zen 3, Intel before Skylake-SP) the linear
layers keep a plain bf16 weight for ATen's bf16 product (`onednn_bf16_available`).
The outputs differ from fp32 by bf16 rounding (about 3 significant digits); see docs/bf16.md.

The result is inference only: packed weights are opaque oneDNN tensors, so the optimised copy is
neither trainable nor saved. Measured benefits depend on the machine; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import copy
import os
import statistics
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
from torch import nn

from hybridzoo.layers import native
from hybridzoo.layers.mlp import Mlp, QuickGELU
from hybridzoo.profile import OutputBytes

__all__ = ["FrozenMlp", "InplaceChain", "OneDNNConv2d", "OneDNNLinear", "conv_post_op", "fold_batch_norm",
           "fastest_cpu_inference", "optimize_for_cpu_inference", "onednn_available", "onednn_bf16_available",
           "split_batch_forward", "QUICK_GELU_ALPHA"]

QUICK_GELU_ALPHA = 1.702
_PACK_LOCK = threading.Lock()


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# activation module → (oneDNN post-op attr, algorithm)
def _post_op(act: nn.Module) -> tuple[str, str] | None:
    if isinstance(act, nn.GELU):
        return ("gelu", "none") if act.approximate == "none" else ("gelu", "tanh")
    if isinstance(act, nn.ReLU):
        return ("relu", "")
    if isinstance(act, (nn.SiLU, QuickGELU)):
        return ("swish", "")
    return None


# convolution post-ops: activation module → (attr, scalars, algorithm); None when oneDNN has none for it
def conv_post_op(act: nn.Module | None) -> tuple[str, list, str] | None:
    if act is None or isinstance(act, nn.Identity):
        return ("none", [], "")
    if isinstance(act, nn.GELU):
        return ("gelu", [], act.approximate)
    if isinstance(act, nn.ReLU):
        return ("relu", [], "")
    if isinstance(act, nn.SiLU):
        return ("swish", [], "")
    if isinstance(act, nn.Hardswish):
        return ("hardswish", [], "")
    if isinstance(act, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return ("hardtanh", [float(act.min_val), float(act.max_val)], "")
    return None


def onednn_bf16_available() -> bool:
    """Whether oneDNN runs bf16 products on this CPU: it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT (and emulates
    the bf16 arithmetic where there is no AVX512-BF16 or AMX); AVX2-only CPUs such as AMD Zen 3 have none."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _native_call(x: torch.Tensor) -> bool:
    """Whether a frozen layer prepared for the native kernels (products on panels, patch embeddings,
    depthwise convolutions) may call them with x now: a plain fp32 tensor, no tracer or compiler watching (to them
    the kernels are opaque calls: oneDNN's ops stay), the kernels still on (HYBRIDZOO_NATIVE)."""
    return (x.dtype == torch.float32 and type(x) is torch.Tensor and native.attention_supported()
            and not (torch.compiler.is_compiling() or torch.jit.is_tracing()))


def _check_frozen_input(x: torch.Tensor, what: str, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    if x.dtype not in dtypes or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{what} is a frozen fp32 CPU inference layer; call the model under "
                           "torch.inference_mode() on float32 CPU tensors")


@torch.no_grad()
def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                    bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of conv → eval-mode BN as one conv: W' = W·γ/σ per output channel, b' = (b − μ)·γ/σ + β."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w.float(), shift.float()


class OneDNNConv2d(nn.Module):
    """y = act(conv(x, W) + b [+ other]) through oneDNN, optionally with a BatchNorm folded into W and b.

    `forward(x)` applies the unary post-op; `forward(x, other)` adds `other` (same shape, e.g. a residual)
    inside the convolution's output pass: act(conv(x) + b + other) (oneDNN fuses only ReLU after the add;
    other activations then run as a pass of their own). `forward(x, other, inplace=True)` writes the result
    into `other` itself (oneDNN's sum post-op) and returns it: no new output buffer, which at batch 32 is
    worth up to 4× on the residual 1×1 convolutions of a ResNet stage (fresh 100 MB outputs are mmap'd and
    page-faulted at every call). Only for a caller that owns `other` (see `InplaceChain`).

    The weight is packed into oneDNN's blocked layout for the actual input shape, once per shape and intra-op
    thread count (a few are cached): measured on the EPYC machine (1 thread) that is worth up to 3.5× at batch 1
    over a plain channels-last weight (1024→2048, stride 2 at 14×14: 24 → 85 GFLOP/s) and nothing at batch 32.
    A 1×1, stride-1, ungrouped convolution without a residual runs as oneDNN's inner product over the
    channels-last pixels (`pointwise`), which is as fast as the shape-packed convolution at these shapes.

    On CPUs with AVX-512 or AVX2, in fp32 (`_native_call`): the pointwise product runs on the native panel kernel, a
    patch embedding (kernel = stride, `patchify`) on `native.patch_embed` and a depthwise 3×3 convolution on
    `native.depthwise3x3`, a dense 3×3 stride-1 convolution (padding 1) on `native.winograd3x3` (Winograd's
    4×4 or 2×2 output tiles), and any other dense convolution of at least 64 outputs (an image stem, a strided
    convolution, any input channels) on `native.gather_conv`, where their activation has an epilogue there and the
    channels are a multiple of 16.
    """

    MAX_PACKED_SHAPES = 4
    RESIDUAL_PANEL_ROWS = 4096   # residual 1×1 convolutions of at most this many pixels run on the panel product
    # False: 1×1 convolutions without a residual run as shape-packed convolutions too (measured level with the
    # inner product on whole BoT50 / CoAtNet-0 at batch 32 and 1, so the inner product stays; benchmarks/infer_levers.py)
    INNER_PRODUCT_1X1 = True
    # False: dense 3×3 stride-1 convolutions stay on oneDNN's direct convolution (for A/B measurements)
    WINOGRAD_3X3 = True
    # their output tiles (read when the layer is built): 4×4 (F(4×4, 3×3), 1.5× F(2×2, 3×3) alone from 28² up on
    # Zen 3) up to Cin·Cout = 128², 2×2 above: 4×4 tiles hold 36 transformed weights per pair of channels (2×2: 16),
    # and inside a forward, where they come from memory, BoT50's 256² ones (9.4 MB) made the whole model 0.95×
    WINOGRAD_TILE = 4
    WINOGRAD_TILE4_MAX_PAIRS = 128 * 128
    # False: the other dense convolutions stay on oneDNN (for A/B measurements). The gathered product needs outputs
    # enough to pay for gathering each pixel's patch: with 16 or 32 (Mobile-Former's and SCTNet's stems) it ran
    # 0.75-0.79x oneDNN's convolution on a batch split's 16 images a thread (Zen 3, benchmarks/RESULTS.md, session 22)
    GATHER_CONV = True
    GATHER_MIN_OUT = 64

    def __init__(self, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm | None = None,
                 act: nn.Module | None = None, batch_hint: int | None = None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        op = conv_post_op(act)
        if op is None:
            raise ValueError(f"oneDNN has no convolution post-op for {type(act).__name__}")
        if not supports_conv(conv):
            raise ValueError(f"OneDNNConv2d takes a zero-padded 2-D convolution with numeric padding, got {conv}")
        self.attr, self.scalars, self.algorithm = op
        self.act = act if self.attr != "none" else None
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.padding, self.stride, self.dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.groups = conv.groups
        w = conv.weight.detach().float() if weight is None else weight
        b = (None if conv.bias is None else conv.bias.detach().float()) if bias is None else bias
        if bn is not None:
            w, b = fold_batch_norm(w, b, bn)
        self.folded_bn = bn is not None
        self.pointwise = (tuple(self.kernel_size) == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]
                          and self.groups == 1)
        # the native kernels below have this activation in their epilogue, and they are built for this CPU
        native_epilogue = (self.attr in ("none", "relu", "gelu", "swish") and self.out_channels % 16 == 0
                           and native.load() and native.attention_supported())
        self.panels = None
        if self.pointwise:
            rows_weight = w.reshape(self.out_channels, self.in_channels).contiguous()
            # on the native panel kernel where it has the activation (as OneDNNLinear; oneDNN's copy packed lazily)
            if native_epilogue:
                self.panels = native.pack_panels(rows_weight)
            self.packed_weight = (None if self.panels is not None
                                  else torch.ops.mkldnn._reorder_linear_weight(rows_weight, batch_hint))
            self.batch_hint = batch_hint
        self.conv_weight = w.contiguous(memory_format=torch.channels_last)
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}
        # a patch embedding (kernel = stride, no padding): the native gather-and-product where it is built
        self.patchify = (list(self.kernel_size) == self.stride and self.padding == [0, 0] and self.dilation == [1, 1]
                         and self.groups == 1 and self.attr == "none" and not self.pointwise
                         and self.out_channels % 16 == 0)
        # a depthwise 3×3 convolution (padding 1, stride 1 or 2): the native kernel where it has the activation
        self.depthwise_taps = None
        if (self.groups == self.in_channels == self.out_channels and tuple(self.kernel_size) == (3, 3)
                and self.padding == [1, 1] and self.dilation == [1, 1] and self.stride in ([1, 1], [2, 2])
                and native_epilogue):
            self.depthwise_taps = w.reshape(self.out_channels, 9).t().contiguous()
        # a dense 3×3 convolution, stride 1, padding 1: Winograd's minimal filtering on the native kernels where it
        # has the activation (4×4 tiles: 4x fewer multiplies, 2.2-3x oneDNN's convolution on BoT50's 64- and
        # 128-channel shapes at batch 1, 2.2x on CoAtNet-0's stem at 112²; 2×2 tiles: 2.25x fewer, 1.95x on its
        # 256-channel ones; Zen 3, benchmarks/RESULTS.md, session 20)
        self.winograd_weight = None
        if (tuple(self.kernel_size) == (3, 3) and self.padding == [1, 1] and self.stride == [1, 1]
                and self.dilation == [1, 1] and self.groups == 1 and self.in_channels % 16 == 0 and native_epilogue):
            pairs = self.in_channels * self.out_channels
            tile = 4 if self.WINOGRAD_TILE == 4 and pairs <= self.WINOGRAD_TILE4_MAX_PAIRS else 2
            self.winograd_weight = native.winograd_weight(w, tile)
        # any other dense convolution: the native product of the gathered patches (`native.gather_conv`)
        self.gather = (self.groups == 1 and self.dilation == [1, 1] and not self.pointwise and not self.patchify
                       and self.winograd_weight is None and self.depthwise_taps is None and native_epilogue
                       and self.out_channels >= self.GATHER_MIN_OUT)
        # the weight packed for the gathered patches (patch embeddings and `gather`), on first use, per layout the
        # input is read in: True channels-last, False an image's planes
        self._gather_panels: dict[bool, torch.Tensor] = {}
        self.packed_bias = None if b is None else b.contiguous()
        # the original tensors stay reachable for code that reads `conv.weight` (the forward uses the packed one)
        self.weight = conv.weight.detach()
        self.bias = None if conv.bias is None else conv.bias.detach()

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        # keyed by the intra-op thread count too: oneDNN picks the blocked layout for the threads it packs
        # under, and a weight packed under one count runs 13–14× slower under another (a 1×1 residual
        # convolution of BoT50 at 14²; a batch of 2 split into two 1-thread parts, then one image on 2 threads)
        key = (*x.shape, torch.get_num_threads())
        w = self._packed.get(key)
        if w is None:
            w = torch.ops.mkldnn._reorder_convolution_weight(
                self.conv_weight, self.padding, self.stride, self.dilation, self.groups, list(x.shape))
            # the batch split calls this from two threads at once (an odd batch gives two new shapes): the
            # eviction must not pop the same oldest entry twice
            with _PACK_LOCK:
                while len(self._packed) >= self.MAX_PACKED_SHAPES:
                    self._packed.pop(next(iter(self._packed)))
                self._packed[key] = w
        return w

    @property
    def _winograd(self) -> bool:
        return self.winograd_weight is not None and self.WINOGRAD_3X3

    @property
    def _gathered(self) -> bool:
        return self.gather and self.GATHER_CONV

    def _on_panels(self, x: torch.Tensor, other: torch.Tensor | None) -> bool:
        """Whether forward(x, other) runs the native panel product (a pointwise convolution's packed weight)."""
        if not (self.pointwise and self.panels is not None and _native_call(x)):
            return False
        if other is None:
            return self.INNER_PRODUCT_1X1
        return x.shape[0] * x.shape[2] * x.shape[3] <= self.RESIDUAL_PANEL_ROWS

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        return self._forward(x, other, inplace, self.panels)

    def forward_gated(self, x: torch.Tensor, gate: torch.Tensor, other: torch.Tensor | None = None,
                      inplace: bool = False, x_owned: bool = False) -> torch.Tensor:
        """forward(x · gate, other, inplace) for a per-channel gate (B, C_in, 1, 1) of x, such as a
        squeeze-excitation's. One image on the native panel product scales the packed weight's inputs instead
        (`native.scale_panels`: N·K multiplies, not a pass over x's pixels); otherwise x · gate is formed, in x
        itself where the caller owns x (`x_owned`)."""
        if x.dim() == 4 and x.shape[0] == 1 and gate.numel() == self.in_channels and self._on_panels(x, other):
            panels = native.scale_panels(self.panels, gate.reshape(-1).float().contiguous())
            return self._forward(x, other, inplace, panels)
        return self._forward(x.mul_(gate) if x_owned else x * gate, other, inplace, self.panels)

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(x), its channel means (B, C)): on the native depthwise kernel the means are summed as the
        output is stored (`native.depthwise3x3_pooled`), otherwise a pass over the output."""
        if self.depthwise_taps is not None and _native_call(x):
            self._check_input(x)
            return self._depthwise(x, native.depthwise3x3_pooled)
        y = self(x)
        return y, y.mean((2, 3))

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        _check_frozen_input(x, "OneDNNConv2d")
        if x.dim() != 4:
            raise ValueError(f"OneDNNConv2d expects a B×C×H×W tensor, got shape {tuple(x.shape)}")

    def _depthwise(self, x: torch.Tensor, op):
        """The native depthwise kernel `op` (native.depthwise3x3 or its pooled form) on x made channels-last."""
        return op(x.contiguous(memory_format=torch.channels_last), self.depthwise_taps, self.packed_bias,
                  self.stride[0], self.attr, self.algorithm)

    def _forward(self, x: torch.Tensor, other: torch.Tensor | None, inplace: bool,
                 panels: torch.Tensor | None) -> torch.Tensor:
        self._check_input(x)
        if (other is None and (self.patchify or self.depthwise_taps is not None or self._winograd or self._gathered)
                and _native_call(x)):
            if self.patchify:
                return self._patch_embed(x)
            if self._gathered:
                return self._gather_conv(x)
            if self._winograd:
                return native.winograd3x3(x.contiguous(memory_format=torch.channels_last), self.winograd_weight,
                                          self.packed_bias, self.attr, self.algorithm)
            return self._depthwise(x, native.depthwise3x3)
        x = x.contiguous(memory_format=torch.channels_last)
        if other is None:
            if self.pointwise and self.INNER_PRODUCT_1X1:
                B, _, H, W = x.shape
                rows = x.permute(0, 2, 3, 1).reshape(B * H * W, self.in_channels)   # a view of channels-last x
                if self._on_panels(x, None):
                    y = native.rows_linear(rows, panels, self.packed_bias, self.attr, self.algorithm)
                else:
                    y = torch.ops.mkldnn._linear_pointwise(rows, self._onednn_rows_weight(), self.packed_bias,
                                                           self.attr, self.scalars, self.algorithm)
                return y.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._weight_for(x), self.packed_bias, self.padding, self.stride, self.dilation, self.groups,
                self.attr, self.scalars, self.algorithm)
        B, _, H, W = x.shape
        if self._on_panels(x, other):
            # the native panel product with the residual added in its epilogue (before the activation, as the
            # sum post-op below), into `other` itself where the caller owns it: 1.07-1.17x oneDNN's convolution
            # with its sum post-op at batch 1 (BoT50's and CoAtNet-0's shapes, Zen 3); with more rows (a batch
            # split's share of 16 images) 0.84-1.25x, so those keep the convolution
            # (benchmarks/RESULTS.md, session 15)
            rows = x.permute(0, 2, 3, 1).reshape(B * H * W, self.in_channels)   # a view of channels-last x
            if inplace and other.is_contiguous(memory_format=torch.channels_last) and other.dtype == torch.float32:
                res = other.permute(0, 2, 3, 1).view(B * H * W, self.out_channels)
                native.rows_linear_add_(res, rows, panels, self.packed_bias, self.attr, self.algorithm)
                return other
            res = other.float().contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(
                B * H * W, self.out_channels)
            y = native.rows_linear(rows, panels, self.packed_bias, self.attr, self.algorithm, res)
            return y.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)
        # a residual add otherwise: oneDNN's inner product with a binary post-op measured 2–3× slower than the
        # convolution's sum post-op at every BoT50 shape, so residual 1×1 convolutions run as convolutions
        relu = self.attr == "relu"
        args = (self._weight_for(x), self.packed_bias, self.padding, self.stride, self.dilation, self.groups,
                "add", 1.0, "relu" if relu else None, [], None)
        if inplace and other.is_contiguous(memory_format=torch.channels_last) and other.dtype == torch.float32:
            y = torch.ops.mkldnn._convolution_pointwise_(other, x, *args)
        else:
            y = torch.ops.mkldnn._convolution_pointwise(x, other.contiguous(memory_format=torch.channels_last), *args)
        return y if relu or self.act is None else self.act(y)

    def _onednn_rows_weight(self) -> torch.Tensor:
        if self.packed_weight is None:
            with _PACK_LOCK, torch.inference_mode(False), torch.no_grad():
                if self.packed_weight is None:
                    rows_weight = self.conv_weight.reshape(self.out_channels, self.in_channels).contiguous()
                    self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(rows_weight, self.batch_hint)
        return self.packed_weight

    def _patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding by `native.patch_embed`: the same map, channels-last like oneDNN's output (to fp32
        rounding); 1.15-1.55× oneDNN's channels-last copy and convolution (benchmarks/RESULTS.md, session 13)."""
        kh, kw = self.kernel_size
        tokens = native.patch_embed(x, self._gather_weight(False), self.packed_bias, kh, kw)
        return tokens.view(x.shape[0], x.shape[2] // kh, x.shape[3] // kw, self.out_channels).permute(0, 3, 1, 2)

    def _gather_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution by `native.gather_conv`: an image of few channels (an NCHW stem's input) gathered from its
        planes as it lies, any other map from channels-last (copied so where it is not, as for oneDNN)."""
        channels_last = not (self.in_channels < 16 and x.is_contiguous())
        return native.gather_conv(x, self._gather_weight(channels_last), self.packed_bias, self.kernel_size,
                                  self.stride, self.padding, channels_last, self.attr, self.algorithm)

    def _gather_weight(self, channels_last: bool) -> torch.Tensor:
        panels = self._gather_panels.get(channels_last)
        if panels is None:
            with _PACK_LOCK, torch.inference_mode(False), torch.no_grad():   # usable in and out of inference mode
                panels = self._gather_panels.get(channels_last)
                if panels is None:
                    panels = self._gather_panels[channels_last] = native.gather_weight(self.conv_weight,
                                                                                       channels_last)
        return panels

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
             f"stride={tuple(self.stride)}, padding={tuple(self.padding)}")
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", as inner product" if self.pointwise else ""
        s += ", bn folded" if self.folded_bn else ""
        return s + (f", act={self.attr}" if self.attr != "none" else "")


class InplaceChain(nn.Sequential):
    """nn.Sequential for the frozen path whose blocks may reuse the previous block's output buffer.

    A block with `reuses_input = True` takes `forward(x, owned)` and returns a tensor that nobody but its
    caller holds (a fresh output, or `x` itself overwritten when `owned`). So inside the chain every such
    block after another such block is handed an input only the chain holds, and may write its output into
    it (a residual block: the sum post-op into the identity shortcut). The chain's own input is never written:
    the first block, and any block after another kind of module, get `owned=False`.
    Caveat: forward hooks on the inner blocks of a frozen copy see outputs that a later block overwrites.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owned = False
        for m in self:
            reuses = getattr(m, "reuses_input", False)
            x = m(x, owned) if reuses else m(x)
            owned = reuses
        return x


def supports_conv(conv: nn.Module) -> bool:
    # exactly nn.Conv2d, or a subclass that declares itself the same convolution in eval mode (FastPointwiseConv2d)
    return ((type(conv) is nn.Conv2d or getattr(type(conv), "plain_in_eval", False)) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.weight.device.type == "cpu")


def _fold_sequential(seq: nn.Sequential, batch_hint: int | None) -> None:
    """Conv2d → BatchNorm2d (→ activation) runs of consecutive children become one OneDNNConv2d."""
    names = list(seq._modules)
    i = 0
    while i < len(names):
        conv = seq._modules[names[i]]
        if not supports_conv(conv):
            i += 1
            continue
        bn = seq._modules[names[i + 1]] if i + 1 < len(names) else None
        if not (isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
                and bn.track_running_stats):
            bn = None
        j = i + (2 if bn is not None else 1)
        act = seq._modules[names[j]] if j < len(names) else None
        fused_act = act is not None and conv_post_op(act) is not None and not isinstance(act, nn.Identity)
        seq._modules[names[i]] = OneDNNConv2d(conv, bn, act if fused_act else None, batch_hint)
        if bn is not None:
            seq._modules[names[i + 1]] = nn.Identity()
        if fused_act:
            seq._modules[names[j]] = nn.Identity()
        i = j + (1 if fused_act else 0)


# products of at most TINY_PRODUCT multiply-adds with a weight of at most SMALL_WEIGHT elements go to MKL
SMALL_WEIGHT = 192 * 1152
TINY_PRODUCT = 6 * 192 * 192
# products of at most TINY_ROWS rows with such a weight (and a multiple of 16 outputs) go to the native kernel
# (`layers.native.tiny_linear`) where it is built: per call 2.4-3.6x faster than MKL with the weight in cache,
# 1.1-2x with it arriving cold
TINY_ROWS = 8
# products of another width than a multiple of 16, with a weight of at least PADDED_WEIGHT elements and fewer rows
# than PADDED_ROWS, go to the native kernel, the weight padded (`OneDNNLinear.padded_panels`): the weight's stream is
# then the cost, and the kernel splits it by columns over the threads (below `native.set_column_split_rows`, 64 rows).
# Measured on classifier heads (192-768 inputs, 1,000 outputs) from 1 to 32 rows
PADDED_WEIGHT = 64 * 1024
PADDED_ROWS = 64
_TINY_ACT = {"none": lambda y, alg: y, "relu": lambda y, alg: y.relu_(),
             "gelu": lambda y, alg: nn.functional.gelu(y, approximate=alg),
             "swish": lambda y, alg: nn.functional.silu(y, inplace=True)}


class OneDNNLinear(nn.Module):
    """y = act(x·Wᵀ + b) through oneDNN with W pre-packed; in fp32 on CPUs with AVX-512 or AVX2, with a multiple of 16
    outputs, through the native panel product instead (`native.rows_linear`, W packed in its panels; `panels`).

    act: "none", "gelu" (algorithm "none" = exact erf, "tanh"), "relu" or "swish" (x·σ(x)).
    `scale` multiplies W and `bias_scale` (default: `scale`) b before packing (QuickGELU folding).
    `weight` / `bias` keep the original, unscaled tensors (code that reads `layer.weight` directly keeps
    working; the layer's own forward uses the packed copy). `dtype=torch.bfloat16` packs W in bf16: fp32
    or bf16 inputs are cast to bf16 and the output is bf16 (the bias stays fp32; oneDNN adds it exactly; on CPUs
    without oneDNN bf16 kernels, ATen's bf16 product takes a bf16 bias).
    """

    def __init__(self, linear: nn.Linear, act: str = "none", algorithm: str = "", batch_hint: int | None = None,
                 scale: float = 1.0, bias_scale: float | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        bias_scale = scale if bias_scale is None else bias_scale
        if scale != 1.0:
            weight = weight * scale
        if bias is not None and bias_scale != 1.0:
            bias = bias * bias_scale
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"OneDNNLinear packs float32 or bfloat16 weights, got dtype={dtype}")
        self.dtype = dtype
        self.packed_bias = bias
        # fp32 products run on the native panel kernel (`native.rows_linear`): 1.0-1.27× oneDNN's packed product
        # on the Zen 4 EPYC (AVX-512) at every size we measured, most at a few hundred rows on two threads (batch 1),
        # 0.95-1.3× on a Zen 3 EPYC (AVX2; level at the largest, ahead at the smaller products); oneDNN's
        # copy is then packed only if a call needs it (HYBRIDZOO_NATIVE=0 set later, a tracer, a compiler)
        self.panels = self.padded_panels = self.padded_bias = None
        if dtype is torch.float32 and native.load() and native.attention_supported():
            if self.out_features % 16 == 0:
                self.panels = native.pack_panels(weight)
            elif weight.numel() >= PADDED_WEIGHT:
                # a large weight of another output count (a classifier's 1,000) on the same kernel, padded by zero
                # rows to a multiple of 16, the output cut back: a 1,000-class head at batch 1 from cold caches ran
                # 2.2-2.8x oneDNN's or MKL's product (about 50 against 140 µs on two threads; 1.35x at 32 rows;
                # benchmarks/RESULTS.md, session 35). `panels` stays None: the callers that read it take exact widths
                pad = -self.out_features % 16
                self.padded_panels = native.pack_panels(nn.functional.pad(weight, (0, 0, 0, pad)))
                self.padded_bias = nn.functional.pad(bias if bias is not None else weight.new_zeros(self.out_features),
                                                     (0, pad))
        # bf16 where oneDNN has no bf16 kernels for this CPU (it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; AVX2
        # machines such as AMD Zen 3 have neither, and packing refuses): ATen's bf16 product on a plain bf16 copy
        self.bf16_weight = self.bf16_bias = None
        if dtype is torch.bfloat16 and not onednn_bf16_available():
            self.bf16_weight = weight.to(dtype)
            self.bf16_bias = None if bias is None else bias.to(dtype)
        self.packed_weight = (None if self.panels is not None or self.padded_panels is not None
                              or self.bf16_weight is not None
                              else torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), batch_hint))
        # a plain copy of a small fp32 weight for tiny products (see forward)
        self.small_weight = weight if dtype is torch.float32 and weight.numel() <= SMALL_WEIGHT else None
        # and, where the native kernels are built, its transpose for products of at most TINY_ROWS rows
        self.tiny_wt = self.tiny_b = None
        if self.small_weight is not None and self.out_features % 16 == 0 and native.load():
            self.tiny_wt = weight.t().contiguous()
            self.tiny_b = bias if bias is not None else torch.zeros(self.out_features)
        # the plain tensors stay reachable for models that slice them (CeiT's LCA takes rows of qkv)
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.act = act
        self.algorithm = "none" if act == "gelu" and not algorithm else algorithm
        self.scale = scale
        self.batch_hint = batch_hint
        self._slices: dict[tuple[int, int], OneDNNLinear] = {}   # packed on first use by output_slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_frozen_input(x, "OneDNNLinear", (torch.float32, self.dtype))
        if (self.tiny_wt is not None and x.numel() <= TINY_ROWS * self.in_features and x.dtype is torch.float32
                and native.available()):
            # a few rows (Mobile-Former's tokens at batch 1): the native kernel, on this thread, faster than MKL
            return _TINY_ACT[self.act](native.tiny_linear(x.contiguous(), self.tiny_wt, self.tiny_b),
                                       self.algorithm)
        if self.padded_panels is not None and x.numel() < PADDED_ROWS * self.in_features and _native_call(x):
            return native.rows_linear(x, self.padded_panels, self.padded_bias, self.act,
                                      self.algorithm)[..., :self.out_features].contiguous()
        if self.small_weight is not None and x.numel() * self.out_features <= TINY_PRODUCT and x.dtype is torch.float32:
            # oneDNN's fixed cost per call (~17 µs on the EPYC, 1 thread) is several times MKL's on tiny
            # products such as Mobile-Former's 6-token linears (6×192 → 192: 11 vs 19 µs)
            return _TINY_ACT[self.act](nn.functional.linear(x, self.small_weight, self.packed_bias), self.algorithm)
        if self.panels is not None and _native_call(x):
            return native.rows_linear(x, self.panels, self.packed_bias, self.act, self.algorithm)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.bf16_weight is not None:
            return _TINY_ACT[self.act](nn.functional.linear(x, self.bf16_weight, self.bf16_bias), self.algorithm)
        return torch.ops.mkldnn._linear_pointwise(x, self._onednn_weight(), self.packed_bias, self.act, [],
                                                  self.algorithm)

    def _onednn_weight(self) -> torch.Tensor:
        if self.packed_weight is None:
            with _PACK_LOCK, torch.inference_mode(False), torch.no_grad():   # usable in and out of inference mode
                if self.packed_weight is None:
                    w = self.weight.float() * self.scale if self.scale != 1.0 else self.weight.float()
                    self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), self.batch_hint)
        return self.packed_weight

    def output_slice(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """`self(x)[..., lo:hi]` through its own packed copy of weight rows lo:hi (packed at the first call for
        that range), so the other outputs are not computed (`layers.attention.linear_rows`)."""
        if self.scale != 1.0 or not 0 <= lo < hi <= self.out_features:
            return self(x)[..., lo:hi]
        part = self._slices.get((lo, hi))
        if part is None:
            with _PACK_LOCK, torch.inference_mode(False):   # the packed copy is usable in and out of inference mode
                part = self._slices.get((lo, hi))
                if part is None:
                    rows = SimpleNamespace(in_features=self.in_features, out_features=hi - lo,
                                           weight=self.weight[lo:hi],
                                           bias=None if self.bias is None else self.bias[lo:hi])
                    part = self._slices[(lo, hi)] = OneDNNLinear(rows, self.act, self.algorithm, self.batch_hint,
                                                                 dtype=self.dtype)
        return part(x)

    def extra_repr(self) -> str:
        extra = f", algorithm={self.algorithm}" if self.act == "gelu" else ""
        extra += f", scale={self.scale}" if self.scale != 1.0 else ""
        extra += ", dtype=bfloat16" if self.dtype is torch.bfloat16 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act}{extra}"


class FrozenMlp(nn.Module):
    """A frozen `layers.Mlp`: fc1 with its activation fused (`OneDNNLinear`) → fc2, run in row chunks when
    the hidden layer is big.

    On 16 images (one thread's part of a batch of 32) CvT-13's stage-1 / stage-2 hidden layers are 51 / 38 MB:
    above glibc's 32 MB mmap cap they are mapped and page-faulted at every call, and they go to memory and back
    between fc1 and fc2. Rows are independent, so above `CHUNK_ABOVE` bytes of hidden layer the rows run in chunks
    of about `CHUNK_BYTES` of hidden layer each, which stays in the cache; each chunk's fc2 output is copied into
    one output buffer. Measured on the EPYC (1 thread, benchmarks/RESULTS.md "Session 8: CvT-13 inference"):
    1.18× on stage 2's MLP, level to 5% slower on hidden layers below 32 MB, so those run whole. Since session 9
    the batch split's sub-batches (`images_per_call`) keep `model(x)`'s parts under the same cap (CvT-13: 8 + 8
    images per thread), so the chunks serve the calls that still go above it: `split_batch=False`,
    `forward_features`, inputs too large for one image to stay under it."""

    CHUNK_ABOVE = 32 * 1024 * 1024
    CHUNK_BYTES = 2 * 1024 * 1024

    def __init__(self, fc1: OneDNNLinear, fc2: OneDNNLinear):
        super().__init__()
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"FrozenMlp: fc1 gives {fc1.out_features} features but fc2 takes {fc2.in_features}")
        self.fc1, self.fc2 = fc1, fc2

    def chunk_rows(self, rows: int) -> int:
        """Rows per chunk for an input of `rows` rows; `rows` itself when it runs whole."""
        hidden = self.fc1.out_features * self.fc1.dtype.itemsize
        if rows * hidden <= self.CHUNK_ABOVE:
            return rows
        return max(1, self.CHUNK_BYTES // hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"FrozenMlp expects inputs with {self.fc1.in_features} features in the last "
                             f"dimension, got shape {tuple(x.shape)}")
        rows = x.numel() // x.shape[-1]
        step = self.chunk_rows(rows)
        if step >= rows:
            return self.fc2(self.fc1(x))
        flat = x.reshape(rows, x.shape[-1])
        out = None
        for i in range(0, rows, step):
            y = self.fc2(self.fc1(flat[i:i + step]))
            if out is None:
                out = y.new_empty(rows, y.shape[-1])
            out[i:i + step] = y
        return out.view(*x.shape[:-1], out.shape[-1])


def _fuse_mlp(mlp: Mlp, batch_hint: int | None, dtype: torch.dtype = torch.float32) -> FrozenMlp | None:
    """The frozen replacement of `mlp` with its activation fused into fc1 where oneDNN can; None if it cannot."""
    op = _post_op(mlp.act)
    if op is None or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return None
    attr, algorithm = op
    quick = isinstance(mlp.act, QuickGELU)
    # QuickGELU(z) = swish(α·z)/α: scale fc1 by α, and fold 1/α into fc2 (dropout between is off in eval)
    fc1 = OneDNNLinear(mlp.fc1, attr, algorithm, batch_hint, scale=QUICK_GELU_ALPHA if quick else 1.0, dtype=dtype)
    fc2 = OneDNNLinear(mlp.fc2, batch_hint=batch_hint, scale=1 / QUICK_GELU_ALPHA if quick else 1.0,
                       bias_scale=1.0, dtype=dtype)
    return FrozenMlp(fc1, fc2)


def _as_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype is torch.bfloat16 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_as_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _as_float32(v) for k, v in out.items()}
    return out


# `model(x)` under CPU bf16 autocast with its bf16 outputs returned as fp32 (callers see an fp32 model). Hooks,
# not a wrapped forward (which would hold a bound method of this object): always_call closes the autocast
# region when the forward raises.
def _enter_bf16(module: nn.Module, args) -> None:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    ctx.__enter__()
    module._bf16_autocast.append(ctx)


def _leave_bf16(module: nn.Module, args, output):
    module._bf16_autocast.pop().__exit__(None, None, None)
    return _as_float32(output)


# Batch splitting: a batch of several images runs as one stream per intra-op thread, each stream on one
# thread. Measured on the 2-vCPU EPYC (benchmarks/RESULTS.md): one thread per image group keeps every
# product and every small op (LayerNorm, adds, softmax, SDPA) free of OpenMP fork/join and of the second
# thread's idle time at each of the ~150 parallel regions of a forward; the packed products run at the same
# per-thread rate either way.
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    # keyed by process too: a forked child (a DataLoader worker) inherits the dict but not the threads
    key = (os.getpid(), workers)
    with _POOL_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="hybridzoo-split")
        return _POOLS[key]


def _batch_leaves(out, n: int) -> bool:
    if isinstance(out, torch.Tensor):
        return out.dim() > 0 and out.shape[0] == n
    return isinstance(out, (tuple, list)) and len(out) > 0 and all(_batch_leaves(o, n) for o in out)


def _concat(parts: list):
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(_concat([p[i] for p in parts]) for i in range(len(parts[0])))


def run_on_threads(run, n: int) -> list:
    """[run(0), ..., run(n - 1)]: run(0) on the calling thread, the others on the pool, each with one intra-op
    thread (its own OpenMP and MKL team) and the caller's CPU autocast (bf16 training and inference: autocast is
    per thread); the caller's thread setting is restored afterwards."""
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def one_thread(i):
        torch.set_num_threads(1)
        if amp is None:
            return run(i)
        with torch.autocast("cpu", dtype=amp):
            return run(i)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_pool(n - 1).submit(one_thread, i) for i in range(1, n)]
        first = run(0)
        return [first] + [f.result() for f in futures]
    finally:
        torch.set_num_threads(before)


def split_batch_forward(forward, x: torch.Tensor, threads: int | None = None):
    """`forward(x)` with x cut along the batch into one part per intra-op thread, every part run on a thread
    of its own with one intra-op thread, the outputs concatenated; None when the output is not a tensor (or a
    tuple / list of tensors) whose first dimension is the part's batch — the caller then runs the whole batch.

    Only for functions whose output row i depends on input row i alone (eval-mode networks). The grad mode and
    inference mode of the caller hold inside the workers. While it runs, `torch.get_num_threads()` reads 1."""
    before = torch.get_num_threads()
    threads = before if threads is None else threads
    parts = x.tensor_split(min(threads, x.shape[0]))
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(i):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return forward(parts[i])

    outs = run_on_threads(run, len(parts))
    if not all(_batch_leaves(o, p.shape[0]) for o, p in zip(outs, parts)):
        return None
    return _concat(outs)


# glibc serves every allocation above its mmap threshold (at most 32 MiB, `engine.cpu_memory`) with a fresh
# mapping, faulted in page by page and unmapped when freed, at every call. A part of a batch whose largest
# activation is above it (CoAtNet-0's expanded 56² maps: 77 MB for 16 images) runs in sub-batches that stay below.
SUB_BATCH_BYTES = 32 * 1024 * 1024


def images_per_call(forward, x: torch.Tensor) -> int | None:
    """How many inputs of x's shape `forward` can take at once with every tensor of the forward under
    SUB_BATCH_BYTES, from one input's forward on one intra-op thread; None when one input alone goes above it
    (nothing to keep under: the batch runs as it is)."""
    from hybridzoo.layers.onednn_tokens import whole_blocks
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # the path a part of the batch split takes
    try:
        # the blocks in turn, as a part of several inputs runs them: no token split, nor its timing
        with OutputBytes() as probe, whole_blocks():
            forward(x[:1])
    finally:
        torch.set_num_threads(before)
    if probe.largest == 0 or probe.largest > SUB_BATCH_BYTES:
        return None
    return SUB_BATCH_BYTES // probe.largest


def in_sub_batches(forward, per_call: int | None):
    """`forward` that runs an input of more than `per_call` rows in about equal sub-batches of at most `per_call`
    rows and concatenates the outputs; an output that is not per-row comes back as the first sub-batch's own, so
    that the caller's row check fails and it runs the batch whole."""
    def run(x: torch.Tensor):
        if per_call is None or x.shape[0] <= per_call:
            return forward(x)
        subs = x.tensor_split(-(-x.shape[0] // per_call))
        outs = [forward(sub) for sub in subs]
        if not all(_batch_leaves(o, sub.shape[0]) for o, sub in zip(outs, subs)):
            return outs[0]
        return _concat(outs)
    return run


class _SplitBatch:
    """Mixin put in front of the frozen copy's class: `model(x)` on a batch runs `split_batch_forward`, each part
    in sub-batches that keep its tensors under SUB_BATCH_BYTES (`images_per_call`, found at the first call for
    each input shape); with one intra-op thread the batch runs in those sub-batches on the calling thread."""

    _split_ok = True

    def forward(self, *args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        if self._split_ok and isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > 1:
            per_call = self._images_per_call(x)
            forward = in_sub_batches(super().forward, per_call)
            if torch.get_num_threads() > 1:
                out = split_batch_forward(forward, x)
            elif per_call is not None and per_call < x.shape[0]:
                out = forward(x)
                out = out if _batch_leaves(out, x.shape[0]) else None
            else:
                return super().forward(*args, **kwargs)
            if out is not None:
                return out
            self._split_ok = False   # outputs that are not per-row tensors: whole batches from now on
        return super().forward(*args, **kwargs)

    def _images_per_call(self, x: torch.Tensor) -> int | None:
        known = self.__dict__.setdefault("_per_call", {})
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in known:
            known[key] = images_per_call(super().forward, x)
        return known[key]


def _with_batch_split(model: nn.Module) -> nn.Module:
    cls = type(model)
    if isinstance(model, _SplitBatch):
        return model
    model.__class__ = type(cls.__name__, (_SplitBatch, cls), {"__module__": cls.__module__,
                                                              "__qualname__": cls.__qualname__})
    return model


@torch.no_grad()
def optimize_for_cpu_inference(model: nn.Module, batch_hint: int | None = None,
                               channels_last: bool = True, dtype: torch.dtype = torch.float32,
                               split_batch: bool = True, split_tokens: bool = True) -> nn.Module:
    """A frozen, eval-mode copy of `model` with oneDNN linear layers (the original is untouched).

    `dtype=torch.bfloat16`: bf16 weights and autocast inside `model(x)` (not other methods such as
    `forward_features`), fp32 in and out; see the module docstring.

    `split_batch`: `model(x)` on a batch of several inputs with several intra-op threads runs one part
    of the batch per thread, each on one thread (`split_batch_forward`); outputs that are not per-input
    tensors fall back to the whole batch. Batch 1 and other methods (`forward_features`) are unaffected.

    `split_tokens` (fp32): the transformer blocks that support it (`layers.onednn_tokens`) may run one image with
    several intra-op threads as one share of the token rows per thread, meeting once per block at attention (CvT's
    blocks twice, in one native call, with one thread too); the container's `mode` ("auto": timed at the first
    call, the faster kept; "tokens"; "whole") decides."""
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN (mkldnn) support")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"optimize_for_cpu_inference: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    elsewhere = sorted({str(t.device) for t in (*model.parameters(), *model.buffers()) if t.device.type != "cpu"})
    if elsewhere:
        raise ValueError(f"optimize_for_cpu_inference builds CPU (oneDNN) kernels, but the model's weights are on "
                         f"{', '.join(elsewhere)}: pass the model on the CPU (model.cpu()), or run it as it is there")
    # a copy made inside the caller's inference mode would hold inference tensors (parameters, cached tables such
    # as ConViT's relative indices), which have no version counter and cannot be updated outside that mode
    with torch.inference_mode(False):
        model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    # the folded convolutions and frozen blocks are fp32 kernels; the bf16 variant keeps the model's own
    # convolutions (weights stored in bf16 below) and packs only the linear layers; both split the batch
    fp32 = dtype is torch.float32

    def convert(parent: nn.Module) -> None:
        if fp32 and isinstance(parent, nn.Sequential):
            _fold_sequential(parent, batch_hint)
        for name, child in list(parent.named_children()):
            # exactly layers.Mlp: a subclass may put something between fc1, act and fc2
            if type(child) is Mlp and (frozen := _fuse_mlp(child, batch_hint, dtype)) is not None:
                setattr(parent, name, frozen)
                continue
            freeze = getattr(child, "freeze_for_cpu_inference", None)
            if freeze is not None and fp32:
                # a block that knows its own layout returns a frozen replacement (its own children may
                # still hold plain layers: convert those too)
                child = freeze(batch_hint)
                setattr(parent, name, child)
                convert(child)
            elif fp32 and type(child) is nn.Sequential:
                convert(child)
                # a plain chain of blocks that can reuse their input buffers (CoAtNet's MBConv stages)
                if any(getattr(m, "reuses_input", False) for m in child):
                    setattr(parent, name, InplaceChain(OrderedDict(child._modules)))
            elif isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, OneDNNLinear(child, batch_hint=batch_hint, dtype=dtype))
            elif fp32 and supports_conv(child):
                setattr(parent, name, OneDNNConv2d(child, batch_hint=batch_hint))
            else:
                convert(child)

    convert(model)
    if split_tokens and fp32:
        from hybridzoo.layers.onednn_tokens import enable_token_parallel
        enable_token_parallel(model)
    if dtype is torch.bfloat16:
        # stored in bf16 once, so autocast does not cast the weights at every call
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.to(torch.bfloat16)
        model._bf16_autocast = []
        model.register_forward_pre_hook(_enter_bf16)
        model.register_forward_hook(_leave_bf16, always_call=True)
    if channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    if split_batch:
        model = _with_batch_split(model)
    return model


def _input_kind(args: tuple, kwargs: dict) -> tuple:
    """What decides which path is faster, not the exact shapes (an image folder of many sizes would otherwise race
    at every image): each tensor's rank, dtype and whether it holds one input or several (the batch split), and
    the other arguments themselves."""
    def kind(v):
        if isinstance(v, torch.Tensor):
            return (v.dim(), v.dtype, v.dim() > 0 and v.shape[0] > 1)
        return v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return tuple(kind(a) for a in args) + tuple((k, kind(v)) for k, v in sorted(kwargs.items()))


def _describe_input(args: tuple) -> str:
    shapes = ["×".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor)]
    return ", ".join(shapes) or "no tensor"


class _FasterForward:
    """Mixin put in front of the frozen copy's class by `fastest_cpu_inference`. The first call of each kind of input
    (`_input_kind`) runs on the frozen path, untimed (its weight packs for the shape, the sub-batch and token-split
    probes); the next ones alternate eager and the frozen path, timed per input element (the shapes of one kind may
    differ: an image folder of many sizes), until each path has run RACE_SECONDS in all or RACE_CALLS calls; from
    then on the one with the lower median answers. Every call computes its own answer once: the race costs only the slower
    path's excess on the calls it lasts. Methods other than `forward` are the copy's."""

    RACE_SECONDS = 0.3   # one call of 20 ms (land cover's 32 patches) is too noisy to decide on
    RACE_CALLS = 5

    def forward(self, *args, **kwargs):
        state = self._fastest.setdefault(_input_kind(args, kwargs), {"calls": 0, "timed": {"eager": [], "oneDNN": []}})
        path = state.get("choice")
        if path is not None:
            return self._eager(*args, **kwargs) if path == "eager" else super().forward(*args, **kwargs)
        n = state["calls"]
        state["calls"] += 1
        path = "eager" if n % 2 else "oneDNN"
        t = time.perf_counter()
        out = self._eager(*args, **kwargs) if path == "eager" else super().forward(*args, **kwargs)
        if n:
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            size = max(1, first.numel()) if first is not None else 1
            state["timed"][path].append((time.perf_counter() - t, size))
            runs = state["timed"].values()
            if all(runs) and (all(sum(sec for sec, _ in r) >= self.RACE_SECONDS for r in runs)
                              or all(len(r) >= self.RACE_CALLS for r in runs)):
                self._choose(state, _describe_input(args))
        return out

    def _choose(self, state: dict, shape: str) -> None:
        per_element = {k: statistics.median(sec / size for sec, size in r) for k, r in state["timed"].items()}
        state["choice"] = best = min(per_element, key=per_element.get)
        timed = ", ".join(f"{k} {statistics.median(sec for sec, _ in r) * 1e3:.0f} ms (median of {len(r)})"
                          for k, r in state["timed"].items())
        line = f"CPU inference on {shape}: the {best} path ({timed}; --no-fast-cpu keeps eager)"
        self.race_log.append(line)
        if self._report is not None:
            self._report(line)


def fastest_cpu_inference(model: nn.Module, report=None, **options) -> nn.Module:
    """`optimize_for_cpu_inference(model, **options)` that also keeps `model` (in eval mode), times both on the first
    calls of each kind of input and answers with the faster from then on (`_FasterForward`).

    What `hybridzoo eval` and `predict` run on the CPU in fp32: the frozen path is 1.5–3.7× eager on the image
    classifiers, but not faster everywhere (SegFormer-B0 at 512², whose 1×1 convolutions over 128² maps run slower
    channels-last and slower still one image per thread: 0.7–0.95×), and which one wins depends on the CPU.
    Both compute the same function; outputs differ by fp32 rounding. `report(line)` is called with each choice,
    which `race_log` also keeps."""
    fast = optimize_for_cpu_inference(model, **options)
    cls = type(fast)
    fast.__class__ = type(cls.__name__, (_FasterForward, cls), {"__module__": cls.__module__,
                                                                "__qualname__": cls.__qualname__})
    # not a registered submodule: the copy's modules(), state_dict() and .to() stay the frozen path's own
    fast.__dict__.update(_eager=model.eval(), _fastest={}, _report=report, race_log=[])
    return fast
