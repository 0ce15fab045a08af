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
    working; the layer's own forward uses the packed copy).
    """

    def __init__(self, linear: nn.Linear, act: str = "none", algorithm: str = "", batch_hint: int | None = None,
                 scale: float = 1.0, bias_scale: float | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        bias_scale = scale if bias_scale is None else bias_scale
        if scale != 1.0:
            weight = weight * scale
        if bias is not None and bias_scale != 1.0:
            bias = bias * bias_scale
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.packed_bias = bias
        # the plain tensors stay reachable for models that slice them (CeiT's LCA takes rows of qkv)
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.act = act
        self.algorithm = "none" if act == "gelu" and not algorithm else algorithm
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("OneDNNLinear is a frozen fp32 CPU inference layer; call the model under "
                               "torch.inference_mode() on float32 CPU tensors")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.packed_bias, self.act, [], self.algorithm)

    def extra_repr(self) -> str:
        extra = f", algorithm={self.algorithm}" if self.act == "gelu" else ""
        extra += f", scale={self.scale}" if self.scale != 1.0 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act}{extra}"


def _fuse_mlp(mlp: Mlp, batch_hint: int | None) -> bool:
    """Fuse mlp.act into mlp.fc1 where oneDNN can (in place); False if it cannot."""
    op = _post_op(mlp.act)
    if op is None or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return False
    attr, algorithm = op
    quick = isinstance(mlp.act, QuickGELU)
    # QuickGELU(z) = swish(α·z)/α: scale fc1 by α, and fold 1/α into fc2 (dropout between is off in eval)
    mlp.fc1 = OneDNNLinear(mlp.fc1, attr, algorithm, batch_hint, scale=QUICK_GELU_ALPHA if quick else 1.0)
    mlp.act = nn.Identity()
    mlp.fc2 = OneDNNLinear(mlp.fc2, batch_hint=batch_hint, scale=1 / QUICK_GELU_ALPHA if quick else 1.0,
                           bias_scale=1.0)
    return True


@torch.no_grad()
def optimize_for_cpu_inference(model: nn.Module, batch_hint: int | None = None,
                               channels_last: bool = True) -> nn.Module:
    """A frozen, eval-mode copy of `model` with oneDNN linear layers (the original is untouched)."""
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN (mkldnn) support")
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def convert(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            # exactly layers.Mlp: a subclass may put something between fc1, act and fc2
            if type(child) is Mlp and _fuse_mlp(child, batch_hint):
                continue
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, OneDNNLinear(child, batch_hint=batch_hint))
            else:
                convert(child)

    convert(model)
    if channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model
