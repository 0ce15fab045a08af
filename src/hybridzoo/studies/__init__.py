"""Studies: the seed articles' own comparisons, re-run by the user (`hybridzoo study NAME`).

Each study writes a run folder with its table (`results.csv`, `results.md`), its plot(s) and a
`summary.json`, on the built-in data by default. The classification studies train reduced models on
the UCI digits for a few epochs: small-scale evidence, labelled as such in every table — they show
the direction of an effect the paper reports at ImageNet scale, not its size.

    coatnet-layouts            CoAtNet's stacking ablation (C-C-C-C ... C-T-T-T)
    deit-tokens                DeiT's distillation ablation and the class/distillation token similarity
    attention-as-convolution   Cordonnier et al.: an attention layer that is a convolution, and one that learns to be
    scaling                    params, MACs and measured latency of every variant against its paper's accuracy
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["STUDIES", "run_study", "write_table", "train_classifier", "study_dir"]

# name -> (module, one-line description); modules are imported when the study runs
STUDIES: dict[str, tuple[str, str]] = {
    "coatnet-layouts": ("hybridzoo.studies.coatnet_layouts", "CoAtNet's C/T stacking ablation on one budget"),
    "deit-tokens": ("hybridzoo.studies.deit_tokens", "DeiT's distillation ablation; class vs distillation token"),
    "attention-as-convolution": ("hybridzoo.studies.attention_conv",
                                 "attention that equals a convolution; one that learns to imitate it"),
    "scaling": ("hybridzoo.studies.scaling", "params / MACs / latency of every variant vs its paper's accuracy"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(STUDIES), help="which study")
    parser.add_argument("--output", default=None, help="run folder (default runs/study-NAME-TIME)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model (study default)")
    parser.add_argument("--data", default=None, help="classification data (default: the built-in digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="attention-as-convolution: training steps")
    parser.add_argument("--pattern", default=None, help="scaling: fnmatch pattern of models (default: all with an accuracy)")
    parser.add_argument("--iters", type=int, default=3, help="scaling: timed iterations per model")
    parser.add_argument("--quick", action="store_true", help="the smallest budget that still runs every part")


def study_dir(name: str, output: str | None) -> Path:
    out = Path(output) if output else Path("runs") / f"study-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_study(args: argparse.Namespace) -> Path:
    import importlib

    module, _ = STUDIES[args.name]
    out = study_dir(args.name, args.output)
    fn: Callable[[argparse.Namespace, Path], dict[str, Any]] = importlib.import_module(module).run
    summary = fn(args, out)
    summary = {"study": args.name, **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"{args.name}: wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} → {out}")
    return out


def write_table(out: Path, rows: list[dict[str, Any]], title: str, note: str = "") -> str:
    """`results.csv` and `results.md` from a list of rows (same keys); returns the Markdown."""
    keys = list(rows[0]) if rows else []
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-3:
                return f"{v:.1e}"
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "—" if v is None else str(v)

    lines = [f"# {title}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(k.replace("|", "/") for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    print(md)
    return md


def train_classifier(model: str, out: Path, epochs: int, data: str | None = None, seed: int = 0,
                     extra: list[str] = ()) -> Any:
    """One `hybridzoo train` run of a classification model (the CLI's own options), returning its TrainResult."""
    from hybridzoo.cli import build_parser
    from hybridzoo.engine.trainer import train
    from hybridzoo.tasks.base import get_task

    task = get_task("classification")
    argv = ["train", "--model", model, "--output", str(out), "--epochs", str(epochs), "--seed", str(seed),
            "--no-progress", *(["--data", data] if data else []), *map(str, extra)]
    args = build_parser(task).parse_args(argv)
    args.task = task.name
    return train(args, task)
