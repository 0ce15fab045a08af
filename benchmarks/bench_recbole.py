"""Our AdaMCT and SASRec against the official models, one training step at a time, in one process.

    /work/recvenv/bin/python benchmarks/bench_recbole.py --adamct-src /work/ext/AdaMCT/adamct.py \\
        --out benchmarks/results_recbole.json

The peers run OUTSIDE this project: RecBole's SASRec (`pip install recbole`, in an environment of its
own) and the official AdaMCT (juyongjiang/AdaMCT, a RecBole fork; its model file
`recbole/model/sequential_recommender/adamct.py` is loaded from `--adamct-src`, or from the installed
`recbole` if that is the fork). A peer that cannot be imported is skipped with a message; with neither,
only our models are timed. This checkout's `src/` is put on the path: nothing of ours is installed there.

The data is the SYNTHETIC Amazon-Beauty-shaped log of bench_recommendation.py (22,363 users, 12,101
items, 5-13 interactions per user); its training prefixes (RecBole's protocol, left-aligned, padded to
50) are shuffled once and cut into batches of 2048 (the AdaMCT paper's `train_batch_size`). Round r
gives batch r to every model: a step is forward, full-softmax cross-entropy over every item (RecBole's
`loss_type: CE`), backward and Adam (RecBole's `learner: adam`, the config's learning rate). Both sides
use the same configuration (Beauty's AdaMCT: hidden 16, 2 heads, kernel 5, dropout 0.43 / 0.57;
RecBole's SASRec defaults: hidden 64, FFN 256, dropout 0.5) and start from the same weights (ours are
copied into the peer: the parameter names are RecBole's). Before timing, both sides' eval-mode outputs
on the first batch are compared (they must agree to fp32 rounding). The table prints sequences/s per
model, the per-round ratio ours / peer (median, min–max) on the wall clock and on CPU time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # this checkout's hybridzoo, whichever interpreter runs us
    sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import cpu_name, load_average  # noqa: E402

from hybridzoo.data.recommendation import SequenceData, synthetic_interactions  # noqa: E402
from hybridzoo.factory import create_model  # noqa: E402

MAX_LEN = 50
# ours → (RecBole config of the same model, learning rate of its paper / RecBole config)
CONFIGS = {
    "adamct_beauty": (dict(n_layers=2, n_heads=2, hidden_size=16, kernel_size=5, reduction_ratio=2,
                           hidden_dropout_prob=0.43, attn_dropout_prob=0.57, hidden_act="swish",
                           layer_norm_eps=1e-12, initializer_range=0.02, loss_type="CE"), 0.02),
    "sasrec": (dict(n_layers=2, n_heads=2, hidden_size=64, inner_size=256, hidden_dropout_prob=0.5,
                    attn_dropout_prob=0.5, hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02,
                    loss_type="CE"), 0.001),
}
FIELDS = dict(USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list",
              ITEM_LIST_LENGTH_FIELD="item_length", NEG_PREFIX="neg_", MAX_ITEM_LIST_LENGTH=MAX_LEN,
              device=torch.device("cpu"))


class _Dataset:
    """What RecBole's SequentialRecommender reads from a dataset: the item count (padding included)."""

    def __init__(self, num_items: int):
        self.num_items = num_items

    def num(self, field: str) -> int:
        return self.num_items


def peer_class(name: str, adamct_src: str | None):
    """(class, None) or (None, why it is skipped)."""
    try:
        import recbole  # noqa: F401
    except ImportError as e:
        return None, f"RecBole is not importable ({e}); run this script with an interpreter that has `recbole`"
    if name == "sasrec":
        from recbole.model.sequential_recommender.sasrec import SASRec
        return SASRec, None
    if adamct_src:
        spec = importlib.util.spec_from_file_location("official_adamct", adamct_src)
        if spec is None or not Path(adamct_src).is_file():
            return None, f"--adamct-src {adamct_src!r} is not a file (the official adamct.py)"
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.AdaMCT, None
    try:
        return importlib.import_module("recbole.model.sequential_recommender.adamct").AdaMCT, None
    except ImportError:
        return None, ("the official AdaMCT is not importable: pass --adamct-src with the path of "
                      "juyongjiang/AdaMCT's recbole/model/sequential_recommender/adamct.py")


def make_batches(batch_size: int, n: int, seed: int = 0):
    users, items, times = synthetic_interactions(num_users=22363, num_items=12101, num_genres=101,
                                                 min_len=5, max_len=13, seed=seed)
    data = SequenceData.from_interactions(users, items, times, kcore=0)
    seq, lengths, target = data.train_samples(MAX_LEN)
    order = np.random.default_rng(seed).permutation(len(seq))
    batches = []
    for i in range(n):
        idx = order[(i * batch_size) % len(seq):][:batch_size]
        batches.append(tuple(torch.from_numpy(np.ascontiguousarray(a[idx])) for a in (seq, lengths, target)))
    return data.num_items, len(seq), batches


def ours_step(model, opt):
    def step(batch):
        seq, lengths, target = batch
        loss = model.calculate_loss(seq, lengths, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def peer_step(model, opt):
    def step(batch):
        seq, lengths, target = batch
        loss = model.calculate_loss({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths, model.POS_ITEM_ID: target})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=2048, help="the AdaMCT paper's train_batch_size")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adamct-src", default=None, metavar="PATH",
                    help="the official adamct.py (juyongjiang/AdaMCT recbole/model/sequential_recommender/adamct.py)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    num_items, n_train, batches = make_batches(args.batch_size, args.rounds + 1)
    env = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "batch_size": args.batch_size,
           "rounds": args.rounds, "num_items": num_items, "train_sequences_per_epoch": n_train,
           "loadavg_start": load_average(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        env["recbole"] = importlib.import_module("recbole").__version__
    except ImportError:
        pass
    lens = torch.cat([b[1] for b in batches]).float()
    print(f"# {env['cpu']}, {args.threads} threads, torch {env['torch']}, RecBole {env.get('recbole', '(none)')}; "
          f"batch {args.batch_size}, history lengths mean {lens.mean():.1f} (max {int(lens.max())}) of {MAX_LEN}; "
          f"load average {env['loadavg_start']}", flush=True)
    rows = []
    for name in args.models:
        cfg, lr = CONFIGS[name]
        torch.manual_seed(0)
        ours = create_model(name, num_items=num_items, max_len=MAX_LEN).train()
        steps = {"ours": ours_step(ours, torch.optim.Adam(ours.parameters(), lr=lr))}
        cls, why = peer_class(name, args.adamct_src)
        row = {"model": name, "params": sum(p.numel() for p in ours.parameters()), "lr": lr}
        if cls is None:
            print(f"[{name}] peer skipped: {why}", flush=True)
            row["peer_skipped"] = why
        else:
            peer = cls({**FIELDS, **cfg}, _Dataset(num_items))
            missing = peer.load_state_dict(ours.state_dict(), strict=True)
            del missing
            row["peer"] = f"{cls.__module__}.{cls.__name__}"
            seq, lengths, _ = batches[0]
            ours.eval(), peer.eval()
            with torch.no_grad():
                row["eval_max_abs_diff"] = float((ours(seq, lengths) - peer(seq, lengths)).abs().max())
            ours.train(), peer.train()
            print(f"[{name}] peer {row['peer']}: same weights, eval outputs differ by at most "
                  f"{row['eval_max_abs_diff']:.2e}", flush=True)
            steps["peer"] = peer_step(peer, torch.optim.Adam(peer.parameters(), lr=lr))
        times = {k: {"wall": [], "cpu": []} for k in steps}
        for f in steps.values():  # warm-up on the spare batch
            f(batches[-1])
        for r in range(args.rounds):
            for k, f in steps.items():
                w, c = time.perf_counter(), time.process_time()
                f(batches[r])
                times[k]["wall"].append(time.perf_counter() - w)
                times[k]["cpu"].append(time.process_time() - c)
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k]['wall'][-1]:.3f} s" for k in steps)
                  + f"; load average {load_average()}", file=sys.stderr, flush=True)
        for k in steps:
            row[f"{k}_seq_per_s"] = args.batch_size / statistics.median(times[k]["wall"])
            row[f"{k}_seq_per_cpu_s"] = args.batch_size / statistics.median(times[k]["cpu"])
        if "peer" in steps:
            for clock in ("wall", "cpu"):
                ratios = [p / o for o, p in zip(times["ours"][clock], times["peer"][clock])]
                row[f"ratio_{clock}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    env["loadavg_end"] = load_average()
    print("\n| model | ours seq/s | peer seq/s | ours / peer (wall) | ours / peer (CPU time) | peer |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        def fmt(s):
            return f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"
        peer = (f"{r['peer_seq_per_s']:,.0f} | {fmt(r['ratio_wall'])} | {fmt(r['ratio_cpu'])} | {r['peer']}"
                if "peer_seq_per_s" in r else f"– | – | – | skipped: {r['peer_skipped']}")
        print(f"| {r['model']} | {r['ours_seq_per_s']:,.0f} | {peer} |")
    print(f"\nload average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
