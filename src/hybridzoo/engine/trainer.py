"""The training loop: one function, `train(args)`, that any task plugs into.

    hybridzoo train                                                   # cvt_tiny_demo on the built-in digits
    hybridzoo train --model deit_tiny_patch16_224 --data ~/imagenette --epochs 100 --amp bf16
    torchrun --nproc_per_node=4 -m hybridzoo train --model cvt_13 --data ~/imagenet --batch-size 128
    hybridzoo train --resume runs/20250101-120000-cvt_13/last.ckpt     # continues exactly

The engine owns what every task shares — devices, the process group, the optimiser and its
schedule, autocast, EMA, gradient clipping, checkpoints and the run folder — and asks the task
(`hybridzoo.tasks.base.Task`) for data, model, loss and metrics. `_train` reads as phases:
set up → resume → for each epoch: one epoch of steps, end of epoch (evaluate, early-stop state,
last.ckpt and the run folder) → finish. Everything that changes lives in one `TrainState`
(`hybridzoo.engine.state`), which is exactly what last.ckpt holds.

`--batch-size` is per process: under torchrun the global batch is batch-size × processes
(× `--accum-steps`). Evaluation runs on every process over its shard of the validation set; the
task's metric state is reduced once, so every process gets the single-process scores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from hybridzoo.engine import distributed
from hybridzoo.engine.checkpoint import (CheckpointError, atomic_save, get_rng_state, load_checkpoint, plain_args,
                                         save_weights)
from hybridzoo.engine.logger import format_row, plot_curves, write_metrics_csv, write_summary
from hybridzoo.engine.optim import CosineWarmupSchedule, ModelEma, build_optimizer
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.layers.train_fast import BatchSplitTraining, optimize_for_cpu_training, split_training_blocker
from hybridzoo.engine.state import TrainState
from hybridzoo.engine.rundir import check_same_classes, keep_finished_weights, prepare_run_dir

__all__ = ["train", "evaluate", "TrainResult", "NonFiniteLossError", "ENGINE_DEFAULTS", "fill_defaults",
           "default_run_dir", "seed_everything", "move_to_device", "AMP_DTYPES"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Engine options and their defaults; None means "the task's default" (Task.default_epochs, ...).
ENGINE_DEFAULTS: dict[str, Any] = {
    "task": None, "model": None, "data": None, "epochs": None, "batch_size": None, "eval_batch_size": None,
    "lr": None, "weight_decay": None, "warmup_epochs": None, "min_lr": 1e-6, "output": None, "resume": None,
    "seed": 0, "device": "auto", "workers": None, "amp": "none", "compile": False, "ema": False,
    "ema_decay": 0.9998, "clip_grad": None, "pretrained": None, "channels_last": None,
    "limit_train_batches": None, "limit_val_batches": None, "stop_after_epochs": None, "progress": True,
    "early_stop": None, "accum_steps": 1, "overwrite": False, "layer_decay": None, "fast_cpu": True,
    "batch_split": True,
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


def _build_loaders(data, args, info: distributed.DistInfo, task=None) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    pin = info.device.type == "cuda"
    # The same sampler on one or many processes: the order is a function of (seed, epoch) only, so a
    # resumed run and an N-process run see exactly what the straight single-process run sees.
    sampler = DistributedSampler(data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=args.seed, drop_last=info.world_size > 1)
    train_loader = DataLoader(data.train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                              pin_memory=pin, drop_last=len(sampler) > args.batch_size, collate_fn=data.collate_fn,
                              persistent_workers=False)
    return train_loader, sampler, _val_loader(data, args, info)


def _val_loader(data, args, info: distributed.DistInfo) -> DataLoader:
    """Every process gets its shard of the same evaluation set, every sample exactly once.

    `--limit-val-batches N` cuts the *whole* set to its first N × eval-batch-size samples before
    sharding, so the scores do not depend on the number of processes."""
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    val = data.val
    if args.limit_val_batches:
        val = Subset(val, range(min(len(val), args.limit_val_batches * eval_bs)))
    return DataLoader(val, batch_size=eval_bs, sampler=distributed.ShardSampler(val, info.world_size, info.rank),
                      num_workers=args.workers, pin_memory=info.device.type == "cuda", collate_fn=data.collate_fn)


def _evaluate(task, model: nn.Module, loader: DataLoader, args, info: distributed.DistInfo,
              amp_dtype: torch.dtype | None, data_info: dict[str, Any] | None = None,
              path: str = "eager") -> dict[str, float]:
    """The task's metrics on the validation set, the same dict on every process.

    Each process runs `task.eval_step` on its shard; the metric's state is reduced once (`sync`) and
    `compute` runs on the whole set's state. `path="oneDNN"` runs a frozen copy of `model` built from its
    weights now (`optimize_for_cpu_inference`; see `_validation_path`)."""
    if data_info is None:
        ds = _base_dataset(loader.dataset)
        data_info = {k: getattr(ds, k) for k in ("num_classes", "class_names") if getattr(ds, k, None) is not None}
    metric = task.build_metric(args, data_info)
    # DDP broadcasts buffers at the start of each training forward, so after the last step every process
    # holds the batch-norm statistics of its own last batch: evaluate the model rank 0 saves
    distributed.broadcast_buffers(model)
    was_training = model.training
    model.eval()
    try:
        # validation never moves the training's random stream, whichever path it takes (the frozen copy's build
        # and first-call probes must not either)
        with torch.random.fork_rng(devices=[]), torch.no_grad(), \
                torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            net = optimize_for_cpu_inference(model) if path == "oneDNN" else model
            for batch in DeviceLoader(loader, info.device, None, args.channels_last):
                task.eval_step(net, batch, metric, args)
    finally:
        model.train(was_training)
    metric.sync()
    return {k: float(v) for k, v in metric.compute().items()}


VALIDATION_PATHS = ("eager", "oneDNN")


def _validation_path(history: list[dict[str, Any]], fast: bool) -> str:
    """Which model validates this epoch: the training model ("eager") or a frozen oneDNN copy of it ("oneDNN").

    The copy runs the image classifiers' forward 1.5-3.7x faster, but it is rebuilt from the weights at every
    epoch, and its build and first call (weight packs, the sub-batch probe) cost about 0.3 s more than a later
    batch for a full-size classifier: a small validation set (the segmentation and recommendation demos', under
    0.1 s) comes out slower, and a model whose frozen path is slower (SegFormer-B0 at 512^2) always does.
    So the first validation runs eager and the second on the copy, each timed whole (`eval_seconds`, the
    slowest process's), and the faster answers from the third on. The choice follows from the history alone,
    which last.ckpt holds: a resumed run validates as the straight run did. `fast` (CPU, fp32, `--no-fast-cpu`
    not given, oneDNN built in) off: always eager."""
    if not fast:
        return "eager"
    first = _first_validations(history)
    for path in VALIDATION_PATHS:
        if path not in first:
            return path
    return "oneDNN" if first["oneDNN"]["eval_seconds"] < first["eager"]["eval_seconds"] else "eager"


def _first_validations(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first timed row of each validation path: the two that decide."""
    first: dict[str, dict[str, Any]] = {}
    for row in history:
        if row.get("eval_path") in VALIDATION_PATHS and isinstance(row.get("eval_seconds"), float):
            first.setdefault(row["eval_path"], row)
    return first


def _validation_choice(history: list[dict[str, Any]]) -> str:
    first = _first_validations(history)
    timed = ", ".join(f"{p} {first[p]['eval_seconds']:.1f} s at epoch {first[p]['epoch']}" for p in VALIDATION_PATHS)
    return (f"validation on the CPU: the {_validation_path(history, True)} path from the next epoch on ({timed}; "
            "--no-fast-cpu keeps eager)")


def _base_dataset(ds):
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def train(args: argparse.Namespace, task=None) -> TrainResult:
    """Train `args.model` on `args.task`'s data; rank 0 writes the run folder. See the module docstring."""
    from hybridzoo.tasks.base import get_task

    task = task if task is not None else get_task(args.task or "classification")
    args = fill_defaults(args, task)
    for k in ("epochs", "batch_size"):  # 0 epochs would write a "completed" run without weights
        if not isinstance(getattr(args, k), int) or getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {getattr(args, k)!r}")
    if not args.output:
        args.output = str(Path(args.resume).parent if args.resume else default_run_dir(args.model))
    info = distributed.setup(args.device)
    try:
        if info.is_main:  # before any work: an existing run, a file, a read-only folder, dead temp files
            prepare_run_dir(args.output, resume=args.resume, overwrite=getattr(args, "overwrite", False))
        return _train(args, task, info)
    finally:
        distributed.cleanup(info)


def _train(args: argparse.Namespace, task, info: distributed.DistInfo) -> TrainResult:
    """The phases, in the manner of nanoGPT's loop: set up → resume → (one epoch → end of epoch)* → finish."""
    run = _set_up(args, task, info)
    state = run.state
    if args.resume:
        _resume(run, args, info)
    train_model = _wrap(state.model, args, info, task)
    if info.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"{task.name}: {args.model} ({run.n_params / 1e6:.2f}M params) on {info.device}"
              f"{f' × {info.world_size} processes' if info.world_size > 1 else ''}; "
              f"{len(run.data.train)} train / {len(run.data.val)} val samples; {run.steps_per_epoch} steps/epoch"
              f"{f' of {args.accum_steps} accumulated batches' if args.accum_steps > 1 else ''}; "
              f"run folder {run.run_dir}")

    completed, start_epoch = True, state.epoch
    # (a resumed run that had already stopped early stays stopped)
    while state.epoch < args.epochs and not _early_stopped(state, args):
        t0 = time.perf_counter()
        row = _train_one_epoch(run, train_model, args, task, info)
        row["train_seconds"] = time.perf_counter() - t0
        _end_of_epoch(run, row, t0, args, task, info)
        if _early_stopped(state, args):
            if info.is_main:
                print(f"early stop: val_{task.headline_metric} has not improved for {args.early_stop} epochs "
                      f"(best {state.early_stop.best_score:.4f} at epoch {state.early_stop.best_epoch}); "
                      "keeping the best epoch's weights")
            break
        if args.stop_after_epochs and state.epoch - start_epoch >= args.stop_after_epochs and state.epoch < args.epochs:
            completed = False
            if info.is_main:
                print(f"stopped after epoch {state.epoch} (--stop-after-epochs); continue with --resume {run.ckpt_path}")
            break
    return _finish(run, args, task, info, completed)


@dataclass
class _Run:
    """What one invocation sets up around the `TrainState`: data, loaders, the run folder."""

    state: TrainState
    data: Any
    n_params: int
    train_loader: DataLoader
    train_sampler: DistributedSampler
    val_loader: DataLoader
    steps_per_epoch: int
    run_dir: Path
    amp_dtype: torch.dtype | None
    meta: dict[str, str]
    fast_cpu: bool                          # fp32 on the CPU, --no-fast-cpu not given: the fast training path

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "last.ckpt"


def _set_up(args: argparse.Namespace, task, info: distributed.DistInfo) -> _Run:
    """Data, model, loaders, optimiser, schedule, scaler and EMA, identical on every process."""
    device = info.device
    amp_dtype = _amp_dtype(args.amp, device)
    if args.accum_steps < 1:
        raise ValueError(f"--accum-steps must be at least 1, got {args.accum_steps}")
    # the same seed on every process gives the same initial weights (DDP checks them too)
    seed_everything(args.seed)
    data = task.build_data(args)
    model = task.build_model(args, data.info).to(device)
    fast_cpu = getattr(args, "fast_cpu", True) and device.type == "cpu" and amp_dtype is None
    if args.channels_last is None:
        # neither --channels-last nor --no-channels-last: the model's own choice on the fast CPU path, where it was
        # measured (SCTNet 1.14x a step at 2 x 512 x 1024, U-Net 1.17-1.27x at 4 x 256², BoT50 1.22x, Mobile-Former
        # 1.15x, CoAtNet-0 1.08x at 16 x 224²; ACT x2 1.22x at 8 x 48², its 3x3 convolutions then by Winograd; SegNetr
        # ran 0.95x and CeiT 0.94x, so not a default for every model; benchmarks/RESULTS.md, sessions 34, 36 and 38),
        # channels-first elsewhere
        args.channels_last = bool(fast_cpu and getattr(model, "train_channels_last", False))
        if args.channels_last and info.is_main:
            print(f"channels-last: {type(model).__name__}'s choice for training on the CPU (--no-channels-last: not)")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fast_cpu:
        # fp32 CPU training: linear layers take the fastest of the native kernels, oneDNN and MKL per product (same
        # function and gradients, same parameters and state dict; benchmarks/RESULTS.md)
        optimize_for_cpu_training(model)
    from hybridzoo.profile import count_params
    n_params = count_params(model)
    seed_everything(args.seed + info.rank)  # different augmentation streams per process

    train_loader, train_sampler, val_loader = _build_loaders(data, args, info, task)
    steps_per_epoch = len(train_loader) // args.accum_steps
    if args.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"no training steps: {len(data.train)} samples, batch size {args.batch_size}"
                         f"{f' × {args.accum_steps} accumulated' if args.accum_steps > 1 else ''} on "
                         f"{info.world_size} process(es)")
    optimizer = task.build_optimizer(model, args) or build_optimizer(model, args.lr, args.weight_decay,
                                                                     layer_decay=getattr(args, "layer_decay", None),
                                                                     fused=True if fast_cpu else None)
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
    state = TrainState(model, optimizer, schedule, scaler, ema)

    run_dir = Path(args.output) if args.output else (Path(args.resume).parent if args.resume else default_run_dir(args.model))
    args.output = str(run_dir)
    meta = {"model": args.model, "task": task.name, "data_info": json.dumps(_plain_info(data.info))}
    return _Run(state, data, n_params, train_loader, train_sampler, val_loader, steps_per_epoch, run_dir,
                amp_dtype, meta, fast_cpu)


def _resume(run: _Run, args: argparse.Namespace, info: distributed.DistInfo) -> None:
    """Every piece of the `TrainState`, including each process's random generators."""
    ckpt = load_checkpoint(args.resume)
    saved_model = ckpt.get("args", {}).get("model")
    if saved_model and saved_model != args.model:
        raise CheckpointError(f"{args.resume!r} was trained with --model {saved_model}, not {args.model}")
    try:
        exact = run.state.load_state_dict(ckpt, info.rank, info.world_size)
    except CheckpointError as e:
        raise CheckpointError(f"{args.resume!r}: {e}") from e
    state = run.state
    finished_epochs = ckpt.get("args", {}).get("epochs")
    if info.is_main and finished_epochs and state.epoch >= finished_epochs and args.epochs > state.epoch:
        # a finished run extended: its final weights would be overwritten by the first new epoch
        kept = keep_finished_weights(run.run_dir, state.epoch)
        last_lr = state.history[-1].get("lr", float("nan")) if state.history else float("nan")
        print(f"note: {args.resume} is a finished {state.epoch}-epoch run; continuing it to {args.epochs} "
              f"epochs. The schedule is laid out again over {args.epochs} epochs, so epoch {state.epoch + 1} "
              f"starts at lr {args.lr * state.schedule.factor(state.step):.3g} (the run ended at lr {last_lr:.3g})"
              + (f"; its final weights are kept as {', '.join(p.name for p in kept)}" if kept else ""))
    if info.is_main:
        if not exact:
            print(f"note: {args.resume} was written by {len(ckpt.get('rng', []))} process(es), this run has "
                  f"{info.world_size}; random streams restart from the seed, so the resumed run is not bitwise identical")
        print(f"resumed from {args.resume} at epoch {run.state.epoch}, step {run.state.step}")


def _batch_split_blocker(model: nn.Module, args: argparse.Namespace, info: distributed.DistInfo,
                         task) -> str | None:
    """Why this run does not train by batch split (None: it does); see `BatchSplitTraining`."""
    if not getattr(args, "batch_split", True):
        return "--no-batch-split"
    if not getattr(args, "fast_cpu", True):
        return "--no-fast-cpu"
    if info.device.type != "cpu" or args.amp not in ("none", "bf16"):
        return "the batch split is for CPU training in fp32 or bf16"
    if info.world_size > 1:  # DDP all-reduces in the gradient hooks: once per part would be wrong and slow
        return "several processes (DDP)"
    if args.compile:
        return "--compile"
    if torch.get_num_threads() < 2:
        return "one intra-op thread"
    if not getattr(task, "batch_split", False):
        return f"the {task.name} task's training step is not split: {task.batch_split_off}"
    return split_training_blocker(model)


def _wrap(model: nn.Module, args: argparse.Namespace, info: distributed.DistInfo, task) -> nn.Module:
    if info.device.type == "cpu":
        blocker = _batch_split_blocker(model, args, info, task)
        if info.is_main and blocker not in ("--no-batch-split", "--no-fast-cpu"):
            print(f"batch split: {torch.get_num_threads()} threads each train their share of every batch"
                  if blocker is None else f"batch split off: {blocker}")
        if blocker is None:
            # each intra-op thread runs forward and backward of its share of the batch on one thread;
            # the same gradients, loss and logs as the whole batch (benchmarks/RESULTS.md, session 6)
            return BatchSplitTraining(model)
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    return model


def _train_one_epoch(run: _Run, train_model: nn.Module, args: argparse.Namespace, task,
                     info: distributed.DistInfo) -> dict[str, Any]:
    """`steps_per_epoch` optimiser steps, each over `--accum-steps` batches; returns the epoch's train row."""
    state, device, accum = run.state, info.device, args.accum_steps
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    epoch = state.epoch
    run.train_sampler.set_epoch(epoch)
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    # the task's logs are summed where they are (a tensor on the device stays there): read once, at the epoch's end
    log_sums: dict[str, Any] = {}
    bar = _progress(run.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=info.is_main and args.progress)
    lr = optimizer.param_groups[0]["lr"]
    batches = iter(run.train_loader)
    ddp = getattr(train_model, "_orig_mod", train_model)  # under --compile, DDP is inside
    ddp = ddp if isinstance(ddp, nn.parallel.DistributedDataParallel) else None
    for i in range(run.steps_per_epoch):
        lr = state.schedule.set_step(state.step)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accum):
            batch = move_to_device(next(batches), device, args.channels_last)
            # gradients are all-reduced once per step, on the last accumulated batch
            with ddp.no_sync() if ddp is not None and micro < accum - 1 else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                    loss, logs = task.training_step(train_model, batch, args)
                # each batch's loss is a mean over its samples: 1/accum makes the step the mean over all of them
                scaler.scale(loss / accum if accum > 1 else loss).backward()
            losses.append(loss.detach())
            for k, v in (logs or {}).items():
                v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                log_sums[k] = log_sums.get(k, 0.0) + v / accum
        # One host read per step, after the backward passes are queued (a GPU is not left idle while the CPU
        # launches them), on every process at once (one tiny all-reduce), before anything touches the weights:
        # a non-finite loss on any process stops all of them with the weights and the last good checkpoint intact.
        losses = torch.stack(losses)
        bad = distributed.all_reduce_sum((~torch.isfinite(losses)).float())
        if bad.sum().item() > 0:
            bar.close()
            micro = int(bad.nonzero()[0])
            kept = (f"the last good checkpoint {run.ckpt_path} (end of epoch {epoch}) is kept"
                    if info.is_main and run.ckpt_path.is_file() else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"non-finite loss ({losses[micro].float().item()}) at step {state.step + 1} (epoch {epoch + 1}, "
                f"batch {i * accum + micro + 1}); training stopped and {kept}. "
                "Try a lower --lr, --clip-grad 1.0, or --amp none.")
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if state.ema is not None:
            state.ema.update(model)
        state.step += 1
        step_loss = losses.double().mean()  # the step's loss: the mean over its batches
        loss_sum += step_loss
        if bar.enabled:
            bar.update(step_loss, lr)
    bar.close()
    n_steps = run.steps_per_epoch
    totals = distributed.all_reduce_sum(torch.tensor([loss_sum.item(), n_steps], dtype=torch.float64, device=device))
    row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(totals[0] / max(1.0, float(totals[1])))}
    for k, v in log_sums.items():
        row[f"train_{k}"] = float(v) / max(1, n_steps)
    row["lr"] = float(lr)
    return row


def _end_of_epoch(run: _Run, row: dict[str, Any], t0: float, args: argparse.Namespace, task,
                  info: distributed.DistInfo) -> None:
    """Evaluate, update the early-stop state, then write `last.ckpt` and the run folder (rank 0)."""
    state = run.state
    lr = row.pop("lr")
    train_seconds = row.pop("train_seconds")
    fast = run.fast_cpu and onednn_available()
    path = _validation_path(state.history, fast)
    t_eval = time.perf_counter()
    metrics = _evaluate(task, state.model, run.val_loader, args, info, run.amp_dtype, run.data.info, path)
    row.update({f"val_{k}": v for k, v in metrics.items()})
    if state.ema is not None:
        ema_metrics = _evaluate(task, state.ema.module, run.val_loader, args, info, run.amp_dtype, run.data.info,
                                path)
        row.update({f"val_ema_{k}": v for k, v in ema_metrics.items()})
    # the slowest process's time: every process derives the same choice from the same history
    eval_seconds = max(distributed.all_gather_object(time.perf_counter() - t_eval))
    row["lr"] = lr
    if fast:
        row["eval_path"] = path
    row["seconds"] = time.perf_counter() - t0
    row["train_seconds"] = train_seconds
    row["eval_seconds"] = float(eval_seconds)
    state.history.append(row)
    state.epoch += 1
    if args.early_stop:
        state.early_stop.update(metrics.get(task.headline_metric), state.epoch, state.model, task.higher_is_better)

    state.rng = distributed.all_gather_object(get_rng_state())
    if info.is_main:
        atomic_save({**state.state_dict(), "args": plain_args(args), "data_info": _plain_info(run.data.info),
                     "task": task.name, "world_size": info.world_size}, run.ckpt_path)
        save_weights(state.model.state_dict(), run.run_dir / "model.safetensors", metadata=run.meta)
        if state.ema is not None:
            save_weights(state.ema.state_dict(), run.run_dir / "model_ema.safetensors", metadata=run.meta)
        write_metrics_csv(run.run_dir / "metrics.csv", state.history)
        plot_curves(run.run_dir / "curves.png", state.history, task.headline_metric,
                    title=f"{args.model} — {task.name}")
        print(format_row(row, args.epochs), flush=True)
        if fast and _first_validations(state.history).get("oneDNN") is row:   # the comparison is complete
            print(_validation_choice(state.history), flush=True)
    distributed.barrier()


def _early_stopped(state: TrainState, args: argparse.Namespace) -> bool:
    return bool(args.early_stop) and state.early_stop.since_best >= args.early_stop and state.epoch < args.epochs


def _finish(run: _Run, args: argparse.Namespace, task, info: distributed.DistInfo, completed: bool) -> TrainResult:
    """Restore the best weights under --early-stop; the summary, the baseline and the task's pictures."""
    state, data, run_dir, main = run.state, run.data, run.run_dir, info.is_main
    model, history = state.model, state.history
    if args.early_stop and state.early_stop.best_weights is not None and completed:
        model.load_state_dict(state.early_stop.best_weights)
        if main:
            save_weights(model.state_dict(), run_dir / "model.safetensors", metadata=run.meta)
    summary = _summary(args, task, data, history, run.n_params, info, completed)
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
                       ema_model=state.ema.module if state.ema is not None else None)


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
    """`hybridzoo eval`: the task's validation metrics for trained weights.

    `args.run` (a run folder) alone is enough: the task, model, data and options are the run's
    (`hybridzoo.engine.run`), and options given in `args` (not None) override them — `--data`
    evaluates on other data. `args.checkpoint` is an engine-written file, or official weights with
    `args.model` (and `args.task`, else the model card's). The model is the one `load_run` rebuilds.
    """
    from hybridzoo.engine.run import load_run, merge_args, read_run
    from hybridzoo.tasks.base import get_task

    spec = read_run(getattr(args, "run", None), getattr(args, "checkpoint", None), getattr(args, "weights", None) or "auto")
    name = spec.model or getattr(args, "model", None)
    if task is None:
        from hybridzoo.registry import get_card

        task = get_task(getattr(args, "task", None) or spec.task or (get_card(name).task if name else "classification"))
    options = vars(args)
    args = merge_args(options, spec.args, task, model=name)
    try:
        info = distributed.setup(args.device)
    except RuntimeError as e:  # e.g. --device cuda without CUDA: bad input, one line
        raise ValueError(str(e) if "--device" in str(e) else f"--device {args.device}: {e}") from e
    try:
        amp_dtype = _amp_dtype(args.amp, info.device)
        seed_everything(args.seed)
        data = task.build_data(args)
        run = load_run(spec=spec, model=name, device=info.device, task=task, data_info=data.info, options=options,
                       fast_cpu=getattr(args, "fast_cpu", True))
        check_same_classes(spec.weights, data.info, trained=run.data_info)
        if info.is_main:
            print(f"{run.describe()}; {len(data.val)} validation samples")
        _, _, val_loader = _build_loaders(data, args, info, task)
        return _evaluate(task, run.model, val_loader, args, info, amp_dtype, data.info)
    finally:
        distributed.cleanup(info)

