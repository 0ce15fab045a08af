"""Exact, cache-friendly CPU training kernels for models whose activations are tiny but numerous.

Sequential recommenders run a few small matmuls over millions of 16–64-wide tokens, so on a CPU their
training time goes to memory traffic and random-number generation, not arithmetic. Three replacements,
each computing the same function and gradient as the plain PyTorch ops they stand in for:

- `fast_dropout`: inverted dropout whose keep mask is cut from 64-bit random words, four 16-bit draws
  per word. PyTorch's CPU `bernoulli_` makes one draw per element and is ~6x slower. The drop
  probability is resolved to 1/65536 and the kept values are scaled by the exact inverse keep rate,
  so the expectation is preserved exactly.
- `chunked_attention`: softmax attention with an additive mask and dropout on the probabilities
  (RecBole's layer), evaluated a group of sequences at a time so the score tiles stay in L2 cache, each
  group cut to the keys its queries can see (short left-aligned histories skip their padding keys);
  the backward pass recomputes the probabilities per group instead of storing them.
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
    """Attention over groups of sequences, each cut to the keys any of its queries can see.

    `order` sorts the batch by key extent and `bounds` lists (start, stop, extent) of each group in that
    order, so a group of short histories works on (b, H, extent, L) score tiles instead of (b, H, S, L).
    Scores are kept keys-by-queries, so the softmax runs over a middle axis: PyTorch's CPU softmax over a
    short last axis is ~15x slower than over one with a long contiguous inner axis.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, order, bounds):
        qs = q * q.shape[-1] ** -0.5
        out = _heads_last(q, v.shape[-1])
        draws = []  # per group, to rebuild the dropout mask in backward
        for b0, b1, ext in bounds:
            idx = order[b0:b1]
            probs_t = _scores_t(qs, k, mask, idx, ext).softmax(-2)  # (b, H, ext, L)
            if p > 0.0:
                draws.append(_draws(tuple(probs_t.shape), q.device))
                probs_t.mul_(_scaled_keep(draws[-1], p, probs_t.dtype))
            out[idx] = torch.matmul(probs_t.transpose(-2, -1), v[idx, :, :ext])
        ctx.save_for_backward(qs, k, v, mask, order)
        ctx.draws, ctx.p, ctx.bounds = draws, p, bounds
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v, mask, order = ctx.saved_tensors
        dq = _heads_last(qs, qs.shape[-1])
        dk, dv = _heads_last(k, k.shape[-1]).zero_(), _heads_last(v, v.shape[-1]).zero_()  # unseen keys: 0
        for i, (b0, b1, ext) in enumerate(ctx.bounds):
            idx = order[b0:b1]
            q_i, k_i, v_i, g_i = qs[idx], k[idx, :, :ext], v[idx, :, :ext], grad_out[idx]
            probs_t = _scores_t(qs, k, mask, idx, ext).softmax(-2)  # recomputed, not stored
            d_probs_t = torch.matmul(v_i, g_i.transpose(-2, -1))
            if ctx.p > 0.0:
                keep = _scaled_keep(ctx.draws[i], ctx.p, probs_t.dtype)
                dv[idx, :, :ext] = torch.matmul(probs_t * keep, g_i)
                d_probs_t.mul_(keep)
            else:
                dv[idx, :, :ext] = torch.matmul(probs_t, g_i)
            # softmax backward over the keys: dS = P * (dP - sum_keys(dP * P)); q's 1/sqrt(d) is applied at the end
            d_scores_t = d_probs_t.sub_((d_probs_t * probs_t).sum(-2, keepdim=True)).mul_(probs_t)
            dq[idx] = torch.matmul(d_scores_t.transpose(-2, -1), k_i)
            dk[idx, :, :ext] = torch.matmul(d_scores_t, q_i)
        return dq.mul_(qs.shape[-1] ** -0.5), dk, dv, None, None, None, None


def _heads_last(like: torch.Tensor, dim: int) -> torch.Tensor:
    """An empty (B, H, L, dim) tensor stored as (B, L, H, dim): merging the heads afterwards is free."""
    B, H, L, _ = like.shape
    return like.new_empty((B, L, H, dim)).transpose(1, 2)


def _scores_t(qs: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor, ext: int) -> torch.Tensor:
    """Masked scores of the sequences `idx` against their first `ext` keys, keys by queries: (b, H, ext, L)."""
    return torch.matmul(k[idx, :, :ext], qs[idx].transpose(-2, -1)).add_(mask[idx, :, :, :ext].transpose(-2, -1))


# An additive mask at or below this value removes a key: exp(-1e4 + s - max) is exactly 0 in float32/64
# for any realistic score, so skipping such keys changes nothing (RecBole masks with -10000).
_DEAD = -1e4


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      dropout_p: float = 0.0, chunk_bytes: int = 1 << 20) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) with dropout on the probabilities, times v.

    q, k, v: (B, H, L, d) / (B, H, S, d); mask: additive, (B or 1, 1 or H, L, S). Sequences are sorted by
    how many leading keys any of their queries may see (keys masked with <= -1e4 for every query lie
    beyond) and processed in groups of about `chunk_bytes` of (L, extent) score tiles: left-aligned
    short histories cost in proportion to their length, and every tile stays in L2 cache.
    """
    B, H, L, _ = q.shape
    S = k.shape[-2]
    mask = mask.to(q.dtype)
    if mask.shape[0] == 1 and B > 1:
        mask = mask.expand(B, *mask.shape[1:])
    live = mask.flatten(1, 2).amax(1) > _DEAD  # (B, S): keys some query may attend to
    extent = (live * torch.arange(1, S + 1, device=q.device)).amax(1).clamp(min=1)
    extent, order = torch.sort(extent, stable=True)
    per_key = H * L * q.element_size()
    bounds, b0, ext = [], 0, extent.tolist()
    while b0 < B:
        # a group whose widest member still fits the budget (extents ascend within `order`)
        b1 = min(B, b0 + max(1, chunk_bytes // (per_key * ext[min(B - 1, b0)])))
        while b1 - 1 > b0 and (b1 - b0) * ext[b1 - 1] * per_key > chunk_bytes:
            b1 = b0 + max(1, (b1 - b0) // 2)
        bounds.append((b0, b1, ext[b1 - 1]))
        b0 = b1
    # q, k, v are usually head views of (B, L, D) projections: the per-group gathers read them as they are
    return _ChunkedAttention.apply(q, k, v, mask, float(dropout_p), order, bounds)


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
