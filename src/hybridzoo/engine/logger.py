"""What a run leaves behind: `metrics.csv`, `summary.json`, `curves.png` (rank 0 only).

Every file is rewritten whole from the in-memory history (which the checkpoint also holds), so a
resumed run continues the same files, row for row.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from hybridzoo.engine.checkpoint import atomic_write

__all__ = ["metric_columns", "write_metrics_csv", "write_summary", "plot_curves", "format_row"]


def metric_columns(history: list[dict[str, Any]]) -> list[str]:
    """epoch, train_loss, val_loss, val_<metric>..., anything else in first-seen order, lr, eval_path,
    train_seconds, eval_seconds, seconds."""
    keys: list[str] = []
    for row in history:
        for k in row:
            if k not in keys:
                keys.append(k)
    head = [k for k in ("epoch", "train_loss", "val_loss") if k in keys]
    vals = [k for k in keys if k.startswith("val_") and k not in head]
    tail = [k for k in ("lr", "eval_path", "train_seconds", "eval_seconds", "seconds") if k in keys]
    rest = [k for k in keys if k not in head + vals + tail]
    return head + vals + rest + tail


def write_metrics_csv(path: str | Path, history: list[dict[str, Any]]) -> None:
    cols = metric_columns(history)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: _fmt(row.get(k)) for k in cols})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    text = json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json_results(dest: str, results: Any) -> None:
    """`--json DEST` of the predict commands: '-' prints the JSON, anything else is a file path."""
    text = json.dumps(results, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
        print(f"wrote {dest}")


def format_row(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for k, v in row.items():
        if k != "epoch" and isinstance(v, float):
            parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.1f}s" if k.endswith("seconds") else f"{k} {v:.4f}")
    return "  ".join(parts)


def plot_curves(path: str | Path, history: list[dict[str, Any]], headline: str, title: str = "") -> None:
    """Loss (train and val) on the left, the task's headline metric (val, and train if logged) on the right."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]

    def series(key):
        ys = [r.get(key) for r in history]
        return None if all(y is None or (isinstance(y, float) and math.isnan(y)) for y in ys) else ys

    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        ys = series(key)
        if ys is not None:
            ax_l.plot(epochs, ys, marker="o", label=label)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.set_title("loss")
    ax_l.legend()
    ax_l.grid(alpha=0.3)
    for key, label in ((f"train_{headline}", "train"), (f"val_{headline}", "val"), (f"val_ema_{headline}", "val (EMA)")):
        ys = series(key)
        if ys is not None:
            ax_m.plot(epochs, ys, marker="o", label=label)
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel(headline)
    ax_m.set_title(headline)
    ax_m.legend()
    ax_m.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_l, ax_m):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
