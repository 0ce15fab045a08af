"""Sequential recommendation: next-item prediction from a user's chronological history.

Protocol (RecBole's `LS: valid_and_test`, `order: TO`): per user, the last item is the test target, the
second-to-last the validation target, and every prefix of the rest is a training sample; histories are
truncated to the most recent `max_len` items and padded to exactly `max_len` (AdaMCT's squeeze-excitation
layers need the fixed length). Training is full-softmax cross-entropy over all items.

Evaluation always reports two protocols, and their keys say which:
- `hr@K`, `ndcg@K`, `mrr@K`: full ranking over every item, the user's earlier items excluded (the target
  itself is never excluded) — the modern standard;
- `uni100_hr@K`, ...: the target ranked against 100 items drawn uniformly from those the user never
  interacted with (fixed by seed) — the protocol of the AdaMCT paper, roughly an order of magnitude higher.
  The prefix carries the actual count: `--num-negatives 10` reports `uni10_hr@K` (the catalogue must
  hold at least the longest history + N items).
Metrics follow RecBole: HR@K = 1 if the target ranks in the top K, NDCG@K = 1/log2(rank+2), MRR@K = 1/(rank+1)
(0-based rank, 0 outside the top K). Ties are broken against the target, so a constant scorer earns nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hybridzoo.data.recommendation import FORMATS, SequenceData, read_interactions, synthetic_interactions
from hybridzoo.layers.fused import linear_cross_entropy
from hybridzoo.engine.metrics import Metric
from hybridzoo.tasks.base import Task, TaskData, register_task

__all__ = ["RecommendationTask", "RankingMetric", "rank_metrics", "full_ranking_ranks", "sampled_ranks", "KS",
           "sampled_prefix", "metric_names"]

KS = (1, 5, 10, 20)


def _fp32_on_cpu(device: torch.device):
    """No autocast on the CPU: the fused recommendation kernels (layers/fused.py) are fp32 and step aside under
    autocast, and at these hidden sizes bf16 has nothing to speed up (docs/bf16.md). GPUs keep autocast."""
    return torch.autocast("cpu", enabled=False) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def sampled_prefix(num_negatives: int) -> str:
    """The key prefix of the sampled protocol: `uni100_` for 100 negatives, `uni10_` for 10."""
    return f"uni{int(num_negatives)}_"


def metric_names(num_negatives: int = 100) -> list[str]:
    """Every metric key evaluation reports (valid `--valid-metric` values), for N sampled negatives."""
    return [f"{p}{m}@{k}" for p in ("", sampled_prefix(num_negatives)) for m in ("hr", "ndcg", "mrr") for k in KS]


def rank_metrics(ranks: torch.Tensor, ks=KS, prefix: str = "") -> dict[str, torch.Tensor]:
    """Per-user HR@K, NDCG@K, MRR@K from 0-based ranks (summed over users: divide by the count)."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"{prefix}hr@{k}"] = hit.double().sum()
        out[f"{prefix}ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2), 0.0).sum()
        out[f"{prefix}mrr@{k}"] = torch.where(hit, 1.0 / (ranks + 1), 0.0).sum()
    return out


def full_ranking_ranks(scores: torch.Tensor, target: torch.Tensor, hist_rows: torch.Tensor,
                       hist_items: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items; padding and history (but not the target) excluded.

    One pass over the (B, N) scores: count the items scoring at least the target's, then take back the
    excluded items (padding and the deduplicated history, the target itself never) that were counted.
    """
    scores = scores.float()
    B, N = scores.shape
    target_score = scores.gather(1, target[:, None])
    # a float-valued compare: the bool path of `>=` is ~5x slower on the CPU
    at_least = torch.ge(scores, target_score, out=torch.empty_like(scores)).sum(1).long()
    rows = torch.cat([torch.arange(B, device=scores.device), hist_rows.long()])
    items = torch.cat([torch.zeros(B, dtype=torch.long, device=scores.device), hist_items.long()])
    keep = items != target[rows]
    key = torch.unique(rows[keep] * N + items[keep])
    rows, items = key // N, key % N
    counted = (scores[rows, items] >= target_score[rows, 0]).long()
    return at_least - 1 - torch.zeros(B, dtype=torch.long, device=scores.device).index_add_(0, rows, counted)


def sampled_ranks(target_score: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target against its sampled negatives (ties counted against the target)."""
    return (negative_scores >= target_score[:, None]).sum(1)


def _rank_keys(num_negatives: int) -> tuple[str, ...]:
    return tuple(f"{p}{m}@{k}" for p in ("", sampled_prefix(num_negatives)) for k in KS for m in ("hr", "ndcg", "mrr"))


class RankingMetric(Metric):
    """Sums of the per-user ranking metrics of both protocols (and the full-softmax cross-entropy), and
    the user count. `split` names whose histories the task excludes ("valid" or "test")."""

    def __init__(self, split: str = "valid", with_loss: bool = True, num_negatives: int = 100) -> None:
        super().__init__()
        self.split, self.with_loss = split, with_loss
        # the sampled protocol is named by its negative count: uni100_hr@10, uni10_hr@10, ...
        self.prefix, self.keys = sampled_prefix(num_negatives), _rank_keys(num_negatives)
        self.add_state("sums", torch.zeros(len(self.keys) + 2, dtype=torch.float64))  # metrics, ce, users

    def update(self, full_ranks: torch.Tensor, sampled: torch.Tensor, ce: torch.Tensor | float = 0.0) -> None:
        values = {**rank_metrics(full_ranks), **rank_metrics(sampled, prefix=self.prefix)}
        add = torch.stack([values[k].double().cpu() for k in self.keys]
                          + [torch.as_tensor(float(ce), dtype=torch.float64),
                             torch.as_tensor(float(len(full_ranks)), dtype=torch.float64)])
        self.sums += add

    def compute(self) -> dict[str, float]:
        n = max(float(self.sums[-1]), 1.0)
        out = {k: float(self.sums[i]) / n for i, k in enumerate(self.keys)}
        if self.with_loss:
            out["loss"] = float(self.sums[-2]) / n
        return out


class _Rows(Sequence):
    """A batch fetched in one gather per tensor that still reads as a list of samples.

    `_as_batch` takes the gathered tensors as they are; any other collate (a user's DataLoader with
    PyTorch's default) sees an ordinary sequence of per-sample tuples.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)


class _Tensors(Dataset):
    """Rows of a few aligned tensors, fetched a whole batch at a time (`__getitems__`): per-sample
    indexing and collation would cost more than the model does here."""

    def __init__(self, *tensors: torch.Tensor, split: str | None = None):
        self.tensors, self.split = tensors, split

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int):
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, indices) -> _Rows:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return _Rows(tuple(t[idx] for t in self.tensors))


def _as_batch(samples):
    if isinstance(samples, _Rows):
        return samples.tensors
    return tuple(torch.stack(col) for col in zip(*samples))


def _eval_set(data: SequenceData, split: str, max_len: int) -> _Tensors:
    """One sample per user: (user index, history, history length, target), labelled with its split."""
    return _Tensors(*(torch.from_numpy(a) for a in data.eval_samples(split, max_len)), split=split)


@register_task
class RecommendationTask(Task):
    name = "recommendation"
    default_model = "adamct_beauty"
    batch_split_off = ("AdaMCT and SASRec measured level with the whole batch by batch split (1.01x, 0.94x at batch "
                       "512; benchmarks/rec_batch_split_probe.py, RESULTS.md session 33)")
    headline_metric = "ndcg@10"
    higher_is_better = True
    default_epochs = 10
    default_batch_size = 512
    default_lr = 2e-3
    default_weight_decay = 0.0

    def __init__(self) -> None:
        self.data: SequenceData | None = None
        self.negatives: torch.Tensor | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("recommendation")
        g.add_argument("--max-len", type=int, default=50, help="history length the model sees (AdaMCT: 50)")
        g.add_argument("--kcore", type=int, default=None,
                       help="iterative k-core filter on users and items (default 5 for files, 0 for the built-in set)")
        g.add_argument("--format", choices=FORMATS, default=None, help="interaction file format (default: detected)")
        g.add_argument("--num-negatives", type=int, default=100,
                       help="negatives of the sampled protocol (metrics uni<N>_*); every user needs N items it "
                            "never interacted with, so the catalogue must hold the longest history + N items")
        g.add_argument("--valid-metric", default="ndcg@10", metavar="METRIC",
                       help="validation metric for --early-stop and the best epoch: " + ", ".join(metric_names(100)[:3])
                            + ", … (K = 1, 5, 10, 20), or uni<N>_hr@10 etc. for N = --num-negatives (the AdaMCT "
                            "configs: uni100_hr@10; HR@K is RecBole's Recall@K under leave-one-out)")
        g.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                       help="the engine's warm-up + cosine, or a constant rate as RecBole trains")
        g.add_argument("--history", nargs="*", default=None, help="predict: item ids of a history, oldest first")
        g.add_argument("--topk", type=int, default=10, help="predict: how many next items to list")

    # ---- data -------------------------------------------------------------------------------------
    def load_sequences(self, args: argparse.Namespace) -> SequenceData:
        if getattr(args, "data", None):
            users, items, times = read_interactions(args.data, getattr(args, "format", None))
            kcore = 5 if getattr(args, "kcore", None) is None else args.kcore
        else:
            users, items, times = synthetic_interactions(num_users=1500, seed=0)
            kcore = 0 if getattr(args, "kcore", None) is None else args.kcore
        return SequenceData.from_interactions(users, items, times, kcore=kcore)

    def build_data(self, args: argparse.Namespace) -> TaskData:
        num_neg = getattr(args, "num_negatives", None)
        num_neg = 100 if num_neg is None else int(num_neg)
        if num_neg < 1:
            raise ValueError(f"--num-negatives must be at least 1, got {num_neg}")
        valid = getattr(args, "valid_metric", None) or type(self).headline_metric
        if valid not in metric_names(num_neg):
            hint = ""
            if valid.startswith("uni") and "_" in valid:
                hint = (f"; the sampled protocol runs with --num-negatives {num_neg}, so its metrics are "
                        f"{sampled_prefix(num_neg)}*, e.g. {sampled_prefix(num_neg)}{valid.split('_', 1)[1]}")
            raise ValueError(f"--valid-metric {valid!r} is not a reported metric; expected one of "
                             f"{', '.join(metric_names(num_neg))}{hint}")
        self.headline_metric = valid
        self.num_negatives = num_neg
        max_len = getattr(args, "max_len", 50)
        self.data = data = self.load_sequences(args)
        self.negatives = torch.from_numpy(data.sample_negatives(num_neg, seed=0))
        seq, lengths, target = data.train_samples(max_len)
        train = _Tensors(torch.from_numpy(seq), torch.from_numpy(lengths), torch.from_numpy(target))
        info = {"num_items": data.num_items, "num_users": data.num_users, "num_interactions": data.num_interactions,
                "max_len": max_len, "num_train_samples": len(train),
                "source": args.data if getattr(args, "data", None) else "built-in synthetic interaction log"}
        return TaskData(train=train, val=_eval_set(data, "valid", max_len), info=info, collate_fn=_as_batch)

    def build_model(self, args: argparse.Namespace, data_info: dict[str, Any]) -> nn.Module:
        from hybridzoo.factory import create_model

        device = str(getattr(args, "device", None) or "auto")
        on_cpu = device.startswith("cpu") or device == "auto" and not torch.cuda.is_available()
        if getattr(args, "amp", None) == "bf16" and on_cpu:
            print("note: the recommendation models run in fp32 on the CPU under --amp bf16: their fused kernels "
                  "(layers/fused.py) are fp32, and at hidden sizes 16-64 bf16 has no products worth speeding up "
                  "(the plain bf16 path measured 2.6x slower per step); see docs/bf16.md", file=sys.stderr)
        return create_model(args.model, pretrained=getattr(args, "pretrained", None),
                            num_items=data_info["num_items"], max_len=data_info["max_len"])

    # ---- training and evaluation ------------------------------------------------------------------
    def lr_factor(self, step: int, total_steps: int, steps_per_epoch: int, args: argparse.Namespace) -> float | None:
        return 1.0 if getattr(args, "lr_schedule", "cosine") == "constant" else None  # None: the engine's cosine

    def training_step(self, model: nn.Module, batch, args: argparse.Namespace):
        seq, lengths, target = batch
        core = model.module if hasattr(model, "module") else model
        # the full-softmax CE without storing (B, num_items) logits on the CPU (exact; see layers/fused.py)
        with _fp32_on_cpu(seq.device):
            loss = linear_cross_entropy(model(seq, lengths), core.item_embedding.weight, target)
        return loss, {}

    def build_metric(self, args: argparse.Namespace, data_info: dict[str, Any]) -> "RankingMetric":
        """`data_info["eval_split"]`: whose histories are excluded from the ranking ("valid" or "test")."""
        return RankingMetric(data_info.get("eval_split", "valid"), with_loss=True,
                             num_negatives=int(self.negatives.shape[1]))

    def _rank_step(self, scores: torch.Tensor, batch, metric: "RankingMetric") -> None:
        users, _, _, target = batch
        scores = scores.float()
        target = target.to(scores.device)
        rows, items = self.data.history(users.cpu().numpy(), metric.split)
        full = full_ranking_ranks(scores, target, torch.from_numpy(rows).to(scores.device),
                                  torch.from_numpy(items).to(scores.device))
        negs = self.negatives[users.cpu()].to(scores.device)
        sampled = sampled_ranks(scores.gather(1, target[:, None]).squeeze(1), scores.gather(1, negs))
        ce = nn.functional.cross_entropy(scores, target, reduction="sum") if metric.with_loss else 0.0
        metric.update(full, sampled, ce)

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch, metric: "RankingMetric", args: argparse.Namespace) -> None:
        core = model.module if hasattr(model, "module") else model
        device = next(core.parameters()).device
        _, seq, lengths, _ = batch
        with _fp32_on_cpu(device):
            rep = core(seq.to(device), lengths.to(device))
        # scores in fp32 even under --amp bf16: bf16's 8-bit mantissa ties many of 12k item scores, and ties
        # count against the target (HR@10 of one run: 0.0233 fp32, 0.0220 from bf16 scores)
        with torch.autocast(device.type, enabled=False):
            scores = core.scores(rep.float())
        self._rank_step(scores, batch, metric)

    def evaluate(self, model: nn.Module, loader, args: argparse.Namespace,
                 data_info: dict[str, Any] | None = None) -> dict[str, float]:
        # the loader's split decides whose histories are excluded
        info = {**(data_info or {}), "eval_split": getattr(loader.dataset, "split", "valid")}
        return super().evaluate(model, loader, args, info)

    @torch.no_grad()
    def popularity_metrics(self, loader) -> dict[str, float]:
        """Both protocols for the popularity ranking (every user gets the training counts as scores)."""
        pop = torch.from_numpy(self.data.item_popularity()).double()
        metric = RankingMetric(getattr(loader.dataset, "split", "valid"), with_loss=False,
                               num_negatives=int(self.negatives.shape[1]))
        for batch in loader:
            self._rank_step(pop.expand(batch[1].shape[0], -1), batch, metric)
        return metric.compute()  # one process's view, no sync (called on rank 0 alone)

    def baselines(self, data: TaskData, args: argparse.Namespace) -> dict[str, float]:
        loader = torch.utils.data.DataLoader(data.val, batch_size=512, collate_fn=_as_batch)
        pop = self.popularity_metrics(loader)
        return {f"{k}_pop": v for k, v in pop.items() if k.endswith(("hr@10", "ndcg@10"))}

    def on_train_end(self, run_dir: Path, model: nn.Module, data: TaskData, args: argparse.Namespace):
        """Test-split metrics (model and popularity, both protocols), the item vocabulary, and a chart."""
        max_len = data.info["max_len"]
        test = torch.utils.data.DataLoader(_eval_set(self.data, "test", max_len), batch_size=512, collate_fn=_as_batch)
        model.eval()
        ours = self.evaluate(model, test, args)
        pop = self.popularity_metrics(test)
        run_dir = Path(run_dir)
        (run_dir / "items.json").write_text(json.dumps(self.data.item_tokens))
        n_neg = int(self.negatives.shape[1])
        report = {"protocols": {"hr@K, ndcg@K, mrr@K": "full ranking over all items, history excluded",
                                f"{sampled_prefix(n_neg)}*": f"target vs {n_neg} uniformly sampled unseen items"
                                + (" (the AdaMCT paper's)" if n_neg == 100 else "")},
                  "test": ours, "test_popularity": pop}
        (run_dir / "test_metrics.json").write_text(json.dumps(report, indent=2))
        _plot_metrics(run_dir / "recommendation.png", ours, pop, getattr(model, "model_name", args.model), n_neg)
        return {f"test_{k}": v for k, v in ours.items() if k.endswith(("hr@10", "ndcg@10"))} | \
               {f"test_{k}_pop": v for k, v in pop.items() if k.endswith(("hr@10", "ndcg@10"))}

    # ---- predict ----------------------------------------------------------------------------------
    eval_options = ("format", "kcore", "num_negatives", "valid_metric")
    predict_options = ("history", "topk")

    def predict(self, args: argparse.Namespace) -> None:
        """The top-K next items after a history (`--history ITEM...`, oldest first), printed (and `--json`)."""
        from hybridzoo.engine.run import load_run_from_args

        if getattr(args, "inputs", None):
            raise ValueError("recommendation predicts from item ids, not files: hybridzoo predict --run DIR "
                             "--history ITEM [ITEM ...] (the ids are listed in DIR/items.json)")
        history = list(getattr(args, "history", None) or [])
        if not history:
            raise ValueError("--history needs at least one item id, oldest first (the ids are listed in the run "
                             "folder's items.json)")
        run = load_run_from_args(args, self)
        tokens = run.data_info.get("item_tokens")
        if tokens is None:
            raise ValueError(f"{run.weights!r} comes without the run's item vocabulary (items.json); pass --run DIR, "
                             "a folder written by `hybridzoo train --task recommendation`")
        index = {str(t): i for i, t in enumerate(tokens)}
        unknown = [h for h in history if h not in index]
        if unknown:
            where = run.run_dir / "items.json" if run.run_dir is not None else "the run folder's items.json"
            raise ValueError(f"--history needs item ids seen in training; unknown: {unknown[:10]}; the "
                             f"{len(tokens) - 1} known ids are listed in {where}")
        print(run.describe(), file=sys.stderr)
        model, device = run.model, run.device
        max_len = int(run.data_info.get("max_len") or run.args.max_len)  # the length the model was trained at
        ids = [index[h] for h in history][-max_len:]
        seq = torch.zeros(1, max_len, dtype=torch.long, device=device)
        seq[0, : len(ids)] = torch.tensor(ids, device=device)
        with torch.no_grad():
            scores = model.scores(model(seq, torch.tensor([len(ids)], device=device)))[0].float().cpu()
        scores[0] = -torch.inf                  # padding
        scores[torch.tensor(ids)] = -torch.inf  # what the user already has
        topk = int(run.args.topk or 10)
        top = scores.topk(min(topk, len(tokens) - 1 - len(set(ids))))
        results = [{"rank": r, "item": str(tokens[i]), "score": float(v)}
                   for r, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1)]
        if getattr(args, "json", None) != "-":
            for row in results:
                print(f"{row['rank']:3d}. {row['item']}  (score {row['score']:.3f})")
        if getattr(args, "json", None):
            from hybridzoo.engine.logger import write_json_results

            write_json_results(args.json, {"history": history, "top": results})


def _plot_metrics(path: Path, ours: dict[str, float], pop: dict[str, float], name: str, num_negatives: int = 100) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((axes[0], "", "full ranking (all items)"),
              (axes[1], sampled_prefix(num_negatives), f"{num_negatives} sampled negatives"))
    for ax, prefix, title in panels:
        x = np.arange(len(KS))
        for off, (label, src) in zip((-0.2, 0.2), ((name, ours), ("popularity", pop))):
            ax.bar(x + off - 0.1, [src[f"{prefix}hr@{k}"] for k in KS], 0.2, label=f"{label} HR")
            ax.bar(x + off + 0.1, [src[f"{prefix}ndcg@{k}"] for k in KS], 0.2, label=f"{label} NDCG", alpha=0.6)
        ax.set_xticks(x, [f"@{k}" for k in KS])
        ax.set_title(f"test, {title}")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
