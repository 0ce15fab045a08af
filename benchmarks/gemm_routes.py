"""GFLOP/s of each training product of DeiT-S's linear layers through MKL and through oneDNN.

    python benchmarks/gemm_routes.py --threads 1
    python benchmarks/gemm_routes.py --threads 2 --tokens 3152

The choice inside `hybridzoo.layers.train_fast.FastLinear`: forward y = x·Wᵀ + b, input gradient dx = dy·W,
weight gradient dW = dyᵀ·x, each through MKL (`addmm` / `mm`, what `nn.Linear`'s autograd runs) and through
oneDNN's inner product (`mkldnn._linear_pointwise` with a plain weight; for dx with Wᵀ as a view or made
contiguous, for dW with transposed operands); dW also as two half-contractions batched (`bmm`, then a sum; an
odd last row is left out, which changes the FLOPs by under 0.1%). Best of 2 calls per round, median of `--rounds` interleaved
rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(384, 1152, "qkv"), (384, 384, "proj"), (384, 1536, "fc1"), (1536, 384, "fc2")]


def best(f, n: int = 2) -> float:
    f()
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        t.append(time.perf_counter() - t0)
    return min(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16 * 197, help="rows M (batch × tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lp = torch.ops.mkldnn._linear_pointwise
    M = args.tokens
    print(f"# {args.threads} thread(s), M = {M}, torch {torch.__version__}; GFLOP/s")
    for K, N, name in SHAPES:
        x, w, b, gy = torch.randn(M, K), torch.randn(N, K), torch.randn(N), torch.randn(M, N)
        wt = w.t().contiguous()
        routes = {
            "fwd MKL": lambda: torch.addmm(b, x, w.t()),
            "fwd oneDNN": lambda: lp(x, w, b, "none", [], ""),
            "dx MKL": lambda: gy.mm(w),
            "dx oneDNN W.t()": lambda: lp(gy, w.t(), None, "none", [], ""),
            "dx oneDNN Wt": lambda: lp(gy, wt, None, "none", [], ""),
            "dW MKL": lambda: gy.t().mm(x),
            "dW oneDNN views": lambda: lp(gy.t(), x.t(), None, "none", [], ""),
            "dW oneDNN copies": lambda: lp(gy.t().contiguous(), x.t().contiguous(), None, "none", [], ""),
            # the contraction split in two halves batched (each thread one half, then one add): a candidate
            # for two threads, where the plain product's output (N × K) is small to share between threads
            "dW MKL split-2": lambda: torch.bmm(gy[:M // 2 * 2].view(2, -1, N).transpose(1, 2),
                                                x[:M // 2 * 2].view(2, -1, K)).sum(0),
        }
        res: dict[str, list[float]] = {k: [] for k in routes}
        for _ in range(args.rounds):
            for k, f in routes.items():
                res[k].append(best(f))
        gf = 2 * M * N * K / 1e9
        print(f"{name} {K}->{N}: " + "  ".join(f"{k} {gf / statistics.median(v):.0f}" for k, v in res.items()),
              flush=True)


if __name__ == "__main__":
    main()
