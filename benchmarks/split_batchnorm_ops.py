"""One BatchNorm2d's training forward + backward on one part of a split batch, against PyTorch's BatchNorm.

    python benchmarks/split_batchnorm_ops.py --rounds 9        # 1 thread, CvT-13's projection shapes, batch 8

`native`: `F.batch_norm` in training mode on the part (its own statistics; what the part would cost if it
were a whole batch). `split`: `_SplitBatchNormFn` as `BatchSplitTraining` runs it, with a one-part meeting
(no other part to wait for: the per-part work and the exchange's bookkeeping, not the wait at the barrier).
Channels-last maps (CvT's projections), a dense channels-last upstream gradient. Rounds alternate the two;
medians and the per-round ratio native / split (> 1: split faster) with its min–max are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import _common  # noqa: F401,I001  (puts this checkout's src/ on sys.path)

from hybridzoo.layers.train_fast import _PART, _PartsMeeting, _split_bn_forward

# (channels, side) of CvT-13's depthwise projections at 224²: queries at the stage's resolution, keys and
# values strided by 2
SHAPES = [(64, 56), (64, 28), (192, 28), (192, 14), (384, 14), (384, 7)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="the part's batch (batch 16 on 2 threads: 8)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=10, help="calls per timed sample")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.threads} thread(s), part batch {args.batch}, {args.rounds} rounds × {args.reps} calls, "
          f"torch {torch.__version__}, load average {os.getloadavg()}")
    print("| C × H × W | native fwd+bwd ms | split fwd+bwd ms | native / split (min–max) |")
    print("| --- | ---: | ---: | --- |")
    for c, s in SHAPES:
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(c).train()
        x = torch.randn(args.batch, c, s, s).contiguous(memory_format=torch.channels_last).requires_grad_()
        dy = torch.randn_like(x)

        def native():
            y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, bn.eps)
            y.backward(dy)

        def split():
            _PART.meeting, _PART.part, _PART.count = _PartsMeeting(1), 0, 0
            try:
                _split_bn_forward(bn, x).backward(dy)
            finally:
                _PART.meeting = None

        times = {"native": [], "split": []}
        for fn in (native, split):
            fn()
        for _ in range(args.rounds):
            for name, fn in (("native", native), ("split", split)):
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.reps * 1e3)
        r = [a / b for a, b in zip(times["native"], times["split"])]
        print(f"| {c} × {s} × {s} | {statistics.median(times['native']):.3f} | {statistics.median(times['split']):.3f} "
              f"| {statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
