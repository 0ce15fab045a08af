"""CoAtNet's stacking ablation (Dai et al., arXiv 2106.04803, Sec. 3.2 and Fig. 2), re-run on one budget.

The paper compares where convolution (C = MBConv) and attention (T = relative-attention Transformer)
stages go: C-C-C-C, C-C-C-T, C-C-T-T and C-T-T-T (S0 is always a convolutional stem). It finds that
training loss (capacity) improves with more T stages, while generalisation and transfer favour C-C-T-T,
its choice. This study builds each layout with the same widths and depths (`layout=` of the CoAtNet
model), trains each on the same data and budget, and tabulates params, MACs, measured throughput,
final training loss and validation accuracy — plus each layout's full-size coatnet_0 params and MACs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

LAYOUTS = ("C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T")
# a reduced coatnet_0 (same four-stage shape) that trains on digits in about a minute per layout
REDUCED = dict(dims=[32, 64, 96, 128], depths=[1, 2, 3, 1], stem_width=16, head_hidden_size=None, dim_head=16)
IMG = 64  # S1..S4 at 16, 8, 4, 2 pixels: the T stages see real grids


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridzoo.factory import create_model
    from hybridzoo.profile import benchmark, count_macs, count_params
    from hybridzoo.studies import train_classifier, write_table

    epochs = args.epochs or (1 if args.quick else 6)
    layouts = LAYOUTS[::3] if args.quick else LAYOUTS
    kw = [f"{k}={json.dumps(v)}" for k, v in REDUCED.items()]
    rows = []
    for layout in layouts:
        with torch.device("meta"):
            full = create_model("coatnet_0", layout=layout)
        full_macs = count_macs(full, torch.empty(1, 3, 224, 224, device="meta"))
        print(f"coatnet-layouts: training {layout} ({epochs} epochs)", flush=True)
        res = train_classifier("coatnet_0", out / layout, epochs, args.data, args.seed,
                               ["--img-size", IMG, "--model-kwargs", f"layout={layout}", *kw,
                                *(["--limit-train-batches", 3] if args.quick else [])])
        model = res.model.eval()
        bs = 32
        infer = benchmark(model, (3, IMG, IMG), batch_size=bs, iters=3 if args.quick else 5, warmup=1)
        trainb = benchmark(model, (3, IMG, IMG), batch_size=bs, iters=3 if args.quick else 5, warmup=1, train=True)
        s = res.summary
        rows.append({
            "layout": layout,
            "params (reduced)": count_params(model),
            "MMACs @64 (reduced)": count_macs(model.eval(), torch.randn(1, 3, IMG, IMG)) / 1e6,
            "infer img/s": infer["samples_per_second"], "train img/s": trainb["samples_per_second"],
            "train loss": s.get("train_loss"), "val top1": s.get("val_top1"),
            "params coatnet_0 @224": count_params(full), "GMACs coatnet_0 @224": full_macs / 1e9,
        })
    note = (f"SMALL-SCALE: reduced CoAtNet ({REDUCED}), UCI digits at {IMG}×{IMG}, {epochs} epochs, seed "
            f"{args.seed}, {torch.get_num_threads()} CPU threads. The paper's ablation is on ImageNet-1K/JFT; this "
            "shows the trade-off on this machine, not the paper's numbers.")
    md = write_table(out, rows, "CoAtNet layouts on one budget", note)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["layout"] for r in rows]
    for ax, key, colour in zip(axes, ("val top1", "train loss", "train img/s"), ("tab:blue", "tab:orange", "tab:green")):
        vals = [r[key] or 0.0 for r in rows]
        ax.bar(names, vals, color=colour)
        ax.set_title(key)
        ax.set_xlabel("layout (S1-S2-S3-S4)")
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"CoAtNet stacking ablation (reduced, digits, {epochs} epochs — small-scale)")
    fig.tight_layout()
    fig.savefig(out / "coatnet_layouts.png", dpi=120)
    plt.close(fig)
    return {"epochs": epochs, "rows": rows, "table": md}
