"""A frozen CPU inference path whose matrix products go through oneDNN.

On x86 CPUs `nn.Linear` dispatches fp32 products to MKL's sgemm; oneDNN's inner-product primitive with
a weight packed once into its blocked layout can apply the bias and an element-wise activation in the
same pass over the output. `optimize_for_cpu_inference` makes a frozen copy of a model in which

- every `nn.Linear` is a `OneDNNLinear` holding the packed weight;
- the activation of a transformer MLP (`layers.Mlp`: fc1 → act → fc2) is fused into fc1 when oneDNN
  has it as a post-op: exact or tanh GELU, ReLU, SiLU, and QuickGELU x·σ(1.702x). oneDNN's swish
  post-op is x·σ(x) with a fixed α = 1, but QuickGELU(z) = swish(1.702·z) / 1.702, so fc1's weight
  and bias are scaled by 1.702 and fc2's weight by 1/1.702 — exact algebra, only fp32 rounding moves;
- with `channels_last=True` (default) convolution weights are stored channels-last, so oneDNN
  convolutions run in NHWC without reordering their input and output at every call.

With `dtype=torch.bfloat16` the linear weights are packed in bf16, convolution weights are stored in
bf16, and a call of the copy (`model(x)`) runs under CPU autocast (bf16 products, fp32 or bf16-in/fp32-accumulate
for normalisation and softmax, as autocast decides) and returns fp32 tensors. On CPUs with AVX512-BF16
or AMX the products run about twice as fast as fp32; elsewhere oneDNN emulates bf16 and it is slower.
The outputs differ from fp32 by bf16 rounding (about 3 significant digits); see docs/bf16.md.

The result is inference only: packed weights are opaque oneDNN tensors, so the optimised copy is
neither trainable nor saved. Measured benefits depend on the machine; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hybridzoo.layers.mlp import Mlp, QuickGELU

__all__ = ["OneDNNLinear", "optimize_for_cpu_inference", "onednn_available", "QUICK_GELU_ALPHA"]

QUICK_GELU_ALPHA = 1.702


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


class OneDNNLinear(nn.Module):
    """y = act(x·Wᵀ + b) through oneDNN with W pre-packed.

    act: "none", "gelu" (algorithm "none" = exact erf, "tanh"), "relu" or "swish" (x·σ(x)).
    `scale` multiplies W and `bias_scale` (default: `scale`) b before packing (QuickGELU folding).
    `weight` / `bias` keep the original, unscaled tensors (code that reads `layer.weight` directly keeps
    working; the layer's own forward uses the packed copy). `dtype=torch.bfloat16` packs W in bf16: fp32
    or bf16 inputs are cast to bf16 and the output is bf16 (the bias stays fp32; oneDNN adds it exactly).
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
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), batch_hint)
        self.packed_bias = bias
        # the plain tensors stay reachable for models that slice them (CeiT's LCA takes rows of qkv)
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.act = act
        self.algorithm = "none" if act == "gelu" and not algorithm else algorithm
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, self.dtype) or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("OneDNNLinear is a frozen fp32 CPU inference layer; call the model under "
                               "torch.inference_mode() on float32 CPU tensors")
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.packed_bias, self.act, [], self.algorithm)

    def extra_repr(self) -> str:
        extra = f", algorithm={self.algorithm}" if self.act == "gelu" else ""
        extra += f", scale={self.scale}" if self.scale != 1.0 else ""
        extra += ", dtype=bfloat16" if self.dtype is torch.bfloat16 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act}{extra}"


def _fuse_mlp(mlp: Mlp, batch_hint: int | None, dtype: torch.dtype = torch.float32) -> bool:
    """Fuse mlp.act into mlp.fc1 where oneDNN can (in place); False if it cannot."""
    op = _post_op(mlp.act)
    if op is None or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return False
    attr, algorithm = op
    quick = isinstance(mlp.act, QuickGELU)
    # QuickGELU(z) = swish(α·z)/α: scale fc1 by α, and fold 1/α into fc2 (dropout between is off in eval)
    mlp.fc1 = OneDNNLinear(mlp.fc1, attr, algorithm, batch_hint, scale=QUICK_GELU_ALPHA if quick else 1.0,
                           dtype=dtype)
    mlp.act = nn.Identity()
    mlp.fc2 = OneDNNLinear(mlp.fc2, batch_hint=batch_hint, scale=1 / QUICK_GELU_ALPHA if quick else 1.0,
                           bias_scale=1.0, dtype=dtype)
    return True


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


@torch.no_grad()
def optimize_for_cpu_inference(model: nn.Module, batch_hint: int | None = None,
                               channels_last: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen, eval-mode copy of `model` with oneDNN linear layers (the original is untouched).

    `dtype=torch.bfloat16`: bf16 weights and autocast inside `model(x)` (not other methods such as
    `forward_features`), fp32 in and out; see the module docstring."""
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN (mkldnn) support")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"optimize_for_cpu_inference: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def convert(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            # exactly layers.Mlp: a subclass may put something between fc1, act and fc2
            if type(child) is Mlp and _fuse_mlp(child, batch_hint, dtype):
                continue
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, OneDNNLinear(child, batch_hint=batch_hint, dtype=dtype))
            else:
                convert(child)

    convert(model)
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
    return model
