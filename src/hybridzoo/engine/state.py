"""`TrainState`: everything that changes while training, and exactly what `last.ckpt` holds.

The trainer keeps no training state in local variables: a run stopped after any epoch and continued
with `--resume` repeats the straight run weight for weight. That covers the model, the optimiser,
the learning-rate schedule, the gradient scaler, the EMA weights, the epoch and step counters, the
per-epoch history, the early-stopping state (best score and epoch, epochs since the best, the best
weights) and the random generators of every process.

    state = TrainState(model, optimizer, schedule, scaler, ema)
    state.load_state_dict(load_checkpoint(path), rank, world_size)   # --resume
    ...
    state.rng = distributed.all_gather_object(get_rng_state())      # every process's generators
    atomic_save({**state.state_dict(), "args": ..., "task": ...}, run_dir / "last.ckpt")

Checkpoint keys: model, optimizer, schedule, scaler, ema, epoch, step, history, early_stop, rng,
world_size (the trainer adds args, data_info and task for `eval` / `predict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hybridzoo.engine.checkpoint import CheckpointError, set_rng_state
from hybridzoo.engine.optim import CosineWarmupSchedule, ModelEma

__all__ = ["TrainState", "EarlyStop"]


@dataclass
class EarlyStop:
    """`--early-stop PATIENCE`: the best headline score so far, its epoch and weights, epochs since."""

    best_score: float | None = None
    best_epoch: int | None = None
    since_best: int = 0
    best_weights: dict[str, torch.Tensor] | None = None

    def update(self, score: float | None, epoch: int, model: nn.Module, higher_is_better: bool) -> bool:
        """Record the score of `epoch` (1-based); True when it is the best so far (its weights are kept)."""
        better = score is not None and score == score and (
            self.best_score is None or (score > self.best_score if higher_is_better else score < self.best_score))
        if better:
            self.best_score, self.best_epoch, self.since_best = float(score), int(epoch), 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.since_best += 1
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "since_best": self.since_best,
                "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state.get("best_score"), state.get("best_epoch")
        self.since_best, self.best_weights = int(state.get("since_best", 0)), state.get("best_weights")


@dataclass
class TrainState:
    model: nn.Module                        # the bare model (not the DDP / compiled wrapper)
    optimizer: torch.optim.Optimizer
    schedule: CosineWarmupSchedule
    scaler: torch.amp.GradScaler
    ema: ModelEma | None = None
    epoch: int = 0                          # completed epochs
    step: int = 0                           # completed optimiser steps
    history: list[dict[str, Any]] = field(default_factory=list)
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    rng: list[dict[str, Any]] = field(default_factory=list)   # one entry per process, rank order

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step": self.step, "history": list(self.history),
            "early_stop": self.early_stop.state_dict(), "rng": list(self.rng), "world_size": len(self.rng) or 1,
        }

    def load_state_dict(self, ckpt: dict[str, Any], rank: int = 0, world_size: int = 1) -> bool:
        """Restore everything from a checkpoint dict; this process's generators too when the checkpoint
        was written by as many processes. Returns whether the generators were restored."""
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"the checkpoint does not fit this model/optimizer: {e}") from e
        self.schedule.load_state_dict(ckpt.get("schedule") or {"step_count": ckpt["step"]})
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.early_stop.load_state_dict(ckpt.get("early_stop") or {})
        self.rng = list(ckpt.get("rng", []))
        if len(self.rng) == world_size:
            set_rng_state(self.rng[rank])
            return True
        return False
