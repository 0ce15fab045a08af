"""Where a training step's time goes, by kind of work, as a share of the step and of the GEMM peak.

    python benchmarks/profile_train.py deit_small_patch16_224 hf:vit cvt_13 hf:cvt --batch 16
    /work/timmvenv/bin/python benchmarks/profile_train.py timm:deit_small_patch16_224 deit_small_patch16_224

One step = forward + cross-entropy + backward + AdamW step, profiled after two warm-up steps. Operators
are grouped by what they do: the matrix products split into forward, gradient-of-input and
gradient-of-weight (a backward product whose contraction runs over the tokens is a weight gradient),
attention (SDPA and its backward), softmax, activations (GELU / QuickGELU's sigmoid-mul), LayerNorm,
element-wise adds, copies / layout changes, the optimiser, convolutions and the rest. `--fast` runs ours
through `hybridzoo.layers.train_fast.optimize_for_cpu_training` (the trainer's default CPU path). The
profiler's "self CPU time" of an operator is its wall time on the calling thread (its OpenMP workers
included), so the categories add up to the step's time; the GEMM GFLOP/s are the step's counted MACs
(3× the forward's, ×2 FLOP) over the GEMM operators' time, against the machine's measured peak.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from _common import add_malloc_option, apply_malloc, count_macs_safe, logits_of  # noqa: I001  (also puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401
from profile_ops import build

GEMM = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"}
CATS = [  # (category, predicate on the operator name), first match wins
    ("attention (SDPA fwd+bwd)", lambda n: "scaled_dot_product" in n or "flash_attention" in n),
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
    if not in_backward:
        return "GEMM forward"
    shapes = [s for s in (ev.input_shapes or []) if isinstance(s, list) and len(s) >= 2]
    if ev.name == "aten::addmm" and len(shapes) >= 3:
        shapes = shapes[1:]
    if len(shapes) >= 2:
        a = shapes[0]
        if a[-1] > max(a[-2], shapes[1][-1]):  # contraction over the tokens: a weight gradient
            return "GEMM bwd-weight"
    return "GEMM bwd-input"


def profile_step(model, x, target, fast: bool, steps: int = 2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            **({"fused": True} if fast else {}))
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits_of(model(x)), target)
        loss.backward()
        opt.step()
    for _ in range(steps):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return prof


def categorise(prof) -> tuple[dict[str, float], float]:
    """Self CPU time (s) per category, and the total."""
    events = prof.events()
    out: dict[str, float] = defaultdict(float)
    total = 0.0
    for ev in events:
        if ev.name.startswith(("autograd::engine", "Optimizer.", "ProfilerStep")) or ev.name.startswith("## "):
            continue
        if ev.name.endswith("Backward0") or ev.name.endswith("Backward1"):
            # autograd nodes' own time (allocations, views) - count what they do themselves
            pass
        t = ev.self_cpu_time_total / 1e6
        total += t
        parents, p = [], ev.cpu_parent
        while p is not None:
            parents.append(p.name)
            p = p.cpu_parent
        in_opt = any(n.startswith("Optimizer.step") for n in parents)
        in_bwd = any(n.startswith("autograd::engine::evaluate_function") for n in parents)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--fast", action="store_true", help="ours through optimize_for_cpu_training")
    ap.add_argument("--peak", type=float, default=210.0, help="GEMM peak in GFLOP/s (results_peak_epyc.json)")
    ap.add_argument("--other-rows", type=int, default=6)
    add_malloc_option(ap)
    ap.add_argument("--table", type=int, default=0,
                    help="also print the profiler's top-N operators by self CPU time, grouped by input shape")
    args = ap.parse_args()
    apply_malloc(args)
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
        prof = profile_step(model, x, target, fast)
        cats, total = categorise(prof)
        gemm = sum(v for k, v in cats.items() if k.startswith("GEMM"))
        print(f"\n### {name}{' (fast path)' if fast else ''}: training step, batch {args.batch}, {args.threads} "
              f"threads, profiled {total:.2f} s, load average {os.getloadavg()[0]:.1f}")
        if macs:
            gf = 6 * macs * args.batch / 1e9
            print(f"step {gf:.0f} GFLOP; GEMM time {gemm:.2f} s = {100 * gemm / total:.0f}% of the step -> "
                  f"{gf / gemm:.0f} GFLOP/s in the GEMMs ({100 * gf / gemm / args.peak:.0f}% of the peak "
                  f"{args.peak:.0f}); whole step {gf / total:.0f} GFLOP/s ({100 * gf / total / args.peak:.0f}% of peak)")
        print("| category | s | share |\n| --- | ---: | ---: |")
        main_rows = sorted(((k, v) for k, v in cats.items() if not k.startswith("other: ")), key=lambda kv: -kv[1])
        others = sorted(((k, v) for k, v in cats.items() if k.startswith("other: ")), key=lambda kv: -kv[1])
        for k, v in main_rows + others[:args.other_rows]:
            print(f"| {k} | {v:.3f} | {100 * v / total:.1f}% |")
        rest = sum(v for _, v in others[args.other_rows:])
        print(f"| other (rest) | {rest:.3f} | {100 * rest / total:.1f}% |")
        if args.table:
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                       row_limit=args.table, max_name_column_width=40,
                                                                       max_shapes_column_width=70))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
