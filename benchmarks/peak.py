"""This machine's fp32 matrix-product peak, as the yardstick for "share of peak" in the benchmarks.

Three routes to the same product y = x·Wᵀ (x: M×K, W: N×K) on the CPU:
- `F.linear`: what `nn.Linear` runs (fp32 → MKL sgemm on x86 builds);
- oneDNN packed linear: `torch.ops.mkldnn._linear_pointwise` with W reordered once into oneDNN's
  blocked layout (what `hybridzoo.layers.onednn.OneDNNLinear` runs);
- 1×1 convolution: the same product as a channels-last 1×1 conv (oneDNN's convolution).
Each is timed on a few large transformer-like shapes, the methods interleaved round by round, and the
median GFLOP/s (2·M·N·K per call) reported. The best oneDNN figure is the "peak" the model benchmarks
divide by.

    python benchmarks/peak.py [--threads 2] [--clock wall|cpu] [--out benchmarks/results_peak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (M, K, N): DeiT-S batch 32 (qkv, fc1, fc2), ViT-B-ish fc1, a square product
    (32 * 197, 384, 1152),
    (32 * 197, 384, 1536),
    (32 * 197, 1536, 384),
    (8 * 197, 768, 3072),
    (4096, 1024, 1024),
]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn, min_seconds: float, clock=time.perf_counter) -> float:
    """Seconds per call: repeat until `min_seconds` (on `clock`) have passed."""
    fn()
    n, t0 = 0, clock()
    while True:
        fn()
        n += 1
        dt = clock() - t0
        if dt >= min_seconds:
            return dt / n


def load_average() -> list[float] | None:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def linear_routes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict:
    """Calls computing x·wᵀ + b: "mkl_linear" (`F.linear`) and, where this PyTorch has oneDNN's inner product,
    "onednn_packed_linear" (w packed once into oneDNN's blocked layout)."""
    routes = {"mkl_linear": lambda: F.linear(x, w, b)}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        routes["onednn_packed_linear"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return routes


def measure_peak(threads: int = 2, rounds: int = 5, min_seconds: float = 0.25, shapes=SHAPES,
                 clock: str = "wall") -> dict:
    """GFLOP/s per method and shape. `clock="cpu"` divides by this process's CPU time instead of wall
    time: on a machine shared with other jobs that approximates the quiet-machine figure with one
    thread (with several, OpenMP's spin-waiting is counted too, so it errs low)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    has_mkldnn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    with torch.inference_mode():
        for M, K, N in shapes:
            x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
            methods = linear_routes(x, w, b)
            if has_mkldnn:
                # the same product as a 1×1 conv on an M-pixel channels-last map (1×M image)
                xc = x.t().reshape(1, K, 1, M).contiguous(memory_format=torch.channels_last)
                wc = w.reshape(N, K, 1, 1).contiguous(memory_format=torch.channels_last)
                methods["conv1x1_channels_last"] = lambda: F.conv2d(xc, wc, b)
            ref = F.linear(x, w, b)
            if has_mkldnn:  # the three routes compute the same product
                torch.testing.assert_close(methods["onednn_packed_linear"](), ref, rtol=1e-4, atol=1e-3)
                torch.testing.assert_close(methods["conv1x1_channels_last"]().reshape(N, M).t(), ref,
                                           rtol=1e-4, atol=1e-3)
            samples: dict[str, list[float]] = {k: [] for k in methods}
            for _ in range(rounds):
                for name, fn in methods.items():
                    samples[name].append(2 * M * N * K / _time(fn, min_seconds, CLOCKS[clock]) / 1e9)
            row = {"M": M, "K": K, "N": N}
            row.update({name: statistics.median(v) for name, v in samples.items()})
            rows.append(row)
    methods = [k for k in rows[0] if k not in ("M", "K", "N")]
    best = {m: max(r[m] for r in rows) for m in methods}
    onednn = max((best[m] for m in ("onednn_packed_linear", "conv1x1_channels_last") if m in best), default=None)
    return {"threads": threads, "clock": clock, "cpu": cpu_name(), "torch": torch.__version__,
            "loadavg": load_average(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "best_gflops": best,
            "onednn_peak_gflops": onednn, "mkl_peak_gflops": best.get("mkl_linear")}


def print_peak(res: dict) -> None:
    methods = list(res["best_gflops"])
    print(f"# fp32 matmul GFLOP/s — {res['cpu']}, {res['threads']} threads, {res['clock']} clock, "
          f"torch {res['torch']}, load average {res['loadavg']}")
    print("| M × K × N | " + " | ".join(methods) + " |")
    print("| --- | " + " | ".join("---:" for _ in methods) + " |")
    for r in res["rows"]:
        print(f"| {r['M']} × {r['K']} × {r['N']} | " + " | ".join(f"{r[m]:.0f}" for m in methods) + " |")
    print("| **best** | " + " | ".join(f"**{res['best_gflops'][m]:.0f}**" for m in methods) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.25)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time (the honest figure on a quiet machine); cpu: process CPU time")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    res = measure_peak(args.threads, args.rounds, args.min_seconds, clock=args.clock)
    print_peak(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
