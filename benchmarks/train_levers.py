"""Each training-speed lever against the plain eager step, interleaved in one process.

    python benchmarks/train_levers.py --models deit_small_patch16_224 convit_small cvt_13 --rounds 7
    python benchmarks/train_levers.py --models deit_small_patch16_224 --levers fast compile fast-compile --rounds 7

A training step is forward + cross-entropy + backward + AdamW step (fp32, batch `--batch`). Variants:
  plain         nn.Linear, AdamW as torch builds it by default (the baseline)
  fast-linear   `optimize_for_cpu_training` (oneDNN forward and input gradient, MKL weight gradient)
  fused-adamw   plain model, `AdamW(fused=True)`
  fast          both, whole batch (`hybridzoo train --no-batch-split`)
  fast-split    both, and the batch split (`BatchSplitTraining`, what `hybridzoo train` does on the CPU for
                models without batch statistics): one share of the batch per thread, each on one thread; attention
                on the native kernels where they build (`layers.native.attend`)
  fast-split-sdpa  fast-split with attention left to SDPA (`optimize_for_cpu_training(native_attention=False)`)
  fast-split-aten-gelu  fast-split with GELU and QuickGELU left to ATen (`optimize_for_cpu_training(
                native_gelu=False)`): what the native one-pass activations give
  compile       `torch.compile(model)` of the plain model (inductor C++), AdamW default; its compile time
                is printed (not in the default set: compiling a full-size model takes minutes)
  fast-compile  the fast path compiled (`hybridzoo train --compile`): FastLinear's products stay oneDNN calls
                (the custom op `hybridzoo::onednn_linear`), inductor fuses the rest; fused AdamW
  fast-cl       the fast path with model and input in channels-last (`--channels-last`; convolution stages)
  fast-split-cl fast-split with model and input in channels-last: the layout measured beside the batch split
  fast-split-cl-sdpa  fast-split-cl with attention left to SDPA (CoAtNet's relative attention with its float mask
                on SDPA's math path, as before session 37)
  fast-split-cl-autograd-se  fast-split-cl with every squeeze-excitation through autograd's formula (x · gate, six
                passes back) instead of `_GatedByMeanFn` (two)
  fast-split-cl-direct-conv  fast-split-cl with the dense 3×3 stride-1 convolutions on oneDNN's direct convolution
                (`FastConv3x3.WINOGRAD` off) instead of Winograd's tiles on the native kernels
  fast-split-every-row  fast-split with the last block computing every token row (`layers.helpers.every_row`),
                as before session 7 (fast-split computes only the class token's row there: the head reads no other)
  fast-split-onednn, fast-split-native, fast-split-mkl  fast-split with `FastLinear`'s forward and input-gradient
                products on that route (`layers.train_fast.PRODUCTS`, set for the step; fast-split takes the CPU's
                default: oneDNN where PyTorch runs AVX-512, native on AVX2, `HYBRIDZOO_TRAIN_PRODUCTS`)
  fast-split-dw-mkl, fast-split-dw-native  fast-split with `FastLinear`'s weight gradient on MKL's `mm` or on the
                native kernel (`layers.train_fast.WEIGHT_GRADS`, set for the step)
  fast-split-avx2  fast-split with the native kernels' AVX2 versions on an AVX-512 CPU (`native.set_isa("avx2")` for
                the step): whether the AVX-512 kernels pay on this CPU
Every variant starts from the same weights. Rounds go plain, fast-linear, ...; each round's ratio
plain / variant is taken and the median and min–max over rounds are printed, so load that comes and goes
hits every variant alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import statistics
import time

import torch

from _common import add_malloc_option, apply_malloc, make_train_step  # noqa: I001  (puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401
from hybridzoo.factory import create_model
from hybridzoo.layers import native, train_fast
from hybridzoo.layers.conv import SqueezeExcite
from hybridzoo.layers.helpers import every_row
from hybridzoo.layers.train_fast import FastConv3x3

LEVERS = ["plain", "fast-linear", "fused-adamw", "fast", "fast-split", "compile", "fast-compile", "fast-cl",
          "fast-split-cl", "fast-split-cl-sdpa", "fast-split-cl-autograd-se", "fast-split-cl-direct-conv",
          "fast-split-every-row", "fast-split-sdpa",
          "fast-split-aten-gelu", "fast-split-avx2", "fast-split-onednn", "fast-split-native", "fast-split-mkl",
          "fast-split-dw-mkl", "fast-split-dw-native"]
ROUTES = {"fast-split-onednn": "onednn", "fast-split-native": "native", "fast-split-mkl": "mkl"}
WEIGHT_GRADS = {"fast-split-dw-mkl": "mkl", "fast-split-dw-native": "native"}
# the variants of the trainer's step by batch split (fast linear layers and fused AdamW with it)
SPLIT = {lever for lever in LEVERS if lever.startswith("fast-split")}


@contextlib.contextmanager
def _route(name: str, value: str):
    """`train_fast.<name>` (PRODUCTS, WEIGHT_GRADS) set to `value` for the duration."""
    before = getattr(train_fast, name)
    setattr(train_fast, name, value)
    try:
        yield
    finally:
        setattr(train_fast, name, before)


@contextlib.contextmanager
def _avx2_kernels():
    native.set_isa("avx2")
    try:
        yield
    finally:
        native.set_isa("best")


@contextlib.contextmanager
def _autograd_squeeze_excite():
    """Every SqueezeExcite's forward as its formula for the duration, autograd taking the backward."""
    before = SqueezeExcite.forward
    SqueezeExcite.forward = lambda self, x: x * self.gate_of(x)
    try:
        yield
    finally:
        SqueezeExcite.forward = before


@contextlib.contextmanager
def _direct_conv3x3():
    """Every FastConv3x3 on the convolution for the duration, not Winograd's tiles."""
    FastConv3x3.WINOGRAD = False
    try:
        yield
    finally:
        FastConv3x3.WINOGRAD = True


def _within(step, context):
    """`step` run inside a fresh `context()` at every call."""
    def run():
        with context():
            return step()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "convit_small", "cvt_13"])
    ap.add_argument("--levers", nargs="+", default=["fast-linear", "fused-adamw", "fast", "fast-split"], choices=LEVERS[1:])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    add_malloc_option(ap)
    args = ap.parse_args()
    apply_malloc(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"# {args.threads} threads, batch {args.batch}, {args.rounds} rounds, malloc {args.malloc}, "
          f"torch {torch.__version__}, "
          f"load average {os.getloadavg()}")
    for name in args.models:
        base = create_model(name, drop_path_rate=0.0)
        variants = {"plain": make_train_step(copy.deepcopy(base), x)}
        for lever in args.levers:  # every variant trains its own copy of the same weights
            variants[lever] = make_train_step(copy.deepcopy(base), x,
                                              linear=lever in SPLIT or lever in ("fast-linear", "fast", "fast-compile",
                                                                                 "fast-cl"),
                                              fused=lever in SPLIT or lever in ("fused-adamw", "fast", "fast-compile",
                                                                                "fast-cl"),
                                              split=lever in SPLIT,
                                              native_attention=lever not in ("fast-split-sdpa",
                                                                             "fast-split-cl-sdpa"),
                                              native_gelu=lever != "fast-split-aten-gelu",
                                              compiled=lever in ("compile", "fast-compile"),
                                              channels_last=lever in ("fast-cl", "fast-split-cl",
                                                                      "fast-split-cl-sdpa",
                                                                      "fast-split-cl-autograd-se",
                                                                      "fast-split-cl-direct-conv"))
        contexts = {"fast-split-every-row": every_row, "fast-split-avx2": _avx2_kernels,
                    "fast-split-cl-autograd-se": _autograd_squeeze_excite,
                    "fast-split-cl-direct-conv": _direct_conv3x3,
                    **{lever: functools.partial(_route, "PRODUCTS", route) for lever, route in ROUTES.items()},
                    **{lever: functools.partial(_route, "WEIGHT_GRADS", route) for lever, route in WEIGHT_GRADS.items()}}
        for lever, context in contexts.items():
            if lever in variants:
                variants[lever] = _within(variants[lever], context)
        for v, step in variants.items():  # warm-up (and compilation)
            t0 = time.perf_counter()
            step()
            if "compile" in v:
                print(f"  {name}: compile + first step {time.perf_counter() - t0:.1f} s", flush=True)
            step()
        times: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}  # process CPU time: less sensitive to load
        for _ in range(args.rounds):
            for v, step in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                times[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
        print(f"\n## {name} (load average now {os.getloadavg()[0]:.1f})")
        print("| variant | median s/step (wall / CPU) | speed-up vs plain: median of per-round ratios | min–max "
              "| speed-up per CPU-second (step medians) |")
        print("| --- | ---: | ---: | --- | ---: |")
        for v, ts in times.items():
            r = [p / t for p, t in zip(times["plain"], ts)]
            print(f"| {v} | {statistics.median(ts):.3f} / {statistics.median(cpu[v]):.3f} | {statistics.median(r):.3f} "
                  f"| {min(r):.3f}–{max(r):.3f} | {statistics.median(cpu['plain']) / statistics.median(cpu[v]):.3f} |",
                  flush=True)
        for base, lever, what in (("fast-split", "fast-split-sdpa", "native attention"),
                                  ("fast-split", "fast-split-aten-gelu", "native GELU"),
                                  ("fast-split-cl", "fast-split-cl-sdpa", "native attention"),
                                  ("fast-split-cl", "fast-split-cl-autograd-se", "two-pass squeeze-excitation"),
                                  ("fast-split-cl", "fast-split-cl-direct-conv", "Winograd 3×3 convolutions")):
            if lever in times and base in times:   # a native kernel's share, round by round
                r = [a / b for a, b in zip(times[lever], times[base])]
                print(f"\n{base} ({what}) vs {lever}: wall {statistics.median(r):.3f}x (min–max "
                      f"{min(r):.3f}–{max(r):.3f}), median of per-round ratios", flush=True)
        for lever in ("fast-split-native", "fast-split-mkl"):   # each route against oneDNN's, round by round
            if lever in times and "fast-split-onednn" in times:
                r = [a / b for a, b in zip(times["fast-split-onednn"], times[lever])]
                rc = [a / b for a, b in zip(cpu["fast-split-onednn"], cpu[lever])]
                print(f"\n{lever} vs fast-split-onednn: wall {statistics.median(r):.3f}x (min–max {min(r):.3f}–"
                      f"{max(r):.3f}), CPU time {statistics.median(rc):.3f}x, medians of per-round ratios", flush=True)
        if "fast-split-dw-native" in times and "fast-split-dw-mkl" in times:   # the weight gradient's route
            r = [a / b for a, b in zip(times["fast-split-dw-mkl"], times["fast-split-dw-native"])]
            print(f"\nfast-split-dw-native vs fast-split-dw-mkl: wall {statistics.median(r):.3f}x (min–max "
                  f"{min(r):.3f}–{max(r):.3f}), median of per-round ratios", flush=True)
        if "fast-split-avx2" in times and "fast-split" in times:   # the AVX-512 kernels against their AVX2 twins
            r = [a / b for a, b in zip(times["fast-split-avx2"], times["fast-split"])]
            print(f"\nfast-split (AVX-512 kernels) vs fast-split-avx2: wall {statistics.median(r):.3f}x (min–max "
                  f"{min(r):.3f}–{max(r):.3f}), median of per-round ratios", flush=True)
        for a, b in (("fast-cl", "fast"), ("fast-split-cl", "fast-split")):   # channels-last, round by round
            if a in times and b in times:
                r = [y / z for y, z in zip(times[b], times[a])]
                rc = [y / z for y, z in zip(cpu[b], cpu[a])]
                print(f"\n{a} vs {b}: wall {statistics.median(r):.3f}x (min–max {min(r):.3f}–{max(r):.3f}), "
                      f"CPU time {statistics.median(rc):.3f}x, medians of per-round ratios", flush=True)
        if "fast" in times and "fast-split" in times:  # the batch split against the whole batch, round by round
            r = [w / s for w, s in zip(times["fast"], times["fast-split"])]
            rc = [w / s for w, s in zip(cpu["fast"], cpu["fast-split"])]
            print(f"\nfast-split vs fast (whole batch): wall {statistics.median(r):.3f}x (min–max {min(r):.3f}–"
                  f"{max(r):.3f}), CPU time {statistics.median(rc):.3f}x (min–max {min(rc):.3f}–{max(rc):.3f}), "
                  "medians of per-round ratios", flush=True)


if __name__ == "__main__":
    main()
