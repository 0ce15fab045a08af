"""Would the recommendation models train faster by batch split? One training step of AdaMCT / SASRec with the
model's forward and backward split between the intra-op threads (`BatchSplitTraining`) against the whole batch.

    python benchmarks/rec_batch_split_probe.py                  # AdaMCT (Beauty) and SASRec, batch 512, 7 rounds
    python benchmarks/rec_batch_split_probe.py --models sasrec --batch 256 --items 3000

The step is the task's: the model on the padded histories, the full-softmax cross-entropy over every item
(`linear_cross_entropy`, on the whole batch's outputs), AdamW. Both sides share the weights and the batch.
Dropout is 0 on both sides: FastDropout and the chunked attention's dropout draw from the global generator, which
the split's threads cannot share reproducibly; a probe of the step's cost, not a training run. Rounds alternate
the two sides; the medians and the per-round ratio whole / split (> 1: the split is faster) with its range are
printed. The `hybridzoo train --task recommendation` line "batch split off: ..." quotes the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import _common  # noqa: F401,I001  (puts this checkout's src/ on sys.path)

from hybridzoo.factory import create_model
from hybridzoo.layers.fused import linear_cross_entropy
from hybridzoo.layers.train_fast import BatchSplitTraining
from peak import cpu_name


class _OneInput(nn.Module):
    """The model on one (B, L + 1) tensor, the histories with their lengths in the last column: the batch split
    cuts one positional tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, :-1], x[:, -1])


def _without_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attn_dropout_prob"):
            m.attn_dropout_prob = 0.0
    return model


def measure(name: str, batch: int, items: int, max_len: int, rounds: int, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = _without_dropout(create_model(name, num_items=items, max_len=max_len)).train()
    whole = _OneInput(model)
    split = BatchSplitTraining(whole)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(5, max_len), max_len + 1, (batch,), generator=g)
    seq = torch.randint(1, items, (batch, max_len), generator=g)
    seq[torch.arange(max_len)[None] >= lengths[:, None]] = 0     # left-aligned histories, 0-padded
    x = torch.cat([seq, lengths[:, None]], 1)
    target = torch.randint(1, items, (batch,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(f: nn.Module) -> None:
        opt.zero_grad(set_to_none=True)
        loss = linear_cross_entropy(f(x), model.item_embedding.weight, target)
        loss.backward()
        opt.step()

    def timed(f: nn.Module) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(f)
        return (time.perf_counter() - t0) / steps

    for f in (whole, split):   # warm-up: kernels, the allocator, the threads
        step(f)
        step(f)
    times = {"whole": [], "split": []}
    for r in range(rounds):
        order = (("whole", whole), ("split", split)) if r % 2 == 0 else (("split", split), ("whole", whole))
        for side, f in order:
            times[side].append(timed(f))
    if not split._ok or split._n_parts(x) < 2:   # it fell back to the whole batch: nothing was compared
        raise RuntimeError(f"{name}: the split side did not train by batch split")
    ratios = [w / s for w, s in zip(times["whole"], times["split"])]
    return {"model": name, "batch": batch, "items": items, "max_len": max_len,
            "whole_ms": 1e3 * statistics.median(times["whole"]), "split_ms": 1e3 * statistics.median(times["split"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["adamct_beauty", "sasrec"])
    ap.add_argument("--batch", type=int, default=512, help="the task's default batch")
    ap.add_argument("--items", type=int, default=12101, help="catalogue size (Amazon Beauty: 12,101)")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed sample")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (the split needs 2+)")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if args.threads < 2:
        ap.error("--threads must be at least 2: one thread has nothing to split")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; {args.threads} threads; batch {args.batch}, {args.items} items, histories of "
          f"{args.max_len}; {args.rounds} interleaved rounds × {args.steps} steps; dropout 0 on both sides", flush=True)
    rows = [measure(m, args.batch, args.items, args.max_len, args.rounds, args.steps) for m in args.models]
    print("\n| model | whole (ms/step) | split (ms/step) | whole / split, median (range) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['whole_ms']:.1f} | {r['split_ms']:.1f} | "
              f"{r['ratio_median']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                       "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
