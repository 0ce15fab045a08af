"""Dense 3×3 convolutions in training: Winograd's tiles (`FastConv3x3`) against oneDNN's direct convolution, one
model toggled round by round in one process, for any task's model (classification, segmentation, super-resolution).

    python benchmarks/winograd_train.py --models unet sctnet_s_seg75 --input 4 3 256 256 --rounds 9
    python benchmarks/winograd_train.py --models botnet_bot50 coatnet_0 --input 16 3 224 224 --split
    python benchmarks/winograd_train.py --models act_x2 --input 8 3 48 48 --split --channels-last --against nchw

The step is the trainer's fast fp32 CPU path: `optimize_for_cpu_training`, channels-last where the model asks for it
(`train_channels_last`; `--channels-last` for any), the batch split with `--split` (classification; segmentation
trains whole), forward, a loss (the mean square of the output: the convolutions' cost does not depend on it),
backward and fused AdamW.
Each round times one step of each variant (two copies of the same weights), in alternating order: Winograd's tiles
against the same layout on the convolution (`FastConv3x3.WINOGRAD` off), or with `--against nchw` against a
channels-first copy; the median of the per-round ratios and their range are printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from _common import add_malloc_option, apply_malloc, logits_of  # noqa: I001  (puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401
from hybridzoo.factory import create_model
from hybridzoo.layers.train_fast import BatchSplitTraining, FastConv3x3, optimize_for_cpu_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["botnet_bot50"])
    ap.add_argument("--input", nargs=4, type=int, default=[16, 3, 224, 224], metavar=("B", "C", "H", "W"))
    ap.add_argument("--split", action="store_true", help="the batch split (BatchSplitTraining), as classification")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and input channels-last even where the model does not ask for it")
    ap.add_argument("--against", choices=["direct", "nchw"], default="direct",
                    help="direct: the same model and layout on oneDNN's convolution; nchw: a channels-first copy on "
                         "it (what choosing channels-last for a model gives)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    add_malloc_option(ap)
    args = ap.parse_args()
    apply_malloc(args)
    torch.set_num_threads(args.threads)
    print(f"# {args.threads} threads, input {args.input}, split {args.split}, {args.rounds} rounds, torch "
          f"{torch.__version__}, load average {os.getloadavg()}")
    for name in args.models:
        torch.manual_seed(0)
        base = optimize_for_cpu_training(create_model(name)).train()
        n_fast = sum(type(m) is FastConv3x3 for m in base.modules())
        cl = args.channels_last or getattr(base, "train_channels_last", False)
        on = _step(copy.deepcopy(base), args, cl, winograd=True)
        # the other variant: the same layout on the convolution, or (--against nchw) a channels-first copy on it
        off = _step(copy.deepcopy(base), args, cl and args.against == "direct", winograd=False)
        for f in (on, off, on, off):   # warm-up: packed weights, the allocator's pools
            f()
        t_on, t_off = [], []
        for r in range(args.rounds):
            for f, ts in ((on, t_on), (off, t_off)) if r % 2 == 0 else ((off, t_off), (on, t_on)):
                ts.append(f())
        ratios = [b / a for a, b in zip(t_on, t_off)]
        other = "direct" if args.against == "direct" else "NCHW, direct"
        print(f"\n## {name}: {n_fast} FastConv3x3 layers, {'channels-last' if cl else 'NCHW'} (load average now "
              f"{os.getloadavg()[0]:.1f})\nWinograd {statistics.median(t_on):.3f} s/step, {other} "
              f"{statistics.median(t_off):.3f} s/step: **{statistics.median(ratios):.3f}x** (min–max "
              f"{min(ratios):.3f}–{max(ratios):.3f}), median of the per-round ratios", flush=True)


def _step(model, args, channels_last: bool, winograd: bool):
    """A timed training step of `model` (its own copy and optimiser), `FastConv3x3.WINOGRAD` set for the step."""
    x = torch.randn(*args.input, generator=torch.Generator().manual_seed(1))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    call = BatchSplitTraining(model) if args.split else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def timed() -> float:
        FastConv3x3.WINOGRAD = winograd
        try:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits_of(call(x)).float().square().mean().backward()
            opt.step()
            return time.perf_counter() - t0
        finally:
            FastConv3x3.WINOGRAD = True
    return timed

if __name__ == "__main__":
    main()
