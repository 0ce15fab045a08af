"""`hybridzoo train`'s fp32 CPU fast path: on by default, off with --no-fast-cpu, and the same training."""

import pytest
import torch

from hybridzoo.engine import trainer
from hybridzoo.engine.checkpoint import atomic_save, load_checkpoint
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


@pytest.mark.parametrize("task_name, argv", [
    ("super-resolution", ("--model", "act_tiny_x2", "--patch-size", 12, "--batch-size", 4)),
    ("land-cover", ("--model", "wetmapformer_small", "--scene-size", 48, "--batch-size", 32)),
])
def test_batch_split_trains_the_other_tasks(task_name, argv, tmp_path, two_threads, capsys):
    """Super-resolution and land cover train by batch split by default (Task.batch_split), with the whole batch's
    losses over three steps; segmentation does not split (it lost to the whole batch, RESULTS.md session 32). The
    step's gradients are checked in tests/layers/test_batch_split_train.py; the weights afterwards are not compared
    to 1e-5: AdamW turns the rounding noise of gradients that are 0 in theory (a bias before a BatchNorm, attention's
    key bias) into steps of the learning rate, and a BatchNorm's running mean follows such a bias only in part."""
    from hybridzoo.cli import build_parser
    from hybridzoo.tasks.base import get_task

    task = get_task(task_name)
    res = {}
    for name, extra in (("split", ()), ("whole", ("--no-batch-split",)), ("still", ("--lr", 0.0))):
        argv_all = ["train", "--task", task_name, "--no-progress", *map(str, argv), "--epochs", "1",
                    "--limit-train-batches", "3", "--limit-val-batches", "1", "--output", str(tmp_path / name),
                    *map(str, extra)]
        res[name] = train(build_parser(task).parse_args(argv_all), task)
        assert ("batch split: 2 threads each train their share" in capsys.readouterr().out) == (name != "whole")
    split, whole, still = (res[k].history[0] for k in ("split", "whole", "still"))
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert split["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-2)
    # and the three steps did change the function (lr 0 keeps the initial one): equal losses are not a given
    assert abs(whole["train_loss"] - still["train_loss"]) > 1e-3 * abs(still["train_loss"])
    assert getattr(get_task("segmentation"), "batch_split", False) is False


def test_batch_split_off_is_said(make_args, tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args, task = make_args(*FAST, "--output", tmp_path / "one")
        train(args, task)
    finally:
        torch.set_num_threads(before)
    assert "batch split off: one intra-op thread" in capsys.readouterr().out


def test_a_task_that_does_not_split_says_why():
    """The default training path says why it is not the batch split (issue 16: "or says why not"): each task
    that does not split names its own reason, and the trainer's line carries it."""
    import argparse

    from hybridzoo.engine import distributed
    from hybridzoo.tasks.base import TASK_REGISTRY, Task, get_task

    get_task("classification")   # registers every task
    generic = Task.batch_split_off
    args = argparse.Namespace(batch_split=True, fast_cpu=True, amp="none", compile=False)
    info = distributed.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, cls in sorted(TASK_REGISTRY.items()):
            task = cls()
            blocker = trainer._batch_split_blocker(torch.nn.Linear(2, 2), args, info, task)
            if task.batch_split:
                assert blocker is None, name
            else:
                assert task.batch_split_off != generic, f"{name}: no reason of its own for not splitting"
                assert blocker == f"the {name} task's training step is not split: {task.batch_split_off}"
    finally:
        torch.set_num_threads(before)
    assert {n for n, c in TASK_REGISTRY.items() if not c.batch_split} >= {"segmentation", "recommendation"}


def test_the_validation_path_follows_from_the_history_alone():
    path = trainer._validation_path
    eager = {"epoch": 1, "eval_path": "eager", "eval_seconds": 4.0}
    assert path([], True) == "eager" and path([eager], True) == "oneDNN"
    for copy_seconds, kept in ((2.0, "oneDNN"), (4.0, "eager"), (5.0, "eager")):
        history = [eager, {"epoch": 2, "eval_path": "oneDNN", "eval_seconds": copy_seconds}]
        assert path(history, True) == kept
        # the first time of each path decides: the kept path's own later epochs do not reopen the comparison
        assert path(history + [{"epoch": 3, "eval_path": kept, "eval_seconds": 9.0}], True) == kept
        assert path(history, False) == "eager"
    # epochs validated without the choice (--no-fast-cpu, --amp) do not count: the comparison starts when it can
    assert path([{"epoch": 1, "eval_seconds": 1.0}], True) == "eager"


def test_validation_times_eager_then_the_frozen_copy_and_never_moves_the_training(make_args, tmp_path, monkeypatch,
                                                                                 capsys):
    """Three epochs: eager, then the copy, then the faster; the same scores as the training model's to fp32
    rounding, and the same training bit for bit as a run validated eager throughout, even when building the copy
    draws from the global generator."""
    real, built = trainer.optimize_for_cpu_inference, []

    def drawing_build(model):
        built.append(torch.rand(1))     # a build that draws: validation must leave the training's stream alone
        return real(model)

    monkeypatch.setattr(trainer, "optimize_for_cpu_inference", drawing_build)
    args, task = make_args(*FAST, "--epochs", 3, "--ema", "--ema-decay", 0.9, "--output", tmp_path / "fast")
    fast = train(args, task)
    paths = [row["eval_path"] for row in fast.history]
    first = {row["eval_path"]: row["eval_seconds"] for row in fast.history[:2]}
    assert paths[:2] == ["eager", "oneDNN"] and paths[2] == trainer._validation_path(fast.history[:2], True)
    assert len(built) == 2 * paths.count("oneDNN")            # the model's copy and the EMA's, at every such epoch
    assert f"validation on the CPU: the {paths[2]} path from the next epoch on (eager {first['eager']:.1f} s" \
        in capsys.readouterr().out

    monkeypatch.setattr(trainer, "_validation_path", lambda history, fast: "eager")
    args, task = make_args(*FAST, "--epochs", 3, "--ema", "--ema-decay", 0.9, "--output", tmp_path / "eager")
    eager = train(args, task)
    assert _same_bytes(tmp_path / "fast", tmp_path / "eager")
    assert _same_bytes(tmp_path / "fast", tmp_path / "eager", "model_ema.safetensors")
    for a, b in zip(fast.history, eager.history):
        assert a["train_loss"] == b["train_loss"]
        for key in ("val_loss", "val_top1", "val_ema_loss", "val_ema_top1"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_no_fast_cpu_validates_the_training_model(make_args, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "optimize_for_cpu_inference", lambda model: pytest.fail("a frozen copy was built"))
    args, task = make_args(*FAST, "--epochs", 2, "--no-fast-cpu", "--output", tmp_path / "plain")
    result = train(args, task)
    assert all("eval_path" not in row and row["eval_seconds"] > 0 for row in result.history)


@pytest.mark.parametrize("kept", ["eager", "oneDNN"])
def test_a_resumed_run_validates_by_its_checkpoints_history(make_args, tmp_path, monkeypatch, kept):
    args, task = make_args(*FAST, "--epochs", 3, "--stop-after-epochs", 2, "--output", tmp_path / "run")
    train(args, task)
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert [row["eval_path"] for row in ckpt["history"]] == ["eager", "oneDNN"]
    # the times this run measured, set so that `kept` wins: the resumed epoch must follow them
    ckpt["history"][0]["eval_seconds"], ckpt["history"][1]["eval_seconds"] = (1.0, 2.0) if kept == "eager" else (2.0, 1.0)
    atomic_save(ckpt, tmp_path / "run" / "last.ckpt")
    real, built = trainer.optimize_for_cpu_inference, []
    monkeypatch.setattr(trainer, "optimize_for_cpu_inference", lambda model: built.append(1) or real(model))
    args, task = make_args(*FAST, "--epochs", 3, "--resume", tmp_path / "run" / "last.ckpt")
    resumed = train(args, task)
    assert [row["eval_path"] for row in resumed.history] == ["eager", "oneDNN", kept]
    assert len(built) == (kept == "oneDNN")
