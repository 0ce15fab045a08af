"""The efficiency claims side by side: every registered variant's params, MACs and latency measured on
this machine against the accuracy its paper reports (from the model cards), as a Pareto plot of
accuracy against measured latency — the figure these papers open with, redrawn on the user's hardware.

Accuracies are the papers' (ImageNet-1K top-1 at the card's resolution); params, MACs and latency are
measured here (batch 1, fp32, eager, the current torch thread count), so the plot shows what each
paper's accuracy costs on *this* CPU or GPU.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
from pathlib import Path
from typing import Any

import torch


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x = latency, higher y = accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def candidates(pattern: str | None, quick: bool) -> list[str]:
    from hybridzoo.registry import get_card, list_models

    names = []
    for n in list_models(task="classification", include_demo=False):
        card = get_card(n)
        if card.reported.get("top1") is None or (pattern and not fnmatch.fnmatch(n, pattern)):
            continue
        if quick and (card.reported.get("gflops") or 99) > 1.5:
            continue
        names.append(n)
    return names


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from hybridzoo.factory import create_model
    from hybridzoo.profile import benchmark, count_macs, count_params
    from hybridzoo.registry import get_card
    from hybridzoo.studies import write_table

    names = candidates(args.pattern, args.quick)
    if not names:
        raise ValueError(f"no classification model with a reported top-1 matches {args.pattern!r}")
    rows = []
    for n in tqdm(names, desc="scaling", dynamic_ncols=True):
        card = get_card(n)
        size = tuple(card.input_size)
        with torch.device("meta"):
            meta = create_model(n)
        macs = count_macs(meta.eval(), torch.empty(1, *size, device="meta"))
        model = create_model(n).eval()
        lat = benchmark(model, size, batch_size=1, iters=args.iters, warmup=1)
        rows.append({"model": n, "paper": card.paper, "res": size[-1], "params (M)": count_params(model) / 1e6,
                     "GMACs": macs / 1e9, "latency ms (bs1)": lat["seconds_per_iter"] * 1e3,
                     "top1 (paper)": float(card.reported["top1"])})
        del model, meta
        gc.collect()
    front = set(pareto_front([(r["latency ms (bs1)"], r["top1 (paper)"]) for r in rows]))
    for i, r in enumerate(rows):
        r["pareto"] = "yes" if i in front else ""
    note = (f"Measured here: fp32 eager, batch 1, {torch.get_num_threads()} threads, median of {args.iters} runs "
            "(an idle machine gives the fairest picture). top1 is each paper's reported ImageNet-1K accuracy.")
    md = write_table(out, rows, "Accuracy against measured latency", note)

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    papers = sorted({r["paper"] for r in rows})
    colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(papers)}
    for ax, key, xlabel in ((axes[0], "latency ms (bs1)", "latency, batch 1 (ms, log scale) — measured here"),
                            (axes[1], "GMACs", "GMACs (log scale)")):
        for p in papers:
            pts = [r for r in rows if r["paper"] == p]
            ax.scatter([r[key] for r in pts], [r["top1 (paper)"] for r in pts], color=colours[p], label=p, s=28)
        if key.startswith("latency"):
            fr = sorted((rows[i] for i in front), key=lambda r: r[key])
            ax.plot([r[key] for r in fr], [r["top1 (paper)"] for r in fr], "k--", lw=1, label="Pareto front")
            for r in fr:
                ax.annotate(r["model"], (r[key], r["top1 (paper)"]), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ImageNet top-1 (paper, %)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Paper accuracy against cost on this machine")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return {"rows": rows, "pareto": [rows[i]["model"] for i in sorted(front)], "table": md}
