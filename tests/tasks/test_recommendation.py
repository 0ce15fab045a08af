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
