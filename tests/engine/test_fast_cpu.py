"""`hybridzoo train`'s fp32 CPU fast path: on by default, off with --no-fast-cpu, and the same training."""

import pytest
import torch

from hybridzoo.engine.trainer import train
from hybridzoo.layers import train_fast
from hybridzoo.layers.train_fast import FastLinear, fast_training_available

pytestmark = pytest.mark.skipif(not fast_training_available(), reason="no oneDNN in this build")

FAST = ("--model", "hz_tiny_vit", "--batch-size", 16, "--limit-train-batches", 3, "--limit-val-batches", 2,
        "--warmup-epochs", 0.5, "--epochs", 1, "--lr", 1e-3)


def test_default_run_takes_the_fast_path_and_trains_the_same(make_args, tmp_path, monkeypatch):
    monkeypatch.setattr(train_fast, "MIN_WEIGHT_NUMEL", 1)  # the tiny model's layers are below the threshold
    args, task = make_args(*FAST, "--output", tmp_path / "fast")
    fast = train(args, task)
    args, task = make_args(*FAST, "--output", tmp_path / "plain", "--no-fast-cpu")
    plain = train(args, task)
    assert any(isinstance(m, FastLinear) for m in fast.model.modules())
    assert not any(isinstance(m, FastLinear) for m in plain.model.modules())
    # three AdamW steps from the same seed: the same weights and losses up to fp32 rounding
    assert fast.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-5)
    assert fast.history[0]["val_loss"] == pytest.approx(plain.history[0]["val_loss"], rel=1e-4)
    for (n, a), b in zip(fast.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    # and the weights did move (lr 0 keeps the initial ones): equal trained weights are not a given
    args, task = make_args(*FAST, "--output", tmp_path / "still", "--lr", 0.0)
    still = train(args, task).model.state_dict()
    assert max(float((a - still[n]).abs().max()) for n, a in plain.model.state_dict().items()) > 1e-3
