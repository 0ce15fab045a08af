"""Box operations for detection, in torch only (no torchvision): conversions, IoU / GIoU, the
RetinaNet box coder, sigmoid focal loss, (batched) NMS and DETR's Hungarian matcher.

Boxes are (x1, y1, x2, y2) in pixels unless a name says otherwise (`cxcywh`: centre and size,
DETR's normalised layout). The NMS is the greedy algorithm of torchvision.ops.nms: boxes are
visited by decreasing score and every later box whose IoU with a kept one exceeds the threshold is
dropped; `batched_nms` runs it per class with the coordinate-offset trick (boxes of different
classes are shifted apart so that they never overlap).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "box_xyxy_to_cxcywh", "box_cxcywh_to_xyxy", "box_area", "box_iou", "generalized_box_iou", "giou_loss",
    "sigmoid_focal_loss", "nms", "batched_nms", "BoxCoder", "hungarian_match",
]


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU, (N, 4) × (M, 4) → (N, M); empty-union pairs give 0."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=1e-12)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019): IoU − (|C| − |A∪B|) / |C|, C the enclosing box."""
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=1e-12)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = wh[..., 0] * wh[..., 1]
    return iou - (enclose - union) / enclose.clamp(min=1e-12)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − GIoU of matched pairs (row i with row i), (N, 4) each → (N,)."""
    if pred.numel() == 0:
        return pred.new_zeros(0)
    return 1.0 - _paired_giou(pred, target)


def _paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(a) + box_area(b) - inter
    elt = torch.minimum(a[:, :2], b[:, :2])
    erb = torch.maximum(a[:, 2:], b[:, 2:])
    ewh = (erb - elt).clamp(min=0)
    enclose = ewh[:, 0] * ewh[:, 1]
    return inter / union.clamp(min=1e-12) - (enclose - union) / enclose.clamp(min=1e-12)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet's focal loss per element (summed by the caller): −α_t (1 − p_t)^γ log p_t.

    targets are 0/1 of the logits' shape; alpha < 0 disables the class weighting.
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the kept boxes, by decreasing score (greedy NMS, as torchvision.ops.nms)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    iou = box_iou(boxes, boxes)
    n = len(boxes)
    # suppressed[j] is set once a kept box i < j overlaps it; one pass over the rows in score order
    over = (iou > iou_threshold).cpu().numpy()
    # one iteration per *kept* box: take the best box still alive, kill everything it overlaps
    alive = np.ones(n, dtype=bool)
    keep, i = [], 0
    while i < n:
        nxt = np.flatnonzero(alive[i:])
        if len(nxt) == 0:
            break
        i += int(nxt[0])
        keep.append(i)
        alive &= ~over[i]
        i += 1
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each class: boxes are offset by label × (max coordinate + 1) so classes never overlap."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


class BoxCoder:
    """R-CNN / RetinaNet deltas: (dx, dy, dw, dh) = (Δcx / w_a, Δcy / h_a, log(w / w_a), log(h / h_a)) × weights.

    `decode` clamps dw, dh at log(1000 / 16) as detectron2 does, so early training cannot overflow exp.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = math.log(1000.0 / 16)):
        self.weights, self.clamp = weights, clamp

    def encode(self, anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        a = box_xyxy_to_cxcywh(anchors)
        b = box_xyxy_to_cxcywh(boxes)
        return torch.stack([wx * (b[:, 0] - a[:, 0]) / a[:, 2], wy * (b[:, 1] - a[:, 1]) / a[:, 3],
                            ww * torch.log(b[:, 2] / a[:, 2]), wh * torch.log(b[:, 3] / a[:, 3])], dim=-1)

    def decode(self, anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        a = box_xyxy_to_cxcywh(anchors.to(deltas.dtype))
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.clamp)
        cx, cy = dx * a[..., 2] + a[..., 0], dy * a[..., 3] + a[..., 1]
        w, h = torch.exp(dw) * a[..., 2], torch.exp(dh) * a[..., 3]
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, tgt_labels: torch.Tensor, tgt_boxes: torch.Tensor,
                    cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DETR's bipartite matching for one image: (query indices, target indices) of the cheapest assignment.

    logits (Q, K+1) with the last column "no object"; boxes (Q, 4) and tgt_boxes (T, 4) normalised cxcywh.
    Cost = −cost_class · p(class) + cost_bbox · L1 + cost_giou · (−GIoU), solved exactly by
    scipy.optimize.linear_sum_assignment.
    """
    from scipy.optimize import linear_sum_assignment

    if len(tgt_labels) == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    prob = logits.float().softmax(-1)
    c = (-cost_class * prob[:, tgt_labels] + cost_bbox * torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
         - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt_boxes.float())))
    qi, ti = linear_sum_assignment(c.cpu().numpy())
    return torch.as_tensor(qi, dtype=torch.long), torch.as_tensor(ti, dtype=torch.long)
