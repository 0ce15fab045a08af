"""DeiT's distillation loss (Touvron et al., arXiv 2012.12877; facebookresearch/deit losses.py).

Minimal version written by the engine for its tests; the DeiT engineer's file replaces it.

loss = (1 − α)·base(student_cls, labels) + α·distill, where distill is
- "soft": KL(log_softmax(s/τ) ‖ log_softmax(t/τ)) summed, × τ², divided by `outputs_kd.numel()`
  (B·classes, as the official code does — not a batch mean);
- "hard": cross-entropy of the distillation head against the teacher's argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss"]


class DistillationLoss(nn.Module):
    def __init__(self, base_criterion: nn.Module, teacher: nn.Module, distillation_type: str = "none",
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(f"distillation_type must be none, soft or hard, got {distillation_type!r}")
        self.base_criterion, self.teacher = base_criterion, teacher
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError("distillation needs a model that returns (class logits, distillation logits) in "
                             "training, such as deit_*_distilled_*")
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == "soft":
            t = self.tau
            distill = F.kl_div(F.log_softmax(outputs_kd / t, dim=1), F.log_softmax(teacher_outputs / t, dim=1),
                               reduction="sum", log_target=True) * (t * t) / outputs_kd.numel()
        else:
            distill = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distill * self.alpha
