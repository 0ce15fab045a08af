"""Training and evaluation throughput of the recommendation task at Amazon-Beauty scale, through the CLI.

    python benchmarks/bench_recommendation.py --models adamct_beauty,sasrec --json benchmarks/results_rec.json

Writes a SYNTHETIC interaction log shaped like Amazon Beauty 5-core (22,363 users, 12,101 items,
about 200k interactions, 5-13 per user) as a `user,item,timestamp` CSV, then runs
`hybridzoo train --task recommendation --data <csv> --epochs 1` per model and reads the run folder:
training sequences per second (every training prefix is one sequence, RecBole's protocol) from the
epoch's `train_seconds`, and full-ranking evaluation users per second (validation split, both
protocols, history exclusion included) from the rest of the epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from hybridzoo.cli import main as cli_main
from hybridzoo.data.recommendation import synthetic_interactions


def write_beauty_scale(path: Path, seed: int = 0) -> int:
    users, items, times = synthetic_interactions(num_users=22363, num_items=12101, num_genres=101,
                                                 min_len=5, max_len=13, seed=seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp"])
        w.writerows(zip(users, items, times.astype(np.int64)))
    return len(users)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="adamct_beauty,sasrec")
    p.add_argument("--batch-size", type=int, default=2048, help="the AdaMCT paper's train_batch_size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "beauty_scale.csv"
        n_inter = write_beauty_scale(data)
        for name in args.models.split(","):
            out = Path(tmp) / name
            rc = cli_main(["train", "--task", "recommendation", "--model", name, "--data", str(data), "--kcore", "0",
                           "--epochs", "1", "--batch-size", str(args.batch_size), "--output", str(out),
                           "--no-progress"])
            if rc:
                sys.exit(f"training {name} failed (exit code {rc})")
            summary = json.loads((out / "summary.json").read_text())
            with open(out / "metrics.csv") as f:
                row = next(csv.DictReader(f))
            train_s, total_s = float(row["train_seconds"]), float(row["seconds"])
            info = summary.get("data", summary)
            n_train, n_users = info["num_train_samples"], info["num_users"]
            rows.append({"model": name, "params": summary["params"], "interactions": n_inter,
                         "train_sequences": n_train, "epoch_train_s": round(train_s, 2),
                         "train_seq_per_s": round(n_train / train_s), "eval_users": n_users,
                         "eval_s": round(total_s - train_s, 2), "eval_users_per_s": round(n_users / (total_s - train_s))})
            print(rows[-1], flush=True)
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "batch_size": args.batch_size, "rows": rows}
    print("| model | params | train sequences | epoch (train) | train seq/s | eval users/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['train_sequences']:,} | {r['epoch_train_s']} s | "
              f"{r['train_seq_per_s']:,} | {r['eval_users_per_s']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
