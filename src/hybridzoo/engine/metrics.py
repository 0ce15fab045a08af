"""The metric contract between a task and the engine (in the manner of mmengine's BaseMetric and torchmetrics).

A task's metric only *accumulates state*: plain tensors that are either summed over batches
(`reduce="sum"`: correct counts, confusion matrices, intersections and unions, PSNR sums) or
concatenated (`reduce="cat"`: per-sample records that cannot be pooled as sums, e.g. detections for
COCO AP). The engine evaluates each process's shard of the validation set, calls `sync()` once — one
all-reduce for the summed state, one gather for the concatenated state — and then `compute()` runs on
the reduced state, identically on every process. No task calls `torch.distributed`.

    metric = task.build_metric(args, data.info)
    for batch in loader:
        task.eval_step(model, batch, metric, args)   # calls metric.update(...)
    metric.sync()                                    # the engine's job
    scores = metric.compute()                        # {"top1": 0.98, ...}, keys without "val_"
"""

from __future__ import annotations

from typing import Any

import torch

from hybridzoo.engine import distributed

__all__ = ["Metric", "SumMetric"]


class Metric:
    """Base class: declare state with `add_state`, fill it in `update`, read it in `compute`.

    State lives on the CPU in float64/int64 unless the subclass chooses otherwise, so sums are exact
    whatever the number of processes.
    """

    def __init__(self) -> None:
        self._defaults: dict[str, tuple[torch.Tensor | None, str]] = {}
        self._synced = False

    # --- declaring and resetting state ---------------------------------------------------------
    def add_state(self, name: str, default: torch.Tensor | None = None, reduce: str = "sum") -> None:
        """`reduce="sum"`: a tensor summed over processes; `reduce="cat"`: a list of tensors
        (concatenated along dim 0 over batches and processes; `default` is ignored)."""
        if reduce not in ("sum", "cat"):
            raise ValueError(f"reduce must be 'sum' or 'cat', not {reduce!r}")
        if reduce == "sum" and default is None:
            raise ValueError(f"state {name!r}: a summed state needs a default tensor")
        self._defaults[name] = (None if default is None else default.detach().clone(), reduce)
        setattr(self, name, [] if reduce == "cat" else default.detach().clone())

    def reset(self) -> None:
        for name, (default, reduce) in self._defaults.items():
            setattr(self, name, [] if reduce == "cat" else default.clone())
        self._synced = False

    def state_dict(self) -> dict[str, Any]:
        """The current (local or synced) state: tensors for summed state, a concatenated tensor for the rest."""
        out: dict[str, Any] = {}
        for name, (_, reduce) in self._defaults.items():
            v = getattr(self, name)
            out[name] = _cat(v) if reduce == "cat" else v
        return out

    # --- what subclasses implement ---------------------------------------------------------------
    def update(self, *args, **kwargs) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    # --- the engine's part -------------------------------------------------------------------------
    def sync(self) -> None:
        """Reduce the state over processes (a no-op on one process). Called once, by the engine."""
        if self._synced:
            return
        self._synced = True
        if not distributed.is_distributed():
            return
        summed = [n for n, (_, r) in self._defaults.items() if r == "sum"]
        if summed:
            dev = distributed.collective_device()
            flat = torch.cat([getattr(self, n).reshape(-1).to(dev, torch.float64) for n in summed])
            distributed.all_reduce_sum(flat)
            offset = 0
            for n in summed:
                t = getattr(self, n)
                k = t.numel()
                setattr(self, n, flat[offset:offset + k].reshape(t.shape).to(t.device, t.dtype))
                offset += k
        for n, (_, r) in self._defaults.items():
            if r == "cat":
                parts = distributed.all_gather_object(_cat(getattr(self, n)).cpu())
                setattr(self, n, [p for p in parts if p is not None and p.numel() > 0])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    parts = [p for p in parts if p is not None]
    if not parts:
        return torch.empty(0)
    return torch.cat([p.reshape(p.shape[0], *p.shape[1:]) if p.dim() else p.reshape(1) for p in parts])


class SumMetric(Metric):
    """Named running sums and a count: `compute` returns each sum divided by the count.

    The simplest metric (mean loss, accuracy): `update(n, loss=..., top1=...)` adds `n` samples.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.add_state("sums", torch.zeros(len(self.names) + 1, dtype=torch.float64))

    def update(self, n: int | float | torch.Tensor, **values: float | torch.Tensor) -> None:
        add = torch.zeros(len(self.names) + 1, dtype=torch.float64)
        for k, v in values.items():
            add[self.names.index(k)] = float(v)
        add[-1] = float(n)
        self.sums += add

    def compute(self) -> dict[str, float]:
        n = max(1.0, float(self.sums[-1]))
        return {k: float(self.sums[i]) / n for i, k in enumerate(self.names)}
