"""Box operations on hand-computed cases: IoU / GIoU, the box coder, focal loss, NMS, Hungarian matching."""

from __future__ import annotations

import math

import pytest
import torch

from hybridzoo.layers.boxes import (
    BoxCoder, batched_nms, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou, giou_loss,
    hungarian_match, nms, sigmoid_focal_loss,
)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [2.0, 0, 3, 1], [0.0, 0, 2, 2]])
    # overlap 1, union 7; disjoint; identical
    assert box_iou(a, b)[0].tolist() == pytest.approx([1 / 7, 0.0, 1.0])
    # GIoU = IoU − (|C| − |A∪B|)/|C|: C = 3×3 for the first pair, 3×2 for the second (union 5)
    assert generalized_box_iou(a, b)[0].tolist() == pytest.approx([1 / 7 - 2 / 9, 0 - (6 - 5) / 6, 1.0])
    loss = giou_loss(a.expand(3, 4), b)
    assert loss.tolist() == pytest.approx([1 - (1 / 7 - 2 / 9), 1 + 1 / 6, 0.0])


def test_box_format_round_trip():
    b = torch.tensor([[1.0, 2, 5, 10]])
    assert box_xyxy_to_cxcywh(b).tolist() == [[3.0, 6.0, 4.0, 8.0]]
    assert torch.equal(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b)


def test_box_coder_hand_computed_and_round_trip():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0, 10, 10]])          # centre (5, 5), 10 × 10
    box = torch.tensor([[5.0, 5, 25, 15]])             # centre (15, 10), 20 × 10
    d = coder.encode(anchor, box)
    assert d[0].tolist() == pytest.approx([1.0, 0.5, math.log(2), 0.0])
    assert coder.decode(anchor, d)[0].tolist() == pytest.approx(box[0].tolist())
    # huge predicted log-sizes are clamped at log(1000/16) instead of overflowing
    big = coder.decode(anchor, torch.tensor([[0.0, 0, 100, 100]]))
    assert torch.isfinite(big).all() and big[0, 2] - big[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-4)


def test_sigmoid_focal_loss_hand_computed():
    logits = torch.zeros(2)
    targets = torch.tensor([1.0, 0.0])
    # p = 0.5: CE = ln 2, (1 − p_t)^2 = 1/4, α_t = 0.25 for the positive, 0.75 for the negative
    out = sigmoid_focal_loss(logits, targets)
    assert out.tolist() == pytest.approx([0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)])
    # a confident correct prediction costs (almost) nothing, a confident wrong one a lot
    easy, hard = sigmoid_focal_loss(torch.tensor([6.0, -6.0]), torch.tensor([1.0, 1.0]))
    assert easy < 1e-6 and hard > 1.0


def test_nms_greedy_order_and_chain():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU(0, 1) = 81 / 119 ≈ 0.68
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    # output is by decreasing score, whatever the input order
    assert nms(boxes[[2, 0, 1]], scores[[2, 0, 1]], 0.5).tolist() == [1, 0]
    # a chain A–B–C (IoU 1/3 each, A and C disjoint): a suppressed B must not suppress C
    chain = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10]])
    assert nms(chain, scores, 0.3).tolist() == [0, 2]
    # every kept box suppresses its own neighbours, not only the first one
    two = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [21, 21, 31, 31]])
    assert nms(two, scores, 0.5).tolist() == [0, 1]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_batched_nms_is_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [0]


def test_hungarian_match_finds_the_optimal_assignment():
    # L1 cost only: matching query 0 to target 0 first (greedy by query) would cost 0.1 + 0.19;
    # the optimum is query 0 → target 1, query 1 → target 0 (0.1 + 0.01)
    tgt = torch.tensor([[0.2, 0.5, 0.1, 0.1], [0.4, 0.5, 0.1, 0.1]])
    q = torch.tensor([[0.3, 0.5, 0.1, 0.1], [0.21, 0.5, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]])
    logits = torch.zeros(3, 3)
    qi, ti = hungarian_match(logits, q, torch.tensor([0, 1]), tgt, cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    assert dict(zip(qi.tolist(), ti.tolist())) == {0: 1, 1: 0}
    # the class cost decides between two queries at the same place
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    same = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)
    qi, ti = hungarian_match(logits, same, torch.tensor([1]), same[:1])
    assert qi.tolist() == [1] and ti.tolist() == [0]
    qi, ti = hungarian_match(logits, same, torch.tensor([], dtype=torch.long), torch.zeros(0, 4))
    assert qi.numel() == 0 and ti.numel() == 0
