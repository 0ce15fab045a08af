"""`hybridzoo eval` end to end, as a user runs it: the default CPU path against `--no-fast-cpu` (eager).

Each command is the whole process — start-up, model build, data reading and decoding, the first-call race between
eager and the frozen oneDNN path (`layers.onednn.fastest_cpu_inference`) and the metrics — timed on the wall clock,
the two commands interleaved for `--rounds` rounds; the table prints each one's median and range and the
per-round ratio. Both must print the same metrics (to 4 decimals), or the benchmark stops.

Setups:
- `folder:MODEL` (classification): a one-step training run of MODEL at its card's resolution on an image folder of
  `--classes` classes of JPEG photographs of 500×375 (scikit-image's, cropped and tinted per class; synthetic data,
  labelled so), then eval on its `val/` of `--images` images;
- `demo:TASK`: a one-step run of TASK's default model on its built-in data, then eval on its validation set.

    python benchmarks/bench_eval.py                                  # DeiT-S, CvT-13, CoAtNet-0 and every task's demo
    python benchmarks/bench_eval.py --setups folder:deit_small_patch16_224 --images 320 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import cpu_name  # noqa: E402

HZ = [sys.executable, "-m", "hybridzoo"]
DEFAULT_SETUPS = ["folder:deit_small_patch16_224", "folder:cvt_13", "folder:coatnet_0", "demo:classification",
                  "demo:segmentation", "demo:super-resolution", "demo:land-cover", "demo:recommendation"]


def photo_folder(root: Path, classes: int, n_train: int, n_val: int, seed: int = 0) -> Path:
    """ImageNet-like JPEGs (500×375) from scikit-image's photographs, a random crop and a per-class tint each."""
    from PIL import Image
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            tint = rng.uniform(0.6, 1.4, 3)
            for i in range(n):
                p = photos[rng.integers(len(photos))]
                h, w = p.shape[:2]
                ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = (p[top:top + ch, left:left + cw] * tint).clip(0, 255).astype(np.uint8)
                Image.fromarray(crop).resize((500, 375)).save(d / f"{i}.jpg", quality=90)
    return root


def metrics_of(text: str) -> str:
    line = [ln for ln in text.splitlines() if ln.startswith("val_")]
    if not line:
        raise RuntimeError(f"no metrics line in the eval output:\n{text[-2000:]}")
    return line[-1]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return seconds, p.stdout, p.stderr


def prepare(setup: str, work: Path, args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """Trains the one-step run; returns the eval command without the path switch."""
    kind, name = setup.split(":", 1)
    out = work / re.sub(r"[^A-Za-z0-9_.-]", "_", setup)
    if kind == "folder":
        data = work / "photos"
        if not data.is_dir():
            photo_folder(data, args.classes, 2, args.images // args.classes)
        train = ["train", "--model", name, "--data", str(data), "--batch-size", "8"]
    elif kind == "demo":
        train = ["train", "--task", name]
    else:
        raise SystemExit(f"--setups: {setup!r} is neither folder:MODEL nor demo:TASK")
    run([*HZ, *train, "--epochs", "1", "--limit-train-batches", "1", "--limit-val-batches", "1", "--output",
         str(out), "--no-progress"], env)
    return [*HZ, "eval", "--run", str(out), "--device", "cpu", "--batch-size", str(args.batch_size)]


def parse_setup_arguments(doc: str, setups: list[str], *extra) -> tuple[argparse.Namespace, dict[str, str]]:
    """The options this benchmark and bench_validation.py share, plus `extra` ((flags, kwargs) pairs); the
    commands' environment."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", nargs="+", default=setups, help="folder:MODEL or demo:TASK")
    ap.add_argument("--images", type=int, default=160, help="validation images of the photo folder")
    ap.add_argument("--classes", type=int, default=10)
    for flags, kwargs in extra:
        ap.add_argument(*flags, **kwargs)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the commands")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    return args, {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}


def main() -> None:
    args, env = parse_setup_arguments(__doc__, DEFAULT_SETUPS, (
        ("--batch-size",), {"type": int, "default": 16, "help": "eval's --batch-size (it evaluates at twice this)"}))
    print(f"CPU: {cpu_name()}; {args.threads} threads; {args.rounds} interleaved rounds; wall clock of the whole "
          "`hybridzoo eval` command", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            cmd = prepare(setup, Path(tmp), args, env)
            times = {"default": [], "eager": []}
            choices, metrics = set(), {}
            for _ in range(args.rounds):
                for path, extra in (("default", []), ("eager", ["--no-fast-cpu"])):
                    seconds, out, err = run(cmd + extra, env)
                    times[path].append(seconds)
                    metrics.setdefault(path, metrics_of(out))
                    choices.update(re.findall(r"CPU inference on (\S+): the (\S+) path", err))
            if metrics["default"] != metrics["eager"]:
                raise RuntimeError(f"{setup}: the two paths score differently:\n  {metrics['default']}\n  "
                                   f"{metrics['eager']}")
            ratios = [e / d for d, e in zip(times["default"], times["eager"])]
            row = {"setup": setup, "default_s": statistics.median(times["default"]),
                   "eager_s": statistics.median(times["eager"]), "default_all": times["default"],
                   "eager_all": times["eager"], "ratio_median": statistics.median(ratios),
                   "ratio_range": [min(ratios), max(ratios)], "choices": sorted(choices), "metrics": metrics["eager"]}
            rows.append(row)
            print(f"{setup:34s} default {row['default_s']:6.1f} s ({min(times['default']):.1f}–"
                  f"{max(times['default']):.1f})  eager {row['eager_s']:6.1f} s ({min(times['eager']):.1f}–"
                  f"{max(times['eager']):.1f})  eager/default {row['ratio_median']:.2f}× "
                  f"({min(ratios):.2f}–{max(ratios):.2f})  chose {sorted(choices)}  {metrics['eager']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
