"""Weight-decay groups and the per-step warm-up + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from hybridzoo.engine.optim import CosineWarmupSchedule, ModelEma, build_optimizer, param_groups_weight_decay


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)


def test_no_decay_on_norms_biases_embeddings_tokens():
    net = Net()
    decay, no_decay = param_groups_weight_decay(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["conv.weight", "fc.weight"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {"cls_token", "pos_embed", "emb.weight", "conv.bias", "bn.weight",
                                                         "bn.bias", "norm.weight", "norm.bias", "fc.bias"}


def test_warmup_then_cosine_per_step():
    opt = build_optimizer(Net(), lr=1.0, weight_decay=0.0)
    s = CosineWarmupSchedule(opt, total_steps=110, warmup_steps=10, min_lr_ratio=0.01)
    lrs = [s.set_step(i) for i in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.01


def test_ema_tracks_weights():
    net = nn.Linear(2, 2)
    ema = ModelEma(net, decay=0.5)
    before = ema.module.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.module.weight, before + 0.5)
    assert not any(p.requires_grad for p in ema.module.parameters())
