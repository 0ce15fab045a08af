"""How fast this machine lets a model's fast path run: every operator it calls, timed alone and in order.

    python benchmarks/ceiling.py deit_small_patch16_224 convit_tiny mobile_former_294m --batch 1 32
    python benchmarks/ceiling.py convit_tiny --batch 1 --against benchmarks/results_timm_infer_epyc_s10.json
    python benchmarks/ceiling.py deit_small_patch16_224 --train --against benchmarks/results_timm_train_epyc_s10.json
    python benchmarks/ceiling.py --table-of benchmarks/results_ceiling_epyc_s10.json --against NEWER.json

Issue 16's targets are shares of the machine's GEMM peak, measured on large products (6,304 rows). A model's own
products are smaller (197 rows at batch 1, 192 channels in ConViT-Ti, 64-wide attention heads), and its forward is
more than its products. This script splits the distance between our forward and the peak into parts:

1. the model goes through `optimize_for_cpu_inference` (with `--train`: one training step of the trainer's fp32 CPU
   path, `_common.make_train_step`, forward, backward and fused AdamW), and one call at one intra-op thread runs
   under a dispatch mode that records every operator call (operator, shapes, strides, dtypes, other arguments;
   views are only counted). One thread, because that is how the batch split and the batch-1 two-thread paths run
   their work;
2. **calls in order**: the recorded calls back to back, in the order the step made them, on their recorded
   arguments — the kernels and what they do to each other's caches, without the model's Python. Timed as one
   intra-op team at `--threads` ("team") and at one thread divided by `--threads` ("split": perfect division);
3. **hot**: every distinct call alone, repeated (cache-warm), at one thread and at `--threads`; the ceiling sums
   count × min(time at `--threads`, time at one thread / `--threads`), for all calls and for the products (linear,
   convolution, matmul, attention kernels). Nothing that calls these kernels runs faster.

Each round measures the GEMM peak (`_common.round_peak`) beside the rest and every figure is a share of that round's
peak (the machine's speed moves within minutes); the table gives the medians over the rounds. With `--against`
(a bench_timm.py / bench_transformers.py JSON) it adds issue 16's target for that row (inference: the lower of
twice the peer's share and 85%; training: 1.3× the peer's share, or 90% where the peer trains above 70%) and
whether the calls in order and the hot ceiling reach it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from _common import count_macs_safe, environment, make_train_step, round_peak, write_json  # noqa: I001  (also puts src/ on sys.path)

from hybridzoo.engine.cpu_memory import tune_glibc_malloc
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import optimize_for_cpu_inference

# words of an operator's name (split at "_") that make it a product; "bilinear" (upsampling) is not one
PRODUCT_WORDS = {"linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "conv", "conv2d", "convolution", "attention"}
TARGET_SHARE_OF_PEAK = 0.85  # issue 16, inference: 85% of the peak, or twice the peer where that is lower
TRAIN_RATIO, TRAIN_TARGET_AT_PEAK, TRAIN_PEER_NEAR_PEAK = 1.3, 0.90, 0.70  # training: 1.3×, or 90% above a 70% peer


def is_product(op_name: str) -> bool:
    """A matrix product, convolution or attention kernel (aten::mm / addmm / bmm / baddbmm, oneDNN's packed linear
    and convolution, SDPA), by the operator's name."""
    base = op_name.split("::")[-1].split(".")[0]
    return not PRODUCT_WORDS.isdisjoint(base.split("_"))


def _signature(a: Any):
    if isinstance(a, torch.Tensor):
        stride = a.stride() if a.layout is torch.strided else None
        return ("T", tuple(a.shape), stride, a.dtype, a.layout)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_signature(v) for v in a))
    return repr(a)


@dataclass
class Call:
    """One distinct operator call: the first instance's arguments (kept for the replay) and how often it ran."""
    func: Any
    args: tuple
    kwargs: dict
    count: int = 0
    seconds: dict[int, float] = field(default_factory=dict)  # threads -> seconds per call

    @property
    def name(self) -> str:
        return str(self.func._schema.name) if hasattr(self.func, "_schema") else str(self.func)

    @property
    def product(self) -> bool:
        return is_product(self.name)


class OpRecorder(TorchDispatchMode):
    """Counts the operators run under it, by distinct call; views (metadata only) are counted apart, not kept.

    Only the first call of each kind keeps its arguments, so a batch-32 forward does not pin every activation."""

    def __init__(self):
        super().__init__()
        self.calls: dict[Any, Call] = {}
        self.order: list[Call] = []  # every call in the order it ran (views left out)
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "is_view", False) or func in (torch.ops.aten.detach.default,):
            self.views += 1
            return func(*args, **kwargs)
        if func.namespace == "profiler":  # record_function's markers (the optimiser's step): no work
            return func(*args, **kwargs)
        key = (str(func), _signature(args), _signature(tuple(sorted(kwargs.items()))))
        call = self.calls.get(key)
        if call is None:
            # the arguments as they are before the call: an in-place operator changes its input
            call = self.calls[key] = Call(func, tree_map(_detached_copy, args), tree_map(_detached_copy, kwargs))
        call.count += 1
        self.order.append(call)
        return func(*args, **kwargs)


def _detached_copy(a):
    """A copy with the same strides (a permuted view stays permuted); an expanded one (stride 0) becomes dense."""
    if isinstance(a, torch.Tensor) and a.layout is torch.strided:
        if a.is_contiguous() or 0 in a.stride():
            return a.detach().clone()
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a)
    return a


def _written(call: Call) -> set[str]:
    schema = getattr(call.func, "_schema", None)
    if schema is None:
        return set()
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def replay(call: Call, threads: int, min_seconds: float = 0.01, repeats: int = 3) -> float:
    """Seconds per call of `call` alone at `threads` intra-op threads: the best of `repeats` timings of as many
    back-to-back calls as fill `min_seconds`. Arguments the operator writes are cloned once, so the recorded
    inputs stay as they were."""
    written = _written(call)
    schema = getattr(call.func, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    args = tuple(_detached_copy(a) if i < len(names) and names[i] in written else a for i, a in enumerate(call.args))
    kwargs = {k: _detached_copy(v) if k in written else v for k, v in call.kwargs.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            call.func(*args, **kwargs)
            first = time.perf_counter() - t0
            n = max(1, min(10_000, int(min_seconds / max(first, 1e-7))))
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(n):
                    call.func(*args, **kwargs)
                best = min(best, (time.perf_counter() - t0) / n)
        return best
    finally:
        torch.set_num_threads(before)


def ceiling_seconds(calls: list[Call], threads: int, products_only: bool = False) -> float:
    """Σ count × min(seconds at `threads`, seconds at one thread / `threads`) over the calls (see the module text)."""
    total = 0.0
    for c in calls:
        if products_only and not c.product:
            continue
        best = c.seconds[1] / threads if 1 in c.seconds else float("inf")
        if threads in c.seconds:
            best = min(best, c.seconds[threads])
        total += c.count * best
    return total


def record(step: Callable[[], Any]) -> OpRecorder:
    """The operators of one call of `step` at one intra-op thread (the calling thread's work only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step()  # first call at this shape and thread count: probes and caches happen here, not recorded
        with OpRecorder() as rec:
            step()
        return rec
    finally:
        torch.set_num_threads(before)


def time_step(step: Callable[[], Any], threads: int, reps: int) -> float:
    """Median wall seconds of `reps` calls of `step` at `threads` intra-op threads, after two warm-up calls."""
    torch.set_num_threads(threads)
    for _ in range(2):
        step()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_in_order(order: list[Call], threads: int, reps: int) -> float:
    """Median wall seconds of the recorded calls run back to back in the order the step ran them (each on its
    recorded arguments: the kernels and their order without the model's Python, at `threads` threads). In-place
    calls write the recorded copies again and again, so denormals are flushed while it runs: their values are
    noise, and a denormal's slow path would time the wrong thing."""
    torch.set_num_threads(threads)
    flush = torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            ts = []
            for i in range(reps + 1):
                t0 = time.perf_counter()
                for c in order:
                    c.func(*c.args, **c.kwargs)
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:])
    finally:
        if flush:
            torch.set_flush_denormal(False)


def target_of(rows: list[dict], model: str, batch: int, train: bool = False) -> dict | None:
    """Issue 16's target for our row of `model` at `batch` in a bench JSON's results, from the best peer's share of
    the peak (the median over the rounds): inference (our fast-path row), the lower of twice the peer's share and
    85%; training (our trainer-path row), 1.3× the peer's share, or 90% where the peer trains above 70%."""
    scenario = {"training"} if train else {"inference", "latency-bs1"}
    name = model if train else f"{model} +oneDNN"
    ours = [r for r in rows if r.get("name") == name and r.get("batch_size") == batch and r.get("scenario") in scenario
            and str(r.get("impl", "")).startswith("ours")]
    if not ours:
        return None
    row = ours[0]
    peers = [r for r in rows if r.get("group") == row.get("group") and r.get("scenario") == row.get("scenario")
             and r.get("batch_size") == batch and not str(r.get("impl", "")).startswith("ours")]
    share = lambda r: r.get("share_round_median", r.get("share_of_peak"))  # noqa: E731
    peer_share = max((share(p) for p in peers if share(p) is not None), default=None)
    if peer_share is None:
        return None
    if train:
        target = TRAIN_TARGET_AT_PEAK if peer_share > TRAIN_PEER_NEAR_PEAK else TRAIN_RATIO * peer_share
    else:
        target = min(2 * peer_share, TARGET_SHARE_OF_PEAK)
    return {"peer_share": peer_share, "ours_share": share(row), "target_share": target}


def inference_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """`model(x)` of the one-call inference path (`optimize_for_cpu_inference`, a frozen copy), under inference
    mode."""
    model = optimize_for_cpu_inference(model)   # an eval-mode copy

    def step():
        with torch.inference_mode():
            return model(x)
    return step


def training_step(model: torch.nn.Module, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    """One step of the trainer's fp32 CPU path on a copy of `model`, as the comparison benchmarks time it
    (`_common.make_train_step`: `optimize_for_cpu_training`, fused AdamW, the batch split where it applies), made
    at `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return make_train_step(model, x, fast=True)
    finally:
        torch.set_num_threads(before)


def measure(name: str, batch: int, threads: int, reps: int, peak: Callable[[], float], img: int = 224,
            rounds: int = 3, train: bool = False, call_seconds: float = 0.01) -> dict[str, Any]:
    """One model at one batch size, its inference path or (`train`) a training step. Every round measures the
    GEMM peak, our step, the calls in order, every distinct call hot at `threads` and at one thread (each timing
    at least `call_seconds` of back-to-back calls), and the peak again (at one thread, then at `threads`); each
    round's times become shares of that round's peak, and the figures are the medians over the rounds (the
    machine's speed moves by a fifth within minutes, benchmarks/RESULTS.md)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img)
    model = create_model(name)
    macs = count_macs_safe(model, x)   # on a meta copy; both steps below work on copies too
    # forward + backward: three times the forward's products (the papers' and the comparison benchmarks' count)
    gflop = (6 if train else 2) * macs * batch / 1e9 if macs else None
    step = training_step(model, x, threads) if train else inference_step(model, x)
    rec = record(step)
    calls = list(rec.calls.values())
    per_round: list[dict[str, float]] = []
    for _ in range(rounds):
        torch.set_num_threads(threads)
        r = {"peak": peak(), "measured_s": time_step(step, threads, reps)}
        r["in_order_team_s"] = time_in_order(rec.order, threads, max(1, reps // 3))
        for c in calls:
            c.seconds[threads] = replay(c, threads, call_seconds)
        torch.set_num_threads(1)
        # as a batch split runs it: each thread the calls of its share, on one thread, perfectly divided
        r["in_order_split_s"] = time_in_order(rec.order, 1, max(1, reps // 3)) / threads
        r["in_order_s"] = min(r["in_order_team_s"], r["in_order_split_s"])
        if threads > 1:
            for c in calls:
                c.seconds[1] = replay(c, 1, call_seconds)
        r["peak_1thread"] = peak()
        torch.set_num_threads(threads)
        r["peak"] = (r["peak"] + peak()) / 2
        r["ceiling_all_s"] = ceiling_seconds(calls, threads)
        r["ceiling_products_s"] = ceiling_seconds(calls, threads, products_only=True)
        r["products_1thread_s"] = sum(c.count * c.seconds[1] for c in calls if c.product)
        if gflop:
            for k in ("measured_s", "in_order_s", "in_order_team_s", "in_order_split_s", "ceiling_all_s", "ceiling_products_s"):
                r[k[:-2] + "_share"] = gflop / r[k] / r["peak"]
            # the products alone on one core, against the one-core peak: their efficiency at their own shapes
            r["products_1thread_share"] = gflop / r["products_1thread_s"] / r["peak_1thread"]
        per_round.append(r)
    out: dict[str, Any] = {"model": name, "batch": batch, "threads": threads, "rounds": rounds, "gflop": gflop,
                           "scenario": "training" if train else "inference",
                           "calls": sum(c.count for c in calls), "distinct_calls": len(calls), "views": rec.views}
    out.update({k: statistics.median(r[k] for r in per_round) for k in per_round[0]})
    out["per_round"] = per_round
    out["top_products"] = sorted(
        ({"op": c.name, "shapes": [list(t.shape) for t in tree_flatten(c.args)[0] if isinstance(t, torch.Tensor)],
          "count": c.count, "ms_1thread": c.seconds[1] * 1e3, f"ms_{threads}threads": c.seconds.get(threads, 0) * 1e3}
         for c in calls if c.product), key=lambda d: -d["count"] * d["ms_1thread"])[:12]
    return out


def print_rows(rows: list[dict], targets: dict) -> None:
    """The markdown table: milliseconds per step and, in brackets, the share of the GEMM peak measured in the run."""
    print("| model | batch | GFLOP | measured | calls in order: the team / split | hot: all calls | hot: products only "
          "| products at 1 thread (share of the 1-thread peak) | target | in order reaches it | hot reaches it |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        def cell(k):
            share = r.get(k[:-2] + "_share")
            return f"{r[k] * 1e3:.1f}" + (f" ({share:.0%})" if share is not None else "")

        t = targets.get((r["model"], r["batch"]))

        def reaches(k):  # a miss shows the share to one decimal: 90% against a target of 90% can be one
            if not t:
                return "–"
            return "yes" if r.get(k, 0) >= t["target_share"] else f"**no** ({r.get(k, 0):.1%})"
        p1 = r.get("products_1thread_share")
        target = f"{t['target_share']:.1%}" if t else "–"
        model = r["model"] + (" (training)" if r.get("scenario") == "training" else "")
        print(f"| {model} | {r['batch']} | {r['gflop']:.1f} | {cell('measured_s')} | "
              f"{cell('in_order_team_s')} / {cell('in_order_split_s')} | "
              f"{cell('ceiling_all_s')} | {cell('ceiling_products_s')} | {'' if p1 is None else f'{p1:.0%}'} | "
              f"{target} | {reaches('in_order_share')} | "
              f"{reaches('ceiling_all_share')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", help="models to measure (none with --table-of)")
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 32; with --train: 16)")
    ap.add_argument("--train", action="store_true", help="a training step of the trainer's fp32 CPU path instead")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--reps", type=int, default=9, help="timed forwards of the fast path per round (median)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--against", nargs="*", default=[], help="bench_timm.py / bench_transformers.py JSON files")
    ap.add_argument("--table-of", metavar="JSON", help="measure nothing: print the table of a saved run (--out), "
                                                          "against the --against files given now")
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args()
    bench_rows = []
    for path in args.against:
        with open(path) as f:
            bench_rows += json.load(f)["results"]
    if args.table_of:
        with open(args.table_of) as f:
            rows = json.load(f)["rows"]
    else:
        if not args.models:
            ap.error("name the models to measure, or give --table-of")
        tune_glibc_malloc()  # as the CLI and the comparison benchmarks do
        peak = round_peak()
        rows = []
        for name in args.models:
            for b in args.batch or ([16] if args.train else [1, 32]):
                r = measure(name, b, args.threads, args.reps, peak, args.img, args.rounds, args.train)
                rows.append(r)
                print(f"{name} batch {b}: measured {r['measured_s'] * 1e3:.1f} ms, in order {r['in_order_s'] * 1e3:.1f} "
                      f"ms, hot {r['ceiling_all_s'] * 1e3:.1f} ms (products {r['ceiling_products_s'] * 1e3:.1f}); "
                      f"{r['calls']} calls ({r['distinct_calls']} distinct, {r['views']} views); "
                      f"peak {r['peak']:.0f} GFLOP/s", flush=True)
    targets = {}
    for r in rows:
        t = target_of(bench_rows, r["model"], r["batch"], r.get("scenario") == "training")
        if t:
            targets[(r["model"], r["batch"])] = r["target"] = t
    print_rows(rows, targets)
    if not args.table_of:
        write_json(args.out, {"environment": environment(args.threads), "rows": rows})


if __name__ == "__main__":
    main()
