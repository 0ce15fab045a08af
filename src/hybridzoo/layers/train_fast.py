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

`BatchSplitTraining(model)` (what `hybridzoo train` uses on the CPU for models without batch statistics)
trains one share of each batch per intra-op thread, each share's forward and backward on one thread, with
the whole batch's loss and gradients; see its docstring and `split_training_blocker`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from hybridzoo.layers.onednn import run_on_threads

__all__ = ["FastLinear", "optimize_for_cpu_training", "fast_training_available", "fast_linear", "onednn_linear",
           "MIN_WEIGHT_NUMEL", "BatchSplitTraining", "split_training_blocker"]


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

    def output_slice(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """`self(x)[..., lo:hi]` from weight rows lo:hi only (`layers.attention.linear_rows`)."""
        w, b = self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi]
        return F.linear(x, w, b) if not self.training else fast_linear(x, w, b)


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


# --- Batch split ------------------------------------------------------------------------------------------
# With N intra-op threads, each of N threads runs the forward and backward of 1/N of the batch with one
# intra-op thread: no OpenMP fork/join at each of the ~600 parallel regions of a ViT step, no second thread
# idling through the small ops (LayerNorm, GELU, adds, softmax). Only for models whose output row i depends on
# input row i alone in training mode: no batch statistics (BatchNorm), no running buffers.


def split_training_blocker(model: nn.Module) -> str | None:
    """Why `model` cannot be trained by batch split (`BatchSplitTraining`), or None when it can.

    Blocked: layers with batch statistics or running buffers (BatchNorm and the like: a part's statistics are
    not the batch's), dropout drawn from the global generator (the threads would draw in a timing-dependent
    order; DropPath draws from a per-part generator and is fine), activation checkpointing (its recompute
    restores the global generator, not the per-part one)."""
    for name, m in model.named_modules():
        where = name or type(model).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{where} ({type(m).__name__}) normalises with batch statistics"
        if any(b.split(".")[-1].startswith("running_") for b, _ in m.named_buffers(recurse=False)):
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

        outs = run_on_threads(run, n)
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
            return self.module(*args)
        n_out = len(flat[0])
        self._pending = [f for f in flat]
        leaves = [flat[i][k].detach().requires_grad_(flat[i][k].requires_grad)
                  for k in range(n_out) for i in range(n)]
        joined = _JoinParts.apply(self, [p.shape[0] for p in parts], n_out, *leaves)
        if isinstance(outs[0], torch.Tensor):
            return joined[0]
        return type(outs[0])(joined)

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

        results = run_on_threads(part, len(pending))
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
