"""The training loop: run folder, exact resume, non-finite loss, options (EMA, bf16, clipping)."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hybridzoo
from hybridzoo.engine.checkpoint import load_checkpoint
from hybridzoo.engine.trainer import NonFiniteLossError, train

# A tiny run: 3 steps of 16 digits per epoch, 2 val batches.
FAST = ("--model", "hz_tiny_vit", "--batch-size", 16, "--limit-train-batches", 3, "--limit-val-batches", 2,
        "--warmup-epochs", 0.5)


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in csv.DictReader(f)]


def test_run_folder(make_args, tmp_path):
    args, task = make_args(*FAST, "--epochs", 2, "--output", tmp_path / "run")
    result = train(args, task)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"summary.json", "metrics.csv", "model.safetensors", "last.ckpt", "curves.png"}
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_top1", "val_loss", "epochs", "model", "task", "params", "val_top1_majority"):
        assert key in summary
    assert summary["epochs"] == 2 and summary["model"] == "hz_tiny_vit" and summary["params"] == 15018
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:4] == ["epoch", "train_loss", "val_loss", "val_top1"] and list(rows[0])[-5:] == ["lr", "eval_path", "train_seconds", "eval_seconds", "seconds"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # model.safetensors loads through the public factory and reproduces the trained model
    model = hybridzoo.create_model("hz_tiny_vit", pretrained=run / "model.safetensors", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), result.model.eval()(x))


def test_resume_is_exact(make_args, tmp_path):
    # augmentation, mixup/cutmix, random erasing and EMA all draw random numbers: resume must restore them
    aug = ("--mixup", 0.8, "--cutmix", 1.0, "--reprob", 0.25, "--ema", "--ema-decay", 0.9, "--seed", 7)
    straight, task = make_args(*FAST, *aug, "--epochs", 2, "--output", tmp_path / "a")
    a = train(straight, task)

    first, task = make_args(*FAST, *aug, "--epochs", 2, "--stop-after-epochs", 1, "--output", tmp_path / "b")
    b1 = train(first, task)
    assert b1.summary["completed"] is False and load_checkpoint(tmp_path / "b" / "last.ckpt")["epoch"] == 1
    resumed, task = make_args(*FAST, *aug, "--epochs", 2, "--resume", tmp_path / "b" / "last.ckpt")
    b = train(resumed, task)

    assert b.run_dir == tmp_path / "b"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ea, eb = a.ema_model.state_dict(), b.ema_model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert _rows(tmp_path / "a" / "metrics.csv") == _rows(tmp_path / "b" / "metrics.csv")
    ca, cb = load_checkpoint(tmp_path / "a" / "last.ckpt"), load_checkpoint(tmp_path / "b" / "last.ckpt")
    assert ca["step"] == cb["step"] == 6
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], cb["optimizer"]["state"][k]["exp_avg_sq"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(make_args, tmp_path, tiny):
    tiny.Exploding.explode_after = 4  # batches 1-4 fine (epoch 1 has 3 steps), step 5 is NaN
    args, task = make_args(*FAST, "--model", "hz_tiny_exploding", "--epochs", 3, "--output", tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(epoch 2, batch 2\).*last.ckpt \(end of epoch 1\) is kept"):
        train(args, task)
    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_loss_in_an_accumulated_batch_names_it_and_leaves_the_weights(make_args, tmp_path, tiny,
                                                                                 monkeypatch):
    # 2 batches a step: the check runs once a step, after both backward passes, and still names the bad batch
    tiny.Exploding.explode_after = 2  # batches 1-2 (step 1) fine, batch 3 (step 2's first) is NaN
    args, task = make_args(*FAST, "--model", "hz_tiny_exploding", "--epochs", 1, "--accum-steps", 2,
                           "--output", tmp_path)
    from hybridzoo.engine import trainer

    weights = {}
    real_step = trainer._train_one_epoch

    def keep(run, *a, **k):
        weights["model"] = run.state.model
        return real_step(run, *a, **k)
    monkeypatch.setattr(trainer, "_train_one_epoch", keep)
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 1, batch 3\).*no checkpoint had been written"):
        train(args, task)
    assert all(torch.isfinite(p).all() for p in weights["model"].parameters())  # step 2 never touched them


def test_non_finite_loss_through_the_cli(make_args, tmp_path, tiny, capsys):
    from hybridzoo.cli import main

    tiny.Exploding.explode_after = 1
    rc = main(["--plugin", str(tiny.__file__), "train", "--no-progress", *map(str, FAST),
               "--model", "hz_tiny_exploding", "--epochs", "1", "--output", str(tmp_path)])
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 2" in err and "no checkpoint had been written yet" in err


class _HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value into Python (`.item()`, `float()`, `bool()`: what makes the host wait
    for a GPU) made by the training loop and the tasks, not by the data pipeline's augmentations on the CPU."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            f = sys._getframe(1)
            while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename.endswith(__file__)):
                f = f.f_back
            name = f.f_code.co_filename if f is not None else "?"
            if "hybridzoo/engine/" in name or "hybridzoo/tasks/" in name:
                self.where.append(f"{Path(name).name}:{f.f_lineno}")
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_step(make_args, tmp_path, monkeypatch):
    """Per optimiser step, the loop reads one value from the device (the non-finite check, after the backward
    passes are queued), whatever the accumulation and the logs; the logs are read at the epoch's end."""
    from hybridzoo.engine import trainer

    args, task = make_args(*FAST, "--epochs", 1, "--accum-steps", 2, "--no-batch-split", "--output", tmp_path)
    step = task.training_step

    def with_a_log(model, batch, a):  # one log, a tensor on the device as the tasks return them
        loss, _ = step(model, batch, a)
        return loss, {"twice": 2 * loss.detach()}
    monkeypatch.setattr(task, "training_step", with_a_log)
    counts = []
    one_epoch = trainer._train_one_epoch

    def counted(*a, **k):
        with _HostReads() as reads:
            row = one_epoch(*a, **k)
        counts.append(reads.where)
        return row
    monkeypatch.setattr(trainer, "_train_one_epoch", counted)
    result = train(args, task)
    steps = 3
    # + once an epoch: the sampler's shuffle, the epoch's loss and step count, its one log
    assert len(counts) == 1 and len(counts[0]) <= steps + 5, counts
    row = result.history[-1]
    assert row["train_twice"] == pytest.approx(2 * row["train_loss"], rel=1e-6)


def test_bf16_ema_clip_and_channels_last(make_args, tmp_path):
    args, task = make_args(*FAST, "--epochs", 1, "--amp", "bf16", "--ema", "--clip-grad", 1.0, "--channels-last",
                           "--output", tmp_path)
    result = train(args, task)
    assert "val_ema_top1" in result.summary and (tmp_path / "model_ema.safetensors").is_file()
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize("flags, want", [((), True), (("--no-channels-last",), False), (("--no-fast-cpu",), False),
                                         (("--channels-last",), True)])
def test_a_model_may_choose_channels_last_training_on_the_fast_cpu_path(make_args, tmp_path, monkeypatch, capsys,
                                                                         flags, want):
    """A model with `train_channels_last` (SCTNet) trains channels-last on the fast CPU path unless told otherwise;
    --no-fast-cpu keeps channels-first, and --channels-last gives it to any model."""
    cls = type(hybridzoo.create_model("hz_tiny_vit", num_classes=10))
    monkeypatch.setattr(cls, "train_channels_last", True, raising=False)
    args, task = make_args(*FAST, "--epochs", 1, "--output", tmp_path, *flags)
    assert args.channels_last is {"--channels-last": True, "--no-channels-last": False}.get(flags[0] if flags else "")
    train(args, task)
    assert args.channels_last is want
    said = "channels-last: " in capsys.readouterr().out
    assert said == (want and not flags)   # said only when the model chose it


def test_fp16_on_cpu_is_refused(make_args, tmp_path):
    args, task = make_args(*FAST, "--epochs", 1, "--amp", "fp16", "--device", "cpu", "--output", tmp_path)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(args, task)


def test_resume_from_corrupt_checkpoint(make_args, tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"\x80\x02garbage")
    args, task = make_args(*FAST, "--epochs", 1, "--resume", bad)
    from hybridzoo.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="last.ckpt"):
        train(args, task)


def test_task_schedule_hook_and_summary_extras(make_args, tmp_path, monkeypatch):
    args, task = make_args(*FAST, "--epochs", 2, "--lr", 0.1, "--output", tmp_path / "run")
    monkeypatch.setattr(task, "lr_factor", lambda step, total, per_epoch, a: 0.5 ** (step // per_epoch))
    monkeypatch.setattr(task, "on_train_end", lambda run_dir, model, data, a: {"test_top1": 0.25})
    train(args, task)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    # the lr logged is the last step's of each epoch: 0.1·0.5 in epoch 2 after 0.5 epochs of warm-up
    assert float(rows[1]["lr"]) == pytest.approx(0.05)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_top1"] == 0.25 and "val_top1_majority" in summary
