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



def _same_bytes(a, b, file: str = "model.safetensors") -> bool:
    """Every tensor of the two files bit for bit (the files' metadata order varies from write to write)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / file), load_file(b / file)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_batch_split_is_the_default_and_reproducible(make_args, tmp_path, two_threads, capsys):
    """Two runs with drop-path, mixup, label smoothing, clipping and EMA write the same bytes; a resumed run
    continues exactly; the split's step is the whole-batch step (no drop-path: the same weights to fp32
    rounding, and the same logged loss)."""
    aug = ("--drop-path", 0.5, "--mixup", 0.8, "--smoothing", 0.1, "--clip-grad", 1.0, "--ema", "--ema-decay", 0.9)
    runs = {}
    for name, extra in (("a", ()), ("b", ()), ("c", ("--stop-after-epochs", 1)), ("whole", ("--no-batch-split",))):
        args, task = make_args(*FAST, *aug, "--epochs", 2, "--output", tmp_path / name, *extra)
        runs[name] = train(args, task)
        out = capsys.readouterr().out
        assert ("batch split: 2 threads each train their share" in out) == (name != "whole"), name
    args, task = make_args(*FAST, *aug, "--epochs", 2, "--resume", tmp_path / "c" / "last.ckpt")
    train(args, task)
    assert _same_bytes(tmp_path / "a", tmp_path / "b") and _same_bytes(tmp_path / "a", tmp_path / "c")
    assert _same_bytes(tmp_path / "a", tmp_path / "c", "model_ema.safetensors")
    # the parts draw other drop-path masks than the whole batch does: other weights (the masks are used)
    assert not _same_bytes(tmp_path / "a", tmp_path / "whole")

    no_drop = [a for a in aug if a not in ("--drop-path", 0.5)]
    res = {}
    for name, extra in (("split0", ()), ("whole0", ("--no-batch-split",))):
        args, task = make_args(*FAST, *no_drop, "--epochs", 1, "--output", tmp_path / name, *extra)
        res[name] = train(args, task)
    assert res["split0"].history[0]["train_loss"] == pytest.approx(res["whole0"].history[0]["train_loss"], rel=1e-5)
    for (n, a), b in zip(res["split0"].model.state_dict().items(), res["whole0"].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_batch_split_with_batchnorm_is_the_whole_batch_training(make_args, tmp_path, two_threads, capsys):
    """A model with BatchNorm2d trains by batch split by default, with the whole batch's statistics: the same
    logged losses (validation reads the running statistics), weights and running statistics as --no-batch-split."""
    res = {}
    for name, extra in (("split", ()), ("whole", ("--no-batch-split",))):
        args, task = make_args(*FAST, "--model", "hz_tiny_bn", "--output", tmp_path / name, *extra)
        res[name] = train(args, task)
        assert ("batch split: 2 threads each train their share" in capsys.readouterr().out) == (name == "split")
    split, whole = res["split"], res["whole"]
    assert split.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=1e-5)
    assert split.history[0]["val_loss"] == pytest.approx(whole.history[0]["val_loss"], rel=1e-4)
    state = split.model.state_dict()
    assert int(state["bn.num_batches_tracked"]) == 3
    for n, b in whole.model.state_dict().items():
        torch.testing.assert_close(state[n], b, rtol=1e-4, atol=1e-5, msg=n)


def test_batch_split_off_is_said(make_args, tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args, task = make_args(*FAST, "--output", tmp_path / "one")
        train(args, task)
    finally:
        torch.set_num_threads(before)
    assert "batch split off: one intra-op thread" in capsys.readouterr().out
