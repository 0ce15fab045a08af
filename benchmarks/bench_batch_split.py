"""The batch split inside `hybridzoo train` on the CPU in fp32 (`BatchSplitTraining`: each intra-op thread trains
its share of every batch on one thread) against the whole batch on every thread (`--no-batch-split`), per task.

Each round runs the same `hybridzoo train` command twice, split first or whole first in turn, as separate
processes. The time is the training seconds the trainer itself records (metrics.csv's `train_seconds`) summed over
the epochs after the first (the first warms the kernels and the allocator up): data loading is included,
validation is not. The table prints each side's median and range over the rounds, the per-round ratio and the
last epoch's training loss of both sides (the split computes the whole batch's step, so the two agree to fp32
rounding, and their relative difference is printed; drop-path masks, drawn per part, would make them differ).

A setup is a task and, optionally, `hybridzoo train` options for it, in one argument:

    python benchmarks/bench_batch_split.py                      # the super-resolution and land-cover demos
    python benchmarks/bench_batch_split.py --setups "super-resolution --model act_x2 --patch-size 48" --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import HZ, run  # noqa: E402
from peak import cpu_name  # noqa: E402

DEFAULT_SETUPS = ["super-resolution", "land-cover"]
SPLIT_LINES = ("batch split: ", "batch split off: ")   # the trainer's line at the start


def epoch_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, help="'TASK [train options]', one per argument")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    ap.add_argument("--train-batches", type=int, default=8, help="training batches per epoch (--limit-train-batches)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the commands (the split needs 2+)")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2: the first epoch is not timed")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    timed = f"epochs 2–{args.epochs}" if args.epochs > 2 else "epoch 2"
    print(f"CPU: {cpu_name()}; {args.threads} threads; {args.rounds} interleaved rounds; training seconds of {timed} "
          "as metrics.csv records them", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            task, *options = shlex.split(setup)
            base = [*HZ, "train", "--task", task, "--epochs", str(args.epochs), "--limit-train-batches",
                    str(args.train_batches), "--no-progress", *options]   # the setup's options come last and win
            times: dict[str, list[float]] = {"split": [], "whole": []}
            losses: dict[str, float] = {}
            for r in range(args.rounds):
                order = ("split", "whole") if r % 2 == 0 else ("whole", "split")
                for side in order:
                    out_dir = Path(tmp) / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{setup}-{side}-{r}")
                    _, out, _ = run([*base, "--output", str(out_dir), *(["--no-batch-split"] if side == "whole"
                                                                         else [])], env)
                    said = next((line for line in out.splitlines() if line.startswith(SPLIT_LINES)), "no such line")
                    if side == "split" and "each train their share" not in said:
                        raise RuntimeError(f"{setup}: the default run did not train by batch split ({said}); is the "
                                           f"task's Task.batch_split set?\n{out[-2000:]}")
                    m = epoch_rows(out_dir)
                    times[side].append(sum(float(row["train_seconds"]) for row in m[1:]))
                    losses.setdefault(side, float(m[-1]["train_loss"]))
            ratios = [w / s for s, w in zip(times["split"], times["whole"])]
            row = {"setup": setup, "split_s": statistics.median(times["split"]),
                   "whole_s": statistics.median(times["whole"]), "split_all": times["split"],
                   "whole_all": times["whole"], "ratio_median": statistics.median(ratios),
                   "ratio_range": [min(ratios), max(ratios)], "train_loss": losses}
            rows.append(row)
            rel = abs(losses["split"] - losses["whole"]) / max(abs(losses["whole"]), 1e-12)
            print(f"{setup}: split {row['split_s']:.2f} s, whole {row['whole_s']:.2f} s, whole / split "
                  f"{row['ratio_median']:.2f}× ({row['ratio_range'][0]:.2f}–{row['ratio_range'][1]:.2f}); last "
                  f"train loss {losses['split']:.6g} / {losses['whole']:.6g} (relative difference {rel:.1e})",
                  flush=True)

    print(f"\n| setup | split, {timed} | whole | whole / split, per round | last train loss, split / whole |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        span = lambda v: f"{min(v):.2f}–{max(v):.2f}"  # noqa: E731
        print(f"| `{row['setup']}` | {row['split_s']:.2f} s ({span(row['split_all'])}) | {row['whole_s']:.2f} s "
              f"({span(row['whole_all'])}) | {row['ratio_median']:.2f}× ({row['ratio_range'][0]:.2f}–"
              f"{row['ratio_range'][1]:.2f}) | {row['train_loss']['split']:.6g} / {row['train_loss']['whole']:.6g} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds,
                                               "epochs": args.epochs, "train_batches": args.train_batches,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
