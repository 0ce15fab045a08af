"""bf16 against fp32 on the CPU: training-step and inference speed-ups, and what bf16 does to the results.

    python benchmarks/bench_bf16.py speed --threads 2 --out benchmarks/results_bf16_speed.json
    python benchmarks/bench_bf16.py accuracy --threads 1 --out benchmarks/results_bf16_accuracy.json

`speed`, per model (random init, stochastic depth off): a training step (forward + cross-entropy +
backward + AdamW) in fp32, through the trainer's fp32 CPU path (`hybridzoo train` without `--amp`: fast linear
layers, fused AdamW, the batch split) and under `torch.autocast("cpu", torch.bfloat16)` with the batch split — the
path of `hybridzoo train --amp bf16` —, and inference through eager fp32, `optimize_for_cpu_inference` (fp32)
and `optimize_for_cpu_inference(dtype=torch.bfloat16)`. Contestants alternate within each round (A, B,
A, B, ...); each round gives a ratio, and the table prints the median ratio over the rounds with its
min–max spread, on the wall clock and on process CPU time (the second is the one to read on a loaded
machine). It also prints the bf16 inference path's logit deviation from fp32 on the timed batch.

`accuracy`: the task defaults trained twice through the CLI with the same seed and epochs, `--amp none`
and `--amp bf16`, one after another at `--threads` threads, and their validation metrics side by side;
then the fp32-trained classification run's validation set through fp32, `eval --amp bf16` autocast and
the bf16 inference path: max / mean logit deviation and top-1 agreement.

bf16 pays only where the CPU has native bf16 products (AVX512-BF16 or AMX: see
`hybridzoo.engine.amp.cpu_bf16_support`); the script prints what this CPU has.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import make_train_step  # noqa: E402
from peak import cpu_name, load_average  # noqa: E402

import hybridzoo  # noqa: E402
from hybridzoo.engine.amp import cpu_bf16_support  # noqa: E402
from hybridzoo.layers.onednn import optimize_for_cpu_inference  # noqa: E402
from hybridzoo.layers.train_fast import BatchSplitTraining, split_training_blocker  # noqa: E402

MODELS = ["deit_small_patch16_224", "cvt_13", "convit_small", "coatnet_0", "mobile_former_294m"]
BF16 = torch.bfloat16


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def train_step(model, x, y, amp: bool, split: bool = False) -> Callable[[], Any]:
    """`split`: the batch split where the model allows it and there are threads (`hybridzoo train --amp bf16`)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    call = model
    if split and torch.get_num_threads() > 1 and split_training_blocker(model) is None:
        call = BatchSplitTraining(model)

    def step():
        with torch.autocast("cpu", dtype=BF16, enabled=amp):
            loss = F.cross_entropy(_logits(call(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def infer_step(model, x) -> Callable[[], Any]:
    model.eval()

    def step():
        with torch.inference_mode():
            return model(x)
    return step


def interleave(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    times = {k: {"wall": [], "cpu": []} for k in steps}
    for f in steps.values():
        for _ in range(warmup):
            f()
    for r in range(rounds):
        for k, f in steps.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            times[k]["wall"].append(time.perf_counter() - w)
            times[k]["cpu"].append(time.process_time() - c)
        print(f"    round {r + 1}/{rounds}, load average {load_average()}", file=sys.stderr, flush=True)
    return times


def ratio_stats(times, ref: str, other: str, clock: str) -> dict[str, float]:
    """Speed of `other` over `ref` per round (ref time / other time): median, min, max."""
    r = [a / b for a, b in zip(times[ref][clock], times[other][clock])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def speed(args) -> dict[str, Any]:
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        try:
            model = hybridzoo.create_model(name, drop_path_rate=0.0)
        except TypeError:  # a model without stochastic depth
            model = hybridzoo.create_model(name)
        size = tuple(hybridzoo.model_card(name).input_size)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.train_batch, *size, generator=g)
        y = torch.randint(0, 1000, (args.train_batch,), generator=g)
        row: dict[str, Any] = {"model": name, "train_batch": args.train_batch, "infer_batch": args.batch}
        if "train" in args.scenarios:
            print(f"[train] {name} batch {args.train_batch}: fp32, fp32 fast path, bf16 autocast", file=sys.stderr,
                  flush=True)
            t = interleave({"fp32": train_step(model, x, y, False), "fp32_fast": make_train_step(model, x, fast=True),
                            "bf16": train_step(model, x, y, True, split=True)}, args.rounds)
            row["train_fp32_s"] = statistics.median(t["fp32"]["wall"])
            row["train_fp32_fast_s"] = statistics.median(t["fp32_fast"]["wall"])
            row["train_bf16_s"] = statistics.median(t["bf16"]["wall"])
            row["train_speedup_wall"] = ratio_stats(t, "fp32", "bf16", "wall")
            row["train_speedup_cpu"] = ratio_stats(t, "fp32", "bf16", "cpu")
            row["train_bf16_vs_fast_wall"] = ratio_stats(t, "fp32_fast", "bf16", "wall")
            row["train_bf16_vs_fast_cpu"] = ratio_stats(t, "fp32_fast", "bf16", "cpu")
        if "infer" in args.scenarios:
            model.eval()
            xi = torch.randn(args.batch, *size, generator=g)
            fast32 = optimize_for_cpu_inference(model)
            fast16 = optimize_for_cpu_inference(model, dtype=BF16)
            print(f"[infer] {name} batch {args.batch}: eager fp32, oneDNN fp32, oneDNN bf16", file=sys.stderr, flush=True)
            t = interleave({"eager": infer_step(model, xi), "onednn": infer_step(fast32, xi),
                            "onednn_bf16": infer_step(fast16, xi)}, args.rounds)
            for k in t:
                row[f"infer_{k}_s"] = statistics.median(t[k]["wall"])
            row["infer_bf16_vs_onednn_wall"] = ratio_stats(t, "onednn", "onednn_bf16", "wall")
            row["infer_bf16_vs_onednn_cpu"] = ratio_stats(t, "onednn", "onednn_bf16", "cpu")
            row["infer_bf16_vs_eager_wall"] = ratio_stats(t, "eager", "onednn_bf16", "wall")
            with torch.inference_mode():
                ref, out = _logits(model(xi)), _logits(fast16(xi))
            d = (out - ref).abs()
            row["logit_max_dev_rel"] = float(d.max() / ref.abs().max())
            row["logit_mean_dev_rel"] = float(d.mean() / ref.abs().mean())
            row["top1_agreement"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        rows.append(row)
        print(json.dumps(row), flush=True)

    def fmt(s):
        return f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})" if s else "–"
    print("\n| model | train fp32 s/step | train bf16 / fp32 (wall) | (CPU time) | train bf16 / fp32 fast path (wall) "
          "| infer bf16 / oneDNN fp32 (wall) | (CPU time) | bf16 / eager fp32 | logit dev max / mean | top-1 agree |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dev = (f"{100 * r['logit_max_dev_rel']:.2f}% / {100 * r['logit_mean_dev_rel']:.2f}%"
               if "logit_max_dev_rel" in r else "–")
        agree = f"{r['top1_agreement']:.2f}" if "top1_agreement" in r else "–"
        train_s = f"{r['train_fp32_s']:.2f}" if "train_fp32_s" in r else "–"
        print(f"| {r['model']} | {train_s} | {fmt(r.get('train_speedup_wall'))} | {fmt(r.get('train_speedup_cpu'))} "
              f"| {fmt(r.get('train_bf16_vs_fast_wall'))} "
              f"| {fmt(r.get('infer_bf16_vs_onednn_wall'))} | {fmt(r.get('infer_bf16_vs_onednn_cpu'))} "
              f"| {fmt(r.get('infer_bf16_vs_eager_wall'))} | {dev} | {agree} |")
    return {"rows": rows}


# task, extra CLI options, the metrics to print
TASKS = {
    "classification": ([], ["val_top1", "val_loss"]),
    "segmentation": ([], ["val_miou", "val_acc"]),
    "recommendation": ([], ["val_hr@10", "val_ndcg@10", "val_uni100_hr@10"]),
}


def accuracy(args) -> dict[str, Any]:
    from hybridzoo.cli import main as cli_main

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for task in args.tasks:
            extra, keys = TASKS[task]
            for amp in ("none", "bf16"):
                out = Path(tmp) / f"{task}-{amp}"
                print(f"[accuracy] hybridzoo train --task {task} --amp {amp}", file=sys.stderr, flush=True)
                t0, c0 = time.perf_counter(), time.process_time()
                rc = cli_main(["train", "--task", task, "--amp", amp, "--output", str(out), "--no-progress", *extra])
                if rc:
                    sys.exit(f"training {task} --amp {amp} failed (exit code {rc})")
                summary = json.loads((out / "summary.json").read_text())
                with open(out / "metrics.csv") as f:
                    train_s = sum(float(r["train_seconds"]) for r in csv.DictReader(f))
                rows.append({"task": task, "amp": amp, "model": summary["model"], "epochs": summary["epochs"],
                             "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                             "train_s": train_s, **{k: summary.get(k) for k in keys}})
                runs[(task, amp)] = out
                print(json.dumps(rows[-1]), flush=True)
        logits = logit_agreement(runs[("classification", "none")]) if ("classification", "none") in runs else None
    print("\n| task | model | epochs | metric | fp32 | bf16 | training s fp32 / bf16 |")
    print("|---|---|---:|---|---:|---:|---:|")
    for task in args.tasks:
        a, b = [r for r in rows if r["task"] == task]
        for k in TASKS[task][1]:
            print(f"| {task} | {a['model']} | {a['epochs']} | {k} | {a[k]:.4f} | {b[k]:.4f} | "
                  f"{a['train_s']:.1f} / {b['train_s']:.1f} |")
    if logits:
        print("\nfp32-trained classification run, validation set, against fp32 eager:")
        for k, v in logits.items():
            print(f"  {k:<28} top-1 {v['top1']:.4f}  agreement {v['top1_agreement']:.4f}  logit deviation max "
                  f"{v['max_dev']:.4f} / mean {v['mean_dev']:.4f} (logit scale {v['logit_absmax']:.2f})")
    return {"rows": rows, "logits": logits}


@torch.no_grad()
def logit_agreement(run_dir: Path) -> dict[str, dict[str, float]]:
    """The run's validation set through fp32, autocast bf16 (`eval --amp bf16`) and the bf16 inference path."""
    from hybridzoo.engine.run import load_run
    from hybridzoo.engine.trainer import fill_defaults, _val_loader
    from hybridzoo.engine import distributed

    run = load_run(run_dir, device="cpu")
    task = run.task
    args = fill_defaults(argparse.Namespace(**vars(run.args)), task)
    data = task.build_data(args)
    info = distributed.DistInfo(device=torch.device("cpu"))
    model = run.model.eval()
    xs, ys = [], []
    for x, y in _val_loader(data, args, info):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    ref = _logits(model(x)).float()
    with torch.autocast("cpu", dtype=BF16):
        amp = _logits(model(x)).float()
    with torch.inference_mode():
        fast = _logits(optimize_for_cpu_inference(model, dtype=BF16)(x))
    res = {"fp32": _agree(ref, ref, y)}
    res["eval --amp bf16 (autocast)"] = _agree(amp, ref, y)
    res["optimize_for_cpu_inference bf16"] = _agree(fast, ref, y)
    return res


def _agree(out, ref, y) -> dict[str, float]:
    d = (out - ref).abs()
    return {"top1": float((out.argmax(-1) == y).float().mean()),
            "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "max_dev": float(d.max()), "mean_dev": float(d.mean()), "logit_absmax": float(ref.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--models", nargs="+", default=MODELS)
    s.add_argument("--scenarios", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    s.add_argument("--train-batch", type=int, default=16)
    s.add_argument("--batch", type=int, default=32, help="inference batch")
    s.add_argument("--rounds", type=int, default=7)
    a = sub.add_parser("accuracy")
    a.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    for p in (s, a):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    env = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "bf16": cpu_bf16_support(),
           "loadavg_start": load_average(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"# {env['cpu']}, {args.threads} threads, torch {env['torch']}; bf16: {env['bf16']['summary']}; "
          f"load average {env['loadavg_start']}", flush=True)
    res = speed(args) if args.mode == "speed" else accuracy(args)
    env["loadavg_end"] = load_average()
    print(f"\nload average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, **res}, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
