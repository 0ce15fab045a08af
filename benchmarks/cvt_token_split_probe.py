"""Would a token split pay for CvT at batch 1? A probe, not a code path of the library.

    python benchmarks/cvt_token_split_probe.py --rounds 15

Runs CvT-13's stage-3 blocks (all but the class-token-only last one: 197 rows, 14×14 map + cls token) of the frozen
fast path on one image two ways, interleaved: the blocks in turn on one thread, and a 2-thread token split written
here in the way `layers.onednn_tokens` splits DeiT — each thread takes half the token rows with one intra-op
thread — with the two meetings per block that CvT's convolutional projections need: after LayerNorm 1 (the
depthwise q / k / v convolutions read neighbouring rows, k / v the whole map at stride 2; each thread runs the
cheap q convolution over the whole map and keeps its rows, thread 0 projects k, thread 1 v) and after k / v are
written. Prints that the outputs agree, the sum of both threads' CPU time over the one-thread CPU time (the split's
extra work: 1.0 would be free), and the wall-clock ratio (meaningful on an idle machine only)."""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401,I001
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import _pool, optimize_for_cpu_inference


def block_rows(blk, x, rows: slice, t: int, barrier, A, KV, H: int, W: int):
    a = blk.attn
    C, NK = x.shape[-1], KV.shape[1]
    A[:, rows] = blk.norm1(x)
    barrier.wait()
    cls = A[:, :1]
    m = A[:, 1:].transpose(1, 2).reshape(1, C, H, W)   # a view: the rows are the channels-last map
    qs = a.conv_proj_q(m)
    q_in = qs[:, max(rows.start - 1, 0):rows.stop - 1]
    if rows.start == 0:
        q_in = torch.cat((cls, q_in), 1)
    q = a.proj_q(q_in)
    if t == 0:
        KV[:, :, :C] = a.proj_k(torch.cat((cls, a.conv_proj_k(m)), 1))
    else:
        KV[:, :, C:] = a.proj_v(torch.cat((cls, a.conv_proj_v(m)), 1))
    barrier.wait()
    n, nh = q.shape[1], a.num_heads
    d = C // nh
    k = KV[:, :, :C].view(1, NK, nh, d).transpose(1, 2)
    v = KV[:, :, C:].view(1, NK, nh, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.view(1, n, nh, d).transpose(1, 2), k, v, scale=a.scale)
    x = a.proj(o.transpose(1, 2).reshape(1, n, C)).add_(x)
    return blk.mlp(blk.norm2(x)).add_(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    _common.add_malloc_option(ap)
    args = ap.parse_args()
    _common.apply_malloc(args)
    torch.manual_seed(0)
    fast = optimize_for_cpu_inference(create_model("cvt_13", drop_path_rate=0.0).eval())
    blocks = list(fast.stages[2].blocks)[:-1]
    H = W = 14
    C = blocks[0].norm1.normalized_shape[0]
    N, NK = 1 + H * W, 1 + (H // 2) * (W // 2)
    x0 = torch.randn(1, N, C)
    A, KV = torch.empty(1, N, C), torch.empty(1, NK, 2 * C)
    shares = [slice(0, N // 2), slice(N // 2, N)]

    def split(x):
        barrier = threading.Barrier(2)
        cpu = [0.0, 0.0]

        def run(t):
            torch.set_num_threads(1)
            c0 = time.thread_time()
            try:
                with torch.inference_mode():
                    h = x[:, shares[t]]
                    for blk in blocks:
                        h = block_rows(blk, h, shares[t], t, barrier, A, KV, H, W)
            except BaseException:
                barrier.abort()
                raise
            cpu[t] = time.thread_time() - c0
            return h

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fut = _pool(1).submit(run, 1)
            h0 = run(0)
            return torch.cat((h0, fut.result()), 1), cpu
        finally:
            torch.set_num_threads(before)

    def whole(x, threads):
        torch.set_num_threads(threads)
        c0 = time.thread_time()
        with torch.inference_mode():
            for blk in blocks:
                x = blk(x, H, W)
        return x, time.thread_time() - c0

    ref, _ = whole(x0, 1)
    out, _ = split(x0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cpu_ratio, wall1, wall2 = [], [], []
    for _ in range(args.rounds):
        _, c1 = whole(x0, 1)
        w0 = time.perf_counter()
        whole(x0, 2)
        w2 = time.perf_counter() - w0
        w0 = time.perf_counter()
        _, cs = split(x0)
        ws = time.perf_counter() - w0
        cpu_ratio.append(sum(cs) / c1)
        wall1.append(c1 / ws)
        wall2.append(w2 / ws)
    print(f"# CvT-13 stage 3, blocks 0–{len(blocks) - 1}, one image, {args.rounds} rounds, malloc {args.malloc}, "
          f"load average {os.getloadavg()}; outputs equal to 1e-5")
    print(f"split: both threads' CPU / one thread's CPU: {statistics.median(cpu_ratio):.3f} "
          f"({min(cpu_ratio):.3f}–{max(cpu_ratio):.3f})")
    print(f"wall: one thread / split {statistics.median(wall1):.2f} ({min(wall1):.2f}–{max(wall1):.2f}); "
          f"2 OpenMP threads / split {statistics.median(wall2):.2f} ({min(wall2):.2f}–{max(wall2):.2f})")


if __name__ == "__main__":
    main()
