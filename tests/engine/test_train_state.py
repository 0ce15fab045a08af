"""The TrainState: a run stopped and resumed equals the straight run for every task, early stopping
included; the early stop restores the best epoch's weights; gradient accumulation equals the larger batch."""

from pathlib import Path

import pytest
import torch
from _helpers import small_sr_val_folder  # tests/conftest.py puts tests/ on sys.path
from safetensors.torch import load_file

from hybridzoo.engine.checkpoint import load_checkpoint
from hybridzoo.engine.trainer import train

COMMON = ["--limit-train-batches", "2", "--limit-val-batches", "2", "--batch-size", "4", "--eval-batch-size", "3",
          "--no-progress", "--device", "cpu", "--ema", "--ema-decay", "0.5", "--seed", "3"]
TASKS = {
    "classification": ["--model", "hz_tiny_vit", "--reprob", "0.5", "--mixup", "0.8"],
    "segmentation": ["--model", "hz_tiny_seg", "--synthetic-size", "32", "--synthetic-train", "16",
                     "--synthetic-val", "6", "--num-classes", "3"],
    "super-resolution": ["--model", "hz_tiny_sr_x2", "--patch-size", "12", "--train-repeat", "2",
                         "--eval-batch-size", "1", "--limit-val-batches", "1"],  # one image of --val-data
    "recommendation": ["--model", "hz_tiny_rec", "--max-len", "10"],
    "land-cover": ["--model", "hz_tiny_lc", "--scene-size", "32"],
}


def _args(task_name, *argv):
    from hybridzoo.cli import build_parser
    from hybridzoo.tasks.base import get_task

    task = get_task(task_name)
    return build_parser(task).parse_args(["train", "--task", task_name, *COMMON, *TASKS[task_name],
                                          *map(str, argv)]), task


def _weights(run, name="model.safetensors"):
    return load_file(str(run / name))


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _rows(history):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in history]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_stop_and_resume_equals_the_straight_run(task_name, tiny, tmp_path, monkeypatch):
    """With --early-stop 1 and --ema: the straight run stops at epoch 2 because epoch 2 does not beat epoch 1;
    the stopped run must carry the early-stop state (best score, patience, best weights) through last.ckpt."""
    # super-resolution validates on a small crop (small_sr_val_folder), not the built-in photographs evaluated whole
    val = ["--val-data", small_sr_val_folder(tmp_path / "val", count=1)] if task_name == "super-resolution" else []
    args, task = _args(task_name, *val, "--epochs", 4, "--early-stop", 1, "--output", tmp_path / "a")
    if task_name == "super-resolution":
        # the tiny model's PSNR rises every epoch, so the stop would never fire; scored lower-is-better,
        # epoch 1 is the best and the stop fires at epoch 2, after the resume
        monkeypatch.setattr(type(task), "higher_is_better", False)
    a = train(args, task)
    ca = load_checkpoint(tmp_path / "a" / "last.ckpt")
    # the premise: the early stop fired at epoch 2, one epoch after the point where the other run stops
    assert len(a.history) == 2 and ca["early_stop"]["best_epoch"] == 1 and ca["early_stop"]["since_best"] == 1

    args, task2 = _args(task_name, *val, "--epochs", 4, "--early-stop", 1, "--stop-after-epochs", 1,
                        "--output", tmp_path / "b")
    b1 = train(args, task2)
    assert b1.summary["completed"] is False and len(b1.history) == 1
    args, task2 = _args(task_name, *val, "--epochs", 4, "--early-stop", 1, "--resume", tmp_path / "b" / "last.ckpt")
    b = train(args, task2)

    assert _rows(a.history) == _rows(b.history)
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"), "model.safetensors (the best epoch's)")
    _assert_same(_weights(tmp_path / "a", "model_ema.safetensors"), _weights(tmp_path / "b", "model_ema.safetensors"),
                 "model_ema.safetensors")
    cb = load_checkpoint(tmp_path / "b" / "last.ckpt")
    _assert_same(ca["model"], cb["model"], "last.ckpt model (epoch 2)")
    _assert_same(ca["early_stop"]["best_weights"], cb["early_stop"]["best_weights"], "best weights")
    assert ca["step"] == cb["step"] and ca["epoch"] == cb["epoch"] == 2
    for k, v in ca["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, cb["optimizer"]["state"][k][name]), f"optimizer state {k}.{name}"
    # the restore is real: the final weights are epoch 1's, not the last epoch's
    assert not all(torch.equal(v, ca["model"][k]) for k, v in _weights(tmp_path / "a").items())


def test_early_stop_restores_the_best_epochs_weights(tiny, tmp_path):
    args, task = _args("classification", "--epochs", 4, "--early-stop", 1, "--output", tmp_path / "es")
    es = train(args, task)
    ckpt = load_checkpoint(tmp_path / "es" / "last.ckpt")
    best = ckpt["early_stop"]["best_epoch"]
    assert len(es.history) < 4 and best < len(es.history)
    # the same run stopped (not early) right after the best epoch holds that epoch's weights
    args, task = _args("classification", "--epochs", 4, "--stop-after-epochs", best, "--output", tmp_path / "ref")
    train(args, task)
    best_weights = _weights(tmp_path / "ref")
    _assert_same(_weights(tmp_path / "es"), best_weights, "model.safetensors vs the best epoch's weights")
    _assert_same(es.model.state_dict(), best_weights, "the returned model vs the best epoch's weights")
    assert not all(torch.equal(v, best_weights[k]) for k, v in ckpt["model"].items())  # the last epoch moved on
    assert es.summary["best_epoch"] == best


def test_resume_of_an_early_stopped_run_stays_stopped(tiny, tmp_path):
    args, task = _args("classification", "--epochs", 4, "--early-stop", 1, "--output", tmp_path / "run")
    first = train(args, task)
    args, task = _args("classification", "--epochs", 4, "--early-stop", 1, "--resume", tmp_path / "run" / "last.ckpt")
    again = train(args, task)
    assert len(again.history) == len(first.history) < 4
    _assert_same(again.model.state_dict(), first.model.state_dict(), "the best weights")


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_steps_equal_the_larger_batch(tiny, tmp_path, monkeypatch, accum):
    """N batches of B accumulated = one batch of N·B: the same samples (the sampler's order is fixed by the
    seed), the loss of each batch weighed 1/N; 2 optimiser steps, weights equal within float tolerance.
    SGD with momentum, whose step is proportional to the gradient (Adam's is not: it would hide a wrong
    loss normalisation)."""
    base = ["--model", "hz_tiny_vit", "--crop-scale", "1.0", "--epochs", "1", "--limit-train-batches", "2",
            "--limit-val-batches", "1", "--no-progress", "--device", "cpu", "--warmup-epochs", "0", "--lr", "0.5"]
    from hybridzoo.cli import build_parser
    from hybridzoo.tasks.base import get_task

    task = get_task("classification")
    monkeypatch.setattr(task, "build_optimizer", lambda model, args: torch.optim.SGD(model.parameters(), lr=args.lr,
                                                                                     momentum=0.9))
    big = train(build_parser(task).parse_args(["train", *base, "--batch-size", str(4 * accum),
                                               "--output", str(tmp_path / "big")]), task)
    acc = train(build_parser(task).parse_args(["train", *base, "--batch-size", "4", "--accum-steps", str(accum),
                                               "--output", str(tmp_path / "acc")]), task)
    assert load_checkpoint(tmp_path / "acc" / "last.ckpt")["step"] == 2
    sb, sa = big.model.state_dict(), acc.model.state_dict()
    for k in sb:
        torch.testing.assert_close(sa[k], sb[k], atol=2e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert acc.history[0]["train_loss"] == pytest.approx(big.history[0]["train_loss"], rel=1e-5)


def test_accum_steps_must_be_positive(tiny, tmp_path, capsys):
    from hybridzoo.cli import main

    with pytest.raises(SystemExit) as exit_:   # refused by the option parser, before any work
        main(["--plugin", str(Path(__file__).resolve().parents[1] / "hz_tiny_models.py"), "train", "--model",
              "hz_tiny_vit", "--accum-steps", "0", "--no-progress", "--output", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "--accum-steps: expected a positive integer, got 0" in capsys.readouterr().err
