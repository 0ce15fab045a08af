"""The native panel product (`native.rows_linear`) against oneDNN's packed product, and whole models with it on and
off, interleaved in one process.

    python benchmarks/panel_kernel.py products [--threads 2] [--rounds 11]
    python benchmarks/panel_kernel.py models [--threads 2] [--rounds 15] [--batch 1] [--models convit_tiny cvt_13]

`products`: at the products of DeiT-S, ConViT-Ti and CvT-13 for one image (2 threads: each has a few hundred rows)
and for a thread's part of a batch of 32 (`--threads 1 --part`), each product with as many distinct weights as
fill 8 MB (the weights come from memory, as in a forward, not from cache), the two kernels alternating; prints the
GFLOP/s and the per-round speed-up, median and range.

`models`: the frozen model (`optimize_for_cpu_inference`) with its products on the panel kernel against the same
copy with them on oneDNN (`panels` set aside), and at batch 1 the token split in one native call (`token_blocks`)
against the blocks in turn; alternating rounds, the per-round speed-up printed as median [min-max].
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)
from hybridzoo.engine.cpu_memory import tune_glibc_malloc
from hybridzoo.factory import create_model
from hybridzoo.layers import native
from hybridzoo.layers import onednn_tokens as ot
from hybridzoo.layers.onednn import OneDNNConv2d, OneDNNLinear, optimize_for_cpu_inference

# rows (one image), K, N
IMAGE = [("DeiT-S qkv", 197, 384, 1152), ("DeiT-S fc1", 197, 384, 1536), ("DeiT-S fc2", 197, 1536, 384),
         ("ConViT-Ti qkv", 197, 192, 576), ("ConViT-Ti proj", 197, 192, 192), ("CvT-13 s1 fc1", 3137, 64, 256),
         ("CvT-13 s1 proj", 3137, 64, 64), ("CvT-13 s2 fc1", 785, 192, 768), ("CvT-13 s2 fc2", 785, 768, 192)]


def _median_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    r = sorted(y / x for x, y in zip(a, b))
    return r[len(r) // 2], r[0], r[-1]


def products(args) -> None:
    part = 16 if args.part else 1
    print(f"# {args.threads} thread(s), {part} image(s) per call, {args.rounds} rounds")
    print("| product | rows | K | N | oneDNN GFLOP/s | panel GFLOP/s | speed-up: median [min-max] |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, rows, K, N in IMAGE:
        M = rows * part
        sets = []
        for _ in range(max(2, min(12, int(8e6 // (K * N * 4))))):
            w, b = torch.randn(N, K) / K ** 0.5, torch.randn(N)
            sets.append((torch.randn(M, K), torch.ops.mkldnn._reorder_linear_weight(w, M), native.pack_panels(w), b))
        ref = torch.ops.mkldnn._linear_pointwise(sets[0][0], sets[0][1], sets[0][3], "none", [], "")
        torch.testing.assert_close(native.rows_linear(sets[0][0], sets[0][2], sets[0][3]), ref, rtol=1e-4, atol=1e-4)
        runs = {"onednn": lambda: [torch.ops.mkldnn._linear_pointwise(x, wd, b, "none", [], "")
                                   for x, wd, _, b in sets],
                "panel": lambda: [native.rows_linear(x, wp, b) for x, _, wp, b in sets]}
        times = {k: [] for k in runs}
        with torch.inference_mode():
            for fn in runs.values():
                fn()
            for _ in range(args.rounds):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) / len(sets))
        flop = 2 * M * K * N
        med = {k: statistics.median(v) for k, v in times.items()}
        r, lo, hi = _median_ratio(times["panel"], times["onednn"])
        print(f"| {name} | {M} | {K} | {N} | {flop / med['onednn'] / 1e9:.0f} | {flop / med['panel'] / 1e9:.0f} "
              f"| {r:.2f} [{lo:.2f}-{hi:.2f}] |")


def models(args) -> None:
    print(f"# {args.threads} thread(s), batch {args.batch}, {args.rounds} rounds")
    print("| model | lever | on (ms) | off (ms) | speed-up: median [min-max] |")
    print("| --- | --- | ---: | ---: | --- |")
    for name in args.models:
        model = optimize_for_cpu_inference(create_model(name).eval())
        containers = [m for m in model.modules() if isinstance(m, ot._TokenParallel)]
        layers = [m for m in model.modules() if isinstance(m, (OneDNNLinear, OneDNNConv2d)) and m.panels is not None]
        panels = [m.panels for m in layers]
        x = torch.randn(args.batch, 3, 224, 224)

        def products_on(on: bool) -> None:
            for m, p in zip(layers, panels):
                m.panels = p if on else None

        def tokens_on(on: bool) -> None:
            for c in containers:
                c.mode = "tokens" if on else "whole"

        levers = [("panel products", products_on)]
        if args.batch == 1 and containers:
            levers.append(("token split, one native call", tokens_on))
        for lever, switch in levers:
            tokens_on(False)
            products_on(True)
            times = {True: [], False: []}
            reps = 5 if args.batch == 1 else 1
            with torch.inference_mode():
                for on in (True, False):
                    switch(on)
                    model(x)
                for _ in range(args.rounds):
                    for on in (True, False):
                        switch(on)
                        best = float("inf")
                        for _ in range(reps):
                            t0 = time.perf_counter()
                            model(x)
                            best = min(best, time.perf_counter() - t0)
                        times[on].append(best)
            r, lo, hi = _median_ratio(times[True], times[False])
            print(f"| {name} | {lever} | {statistics.median(times[True]) * 1e3:.1f} | "
                  f"{statistics.median(times[False]) * 1e3:.1f} | {r:.3f} [{lo:.3f}-{hi:.3f}] |")
        products_on(True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["products", "models"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--part", action="store_true", help="products: 16 images per call (a thread's part of 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "convit_tiny", "convit_small", "cvt_13",
                                                    "mobile_former_294m"])
    args = p.parse_args()
    tune_glibc_malloc()
    torch.set_num_threads(args.threads)
    if not (native.load() and native.attention_supported()):
        raise SystemExit("the native kernels are not built here or this CPU has no AVX-512: nothing to compare")
    products(args) if args.what == "products" else models(args)


if __name__ == "__main__":
    main()
