"""Batch-1 levers of the transformer fast path, interleaved in one process (session 6).

    python benchmarks/token_levers.py --models deit_small_patch16_224 convit_tiny convit_small --rounds 15

Variants (each an `optimize_for_cpu_inference` copy of the same model, one image per step):
  whole     `split_tokens=False`: the path before session 6 (every op an OpenMP region over both threads)
  tokens    the blocks' token rows shared among the threads, one intra-op thread each (`layers.onednn_tokens`,
            mode "tokens": always)
  auto      the default (mode "auto"): whichever of the two measured faster at the copy's first call
  1thread   `split_tokens=False` with one intra-op thread: the one-thread reference, whose GFLOP per CPU-second
            is what the token split can reach per thread
Per round every variant runs `--steps` steps; the ratios are medians over rounds of the per-round ratio
(whole / variant) with min–max, on the wall clock and on process CPU time. The share of peak divides the wall
GFLOP/s by `--peak` (default: the idle EPYC's 2-thread oneDNN figure, 222) and the per-CPU-second GFLOP/s by half
of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _common import count_macs_safe  # noqa: I001  (also puts this checkout's src/ on sys.path)

from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import optimize_for_cpu_inference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "convit_tiny", "convit_small"])
    ap.add_argument("--variants", nargs="+", default=["whole", "tokens", "auto", "1thread"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak", type=float, default=222.0, help="2-thread GEMM peak, GFLOP/s (wall)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {args.threads} threads, {args.rounds} rounds × {args.steps} steps, torch {torch.__version__}, "
          f"load average {os.getloadavg()}")
    x = torch.randn(1, 3, 224, 224)
    for name in args.models:
        model = create_model(name, drop_path_rate=0.0).eval()
        macs = count_macs_safe(model, x)
        copies = {"whole": optimize_for_cpu_inference(model, split_tokens=False),
                  "tokens": optimize_for_cpu_inference(model), "auto": optimize_for_cpu_inference(model)}
        copies["tokens"].blocks.mode = "tokens"
        copies["1thread"] = copies["whole"]
        threads = {v: 1 if v == "1thread" else args.threads for v in args.variants}
        with torch.inference_mode():
            ref = model(x)
            for v in args.variants:   # warm-up and a check of the outputs
                torch.set_num_threads(threads[v])
                torch.testing.assert_close(copies[v](x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
            cpu = {v: [] for v in args.variants}
            wall = {v: [] for v in args.variants}
            for _ in range(args.rounds):
                for v in args.variants:
                    torch.set_num_threads(threads[v])
                    c0, w0 = time.process_time(), time.perf_counter()
                    for _ in range(args.steps):
                        copies[v](x)
                    cpu[v].append((time.process_time() - c0) / args.steps)
                    wall[v].append((time.perf_counter() - w0) / args.steps)
        torch.set_num_threads(args.threads)
        chosen = getattr(copies["auto"].blocks, "_choices", {})
        print(f"\n## {name}, batch 1, {2 * macs / 1e9:.2f} GFLOP (load average now {os.getloadavg()[0]:.1f}); "
              f"'auto' chose the token split: {sorted(set(chosen.values())) or 'not timed'}")
        print("| variant | threads | wall ms | CPU ms | GFLOP/s wall (share of peak) | GFLOP per CPU-s (share of "
              "1-thread peak) | whole / variant, wall: median (min–max) | CPU: median (min–max) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for v in args.variants:
            w, c = statistics.median(wall[v]), statistics.median(cpu[v])
            rw = [a / b for a, b in zip(wall["whole"], wall[v])] if "whole" in wall else [float("nan")]
            rc = [a / b for a, b in zip(cpu["whole"], cpu[v])] if "whole" in cpu else [float("nan")]
            g, gc = 2 * macs / w / 1e9, 2 * macs / c / 1e9
            print(f"| {v} | {threads[v]} | {1e3 * w:.1f} | {1e3 * c:.1f} | {g:.0f} ({g / args.peak:.0%}) | "
                  f"{gc:.0f} ({gc / (args.peak / 2):.0%}) | {statistics.median(rw):.3f} ({min(rw):.3f}–{max(rw):.3f}) | "
                  f"{statistics.median(rc):.3f} ({min(rc):.3f}–{max(rc):.3f}) |", flush=True)


if __name__ == "__main__":
    main()
