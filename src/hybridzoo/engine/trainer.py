"""The training loop: one function, `train(args)`, that any task plugs into.

    hybridzoo train                                                   # cvt_tiny_demo on the built-in digits
    hybridzoo train --model deit_tiny_patch16_224 --data ~/imagenette --epochs 100 --amp bf16
    torchrun --nproc_per_node=4 -m hybridzoo train --model cvt_13 --data ~/imagenet --batch-size 128
    hybridzoo train --resume runs/20250101-120000-cvt_13/last.ckpt     # continues exactly

The engine owns what every task shares — devices, the process group, the optimiser and its
schedule, autocast, EMA, gradient clipping, checkpoints and the run folder — and asks the task
(`hybridzoo.tasks.base.Task`) for data, model, loss and metrics. It reads top to bottom:
set up → build → (resume) → for each epoch: train steps, evaluate, write the run folder.

`--batch-size` is per process: under torchrun the global batch is batch-size × processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from hybridzoo.engine import distributed
from hybridzoo.engine.checkpoint import (CheckpointError, atomic_save, get_rng_state, load_checkpoint, plain_args,
                                         save_weights, set_rng_state)
from hybridzoo.engine.logger import format_row, plot_curves, write_metrics_csv, write_summary
from hybridzoo.engine.optim import CosineWarmupSchedule, ModelEma, build_optimizer

__all__ = ["train", "evaluate", "TrainResult", "NonFiniteLossError", "ENGINE_DEFAULTS", "fill_defaults",
           "default_run_dir", "seed_everything", "move_to_device", "AMP_DTYPES"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Engine options and their defaults; None means "the task's default" (Task.default_epochs, ...).
ENGINE_DEFAULTS: dict[str, Any] = {
    "task": None, "model": None, "data": None, "epochs": None, "batch_size": None, "eval_batch_size": None,
    "lr": None, "weight_decay": None, "warmup_epochs": None, "min_lr": 1e-6, "output": None, "resume": None,
    "seed": 0, "device": "auto", "workers": None, "amp": "none", "compile": False, "ema": False,
    "ema_decay": 0.9998, "clip_grad": None, "pretrained": None, "channels_last": False,
    "limit_train_batches": None, "limit_val_batches": None, "stop_after_epochs": None, "progress": True,
    "early_stop": None, "layer_decay": None,
}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step touched the weights."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path | None
    ema_model: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def fill_defaults(args: argparse.Namespace, task) -> argparse.Namespace:
    """Complete `args` with the engine's and the task's defaults (for callers that build args by hand)."""
    for k, v in ENGINE_DEFAULTS.items():
        if getattr(args, k, None) is None and v is not None:
            setattr(args, k, v)
        elif not hasattr(args, k):
            setattr(args, k, v)
    args.task = task.name
    args.model = args.model or task.default_model
    for k, task_attr in (("epochs", "default_epochs"), ("batch_size", "default_batch_size"),
                         ("lr", "default_lr"), ("weight_decay", "default_weight_decay")):
        if getattr(args, k) is None:
            setattr(args, k, getattr(task, task_attr))
    if args.warmup_epochs is None:
        args.warmup_epochs = getattr(task, "default_warmup_epochs", 0)
    if args.workers is None:
        args.workers = getattr(task, "default_workers", 0)
    return args


def default_run_dir(model: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{model}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.ndim == 4 else t
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


class DeviceLoader:
    """A loader whose batches arrive on the device, cut to `limit` batches if given."""

    def __init__(self, loader: DataLoader, device: torch.device, limit: int | None = None, channels_last: bool = False):
        self.loader, self.device, self.limit, self.channels_last = loader, device, limit, channels_last

    def __len__(self) -> int:
        n = len(self.loader)
        return min(n, self.limit) if self.limit else n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.limit and i >= self.limit:
                break
            yield move_to_device(batch, self.device, self.channels_last)

    @property
    def dataset(self):
        return self.loader.dataset


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (it relies on a gradient scaler); use --amp bf16 on the CPU")
    return dtype


def _build_loaders(data, args, info: distributed.DistInfo, task) -> tuple[DataLoader, DistributedSampler, DataLoader | None]:
    pin = info.device.type == "cuda"
    # The same sampler on one or many processes: the order is a function of (seed, epoch) only, so a
    # resumed run and an N-process run see exactly what the straight single-process run sees.
    sampler = DistributedSampler(data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=args.seed, drop_last=info.world_size > 1)
    train_loader = DataLoader(data.train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                              pin_memory=pin, drop_last=len(sampler) > args.batch_size, collate_fn=data.collate_fn,
                              persistent_workers=False)
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    if getattr(task, "distributed_eval", False):
        val_sampler = distributed.ShardSampler(data.val, info.world_size, info.rank)
    elif info.is_main:
        val_sampler = None
    else:
        return train_loader, sampler, None
    val_loader = DataLoader(data.val, batch_size=eval_bs, sampler=val_sampler, shuffle=False, num_workers=args.workers,
                            pin_memory=pin, collate_fn=data.collate_fn)
    return train_loader, sampler, val_loader


def _evaluate(task, model: nn.Module, loader: DataLoader | None, args, info: distributed.DistInfo,
              amp_dtype: torch.dtype | None) -> dict[str, float]:
    """The task's metrics on the validation set, the same dict on every process.

    Tasks with `distributed_eval = True` reduce over processes themselves (each sees a shard);
    for the others rank 0 evaluates the whole set and broadcasts the result.
    """
    was_training = model.training
    model.eval()
    metrics = None
    if loader is not None:
        dl = DeviceLoader(loader, info.device, args.limit_val_batches, args.channels_last)
        with torch.no_grad(), torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            metrics = {k: float(v) for k, v in task.evaluate(model, dl, args).items()}
    if not getattr(task, "distributed_eval", False):
        metrics = distributed.broadcast_object(metrics)
    model.train(was_training)
    return metrics


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train(args: argparse.Namespace, task=None) -> TrainResult:
    """Train `args.model` on `args.task`'s data; rank 0 writes the run folder. See the module docstring."""
    from hybridzoo.tasks.base import get_task

    task = task if task is not None else get_task(args.task or "classification")
    args = fill_defaults(args, task)
    info = distributed.setup(args.device)
    try:
        return _train(args, task, info)
    finally:
        distributed.cleanup(info)


def _train(args: argparse.Namespace, task, info: distributed.DistInfo) -> TrainResult:
    device, main = info.device, info.is_main
    amp_dtype = _amp_dtype(args.amp, device)

    # --- build: the same seed on every process gives the same initial weights (DDP checks them too)
    seed_everything(args.seed)
    data = task.build_data(args)
    model = task.build_model(args, data.info).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    from hybridzoo.profile import count_params
    n_params = count_params(model)
    # different augmentation streams per process
    seed_everything(args.seed + info.rank)

    train_loader, train_sampler, val_loader = _build_loaders(data, args, info, task)
    steps_per_epoch = len(train_loader) if not args.limit_train_batches else min(len(train_loader), args.limit_train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"no training batches: {len(data.train)} samples, batch size {args.batch_size} on "
                         f"{info.world_size} process(es)")
    optimizer = task.build_optimizer(model, args) or build_optimizer(model, args.lr, args.weight_decay,
                                                                     layer_decay=getattr(args, "layer_decay", None))
    total_steps = args.epochs * steps_per_epoch
    decay_fn = None
    if task.lr_factor(0, total_steps, steps_per_epoch, args) is not None:
        def decay_fn(s: int) -> float:
            return task.lr_factor(s, total_steps, steps_per_epoch, args)
    schedule = CosineWarmupSchedule(optimizer, total_steps=total_steps,
                                    warmup_steps=int(round(args.warmup_epochs * steps_per_epoch)),
                                    min_lr_ratio=min(1.0, args.min_lr / args.lr) if args.lr > 0 else 0.0,
                                    decay_fn=decay_fn)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    ema = ModelEma(model, args.ema_decay) if args.ema else None

    run_dir = Path(args.output) if args.output else (Path(args.resume).parent if args.resume else default_run_dir(args.model))
    args.output = str(run_dir)
    ckpt_path = run_dir / "last.ckpt"

    # --- resume: every piece of state, including each process's random generators
    start_epoch, step, history = 0, 0, []
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        saved_model = ckpt.get("args", {}).get("model")
        if saved_model and saved_model != args.model:
            raise CheckpointError(f"{args.resume!r} was trained with --model {saved_model}, not {args.model}")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{args.resume!r} does not fit this model/optimizer: {e}") from e
        schedule.load_state_dict(ckpt.get("schedule", {"step_count": ckpt["step"]}))
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, step, history = int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt.get("history", []))
        rngs = ckpt.get("rng", [])
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        elif main:
            print(f"note: {args.resume} was written by {len(rngs)} process(es), this run has {info.world_size}; "
                  "random streams restart from the seed, so the resumed run is not bitwise identical")
        if main:
            print(f"resumed from {args.resume} at epoch {start_epoch}, step {step}")

    train_model: nn.Module = model
    if info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"{task.name}: {args.model} ({n_params / 1e6:.2f}M params) on {device}"
              f"{f' × {info.world_size} processes' if info.world_size > 1 else ''}; "
              f"{len(data.train)} train / {len(data.val)} val samples; {steps_per_epoch} steps/epoch; "
              f"run folder {run_dir}")

    headline = task.headline_metric
    completed = True
    epoch = start_epoch
    # --early-stop N: stop when the headline metric has not improved for N epochs, keep the best weights
    best_score, best_state, since_best = None, None, 0
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        log_sums: dict[str, float] = {}
        n_steps = 0
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=main and args.progress)
        lr = optimizer.param_groups[0]["lr"]
        for i, batch in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            batch = move_to_device(batch, device, args.channels_last)
            lr = schedule.set_step(step)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, logs = task.training_step(train_model, batch, args)

            # Checked before backward, on every process at once (one tiny all-reduce), so a NaN on any
            # process stops all of them before the weights or the last good checkpoint are touched.
            bad = distributed.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
            if bad.item() > 0:
                bar.close()
                kept = (f"the last good checkpoint {ckpt_path} (end of epoch {epoch}) is kept"
                        if main and ckpt_path.is_file() else "no checkpoint had been written yet")
                raise NonFiniteLossError(f"non-finite loss ({loss.detach().float().item()}) at step {step + 1} "
                                         f"(epoch {epoch + 1}, batch {i + 1}); training stopped and {kept}. "
                                         "Try a lower --lr, --clip-grad 1.0, or --amp none.")

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            step += 1
            n_steps += 1
            loss_sum += loss.detach().double()
            for k, v in (logs or {}).items():
                log_sums[k] = log_sums.get(k, 0.0) + float(v)
            if bar.enabled:
                bar.update(loss.detach(), lr)
        bar.close()
        train_seconds = time.perf_counter() - t0

        # --- epoch end: all-reduced train loss, the task's metrics, the run folder
        totals = distributed.all_reduce_sum(torch.tensor([loss_sum.item(), n_steps], dtype=torch.float64, device=device))
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(totals[0] / max(1.0, float(totals[1])))}
        for k, v in log_sums.items():
            row[f"train_{k}"] = v / max(1, n_steps)
        metrics = _evaluate(task, model, val_loader, args, info, amp_dtype)
        row.update({f"val_{k}": v for k, v in metrics.items()})
        if ema is not None:
            ema_metrics = _evaluate(task, ema.module, val_loader, args, info, amp_dtype)
            row.update({f"val_ema_{k}": v for k, v in ema_metrics.items()})
        row["lr"] = float(lr)
        row["seconds"] = time.perf_counter() - t0
        row["train_seconds"] = train_seconds
        history.append(row)

        rng_states = distributed.all_gather_object(get_rng_state())
        if main:
            atomic_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "ema": ema.state_dict() if ema is not None else None,
                "rng": rng_states, "epoch": epoch + 1, "step": step, "history": history,
                "args": plain_args(args), "data_info": _plain_info(data.info), "task": task.name,
                "world_size": info.world_size,
            }, ckpt_path)
            meta = {"model": args.model, "task": task.name, "data_info": json.dumps(_plain_info(data.info))}
            save_weights(model.state_dict(), run_dir / "model.safetensors", metadata=meta)
            if ema is not None:
                save_weights(ema.state_dict(), run_dir / "model_ema.safetensors", metadata=meta)
            write_metrics_csv(run_dir / "metrics.csv", history)
            plot_curves(run_dir / "curves.png", history, headline, title=f"{args.model} — {task.name}")
            print(format_row(row, args.epochs), flush=True)
        distributed.barrier()
        if args.early_stop:
            score = metrics.get(headline)
            if score is not None and (best_score is None or (score > best_score if task.higher_is_better
                                                              else score < best_score)):
                best_score, since_best = score, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            if since_best >= args.early_stop and epoch + 1 < args.epochs:
                if main:
                    print(f"early stop: val_{headline} has not improved for {args.early_stop} epochs "
                          f"(best {best_score:.4f}); keeping the best epoch's weights")
                break
        if args.stop_after_epochs and epoch + 1 - start_epoch >= args.stop_after_epochs and epoch + 1 < args.epochs:
            completed = False
            if main:
                print(f"stopped after epoch {epoch + 1} (--stop-after-epochs); continue with --resume {ckpt_path}")
            break

    if best_state is not None:
        model.load_state_dict(best_state)
        if main:
            save_weights(model.state_dict(), run_dir / "model.safetensors", metadata=meta)
    summary = _summary(args, task, data, history, n_params, info, completed)
    if main:
        if completed:
            # a trivial baseline's scores next to the model's: val_<metric>_<baseline>
            summary.update({(k if k.startswith("val_") else f"val_{k}"): v
                            for k, v in (task.baselines(data, args) or {}).items()})
        write_summary(run_dir / "summary.json", summary)
        if completed:
            extra = task.on_train_end(run_dir, model, data, args)
            if extra:
                summary.update(extra)
                write_summary(run_dir / "summary.json", summary)
        if completed and history:
            shown = {k: v for k, v in summary.items() if k.startswith("val_")}
            print("done: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f"  → {run_dir}")
    return TrainResult(model=model, history=history, summary=summary, run_dir=run_dir if main else None,
                       ema_model=ema.module if ema is not None else None)


def _plain_info(info: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(info, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _summary(args, task, data, history, n_params, info, completed) -> dict[str, Any]:
    last = history[-1] if history else {}
    summary: dict[str, Any] = {"task": task.name, "model": args.model, "epochs": int(last.get("epoch", 0)),
                               "params": n_params}
    summary.update({k: v for k, v in last.items() if k.startswith("val_")})
    key = f"val_{task.headline_metric}"
    scored = [r for r in history if isinstance(r.get(key), float) and math.isfinite(r[key])]
    if scored:
        best = (max if task.higher_is_better else min)(scored, key=lambda r: r[key])
        summary[f"best_{key}"] = best[key]
        summary["best_epoch"] = best["epoch"]
    summary.update({
        "train_loss": last.get("train_loss"), "completed": completed,
        "seconds": float(sum(r.get("seconds", 0.0) for r in history)),
        "world_size": info.world_size, "device": str(info.device), "amp": args.amp,
        "data": _plain_info({k: v for k, v in data.info.items() if k != "class_names"}),
        "args": plain_args(args),
    })
    return summary


class _progress:
    """A tqdm bar on rank 0 (refreshing its postfix every few steps, to keep the loop quiet)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled, self.bar, self.n = enabled, None, 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: torch.Tensor, lr: float) -> None:
        self.n += 1
        if self.n % 5 == 1:
            self.bar.set_postfix(loss=f"{loss.float().item():.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def evaluate(args: argparse.Namespace, task=None) -> dict[str, float]:
    """`hybridzoo eval`: the task's validation metrics for `args.model` with weights `args.checkpoint`."""
    from hybridzoo.tasks.base import get_task

    task = task if task is not None else get_task(args.task or "classification")
    args = fill_defaults(args, task)
    if getattr(args, "checkpoint", None):
        args.pretrained = args.checkpoint
    info = distributed.setup(args.device)
    try:
        amp_dtype = _amp_dtype(args.amp, info.device)
        seed_everything(args.seed)
        data = task.build_data(args)
        model = task.build_model(args, data.info).to(info.device)
        _, _, val_loader = _build_loaders(data, args, info, task)
        return _evaluate(task, model, val_loader, args, info, amp_dtype)
    finally:
        distributed.cleanup(info)
