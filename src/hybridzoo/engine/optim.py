"""Optimiser, learning-rate schedule and weight EMA of the default recipe (DeiT / timm style).

- AdamW with two parameter groups: no weight decay on norms, biases and other 1-D parameters,
  embeddings (position embeddings, class / distillation / global tokens, relative-position
  tables, `nn.Embedding` tables) and whatever the model lists in `no_weight_decay()`.
- Cosine decay with linear warm-up, updated every optimisation step (not every epoch), so short
  runs and resumed runs follow the same curve.
- EMA of the weights (Polyak averaging), updated after every step.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

__all__ = ["param_groups_weight_decay", "param_groups_layer_decay", "layer_ids", "build_optimizer", "CosineWarmupSchedule", "ModelEma"]

_NO_DECAY_WORDS = ("token", "pos_embed", "position", "rel_pos", "embedding", "pos_emb")


def _norm_or_embedding(module: nn.Module) -> bool:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                           nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)):
        return True
    return "norm" in type(module).__name__.lower()


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    no_decay_ids = set()
    for mod_name, module in model.named_modules():
        if _norm_or_embedding(module):
            for p in module.parameters(recurse=False):
                no_decay_ids.add(id(p))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1].lower()
        if (p.ndim <= 1 or id(p) in no_decay_ids or name in skip or leaf in skip
                or any(w in leaf for w in _NO_DECAY_WORDS)):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|layer|stages|stage)\.(\d+)(?=\.)")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of every parameter for layer-wise lr decay: ({name: id}, number of ids).

    Parameters before the first block (patch / token embeddings, stems) are layer 0; each transformer
    or conv block (the innermost `blocks.N` / `layers.N` / `stages.N` of its name, in forward order)
    is the next layer; what follows the last block (final norm, head) is the top layer. A generic rule,
    so it covers every registered family; BEiT / DeiT III / timm number ViT blocks the same way.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    block_of: dict[str, str] = {}
    order: list[str] = []
    for n in names:
        matches = list(_BLOCK.finditer(n))
        if matches:
            key = n[: matches[-1].end()]
            block_of[n] = key
            if key not in order:
                order.append(key)
    index = {k: i + 1 for i, k in enumerate(order)}
    top = len(order) + 1
    ids: dict[str, int] = {}
    seen_block = False
    for n in names:
        if n in block_of:
            ids[n], seen_block = index[block_of[n]], True
        else:
            ids[n] = top if seen_block else 0
    return ids, top + 1


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """`param_groups_weight_decay` split by depth: group lr scale = layer_decay ** (top - layer id).

    Each group carries an explicit `lr_scale`; `build_optimizer` turns it into the group's lr so that
    the schedule (which scales every group's initial lr by one factor) keeps the ratios.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"--layer-decay should be in (0, 1], got {layer_decay}")
    ids, n = layer_ids(model)
    by_param = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for base in param_groups_weight_decay(model, weight_decay):
        buckets: dict[int, list] = {}
        for p in base["params"]:
            buckets.setdefault(ids[by_param[id(p)]], []).append(p)
        for layer, params in sorted(buckets.items(), reverse=True):  # the top (scale 1) first: the logged lr
            groups.append({"params": params, "weight_decay": base["weight_decay"],
                           "lr_scale": layer_decay ** (n - 1 - layer), "layer_id": layer})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    fused: bool | None = None, layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW without decay on norms / biases / embeddings; `layer_decay` < 1 gives deeper layers
    larger learning rates (fine-tuning recipes of BEiT, DeiT III, ConvNeXt: lr × decay^(depth from top))."""
    if layer_decay is None or layer_decay == 1.0:
        groups = param_groups_weight_decay(model, weight_decay)
    else:
        groups = param_groups_layer_decay(model, weight_decay, layer_decay)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


class CosineWarmupSchedule:
    """lr(step) = base·(step+1)/warmup during warm-up, then cosine from base down to min_lr.

    Works on any optimiser: each group's own starting lr (`initial_lr`) is scaled by the same factor,
    so tasks that give some groups a different lr keep the ratio.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.0, decay_fn=None):
        # decay_fn(step) -> factor replaces the cosine after warm-up (a task's poly or step schedule)
        self.decay_fn = decay_fn
        self.optimizer, self.total_steps = optimizer, max(1, total_steps)
        self.warmup_steps, self.min_lr_ratio = max(0, min(warmup_steps, self.total_steps)), min_lr_ratio
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.step_count = 0

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_fn is not None:
            return float(self.decay_fn(step))
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def set_step(self, step: int) -> float:
        """Set every group's lr for optimisation step `step` (0-based); returns the base group's lr."""
        self.step_count = step
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])


class ModelEma:
    """An exponential moving average of the weights: ema ← decay·ema + (1 − decay)·model after each step."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        src = model.state_dict()
        floats_e, floats_m = [], []
        for k, v in ema_state.items():
            if v.is_floating_point():
                floats_e.append(v)
                floats_m.append(src[k].detach())
            else:
                v.copy_(src[k])
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
