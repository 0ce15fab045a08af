"""The validation inside `hybridzoo train` on the CPU in fp32: the training model (eager) against a frozen oneDNN copy
rebuilt from the weights at each epoch's end, as `hybridzoo train` times them itself.

Each round is one whole `hybridzoo train` command of three epochs: the trainer validates epoch 1 eager and epoch 2 on
the copy, each timed whole (`eval_seconds` in metrics.csv: the copy's build and first-call probes included), and
epoch 3 on the faster. The rounds are separate processes, so each round holds one interleaved pair; the table prints
each path's median and range over the rounds, the per-round ratio and the path kept.

"epoch at 4:1" is derived, and labelled so: an epoch that trains four times as many images as it validates, at this
run's measured training seconds per image (epochs 2 and 3), validated eager against validated on the kept path.

Setups:
- `folder:MODEL` (classification): MODEL at its card's resolution on an image folder of `--classes` classes of JPEG
  photographs of 500×375 (scikit-image's, cropped and tinted per class; synthetic data, labelled so), validating on
  `--images` images, training `--train-batches` batches of 16 per epoch;
- `demo:TASK`: TASK's default model on its built-in data (the whole validation set, `--train-batches` batches).

    python benchmarks/bench_validation.py                                 # DeiT-S, CvT-13, CoAtNet-0, the demos
    python benchmarks/bench_validation.py --setups folder:coatnet_0 --images 320 --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import HZ, parse_setup_arguments, photo_folder, run  # noqa: E402
from peak import cpu_name  # noqa: E402

DEFAULT_SETUPS = ["folder:deit_small_patch16_224", "folder:cvt_13", "folder:coatnet_0", "demo:classification",
                  "demo:segmentation", "demo:super-resolution", "demo:land-cover", "demo:recommendation"]
TRAIN_BATCH = 16


def train_command(setup: str, work: Path, args: argparse.Namespace) -> tuple[list[str], int | None]:
    """The train command (without --output) and the number of images trained per epoch where known."""
    kind, name = setup.split(":", 1)
    if kind == "folder":
        data = work / "photos"
        if not data.is_dir():
            photo_folder(data, args.classes, max(1, args.train_batches * TRAIN_BATCH // args.classes),
                         args.images // args.classes)
        cmd = ["train", "--model", name, "--data", str(data), "--batch-size", str(TRAIN_BATCH)]
        trained = args.train_batches * TRAIN_BATCH
    elif kind == "demo":
        cmd, trained = ["train", "--task", name], None
    else:
        raise SystemExit(f"--setups: {setup!r} is neither folder:MODEL nor demo:TASK")
    return [*HZ, *cmd, "--epochs", "3", "--limit-train-batches", str(args.train_batches), "--no-progress"], trained


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def main() -> None:
    args, env = parse_setup_arguments(__doc__, DEFAULT_SETUPS, (
        ("--train-batches",), {"type": int, "default": 2, "help": "training batches per epoch (--limit-train-batches)"}))
    print(f"CPU: {cpu_name()}; {args.threads} threads; {args.rounds} rounds of a 3-epoch `hybridzoo train` each; "
          "validation seconds as metrics.csv's eval_seconds", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            cmd, trained = train_command(setup, Path(tmp), args)
            eager, copy, kept, per_image = [], [], [], []
            for r in range(args.rounds):
                out_dir = Path(tmp) / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{setup}-{r}")
                _, out, _ = run([*cmd, "--output", str(out_dir)], env)
                m = read_rows(out_dir)
                paths = [row.get("eval_path") for row in m]
                if paths[:2] != ["eager", "oneDNN"]:
                    raise RuntimeError(f"{setup}: validation paths {paths}, expected eager then oneDNN first; is "
                                       f"oneDNN built in?\n{out[-2000:]}")
                eager.append(float(m[0]["eval_seconds"]))
                copy.append(float(m[1]["eval_seconds"]))
                kept.append(paths[2])
                if trained:
                    per_image.append(statistics.median(float(row["train_seconds"]) for row in m[1:]) / trained)
            ratios = [e / c for e, c in zip(eager, copy)]
            row = {"setup": setup, "eager_s": statistics.median(eager), "copy_s": statistics.median(copy),
                   "eager_all": eager, "copy_all": copy, "ratio_median": statistics.median(ratios),
                   "ratio_range": [min(ratios), max(ratios)], "kept": kept}
            if per_image and setup.startswith("folder:"):
                # derived: 4 trained images per validated one, at this run's training speed
                train_s = 4 * args.images * statistics.median(per_image)
                kept_s = row["copy_s"] if kept.count("oneDNN") > len(kept) / 2 else row["eager_s"]
                row["epoch_4to1"] = (train_s + row["eager_s"]) / (train_s + kept_s)
                row["train_s_per_image"] = statistics.median(per_image)
            rows.append(row)
            print(f"{setup}: eager {row['eager_s']:.2f} s, copy {row['copy_s']:.2f} s, eager / copy "
                  f"{row['ratio_median']:.2f}× ({row['ratio_range'][0]:.2f}–{row['ratio_range'][1]:.2f}), kept "
                  f"{', '.join(kept)}", flush=True)

    print("\n| setup | eager validation | copy validation | eager / copy, per round | kept at epoch 3 | "
          "epoch at 4:1 (derived) |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        span = lambda v: f"{min(v):.2f}–{max(v):.2f}"  # noqa: E731
        epoch = f"{row['epoch_4to1']:.3f}×" if "epoch_4to1" in row else "–"
        print(f"| `{row['setup']}` | {row['eager_s']:.2f} s ({span(row['eager_all'])}) | {row['copy_s']:.2f} s "
              f"({span(row['copy_all'])}) | {row['ratio_median']:.2f}× ({row['ratio_range'][0]:.2f}–"
              f"{row['ratio_range'][1]:.2f}) | {', '.join(sorted(set(row['kept'])))} | {epoch} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds,
                                               "images": args.images, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
