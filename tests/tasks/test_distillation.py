"""DeiT's distillation losses against values computed by hand (official losses.py semantics)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hybridzoo
from hybridzoo.tasks._distillation import DistillationLoss


class FixedTeacher(nn.Module):
    """Returns given logits whatever the input; counts calls and records grad mode."""

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.w = nn.Parameter(torch.ones(()))  # would get a gradient if the teacher were not under no_grad
        self.grad_enabled: list[bool] = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.logits * self.w


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _ce(row, target):
    return -_log_softmax(row)[target]


STUDENT_CLS = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.2]]
STUDENT_DIST = [[0.3, -0.2, 1.5], [1.0, 0.0, -0.5]]
TEACHER = [[0.1, 3.0, 0.2], [2.5, -1.0, 0.0]]   # arg-max: 1, 0
LABELS = [0, 1]


def _outputs(requires_grad=False):
    return (torch.tensor(STUDENT_CLS, requires_grad=requires_grad),
            torch.tensor(STUDENT_DIST, requires_grad=requires_grad))


def test_hard_distillation_by_hand():
    alpha = 0.5
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(TEACHER), "hard", alpha=alpha)
    loss = loss_fn(torch.zeros(2, 3, 4, 4), _outputs(), torch.tensor(LABELS))
    base = sum(_ce(r, t) for r, t in zip(STUDENT_CLS, LABELS)) / 2
    hard = (_ce(STUDENT_DIST[0], 1) + _ce(STUDENT_DIST[1], 0)) / 2
    assert loss.item() == pytest.approx((1 - alpha) * base + alpha * hard, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_by_hand(tau):
    alpha = 0.3
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(TEACHER), "soft", alpha=alpha, tau=tau)
    loss = loss_fn(torch.zeros(2, 3, 4, 4), _outputs(), torch.tensor(LABELS))
    base = sum(_ce(r, t) for r, t in zip(STUDENT_CLS, LABELS)) / 2
    kl = 0.0
    for s, t in zip(STUDENT_DIST, TEACHER):
        ls = _log_softmax([v / tau for v in s])
        lt = _log_softmax([v / tau for v in t])
        kl += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))  # KL(teacher ‖ student)
    # summed, times τ², divided by B·classes (= 6 here), not by the batch size
    soft = kl * tau * tau / 6
    assert loss.item() == pytest.approx((1 - alpha) * base + alpha * soft, rel=1e-6)


def test_none_uses_the_class_head_only():
    teacher = FixedTeacher(TEACHER)
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "none")
    base = sum(_ce(r, t) for r, t in zip(STUDENT_CLS, LABELS)) / 2
    assert loss_fn(None, _outputs(), torch.tensor(LABELS)).item() == pytest.approx(base, rel=1e-6)
    assert loss_fn(None, torch.tensor(STUDENT_CLS), torch.tensor(LABELS)).item() == pytest.approx(base, rel=1e-6)
    assert teacher.grad_enabled == []  # never called
    assert DistillationLoss(nn.CrossEntropyLoss(), None, "none")(None, _outputs(), torch.tensor(LABELS)).item() \
        == pytest.approx(base, rel=1e-6)


def test_teacher_runs_without_grad_and_student_gets_both_gradients():
    teacher = FixedTeacher(TEACHER)
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=0.5, tau=2.0)
    cls_logits, dist_logits = _outputs(requires_grad=True)
    loss_fn(torch.zeros(2, 3, 4, 4), (cls_logits, dist_logits), torch.tensor(LABELS)).backward()
    assert teacher.grad_enabled == [False]
    assert teacher.w.grad is None
    assert cls_logits.grad.abs().sum() > 0 and dist_logits.grad.abs().sum() > 0


def test_teacher_stays_in_eval_mode():
    teacher = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(48, 3))
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard")
    assert not teacher.training
    loss_fn.train()
    assert not teacher.training


def test_errors():
    with pytest.raises(ValueError, match="distillation_type"):
        DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(TEACHER), "medium")
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "hard")
    # a student without a distillation token is not an error: it distils through its class token
    # (DeiT's "usual distillation", tests/studies/test_studies.py::test_class_token_distillation)


def test_with_a_distilled_student_and_a_cnn_teacher():
    torch.manual_seed(0)
    student = hybridzoo.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                                     depth=1, num_heads=2, num_classes=4).train()
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 4))
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.5)
    x = torch.randn(3, 3, 32, 32)
    loss = loss_fn(x, student(x), torch.tensor([0, 1, 2]))
    loss.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    assert student.dist_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
