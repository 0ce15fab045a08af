"""Memory-allocator settings, measured: glibc as it starts, glibc tuned in-process (what the hybridzoo CLI does,
`hybridzoo.engine.cpu_memory.tune_glibc_malloc`), and jemalloc / tcmalloc preloaded with LD_PRELOAD.

    /work/timmvenv/bin/python benchmarks/allocators.py [--model deit_small_patch16_224] [--rounds 5] [--threads 2]

Each allocator runs in its own process (LD_PRELOAD only takes effect at start). In each, our model (the trainer's
fast path for training, `optimize_for_cpu_inference` for inference) and timm's (when installed) are timed in
interleaved rounds: a training step at batch 16 and an inference batch of 32. Reported per step: median wall time,
CPU time, of it system time (mostly the kernel zeroing and mapping pages), minor page faults, and the process's
peak resident memory at the end. A preloaded library that is not installed is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import make_inference_step, make_train_step  # noqa: I001  (also puts this checkout's src/ on sys.path)
from peak import cpu_name

PRELOAD = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


def find_library(name: str) -> str | None:
    for d in LIB_DIRS:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def child(mode: str, model_name: str, rounds: int, threads: int) -> None:
    if mode == "tuned":
        from hybridzoo.engine.cpu_memory import tune_glibc_malloc
        if tune_glibc_malloc() is None:
            raise SystemExit("tune_glibc_malloc did nothing here (not glibc?)")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from hybridzoo.factory import create_model
    from hybridzoo.layers.onednn import optimize_for_cpu_inference

    steps = {}
    x16, x32 = torch.randn(16, 3, 224, 224), torch.randn(32, 3, 224, 224)
    steps["ours train b16"] = make_train_step(create_model(model_name), x16, fast=True)
    steps["ours infer b32"] = make_inference_step(optimize_for_cpu_inference(create_model(model_name).eval()), x32)
    try:
        import timm
        steps["timm train b16"] = make_train_step(timm.create_model(model_name), x16)
        steps["timm infer b32"] = make_inference_step(timm.create_model(model_name).eval(), x32)
    except Exception as e:  # timm absent or without this name: ours alone
        print(f"# timm skipped: {e}", file=sys.stderr)
    rec = {k: [] for k in steps}
    for f in steps.values():
        f()
    for _ in range(rounds):
        for k, f in steps.items():
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            f()
            r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            rec[k].append((w1 - w0, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, r1.ru_stime - r0.ru_stime,
                           r1.ru_minflt - r0.ru_minflt))
    out = {k: {"wall_s": statistics.median(v[0] for v in vs), "cpu_s": statistics.median(v[1] for v in vs),
               "sys_s": statistics.median(v[2] for v in vs), "minflt": statistics.median(v[3] for v in vs)}
           for k, vs in rec.items()}
    out["_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--modes", nargs="+", default=["default", "tuned", "jemalloc", "tcmalloc"],
                    choices=["default", "tuned", "jemalloc", "tcmalloc"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model, args.rounds, args.threads)
    results = {}
    for mode in args.modes:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        env["OMP_NUM_THREADS"] = str(args.threads)
        if mode in PRELOAD:
            lib = find_library(PRELOAD[mode])
            if lib is None:
                print(f"{mode}: {PRELOAD[mode]} not found in {', '.join(LIB_DIRS)}; skipped "
                      f"(Debian: apt install libjemalloc2 / libtcmalloc-minimal4)")
                continue
            env["LD_PRELOAD"] = lib
        print(f"{mode}: running ({args.rounds} rounds) ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", "tuned" if mode == "tuned" else "plain",
                               "--model", args.model, "--rounds", str(args.rounds), "--threads", str(args.threads)],
                              env=env, capture_output=True, text=True)
        line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(line[-1][7:])
    print(f"\n{args.model}, {args.threads} threads, {args.rounds} interleaved rounds per process, medians per step; "
          f"load average at end {os.getloadavg()}")
    print("| allocator | step | wall ms | CPU ms | of it sys ms | page faults | wall vs glibc default |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    base = results.get("default", {})
    for mode, res in results.items():
        for k, v in res.items():
            if k.startswith("_"):
                continue
            rel = f"{base[k]['wall_s'] / v['wall_s']:.2f}×" if k in base else "–"
            print(f"| {mode} | {k} | {v['wall_s'] * 1e3:.0f} | {v['cpu_s'] * 1e3:.0f} | {v['sys_s'] * 1e3:.0f} | "
                  f"{v['minflt']:.0f} | {rel} |")
        print(f"| {mode} | peak resident memory | {res['_maxrss_mib']:.0f} MiB | | | | |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "threads": args.threads, "rounds": args.rounds,
                                              "cpu": cpu_name(),
                                              "results": results}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
