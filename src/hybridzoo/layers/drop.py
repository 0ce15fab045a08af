"""Stochastic depth (DropPath).

The masks come from the global generator unless a thread has set its own with `use_generator`: the fast
CPU training path runs parts of a batch on several threads at once (`hybridzoo.layers.train_fast`), where
draws from one shared generator would land in whatever order the threads reach them; a generator per part,
seeded from the global one once per step, keeps training bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

_LOCAL = threading.local()


def current_generator() -> torch.Generator | None:
    """This thread's generator for drop-path masks (None: the global generator)."""
    return getattr(_LOCAL, "generator", None)


@contextlib.contextmanager
def use_generator(generator: torch.Generator | None):
    """Draw this thread's drop-path masks from `generator` inside the block."""
    before = current_generator()
    _LOCAL.generator = generator
    try:
        yield generator
    finally:
        _LOCAL.generator = before


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep, generator=current_generator())
    if scale_by_keep and keep > 0.0:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Drop whole residual branches per sample (Huang et al. 2016), scaled to keep the expectation."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to `drop_path_rate` over `depth` blocks."""
    if depth <= 1:
        return [0.0] * depth if drop_path_rate == 0 else [drop_path_rate] * depth
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]
