"""The contract between the training engine and a task.

The engine (`hybridzoo.engine.trainer`) owns the loop: devices, distributed setup, the optimiser
and schedule, autocast, checkpoints, progress bars, `metrics.csv`, `summary.json` and `curves.png`.
A task owns everything that depends on what is being learned: its data, its model defaults, its
loss, its metrics, its pictures and its `predict`. One file per task in `hybridzoo/tasks/`.

Evaluation is split the same way. The task's `build_metric(args, data_info)` returns a
`hybridzoo.engine.metrics.Metric` whose state is plain tensors, and `eval_step(model, batch, metric,
args)` runs the model on one batch and calls `metric.update(...)`. The engine shards the validation
set over the processes (every sample exactly once), calls `eval_step` on each process's shard,
`metric.sync()` once (one all-reduce) and `metric.compute()`: the same dict on every process, equal to
a single-process evaluation. A task never calls `torch.distributed`. `evaluate(model, loader, args)`
does the same on one process for callers that hold a loader.

A task registers itself with `@register_task` and is chosen by `hybridzoo train --task NAME`
(default: the model card's task).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from hybridzoo.engine.metrics import Metric

__all__ = ["Task", "TaskData", "register_task", "get_task", "unwrap_model", "TASK_REGISTRY"]

TASK_REGISTRY: dict[str, type["Task"]] = {}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside the trainer's wrappers (`torch.compile`, DDP, `BatchSplitTraining`): where a training step
    reads the model's own attributes (auxiliary-loss weights, a detector's loss)."""
    model = getattr(model, "_orig_mod", model)
    from hybridzoo.layers.train_fast import BatchSplitTraining

    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, BatchSplitTraining)) else model


def register_task(cls: type["Task"]) -> type["Task"]:
    TASK_REGISTRY[cls.name] = cls
    return cls


def get_task(name: str) -> "Task":
    import hybridzoo.tasks  # noqa: F401  (registers every task module)

    if name not in TASK_REGISTRY:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASK_REGISTRY)}")
    return TASK_REGISTRY[name]()


@dataclass
class TaskData:
    """What `Task.build_data` returns: datasets plus facts the model and metrics need."""

    train: Dataset
    val: Dataset
    info: dict[str, Any] = field(default_factory=dict)  # e.g. num_classes, in_chans, class_names, num_items
    collate_fn: Any = None  # optional custom collate for both loaders


class Task:
    """Override what the task needs; defaults suit classification-like tasks."""

    name: str = ""
    default_model: str = ""
    headline_metric: str = ""          # key in evaluate()'s dict, e.g. "top1", "miou", "psnr_y"
    higher_is_better: bool = True
    default_epochs: int = 10
    default_batch_size: int = 64
    default_lr: float = 1e-3
    default_weight_decay: float = 0.05
    default_warmup_epochs: float = 0
    # training_step calls `model(inputs)` once on the batch, whose output (a tensor, or a tuple or list of them) has
    # rows per sample, computes the loss on that whole output, and reads the model's own attributes through
    # `unwrap_model`: the fp32 CPU trainer may then train by batch split (BatchSplitTraining)
    batch_split: bool = False
    # where batch_split is False: why, for the trainer's "batch split off: ..." line
    batch_split_off: str = "its training step is not declared splittable (Task.batch_split)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task-specific command-line options (added to `train`, `eval`, `predict`)."""

    def build_data(self, args: argparse.Namespace) -> TaskData:
        raise NotImplementedError

    def build_model(self, args: argparse.Namespace, data_info: dict[str, Any]) -> nn.Module:
        from hybridzoo.factory import create_model

        return create_model(args.model, pretrained=getattr(args, "pretrained", None))

    def training_step(self, model: nn.Module, batch: Any,
                      args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Loss on one batch (already on the device), and scalars to log: detached 0-d tensors where they are
        computed on the device (the trainer sums them there and reads them once an epoch; a float() here would make
        the host wait for the device every step)."""
        raise NotImplementedError

    # --- evaluation: the metric contract (hybridzoo.engine.metrics) ------------------------------
    def build_metric(self, args: argparse.Namespace, data_info: dict[str, Any]) -> "Metric":
        """A fresh `hybridzoo.engine.metrics.Metric` that accumulates this task's state."""
        raise NotImplementedError(f"task {self.name!r} defines no metric")

    def eval_step(self, model: nn.Module, batch: Any, metric: "Metric", args: argparse.Namespace) -> None:
        """Run the model on one validation batch (already on the device) and `metric.update(...)`."""
        raise NotImplementedError(f"task {self.name!r} defines no eval_step")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, args: argparse.Namespace,
                 data_info: dict[str, Any] | None = None) -> dict[str, float]:
        """Metrics over a whole loader on this process, keys without the `val_` prefix (`loss`, `top1`, ...).

        The engine does the same with a sharded loader and `metric.sync()` between the two halves; this
        method never communicates, so rank 0 alone may call it (pictures, test-split scores).
        Without `data_info`, the facts a metric needs (`num_classes`, `class_names`) are read from the
        loader's dataset where it carries them.
        """
        if data_info is None:
            ds = getattr(loader, "dataset", None)
            data_info = {k: getattr(ds, k) for k in ("num_classes", "class_names") if getattr(ds, k, None) is not None}
        metric = self.build_metric(args, data_info)
        was_training = model.training
        model.eval()
        try:
            for batch in loader:
                self.eval_step(model, batch, metric, args)
        finally:
            model.train(was_training)
        return metric.compute()  # no sync: this is one process's view (rank 0 alone may call it)

    def build_optimizer(self, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer | None:
        """Return None for the engine's default (AdamW, no decay on norms/biases/embeddings)."""
        return None

    def lr_factor(self, step: int, total_steps: int, steps_per_epoch: int, args: argparse.Namespace) -> float | None:
        """The learning-rate multiplier at `step` after warm-up, or None for the engine's cosine decay.

        A pure function of the step, so resuming restores it exactly (poly for segmentation, step decay
        for super-resolution).
        """
        return None

    def baselines(self, data: TaskData, args: argparse.Namespace) -> dict[str, float]:
        """A trivial baseline's scores, `<metric>_<baseline>` (e.g. `psnr_y_bicubic`); the engine writes
        them to `summary.json` with the `val_` prefix."""
        return {}

    def on_train_end(self, run_dir: Path, model: nn.Module, data: TaskData,
                     args: argparse.Namespace) -> dict[str, Any] | None:
        """Write the task's pictures (overlays, comparisons, maps) into the run folder; a returned dict
        (e.g. test-split metrics) is added to `summary.json`."""
        return None

    def predict(self, args: argparse.Namespace) -> None:
        raise NotImplementedError(f"predict is not implemented for task {self.name!r}")
