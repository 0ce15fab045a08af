"""DeiT's knowledge-distillation losses (Touvron et al., arXiv 2012.12877, §5; official `losses.py`).

A distilled student returns `(cls_logits, dist_logits)` in training mode. The class head learns from
the labels, the distillation head from a teacher (RegNetY-16GF in the paper):

    loss = (1 − α) · base(cls_logits, labels) + α · distill(dist_logits, teacher(inputs))

- hard: cross-entropy against the teacher's arg-max, `CE(dist_logits, teacher.argmax(1))`;
- soft: τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), summed and divided by `dist_logits.numel()` (B·classes,
  the "legacy PyTorch" normalisation the official code keeps — not the batch mean);
- none: the base loss on the class head only.

The teacher runs under `no_grad`. Defaults α = 0.5, τ = 1.0 are the official command line's.
Deviation: the teacher is switched to eval mode here and kept there when the loss module's `train()`
is called (the official `main.py` calls `teacher.eval()` itself and never trains the criterion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss", "DISTILLATION_TYPES"]

DISTILLATION_TYPES = ("none", "soft", "hard")


class DistillationLoss(nn.Module):
    """Wraps `base_criterion` and adds DeiT's distillation term from `teacher`.

    forward(inputs, outputs, labels): `inputs` are the images the teacher sees, `outputs` the
    student's `(cls_logits, dist_logits)` (or a single tensor when `distillation_type='none'`).
    """

    def __init__(self, base_criterion: nn.Module, teacher: nn.Module | None, distillation_type: str = "none",
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}")
        if distillation_type != "none" and teacher is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher model")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.base_criterion = base_criterion
        self.teacher = teacher.eval() if teacher is not None else None
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            # a student without a distillation token learns from the teacher through its class token
            # (DeiT Table 5's "usual distillation": both terms on the same head)
            outputs_kd = outputs
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = F.kl_div(F.log_softmax(outputs_kd / T, dim=1),
                                         F.log_softmax(teacher_outputs / T, dim=1),
                                         reduction="sum", log_target=True) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha
