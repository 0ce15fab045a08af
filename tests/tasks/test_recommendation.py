"""Ranking metrics as RecBole defines them, both protocols, and the task's pieces."""

import argparse
import math

import torch

from hybridzoo.tasks.recommendation import (RecommendationTask, full_ranking_ranks, rank_metrics,
                                            sampled_ranks)


def test_rank_metrics_hand_computed():
    ranks = torch.tensor([0, 3, 12])  # 0-based
    m = {k: float(v) / 3 for k, v in rank_metrics(ranks, ks=(1, 5, 10)).items()}
    assert m["hr@1"] == 1 / 3 and m["hr@5"] == 2 / 3 and m["hr@10"] == 2 / 3
    assert math.isclose(m["ndcg@5"], (1 / math.log2(2) + 1 / math.log2(5)) / 3)
    assert math.isclose(m["mrr@10"], (1 + 1 / 4) / 3)
    assert m["ndcg@1"] == m["hr@1"]


def test_full_ranking_excludes_history_and_padding_but_not_the_target():
    scores = torch.tensor([[9.0, 5.0, 8.0, 7.0, 1.0, 6.0]])  # item 0 is padding
    target = torch.tensor([3])
    # history {2, 3}: item 2 (score 8) is excluded; the target 3 is never excluded
    r = full_ranking_ranks(scores, target, torch.tensor([0, 0]), torch.tensor([2, 3]))
    assert r.tolist() == [0]
    r = full_ranking_ranks(scores, target, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert r.tolist() == [1]  # only item 2 beats it


def test_ties_count_against_the_target():
    assert full_ranking_ranks(torch.zeros(1, 5), torch.tensor([2]), torch.tensor([], dtype=torch.long),
                              torch.tensor([], dtype=torch.long)).tolist() == [3]
    assert sampled_ranks(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 1.5]])).tolist() == [2, 0]


def _args(**kw):
    base = dict(data=None, max_len=20, kcore=None, format=None, num_negatives=100, model="adamct_beauty",
                pretrained=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_full_ranking_matches_a_direct_count_with_ties_duplicates_and_target_in_history():
    g = torch.Generator().manual_seed(0)
    B, N = 40, 30
    scores = torch.randint(0, 6, (B, N), generator=g).float()  # many ties
    target = torch.randint(1, N, (B,), generator=g)
    rows = torch.repeat_interleave(torch.arange(B), 8)
    items = torch.randint(1, N, (B * 8,), generator=g)
    items[::5] = target[rows[::5]]  # the target is sometimes in the history (a repeat purchase)
    expected = []
    for b in range(B):
        excluded = {0} | {int(i) for r, i in zip(rows, items) if r == b} - {int(target[b])}
        t = scores[b, target[b]]
        others = [j for j in range(N) if j not in excluded and j != int(target[b])]
        expected.append(sum(bool(scores[b, j] >= t) for j in others))
    assert full_ranking_ranks(scores, target, rows, items).tolist() == expected


def test_datasets_fetch_whole_batches_and_still_work_with_the_default_collate():
    from hybridzoo.tasks.recommendation import _Rows, _Tensors, _as_batch

    ds = _Tensors(torch.arange(10).view(5, 2), torch.arange(5))
    rows = ds.__getitems__([3, 1])
    assert isinstance(rows, _Rows) and len(rows) == 2
    seq, n = _as_batch(rows)
    assert seq.tolist() == [[6, 7], [2, 3]] and n.tolist() == [3, 1]
    # a plain DataLoader (PyTorch's default collate), also through a Subset
    sub = torch.utils.data.Subset(ds, [4, 0, 2])
    seq, n = next(iter(torch.utils.data.DataLoader(sub, batch_size=3)))
    assert seq.tolist() == [[8, 9], [0, 1], [4, 5]] and n.tolist() == [4, 0, 2]


def test_task_data_model_and_evaluation_on_the_builtin_log():
    task = RecommendationTask()
    args = _args()
    data = task.build_data(args)
    assert data.info["num_items"] > 500 and len(data.val) == data.info["num_users"]
    model = task.build_model(args, data.info)
    assert model.max_len == 20 and model.num_items == data.info["num_items"]
    seq, lengths, target = data.train[:64]
    loss, _ = task.training_step(model, (seq, lengths, target), args)
    assert math.isclose(loss.item(), math.log(data.info["num_items"]), rel_tol=0.1)  # near-uniform at init
    sub = torch.utils.data.Subset(data.val, range(300))
    sub.split = "valid"
    m = task.evaluate(model.eval(), torch.utils.data.DataLoader(sub, batch_size=128), args)
    for k in ("hr@10", "ndcg@10", "mrr@10", "uni100_hr@10", "uni100_ndcg@10", "loss"):
        assert k in m
    assert m["uni100_hr@10"] < 0.3  # untrained: about 10/101 against sampled negatives
    pop = task.baselines(data, args)
    assert pop["uni100_hr@10_pop"] > pop["hr@10_pop"] > 0


def test_train_and_predict_end_to_end_through_the_cli(tmp_path, capsys):
    """`hybridzoo train --task recommendation --data <csv>` then `hybridzoo predict --history ...`."""
    import json

    from hybridzoo.cli import main

    rows = ["user,item,timestamp"]
    for u in range(40):
        for t in range(8):
            rows.append(f"u{u},i{(u + 3 * t) % 25},{1000 + t}")
    data = tmp_path / "log.csv"
    data.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--task", "recommendation", "--model", "adamct_beauty", "--data", str(data), "--kcore", "0",
                 "--max-len", "10", "--epochs", "2", "--batch-size", "64", "--output", str(run), "--no-progress",
                 "--valid-metric", "uni10_hr@10", "--num-negatives", "10"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["num_items"] == 26 and summary["data"]["max_len"] == 10
    # named by the actual count of negatives (today: uni100_* whatever --num-negatives said)
    assert "best_val_uni10_hr@10" in summary and "test_ndcg@10" in summary and "test_uni10_hr@10_pop" in summary
    assert not [k for k in summary if "uni100" in k]
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(metrics) >= {"protocols", "test", "test_popularity"}
    assert "uni10_*" in metrics["protocols"] and "uni10_ndcg@20" in metrics["test"]
    assert (run / "recommendation.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["predict", "--task", "recommendation", "--run", str(run), "--history", "i1", "i4", "i7",
                 "--topk", "5"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 5 and lines[0].lstrip().startswith("1.")
    listed = [ln.split()[1] for ln in lines]
    assert not {"i1", "i4", "i7", "[PAD]"} & set(listed)  # the history and padding are never recommended
    assert main(["predict", "--task", "recommendation", "--run", str(run), "--history", "nope"]) != 0
    err = capsys.readouterr().err
    assert "unknown: ['nope']" in err and f"25 known ids are listed in {run / 'items.json'}" in err


def test_valid_metric_and_chart_follow_the_number_of_negatives(tmp_path, monkeypatch):
    import matplotlib.figure
    import pytest

    from hybridzoo.tasks.recommendation import _plot_metrics, metric_names

    task = RecommendationTask()
    with pytest.raises(ValueError, match=r"--valid-metric 'uni100_hr@10'.*--num-negatives 10.*e\.g\. uni10_hr@10"):
        task.build_data(_args(num_negatives=10, valid_metric="uni100_hr@10"))
    with pytest.raises(ValueError, match="--num-negatives must be at least 1"):
        task.build_data(_args(num_negatives=0))
    assert "uni10_mrr@20" in metric_names(10) and "uni100_hr@10" in metric_names()
    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: titles.extend(ax.get_title() for ax in fig.axes))
    ours = {f"{p}{m}@{k}": 0.5 for p in ("", "uni10_") for m in ("hr", "ndcg") for k in (1, 5, 10, 20)}
    _plot_metrics(tmp_path / "x.png", ours, ours, "adamct", 10)
    assert titles == ["test, full ranking (all items)", "test, 10 sampled negatives"]


def test_bf16_evaluation_ranks_on_fp32_scores():
    """Under `--amp bf16` the item scores stay fp32 (on a GPU the encoder runs in bf16; on the CPU it stays fp32
    too): bf16's 8-bit mantissa would tie items whose scores differ by less than 0.4%, and ties count against
    the target."""
    task = RecommendationTask()
    args = _args()
    data = task.build_data(args)
    torch.manual_seed(0)
    model = task.build_model(args, data.info).eval()
    with torch.no_grad():  # item i scores (1 + 1e-4·i)·(h·e): distinct in fp32, in buckets of ~40 ties in bf16
        w = model.item_embedding.weight
        w.copy_(torch.randn(w.shape[1]) * (1 + 1e-4 * torch.arange(w.shape[0], dtype=torch.float32))[:, None])
    sub = torch.utils.data.Subset(data.val, range(200))
    sub.split = "valid"
    loader = torch.utils.data.DataLoader(sub, batch_size=100)
    ref = task.evaluate(model, loader, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task.evaluate(model, loader, args)
    assert 0 < ref["hr@20"] < 1
    for k in ref:
        if k != "loss":  # the ranks must not move
            assert out[k] == ref[k], k


def test_bf16_autocast_leaves_the_cpu_training_step_in_fp32():
    """Under --amp bf16 on the CPU the recommendation step is the fp32 step, exactly (the fused fp32 kernels)."""
    task = RecommendationTask()
    args = _args()
    data = task.build_data(args)
    model = task.build_model(args, data.info).train()
    batch = data.train[:256]

    def step(amp: bool):
        torch.manual_seed(0)  # the same dropout draws
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = task.training_step(model, batch, args)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (l32, g32), (l16, g16) = step(False), step(True)
    assert l16.dtype is torch.float32 and torch.equal(l16, l32)
    assert all(torch.equal(a, b) for a, b in zip(g16, g32))
