"""What the native CPU kernels (`hybridzoo.layers.native`) give a frozen model: on against off, interleaved.

    python benchmarks/native_ab.py [--model mobile_former_294m] [--batch 32 1] [--rounds 7] [--threads 2]

Builds the kernels if they are not in the cache yet (about 80 s), prepares the model once with
`optimize_for_cpu_inference`, checks that its output is the same with the kernels and without (HYBRIDZOO_NATIVE=0
at call time: the ATen / MKL / oneDNN calls; fp32 rounding apart, since the tiny products sum in another order),
then times both in alternating rounds and prints the per-round speed-up: median and range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)
from hybridzoo.engine.cpu_memory import tune_glibc_malloc
from hybridzoo.factory import create_model
from hybridzoo.layers import native
from hybridzoo.layers.onednn import optimize_for_cpu_inference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobile_former_294m")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tune_glibc_malloc()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not native.load():
        raise SystemExit("the native kernels are not available here (see the warning above)")
    print(f"kernels loaded in {time.perf_counter() - t0:.1f} s from {native.build_dir()}", flush=True)
    torch.manual_seed(0)
    model = optimize_for_cpu_inference(create_model(args.model).eval())
    variants = {"ATen passes": "0", "native kernels": "1"}
    try:
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224)
            steps = 2 if batch > 1 else 10
            times = {k: [] for k in variants}
            with torch.inference_mode():
                outs = {}
                for k, flag in variants.items():
                    os.environ["HYBRIDZOO_NATIVE"] = flag
                    model(x)
                    outs[k] = model(x)
                a, b = outs.values()
                diff = (a - b).abs().max().item()
                # the dynamic ReLU's kernel is exact; the tiny products sum in another order than MKL
                assert diff <= 1e-4 * a.abs().max().item(), f"the kernels changed the output by {diff:.2e}"
                for _ in range(args.rounds):
                    for k, flag in variants.items():
                        os.environ["HYBRIDZOO_NATIVE"] = flag
                        model(x)
                        ts = []
                        for _ in range(steps):
                            t = time.perf_counter()
                            model(x)
                            ts.append(time.perf_counter() - t)
                        times[k].append(statistics.median(ts))
            ratios = [p / q for p, q in zip(*times.values())]
            print(f"{args.model} batch {batch}, {args.threads} threads: "
                  + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items())
                  + f"; speed-up per round {statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f}),"
                  f" outputs differ by at most {diff:.1e}", flush=True)
    finally:
        os.environ.pop("HYBRIDZOO_NATIVE", None)


if __name__ == "__main__":
    main()
