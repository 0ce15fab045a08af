"""Per-operator 2-thread scaling of the inference fast path: which ops gain from the second thread.

    python benchmarks/op_scaling.py cvt_13 --batch 1 --steps 10

Profiles `optimize_for_cpu_inference(model)(x)` with 1 and then 2 intra-op threads (torch.profiler, after a
warm-up) and prints, per operator and input shape, the milliseconds per forward at each thread count and the
ratio (1-thread / 2-thread: 2.0 is perfect scaling, below 1 the second thread costs time). Wall-clock per op, so
only meaningful on an idle machine: under load every OpenMP region waits for a descheduled thread.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401,I001
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import optimize_for_cpu_inference


def per_op(fast, x, threads: int, steps: int) -> dict[tuple[str, str], float]:
    torch.set_num_threads(threads)
    with torch.inference_mode():
        for _ in range(3):
            fast(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                fast(x)
    return {(e.key, str(e.input_shapes)[:72]): e.self_cpu_time_total / steps / 1000
            for e in prof.key_averages(group_by_input_shape=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=30)
    _common.add_malloc_option(ap)
    args = ap.parse_args()
    _common.apply_malloc(args)
    torch.manual_seed(0)
    fast = optimize_for_cpu_inference(create_model(args.model, drop_path_rate=0.0).eval())
    x = torch.randn(args.batch, 3, args.img, args.img)
    one, two = per_op(fast, x, 1, args.steps), per_op(fast, x, 2, args.steps)
    print(f"# {args.model}, batch {args.batch}, {args.steps} forwards each, malloc {args.malloc}, load average "
          f"{os.getloadavg()}")
    print(f"sum of ops' self times: 1 thread {sum(one.values()):.1f} ms, 2 threads {sum(two.values()):.1f} ms per forward")
    print("| op | input shapes | 1 thread ms | 2 threads ms | 1t / 2t |")
    print("| --- | --- | ---: | ---: | ---: |")
    for k in sorted(one, key=lambda k: -one[k])[:args.rows]:
        a, b = one[k], two.get(k, 0.0)
        print(f"| {k[0][:40]} | {k[1]} | {a:.2f} | {b:.2f} | {a / b if b else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
