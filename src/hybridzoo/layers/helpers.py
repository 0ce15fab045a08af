"""Small helpers shared by model files: tuple coercion, input validation, checkpointed sequences."""

from __future__ import annotations

import collections.abc
import contextlib
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def to_2tuple(x) -> tuple:
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        t = tuple(x)
        if len(t) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return t
    return (x, x)


def check_image_input(x: torch.Tensor, model: nn.Module | str, in_chans: int,
                      img_size: tuple[int, int] | None = None, divisor: int | tuple[int, int] = 1,
                      min_size: int | tuple[int, int] = 1) -> None:
    """Validate a B×C×H×W input once, at the model's entry, with an error naming the model.

    img_size: the only size the model accepts (fixed-size designs), or None for any size that is a
        multiple of `divisor` and at least `min_size`.
    """
    name = model if isinstance(model, str) else getattr(model, "model_name", type(model).__name__)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected input of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point image tensor, got dtype {x.dtype}")
    h, w = x.shape[-2:]
    if img_size is not None:
        if (h, w) != tuple(img_size):
            raise ValueError(f"{name}: expected input of shape (B, {in_chans}, {img_size[0]}, {img_size[1]}), "
                             f"got {tuple(x.shape)}; build the model with img_size=({h}, {w}) to change it")
        return
    dh, dw = to_2tuple(divisor)
    mh, mw = to_2tuple(min_size)
    if h % dh or w % dw or h < mh or w < mw:
        raise ValueError(f"{name}: expected H a multiple of {dh} and >= {mh}, W a multiple of {dw} and >= {mw}, "
                         f"got input of shape {tuple(x.shape)}")


def checkpoint_seq(blocks: Iterable[nn.Module], x, *args, enabled: bool = True):
    """Run `blocks` in order; with `enabled` and grad on, recompute each block's activations in backward."""
    if getattr(blocks, "runs_as_one", False) and not (enabled and torch.is_grad_enabled()):
        return blocks(x, *args)   # a frozen container that schedules its blocks itself (layers.onednn_tokens)
    for blk in blocks:
        if enabled and torch.is_grad_enabled():
            x = checkpoint(blk, x, *args, use_reentrant=False)
        else:
            x = blk(x, *args)
    return x


def run_blocks_for_prefix(blocks, x: torch.Tensor, num_prefix: int, *args, checkpointing: bool = False):
    """`blocks` in turn on tokens x, the last one computing only the `num_prefix` leading rows (B×num_prefix×C):
    what a classifier on the prefix token(s) reads. The same values as running every row and slicing, without the
    last block's dead rows (≈ 10/12 of that block: its query, output projection and MLP on the patch tokens);
    in training those rows have no gradient either. The last block is called as a module (its hooks fire)."""
    if len(blocks) == 0:
        return x[:, :num_prefix]
    if _EVERY_ROW["depth"]:
        return checkpoint_seq(blocks, x, *args, enabled=checkpointing)[:, :num_prefix]
    if hasattr(blocks, "forward_prefix") and not (checkpointing and torch.is_grad_enabled()):
        # a frozen container that schedules its blocks itself (layers.onednn_tokens)
        return blocks.forward_prefix(x, num_prefix, *args)
    x = checkpoint_seq(blocks[:-1], x, *args, enabled=checkpointing)
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(blocks[-1], x, *args, num_queries=num_prefix, use_reentrant=False)
    return blocks[-1](x, *args, num_queries=num_prefix)


_EVERY_ROW = {"depth": 0}


@contextlib.contextmanager
def every_row():
    """While inside, `run_blocks_for_prefix` computes every row of the last block too and then keeps the prefix
    rows: the model as papers count its FLOPs (`hybridzoo.profile` counts with it), and the computation as it was
    before the prefix-only block, for A/B benchmarks. Process-wide (the batch split runs parts on pool threads)."""
    _EVERY_ROW["depth"] += 1
    try:
        yield
    finally:
        _EVERY_ROW["depth"] -= 1
