"""Shared machinery of the comparison benchmarks: interleaved timing, MAC counting, tables, JSON.

Every contestant of a scenario (inference / training / batch-1 latency) runs in the same process with
the same thread count and input; rounds go A, B, C, A, B, C, ... and each contestant's figure is the
median over all its timed steps, so background load that comes and goes hits every contestant alike.
Both the wall-clock time (the figure that matters on a quiet machine) and the process CPU time of each
step are recorded: on a machine shared with other jobs the wall-clock medians still give usable
*ratios*, but not usable absolute numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # this checkout's hybridzoo, whichever interpreter runs us
    sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import cpu_name, linear_routes, load_average, measure_peak  # noqa: E402

from hybridzoo.engine.cpu_memory import allocator_in_use  # noqa: E402


@dataclass
class Contestant:
    """One model in one mode. `step()` runs one timed iteration; `group` names what it is compared with."""
    name: str
    group: str
    impl: str  # "ours", "ours+onednn", "timm", "hf-transformers"
    step: Callable[[], Any]
    macs_per_image: int | None = None
    params: int | None = None
    note: str = ""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def logits_of(out: Any) -> torch.Tensor:
    """A model's main output: HF's `.logits`, the first of a tuple or list, the first value of a dict (a
    segmentation model's `out`), nested."""
    while not isinstance(out, torch.Tensor):
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        else:
            raise TypeError(f"logits_of: no tensor in a {type(out).__name__}")
    return out


def make_inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model.eval()

    def step():
        with torch.inference_mode():
            return model(x)
    return step


TRAIN_NOTE = "train: optimize_for_cpu_training + fused AdamW + batch split where the trainer splits"


def make_train_step(model: nn.Module, x: torch.Tensor, num_classes: int = 1000, call=None,
                    fast: bool = False, *, linear: bool | None = None, fused: bool | None = None,
                    compiled: bool = False, channels_last: bool | None = None, split: bool | None = None,
                    native_attention: bool = True, native_gelu: bool = True) -> Callable[[], Any]:
    """Forward in train mode, cross-entropy on fixed random labels, backward, AdamW step.

    `fast=True` is the trainer's fp32 CPU path for our models (`hybridzoo train` without `--no-fast-cpu`):
    `optimize_for_cpu_training` on a copy of the model and `AdamW(fused=True)`. The peers get AdamW as
    torch builds it by default. `linear` / `fused` take one of the two levers alone (benchmarks/train_levers.py);
    `compiled` wraps the call in `torch.compile`; `channels_last` converts the model and the input (as
    `hybridzoo train --channels-last` does; default: with `fast`, the model's own choice, `train_channels_last`,
    as `hybridzoo train` takes it on the CPU); `split` (default: `fast`) trains by batch split where the trainer
    does (`BatchSplitTraining`: models without batch statistics, ≥ 2 threads, not compiled); `native_attention`
    (with `linear`): attention through the native kernels where they build, as the trainer does, else SDPA;
    `native_gelu` (with `linear`): exact GELU and QuickGELU likewise, else ATen's."""
    linear = fast if linear is None else linear
    split = fast if split is None else split
    fused = fast if fused is None else fused
    if channels_last is None:
        channels_last = fast and getattr(model, "train_channels_last", False)
    if linear:
        from hybridzoo.layers.train_fast import optimize_for_cpu_training
        model = optimize_for_cpu_training(copy.deepcopy(model), native_attention=native_attention,
                                          native_gelu=native_gelu)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    target = torch.randint(0, num_classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                            **({"fused": True} if fused else {}))
    if call is None and split and not compiled and torch.get_num_threads() > 1:
        from hybridzoo.layers.train_fast import BatchSplitTraining, split_training_blocker
        if split_training_blocker(model) is None:
            call = BatchSplitTraining(model)
    call = call or model
    if compiled:
        call = torch.compile(call)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits_of(call(x)), target)
        loss.backward()
        opt.step()
        return loss
    return step


def compiled_train_contestant(name: str, group: str, model: nn.Module, x: torch.Tensor, macs: int | None,
                              params: int | None, compile_times: dict[str, float]) -> Contestant:
    """Ours through `hybridzoo train --compile`: the fast path (oneDNN products as the custom op
    `hybridzoo::onednn_linear`, fused AdamW) under `torch.compile`; compiled here, its compile time (with the
    first step) printed and recorded in `compile_times`."""
    step = make_train_step(model, x, fast=True, compiled=True)
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    compile_times[f"{name} training batch {x.shape[0]}"] = seconds
    print(f"  compiled the training step of {name} (batch {x.shape[0]}) in {seconds:.0f} s", flush=True)
    return Contestant(name + " +compile", group, "ours+compile", step, macs, params,
                      f"{TRAIN_NOTE}, torch.compile (inductor); compile + first step {seconds:.0f} s")


def train_contestants_of(name: str, group: str, impl: str, model: nn.Module, note: str, x: torch.Tensor,
                         macs: int | None, params: int | None,
                         compile_times: dict[str, float] | None = None,
                         whole_batch: bool = False) -> list[Contestant]:
    """One model's training contestants: ours through the trainer's fp32 CPU path (optimize_for_cpu_training +
    fused AdamW + the batch split where it applies), a peer as built; with `compile_times` given, ours also
    under torch.compile (`compiled_train_contestant`); with `whole_batch`, ours also without the batch split
    (`hybridzoo train --no-batch-split`)."""
    ours = impl == "ours"
    cs = [Contestant(name, group, impl, make_train_step(model, x, fast=ours), macs, params,
                     note + ("; " if note else "") + TRAIN_NOTE if ours else note)]
    if ours and whole_batch:
        cs.append(Contestant(name + " whole batch", group, "ours-whole", make_train_step(model, x, fast=True, split=False),
                             macs, params, "optimize_for_cpu_training + fused AdamW, whole batch (--no-batch-split)"))
    if ours and compile_times is not None:
        cs.append(compiled_train_contestant(name, group, model, x, macs, params, compile_times))
    return cs


def count_macs_safe(model: nn.Module, x: torch.Tensor) -> int | None:
    """Forward MACs of one image, counted on a meta-device copy.

    On real CPU tensors `scaled_dot_product_attention` dispatches to a fused kernel that FlopCounterMode
    does not count (the attention products would be missing); on `meta` it decomposes into counted
    matrix products, as in `hybridzoo.profile.measure_model`."""
    from hybridzoo.profile import count_macs
    try:
        meta = copy.deepcopy(model).to("meta").eval()
        return count_macs(meta, x[:1].to("meta"))
    except Exception as e:  # a counter failure must not stop the timing
        print(f"  (MAC count failed: {type(e).__name__}: {e})", file=sys.stderr)
        return None


def run_interleaved(contestants: list[Contestant], rounds: int, steps_per_round: int = 1, warmup: int = 1,
                    log: Callable[[str], None] = print,
                    reference: Callable[[], float] | None = None) -> list[float]:
    """Warm every contestant up, then time `steps_per_round` steps of each, round-robin, `rounds` times.

    `reference` (e.g. `round_peak`): run once at the start of every round, its values returned in round order —
    the machine's GEMM peak measured beside each round's steps, so that a share of the peak compares figures
    of the same minutes (this machine's peak moved by 7% between runs minutes apart)."""
    for c in contestants:
        for _ in range(warmup):
            c.step()
    values = []
    for r in range(rounds):
        if reference is not None:
            values.append(reference())
        for c in contestants:
            for _ in range(steps_per_round):
                w0, c0 = time.perf_counter(), time.process_time()
                c.step()
                c.wall.append(time.perf_counter() - w0)
                c.cpu.append(time.process_time() - c0)
        log(f"  round {r + 1}/{rounds} done, load average {load_average()}"
            + (f", round peak {values[-1]:.0f} GFLOP/s" if values else ""))
    return values


# DeiT-S's fc2 at batch 32 (quick_peak's second shape). Not fc1 (6,304 × 384 × 1,536): its 39 MB output is above
# glibc's 32 MiB mmap cap, so every call mapped and faulted it afresh (9,500 faults) and read 3–5% low, more when
# the host was busy (145 against 214 GFLOP/s once, 2026-12-01).
ROUND_PEAK_SHAPE = (32 * 197, 1536, 384)


def round_peak(calls: int = 4) -> Callable[[], float]:
    """A reference for `run_interleaved`: the best GFLOP/s of `calls` fp32 products at ROUND_PEAK_SHAPE, each
    through oneDNN's packed inner product (where this PyTorch has it) and MKL, on the threads set when it runs."""
    M, K, N = ROUND_PEAK_SHAPE
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen) / K ** 0.5, torch.randn(N, generator=gen)
    routes = linear_routes(x, w, b).values()

    def measure() -> float:
        best = 0.0
        with torch.inference_mode():
            for route in routes:
                route()
                for _ in range(calls):
                    t0 = time.perf_counter()
                    route()
                    best = max(best, 2 * M * K * N / (time.perf_counter() - t0) / 1e9)
        return best
    return measure


def summarise(c: Contestant, batch_size: int, flops_per_mac: float) -> dict[str, Any]:
    wall, cpu = statistics.median(c.wall), statistics.median(c.cpu)
    res = {"name": c.name, "group": c.group, "impl": c.impl, "batch_size": batch_size, "flops_per_mac": flops_per_mac,
           "note": c.note,
           "params": c.params, "macs_per_image": c.macs_per_image, "steps": len(c.wall),
           "median_wall_s": wall, "median_cpu_s": cpu, "min_wall_s": min(c.wall),
           "images_per_s": batch_size / wall, "images_per_cpu_s": batch_size / cpu,
           "wall_s": list(c.wall), "cpu_s": list(c.cpu)}
    if c.macs_per_image:
        res["gflops_per_s"] = c.macs_per_image * flops_per_mac * batch_size / wall / 1e9
        res["gflops_per_cpu_s"] = c.macs_per_image * flops_per_mac * batch_size / cpu / 1e9
    return res


def environment(threads: int) -> dict[str, Any]:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(), "machine": platform.machine(),
            "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "loadavg_start": load_average(), "allocator": allocator_in_use(),
            **{k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LD_PRELOAD") if k in os.environ}}
    for mod in ("timm", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def quick_peak(threads: int) -> dict[str, Any]:
    """A short fp32 matmul peak measurement in this process (two DeiT-S shapes), for "share of peak".

    `peak_gflops` is the best of MKL / oneDNN / 1×1 conv on the wall clock; `peak_gflops_cpu` the same
    per second of process CPU time (the denominator for the CPU-time figures on a loaded machine)."""
    shapes = [(32 * 197, 384, 1536), (32 * 197, 1536, 384)]
    wall = measure_peak(threads, rounds=3, min_seconds=0.15, shapes=shapes, clock="wall")
    cpu = measure_peak(threads, rounds=2, min_seconds=0.15, shapes=shapes, clock="cpu")
    return {"peak_gflops": max(wall["best_gflops"].values()), "peak_gflops_cpu": max(cpu["best_gflops"].values()),
            "onednn_peak_gflops": wall["onednn_peak_gflops"], "mkl_peak_gflops": wall["mkl_peak_gflops"],
            "wall": wall["best_gflops"], "cpu": cpu["best_gflops"], "loadavg": wall["loadavg"]}


def round_ratios(ref_wall: list[float], wall: list[float], rounds: int) -> list[float]:
    """Per-round speed ratio ref / ours: each round's steps of the two contestants ran back to back."""
    if not rounds or len(ref_wall) != len(wall) or len(wall) % rounds:
        return []
    spr = len(wall) // rounds
    return [sum(ref_wall[r * spr:(r + 1) * spr]) / sum(wall[r * spr:(r + 1) * spr]) for r in range(rounds)]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def add_ratios(rows: list[dict[str, Any]], peak: dict[str, Any]) -> None:
    """ratio_vs_ref: images/s over the reference implementation's (timm or HF) in the same group and scenario;
    ratio_rounds: the same ratio round by round (with its min, max and quartiles: the spread);
    share_of_peak: achieved GFLOP/s over the matmul peak (wall clock), share_of_peak_cpu: the same on CPU time."""
    for r in rows:
        refs = [o for o in rows if o["group"] == r["group"] and o["scenario"] == r["scenario"]
                and not o["impl"].startswith("ours")]
        if refs:
            r["ratio_vs_ref"] = r["images_per_s"] / refs[0]["images_per_s"]
            r["ref"] = refs[0]["name"]
            r["ratio_vs_ref_cpu"] = r["images_per_cpu_s"] / refs[0]["images_per_cpu_s"]
            per_round = round_ratios(refs[0].get("wall_s", []), r.get("wall_s", []), r.get("rounds", 0))
            if per_round:
                r["ratio_rounds"] = per_round
                r["ratio_round_median"] = statistics.median(per_round)
                r["ratio_min"], r["ratio_max"] = min(per_round), max(per_round)
                r["ratio_q1"], r["ratio_q3"] = quartiles(per_round)
        if peak.get("peak_gflops") and r.get("gflops_per_s"):
            r["share_of_peak"] = r["gflops_per_s"] / peak["peak_gflops"]
            r["share_of_peak_cpu"] = r["gflops_per_cpu_s"] / peak["peak_gflops_cpu"]
        shares = round_shares(r)
        if shares:
            r["share_rounds"] = shares
            r["share_round_median"] = statistics.median(shares)
            r["share_round_min"], r["share_round_max"] = min(shares), max(shares)


def round_shares(row: dict[str, Any]) -> list[float]:
    """Round by round: the contestant's GFLOP/s in that round over the peak measured at the round's start."""
    peaks, wall, rounds = row.get("round_peak_gflops") or [], row.get("wall_s", []), row.get("rounds", 0)
    if not row.get("macs_per_image") or not rounds or len(peaks) != rounds or not wall or len(wall) % rounds:
        return []
    spr = len(wall) // rounds
    flops = row["macs_per_image"] * row["flops_per_mac"] * row["batch_size"] * spr
    return [flops / sum(wall[i * spr:(i + 1) * spr]) / 1e9 / peaks[i] for i in range(rounds)]


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| scenario | model | impl | batch | img/s (wall) | img/s per CPU-s | ms/step | GMAC/img | GFLOP/s | "
          "share of peak (wall / CPU) | share of the round's peak: median (min–max) | ours / ref (wall / CPU) | "
          "per-round ratio: median [IQR] min–max (rounds) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        macs = f"{r['macs_per_image'] / 1e9:.2f}" if r.get("macs_per_image") else "–"
        gf = f"{r['gflops_per_s']:.0f}" if r.get("gflops_per_s") else "–"
        share = (f"{100 * r['share_of_peak']:.0f}% / {100 * r['share_of_peak_cpu']:.0f}%"
                 if r.get("share_of_peak") else "–")
        round_share = (f"{100 * r['share_round_median']:.0f}% ({100 * r['share_round_min']:.0f}–"
                       f"{100 * r['share_round_max']:.0f}%)" if "share_rounds" in r else "–")
        ours = r["impl"].startswith("ours")
        ratio = (f"{r['ratio_vs_ref']:.2f} / {r['ratio_vs_ref_cpu']:.2f}" if "ratio_vs_ref" in r and ours else "")
        spread = (f"{r['ratio_round_median']:.2f} [{r['ratio_q1']:.2f}–{r['ratio_q3']:.2f}] "
                  f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f} ({len(r['ratio_rounds'])})"
                  if "ratio_rounds" in r and ours else "")
        print(f"| {r['scenario']} | {r['name']} | {r['impl']} | {r['batch_size']} | {r['images_per_s']:.2f} | "
              f"{r['images_per_cpu_s']:.2f} | {1000 * r['median_wall_s']:.0f} | {macs} | {gf} | {share} | "
              f"{round_share} | {ratio} | "
              f"{spread} |")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"wrote {path}")


def run_scenarios(scenarios: list[tuple[str, int, float, Callable[[], list[Contestant]], int, int]], threads: int,
                  env_extra: dict[str, Any] | None = None, out: str | None = None, peak: bool = True) -> dict:
    """scenarios: (name, batch_size, flops_per_mac, make_contestants, rounds, steps_per_round).

    Contestants are built when their scenario starts (a training step puts its model in train mode,
    an inference step in eval mode), and dropped after it."""
    env = environment(threads)
    env.update(env_extra or {})
    peak_res = quick_peak(threads) if peak else {}
    reference = round_peak() if peak else None
    print(f"# {env['cpu']}, {threads} threads, torch {env['torch']}, load average {env['loadavg_start']}; "
          f"matmul peak {peak_res.get('wall')} GFLOP/s (wall), {peak_res.get('cpu')} (per CPU-second)", flush=True)
    rows = []
    for name, bs, fpm, make_contestants, rounds, spr in scenarios:
        contestants = make_contestants()
        print(f"[{name}] batch {bs}: " + ", ".join(c.name for c in contestants), flush=True)
        peaks = run_interleaved(contestants, rounds, spr, log=lambda s: print(s, flush=True), reference=reference)
        for c in contestants:
            rows.append({"scenario": name, "rounds": rounds, **summarise(c, bs, fpm),
                         **({"round_peak_gflops": peaks} if peaks else {})})
    env["loadavg_end"] = load_average()
    add_ratios(rows, peak_res)
    print()
    print_table(rows)
    print(f"\nload average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    payload = {"environment": env, "peak": peak_res, "results": rows}
    write_json(out, payload)
    return payload


def base_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options every comparison script shares; each adds its own model choices."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--batch", type=int, default=32, help="inference batch")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=rounds, help="timed rounds (inference, latency)")
    ap.add_argument("--train-rounds", type=int, default=7,
                    help="timed rounds of the training scenario (each: one step per contestant, interleaved)")
    ap.add_argument("--scenarios", nargs="+", default=["infer", "train", "latency"],
                    choices=["infer", "train", "latency"])
    ap.add_argument("--no-peak", action="store_true")
    ap.add_argument("--out", default=None)
    add_malloc_option(ap)
    return ap


def add_malloc_option(ap: argparse.ArgumentParser) -> None:
    """`--malloc tuned|default`, applied by `apply_malloc` (every benchmark script that times steps has it)."""
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned: raise glibc's mmap/trim thresholds for the whole process (every contestant), as "
                         "the hybridzoo CLI does (hybridzoo.engine.cpu_memory); default: glibc as it starts. "
                         "An allocator preloaded with LD_PRELOAD (jemalloc, tcmalloc) is left alone")


def apply_malloc(args: argparse.Namespace) -> None:
    if args.malloc == "tuned":
        from hybridzoo.engine.cpu_memory import tune_glibc_malloc
        tune_glibc_malloc()


def parse_and_setup(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, then fix threads and seed and silence warnings, identically for both sides."""
    args = ap.parse_args()
    apply_malloc(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    return args
