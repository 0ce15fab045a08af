"""The native attention kernel (`hybridzoo.layers.native.attention`) against what it replaces, alone, interleaved.

    python benchmarks/attention_kernel.py [--threads 1] [--rounds 7] [--batch 16] [--train]

At the attention shapes of DeiT-S, ConViT-Ti / -S and CvT-13's three stages (batch `--batch` per thread, the
inference path's batch split): SDPA plus the transpose to tokens first that follows it (what DeiT, ConViT's MHSA
and CvT ran before), and for ConViT's GPSA the per-image `gpsa_attend` ((softmax(q kᵀ) + P′)·v′ with two `bmm`),
each against the kernel on the same views of one qkv product. Prints per shape the medians, the GFLOP/s (the
two products' 4·n·N·d per head) and the per-round speed-up: median and range. Checks the outputs agree first.

With `--train`: forward and backward (the gradients of q, k and v), `native.attend` against SDPA with autograd
(the training path's attention, `optimize_for_cpu_training`), counting 3× the forward's products. ConViT's GPSA
has no training kernel, so its row is left out there. Checks the gradients agree first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)
from hybridzoo.layers import native
from hybridzoo.models.convit import gpsa_attend

# name, heads, query rows, keys, head dim
SHAPES = [("DeiT-S", 6, 197, 197, 64), ("ConViT-Ti", 4, 196, 196, 48), ("ConViT-S", 9, 196, 196, 48),
          ("CvT-13 stage 1", 1, 3136, 784, 64), ("CvT-13 stage 2", 3, 784, 196, 64), ("CvT-13 stage 3", 6, 197, 50, 64)]


def sdpa(q, k, v, pos, scale):
    B, H, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, n, H * d)


def per_image_gpsa(q, k, v, pos, scale):
    B, H, n, d = q.shape
    out = q.new_empty(B, n, H * d)
    o = out.view(B, n, H, d).transpose(1, 2)
    for b in range(B):
        o[b].copy_(gpsa_attend(q[b], k[b], v[b], pos))
    return out


def kernel(q, k, v, pos, scale):
    return native.attention(q, k, v, pos, scale)


def train_step(fn, q, k, v, g, scale):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, scale)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def sdpa_train(q, k, v, scale):
    B, H, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, n, H * d)


def train_rows(args) -> None:
    """Forward and backward of the kernel (`native.attend`) against SDPA's, interleaved."""
    for name, H, n, N, d in SHAPES:
        B = args.batch
        q, k, v = torch.randn(B, n, 3, H, d).permute(2, 0, 3, 1, 4)
        if N != n:
            k, v = torch.randn(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
        g = torch.randn(B, n, H * d)
        ref, got = train_step(sdpa_train, q, k, v, g, d ** -0.5), train_step(native.attend, q, k, v, g, d ** -0.5)
        err = max(((a - b).abs().max() / max(1.0, a.abs().max())).item() for a, b in zip(ref, got))
        assert err <= 1e-4, f"{name}: outputs or gradients differ by {err:.2e}"
        times = {"ref": [], "kernel": []}
        for _ in range(args.rounds):
            for key, fn in (("ref", sdpa_train), ("kernel", native.attend)):
                t0 = time.perf_counter()
                train_step(fn, q, k, v, g, d ** -0.5)
                times[key].append(time.perf_counter() - t0)
        ratios = sorted(a / b for a, b in zip(times["ref"], times["kernel"]))
        gflop = 3 * 4 * B * H * n * N * d / 1e9
        a, b = statistics.median(times["ref"]), statistics.median(times["kernel"])
        print(f"{name:15s} {'SDPA fwd+bwd':20s} {a * 1e3:8.2f} ms ({gflop / a:5.1f} GFLOP/s)   kernel {b * 1e3:8.2f} ms "
              f"({gflop / b:5.1f})   speed-up {statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})"
              f"   max rel diff {err:.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", action="store_true", help="forward and backward (the training path's attention)")
    args = ap.parse_args()
    if not native.load() or not native.attention_applies(torch.zeros(1, 1, 1, 64)):
        raise SystemExit("the native attention kernel is not available here (no compiler, or neither AVX-512 nor "
                         "AVX2 with FMA)")
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), batch {args.batch}, {args.rounds} interleaved rounds; ms per call (median)")
    torch.manual_seed(0)
    if args.train:
        return train_rows(args)
    for name, H, n, N, d in SHAPES:
        B = args.batch
        q, k, v = torch.randn(B, n, 3, H, d).permute(2, 0, 3, 1, 4)
        if N != n:
            k, v = torch.randn(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
        cases = [("SDPA", sdpa, None, d ** -0.5)]
        if name.startswith("ConViT"):
            pos = (torch.softmax(torch.randn(H, n, N), dim=-1) * 0.3).contiguous()
            cases.append(("GPSA, per-image bmm", per_image_gpsa, pos, 1.0))
        for label, ref_fn, pos, scale in cases:
            ref, out = ref_fn(q, k, v, pos, scale), kernel(q, k, v, pos, scale)
            err = (ref - out).abs().max().item()
            assert err <= 1e-4 * max(1.0, ref.abs().max().item()), f"{name}: outputs differ by {err:.2e}"
            times = {"ref": [], "kernel": []}
            for _ in range(args.rounds):
                for key, fn in (("ref", ref_fn), ("kernel", kernel)):
                    t0 = time.perf_counter()
                    fn(q, k, v, pos, scale)
                    times[key].append(time.perf_counter() - t0)
            ratios = sorted(a / b for a, b in zip(times["ref"], times["kernel"]))
            gflop = 4 * B * H * n * N * d / 1e9
            a, b = statistics.median(times["ref"]), statistics.median(times["kernel"])
            print(f"{name:15s} {label:20s} {a * 1e3:8.2f} ms ({gflop / a:5.1f} GFLOP/s)   kernel {b * 1e3:8.2f} ms "
                  f"({gflop / b:5.1f})   speed-up {statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})"
                  f"   max diff {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
