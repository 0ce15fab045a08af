"""Exact, cache-friendly CPU training kernels for models whose activations are tiny but numerous.

Sequential recommenders run a few small matmuls over millions of 16–64-wide tokens, so on a CPU their
training time goes to memory traffic and random-number generation, not arithmetic. Three replacements,
each computing the same function and gradient as the plain PyTorch ops they stand in for:

- `fast_dropout`: inverted dropout whose keep mask is cut from 64-bit random words, four 16-bit draws
  per word. PyTorch's CPU `bernoulli_` makes one draw per element and is ~6x slower. The drop
  probability is resolved to 1/65536 and the kept values are scaled by the exact inverse keep rate,
  so the expectation is preserved exactly.
- `chunked_attention`: softmax attention with an additive mask and dropout on the probabilities
  (RecBole's layer), evaluated a few sequences at a time so the (L, L) score tiles stay in L2 cache;
  the backward pass recomputes the probabilities per chunk instead of storing them.
- `linear_cross_entropy`: full-softmax cross-entropy of `h @ weight.T` that never materialises the
  (B, num_items) logits: it works through row chunks and forms both gradients in the forward pass.

They are used only for float32 training on the CPU; elsewhere the callers use the standard ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fast_dropout", "FastDropout", "chunked_attention", "linear_cross_entropy", "use_fused_cpu"]

_LEVELS = 1 << 16


def use_fused_cpu(x: torch.Tensor) -> bool:
    """True where the fused CPU kernels apply: a float32 CPU tensor outside autocast."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _draws(shape: tuple[int, ...], device) -> torch.Tensor:
    """int16 values uniform over [-32768, 32767], four per 64-bit random word."""
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.int16)[:n].view(shape)


def _threshold(p: float) -> tuple[float, float]:
    """(threshold on the draws, exact keep probability) for P(drop) = round(p * 65536) / 65536."""
    dropped = round(p * _LEVELS)
    return float(dropped - _LEVELS // 2), (_LEVELS - dropped) / _LEVELS


def _scaled_keep(draws: torch.Tensor, p: float, dtype=torch.float32) -> torch.Tensor:
    """1/keep_prob where a draw keeps its element, 0 where it drops it.

    Built with float compares: bool masks (`masked_fill_`, `where`) take a slow, unvectorised path on the CPU.
    """
    threshold, keep_prob = _threshold(p)
    return draws.to(dtype).ge_(threshold).mul_(1.0 / keep_prob)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    if not use_fused_cpu(x):
        return F.dropout(x, p, training=True)
    return x * _scaled_keep(_draws(tuple(x.shape), x.device), p, x.dtype)


class FastDropout(nn.Dropout):
    """`nn.Dropout` with the fast CPU mask (same semantics, same state dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, chunk: int):
        B, H, L, d = q.shape
        qs = q * d ** -0.5
        kt = k.transpose(-2, -1)
        # the dropout draws of the whole batch (2 bytes per score), kept to rebuild the mask in backward
        draws = _draws((B, H, L, k.shape[2]) if p > 0.0 else (0,), q.device)
        outs = []
        for b0 in range(0, B, chunk):
            sl = slice(b0, b0 + chunk)
            probs = torch.matmul(qs[sl], kt[sl]).add_(mask[sl]).softmax(-1)
            if p > 0.0:
                probs.mul_(_scaled_keep(draws[sl], p, probs.dtype))
            outs.append(torch.matmul(probs, v[sl]))
        ctx.save_for_backward(qs, k, v, mask, draws)
        ctx.p, ctx.chunk = p, chunk
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v, mask, draws = ctx.saved_tensors
        scale = qs.shape[-1] ** -0.5
        grad_out = grad_out.contiguous()
        kt, vt = k.transpose(-2, -1), v.transpose(-2, -1)
        dqs, dks, dvs = [], [], []
        for b0 in range(0, qs.shape[0], ctx.chunk):
            sl = slice(b0, b0 + ctx.chunk)
            probs = torch.matmul(qs[sl], kt[sl]).add_(mask[sl]).softmax(-1)  # recomputed, not stored
            d_probs = torch.matmul(grad_out[sl], vt[sl])
            if ctx.p > 0.0:
                keep = _scaled_keep(draws[sl], ctx.p, probs.dtype)
                dvs.append(torch.matmul((probs * keep).transpose(-2, -1), grad_out[sl]))
                d_probs.mul_(keep)
            else:
                dvs.append(torch.matmul(probs.transpose(-2, -1), grad_out[sl]))
            # softmax backward: dS = P * (dP - sum(dP * P)); the 1/sqrt(d) of q is applied once at the end
            d_scores = d_probs.sub_((d_probs * probs).sum(-1, keepdim=True)).mul_(probs)
            dqs.append(torch.matmul(d_scores, k[sl]))
            dks.append(torch.matmul(d_scores.transpose(-2, -1), qs[sl]))
        return torch.cat(dqs).mul_(scale), torch.cat(dks), torch.cat(dvs), None, None, None


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      dropout_p: float = 0.0, chunk_bytes: int = 1 << 20) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) with dropout on the probabilities, times v.

    q, k, v: (B, H, L, d); mask: additive, broadcastable to (B, H, L, L) with a leading B (or 1).
    Rows of the batch are processed `chunk_bytes` of score tiles at a time.
    """
    B, H, L, _ = q.shape
    S = k.shape[-2]
    chunk = max(1, chunk_bytes // (H * L * S * q.element_size()))
    mask = mask.to(q.dtype)
    if mask.shape[0] == 1 and B > 1:
        mask = mask.expand(B, *mask.shape[1:])
    return _ChunkedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask, float(dropout_p), chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, chunk: int):
        B = h.shape[0]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        total = h.new_zeros((), dtype=torch.float64)
        rows = torch.arange(min(chunk, B), device=h.device)
        for b0 in range(0, B, chunk):
            hs, ts = h[b0:b0 + chunk], target[b0:b0 + chunk]
            logits = hs @ weight.t()
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            total += (lse.squeeze(1) - logits.gather(1, ts[:, None]).squeeze(1)).sum(dtype=torch.float64)
            probs = logits.sub_(lse).exp_()
            probs[rows[: len(ts)], ts] -= 1.0  # d(loss)/d(logits) = softmax - onehot
            torch.matmul(probs, weight, out=grad_h[b0:b0 + chunk])
            grad_w.addmm_(probs.t(), hs)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.batch = B
        return (total / B).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_loss / ctx.batch
        return grad_h * g, grad_w * g, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk_bytes: int = 4 << 20) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` (B, N) against `target`, without storing the logits.

    Equal to `F.cross_entropy(h @ weight.T, target)` in value and gradient (up to float rounding).
    """
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1] or target.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: expected h (B, D), weight (N, D), target (B,); got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if not (h.requires_grad or weight.requires_grad) or not use_fused_cpu(h):
        return F.cross_entropy(h @ weight.t(), target)
    chunk = max(1, chunk_bytes // (weight.shape[0] * h.element_size()))
    return _LinearCrossEntropy.apply(h, weight, target.long(), chunk)
