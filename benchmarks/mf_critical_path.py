"""Mobile-Former's two-thread batch-1 block: the critical path from per-thread CPU time, robust to machine load.

    python benchmarks/mf_critical_path.py [--model mobile_former_294m] [--forwards 30]

Runs the fast path (`optimize_for_cpu_inference`) at batch 1 on 2 intra-op threads and records the CPU time
(`time.thread_time`, so time spent descheduled by other jobs does not count) of each frozen block's parts: the
token side, the first convolution, and the two halves of the rest. Per block the critical path is
max(token side, first convolution) + max(upper half, lower half); printed against the sum of the same parts (what
one thread would spend on them). Hand-off and barrier waits are not included: an upper bound on the gain.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401,I001
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import optimize_for_cpu_inference
from hybridzoo.models import mobile_former


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobile_former_294m")
    ap.add_argument("--forwards", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    frozen = mobile_former._FrozenMobileFormerBlock
    records: list[tuple[int, str, float]] = []

    def timed(name):
        orig = getattr(frozen, name)

        def run(self, *a):
            t = time.thread_time()
            out = orig(self, *a)
            records.append((id(self), name, time.thread_time() - t))
            return out
        setattr(frozen, name, run)

    for name in ("tokens", "_first", "_rest_rows"):
        timed(name)
    model = optimize_for_cpu_inference(create_model(args.model).eval())
    blocks = [b for b in model.modules() if isinstance(b, frozen)]
    x = torch.randn(1, 3, 224, 224)
    serial, critical = [], []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        for _ in range(args.forwards):
            records.clear()
            model(x)
            s = c = 0.0
            for b in blocks:
                parts = [(n, t) for i, n, t in records if i == id(b)]
                tokens = sum(t for n, t in parts if n == "tokens")
                first = sum(t for n, t in parts if n == "_first")
                halves = [t for n, t in parts if n == "_rest_rows"]
                s += tokens + first + sum(halves)
                c += max(tokens, first) + max(halves, default=0.0)
            serial.append(1e3 * s)
            critical.append(1e3 * c)
    print(f"{args.model}, batch 1, {len(blocks)} frozen blocks, {args.forwards} forwards, threads alive "
          f"{threading.active_count()}: parts {statistics.median(serial):.2f} ms CPU, critical path "
          f"{statistics.median(critical):.2f} ms, ratio {statistics.median(s / c for s, c in zip(serial, critical)):.2f}")


if __name__ == "__main__":
    main()
