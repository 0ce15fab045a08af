"""Where a training step's time goes, by kind of work, as a share of the step and of the GEMM peak.

    python benchmarks/profile_train.py deit_small_patch16_224 hf:vit cvt_13 hf:cvt --batch 16
    /work/timmvenv/bin/python benchmarks/profile_train.py timm:deit_small_patch16_224 deit_small_patch16_224

One step = forward + cross-entropy + backward + AdamW step, timed after warm-up steps until a step takes few
page faults (the heap has settled), each operator's wall time taken where it is dispatched. Operators
are grouped by what they do: the matrix products split into forward, gradient-of-input and
gradient-of-weight (a backward product whose contraction runs over the tokens is a weight gradient),
attention (SDPA and its backward), softmax, activations (GELU / QuickGELU's sigmoid-mul), LayerNorm,
element-wise adds, copies / layout changes, the optimiser, convolutions and the rest (hybridzoo's native
products and attention in their kinds); the time between operators is the Python and autograd around them.
`--fast` runs ours through `hybridzoo.layers.train_fast.optimize_for_cpu_training` (the trainer's default CPU
path). An operator's time is its wall time on the calling thread (its OpenMP workers included), so the
categories add up to the step's time. `--timer profiler` uses torch.profiler's self CPU time instead: its
per-event records keep moving the heap, and the page faults land on whichever operator first touches the fresh
pages (CvT-13's QuickGELU at ten times its cost). The GEMM GFLOP/s are the step's counted MACs
(3× the forward's, ×2 FLOP) over the GEMM operators' time, against the machine's measured peak.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from _common import add_malloc_option, apply_malloc, count_macs_safe, logits_of  # noqa: I001  (also puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401
from profile_ops import build

# The fast path's products run on hybridzoo's native kernels: count them as products, not as "other".
NATIVE_GEMM = {"hybridzoo_native::rows_linear", "hybridzoo_native::rows_linear_add_", "hybridzoo_native::tiny_linear"}
GEMM = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
        "hybridzoo_native::weight_grad"} | NATIVE_GEMM
CATS = [  # (category, predicate on the operator name), first match wins
    ("attention (SDPA fwd+bwd)", lambda n: "scaled_dot_product" in n or "flash_attention" in n
     or n.startswith(("hybridzoo_native::attention", "hybridzoo_native::attend"))),
    ("weight packing", lambda n: n in {"hybridzoo_native::pack_panels", "hybridzoo_native::scale_panels"}),
    ("softmax", lambda n: "softmax" in n),
    ("GELU / QuickGELU", lambda n: "gelu" in n or "sigmoid" in n),
    ("LayerNorm", lambda n: "layer_norm" in n),
    ("convolution", lambda n: "convolution" in n or "conv" in n),
    ("batch/group norm", lambda n: "batch_norm" in n or "group_norm" in n),
    ("add / mul (element-wise)", lambda n: n in {"aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub",
                                                  "aten::div", "aten::div_", "aten::neg", "aten::fill_",
                                                  "aten::zero_", "aten::where"}),
    ("bias grad (sum)", lambda n: n in {"aten::sum"}),
    ("copies / layout", lambda n: n in {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat",
                                        "aten::_to_copy", "aten::index", "aten::index_put_", "aten::slice_backward",
                                        "aten::select_backward", "aten::stack", "aten::empty_like", "aten::empty",
                                        "aten::empty_strided", "aten::new_zeros", "aten::zeros", "aten::transpose",
                                        "aten::reshape", "aten::view", "aten::as_strided", "aten::unbind"}),
]


def _kind(ev, in_backward: bool) -> str:
    """fwd / bwd-input / bwd-weight for a matrix product."""
    if ev.name == "hybridzoo_native::weight_grad":
        return "GEMM bwd-weight"
    if not in_backward:
        return "GEMM forward"
    if ev.name in NATIVE_GEMM:  # (rows, weight) in backward: the input's gradient
        return "GEMM bwd-input"
    shapes = [s for s in (ev.input_shapes or []) if isinstance(s, list) and len(s) >= 2]
    if ev.name == "aten::addmm" and len(shapes) >= 3:
        shapes = shapes[1:]
    if len(shapes) >= 2:
        a = shapes[0]
        if a[-1] > max(a[-2], shapes[1][-1]):  # contraction over the tokens: a weight gradient
            return "GEMM bwd-weight"
    return "GEMM bwd-input"


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Op:
    """One timed operator call, with the fields `categorise` reads from a profiler event."""

    __slots__ = ("name", "input_shapes", "self_cpu_time_total", "phase")

    def __init__(self, name, input_shapes, seconds, phase):
        self.name, self.input_shapes, self.self_cpu_time_total, self.phase = name, input_shapes, seconds * 1e6, phase


class _OpTimer(TorchDispatchMode):
    """Wall time of every operator the step dispatches, at the top level (an operator's inner calls are its own
    time), with the phase it ran in. Unlike torch.profiler it keeps no per-event records that churn the heap:
    under the profiler CvT-13's step still took 33-55k minor page faults after five warm-up steps, booked on the
    operators that first touched the pages (its QuickGELU at ten times its settled cost)."""

    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []
        self.optimiser = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        phase = ("optimiser" if self.optimiser
                 else "backward" if torch._C._current_autograd_node() is not None else "forward")
        shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.ops.append(_Op(func._schema.name, shapes, dt, phase))
        return out


def profile_step(model, x, target, fast: bool, timer: str = "ops", max_warmup: int = 12,
                 settled_faults: int = 5000):
    """Time one step after warm-up steps until the heap has settled: a step that still page-faults its way into
    fresh memory (CvT-13 at batch 8: 311k minor faults over its first three steps) books that time on whichever
    operator first touches the pages. Returns (the per-operator records, or the torch.profiler run with
    `timer="profiler"`; the step's wall seconds; the warm-up steps; the timed step's minor page faults)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            **({"fused": True} if fast else {}))
    model.train()
    op_timer = _OpTimer() if timer == "ops" else None
    if op_timer is not None:  # the optimiser's operators are booked as its own, whatever they are
        opt.register_step_pre_hook(lambda *_: setattr(op_timer, "optimiser", True))
        opt.register_step_post_hook(lambda *_: setattr(op_timer, "optimiser", False))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits_of(model(x)), target)
        loss.backward()
        opt.step()
    for done in range(1, max_warmup + 1):
        before = _minor_faults()
        step()
        if done >= 2 and _minor_faults() - before <= settled_faults:
            break
    before = _minor_faults()
    t0 = time.perf_counter()
    if op_timer is not None:
        with op_timer:
            step()
        records = op_timer.ops
    else:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        records = prof
    return records, time.perf_counter() - t0, done, _minor_faults() - before


def categorise(records) -> tuple[dict[str, float], float]:
    """Seconds per category, and their total, from `_OpTimer` records or a torch.profiler run (self CPU time)."""
    profiled = not isinstance(records, list)
    out: dict[str, float] = defaultdict(float)
    total = 0.0
    for ev in (records.events() if profiled else records):
        if ev.name.startswith(("autograd::engine", "Optimizer.", "ProfilerStep")) or ev.name.startswith("## "):
            continue
        t = ev.self_cpu_time_total / 1e6
        total += t
        if profiled:
            parents, p = [], ev.cpu_parent
            while p is not None:
                parents.append(p.name)
                p = p.cpu_parent
            in_opt = any(n.startswith("Optimizer.step") for n in parents)
            in_bwd = any(n.startswith("autograd::engine::evaluate_function") for n in parents)
        else:
            in_opt, in_bwd = ev.phase == "optimiser", ev.phase == "backward"
        if in_opt:
            out["optimiser (AdamW)"] += t
        elif ev.name in GEMM:
            out[_kind(ev, in_bwd)] += t
        else:
            for cat, pred in CATS:
                if pred(ev.name):
                    out[cat] += t
                    break
            else:
                out["other: " + ev.name] += t
    return out, total


def top_table(records, rows: int) -> str:
    """The top operators by time, grouped by input shape."""
    if not isinstance(records, list):
        return records.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=70)
    groups: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
    for op in records:
        g = groups[(op.name, op.phase, str(op.input_shapes)[:70])]
        g[0] += 1
        g[1] += op.self_cpu_time_total / 1e3
    lines = ["| operator | phase | input shapes | calls | ms |", "| --- | --- | --- | ---: | ---: |"]
    for (name, phase, shapes), (n, ms) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"| {name} | {phase} | {shapes} | {n} | {ms:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--fast", action="store_true", help="ours through optimize_for_cpu_training")
    ap.add_argument("--peak", type=float, default=None,
                    help="GEMM peak in GFLOP/s at these threads (default 105 per thread: results_peak_epyc.json's "
                         "210 at two)")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and images channels-last (what `hybridzoo train` does for a model whose "
                         "`train_channels_last` is set)")
    ap.add_argument("--other-rows", type=int, default=6)
    add_malloc_option(ap)
    ap.add_argument("--table", type=int, default=0,
                    help="also print the top-N operators by time, grouped by input shape")
    ap.add_argument("--timer", choices=("ops", "profiler"), default="ops",
                    help="ops: each dispatched operator's wall time (default; adds ~3%% and keeps the heap still); "
                         "profiler: torch.profiler's self CPU time, whose records move the heap and book page "
                         "faults on the operators that touch fresh pages")
    args = ap.parse_args()
    apply_malloc(args)
    if args.peak is None:
        args.peak = 105.0 * args.threads
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    target = torch.randint(0, 1000, (args.batch,))
    for name in args.models:
        model = build(name, 224)
        for m in model.modules():  # stochastic depth off, as in the benchmarks
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
        macs = count_macs_safe(model, x[:1])
        fast = args.fast and not name.startswith(("timm:", "hf:"))
        if fast:
            from hybridzoo.layers.train_fast import optimize_for_cpu_training
            model = optimize_for_cpu_training(model)
        xs = x
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            xs = x.contiguous(memory_format=torch.channels_last)
        prof, wall, warm, faults = profile_step(model, xs, target, fast, timer=args.timer)
        cats, total = categorise(prof)
        if args.timer == "ops":  # the wall time no operator holds: Python, autograd's engine, the dispatch itself
            cats["between operators (Python, autograd)"] = max(wall - total, 0.0)
            total = wall
        gemm = sum(v for k, v in cats.items() if k.startswith("GEMM"))
        print(f"\n### {name}{' (fast path)' if fast else ''}: training step, batch {args.batch}, {args.threads} "
              f"threads, {total:.2f} s ({args.timer} timer) after {warm} warm-up steps ({faults} minor page faults "
              f"in it), load average {os.getloadavg()[0]:.1f}")
        if macs:
            # the step's FLOPs (6 per forward MAC: forward, input and weight gradients) are all in the products,
            # attention and convolutions: their rate is over the time of those three, not of the products alone
            gf = 6 * macs * args.batch / 1e9
            work = gemm + sum(v for k, v in cats.items() if k.startswith(("attention", "convolution")))
            print(f"step {gf:.0f} GFLOP; products {gemm:.2f} s = {100 * gemm / total:.0f}% of the step; products, "
                  f"attention and convolutions {work:.2f} s -> {gf / work:.0f} GFLOP/s ({100 * gf / work / args.peak:.0f}%"
                  f" of the peak {args.peak:.0f}); whole step {gf / total:.0f} GFLOP/s "
                  f"({100 * gf / total / args.peak:.0f}% of peak)")
        print("| category | s | share |\n| --- | ---: | ---: |")
        main_rows = sorted(((k, v) for k, v in cats.items() if not k.startswith("other: ")), key=lambda kv: -kv[1])
        others = sorted(((k, v) for k, v in cats.items() if k.startswith("other: ")), key=lambda kv: -kv[1])
        for k, v in main_rows + others[:args.other_rows]:
            print(f"| {k} | {v:.3f} | {100 * v / total:.1f}% |")
        rest = sum(v for _, v in others[args.other_rows:])
        print(f"| other (rest) | {rest:.3f} | {100 * rest / total:.1f}% |")
        if args.table:
            print(top_table(prof, args.table))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
