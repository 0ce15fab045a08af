"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", arXiv 1708.02002) on any
`features_only` backbone of the zoo — Mobile-Former as the Mobile-Former paper transfers it
(arXiv 2108.05895, §"object detection"), BoTNet, CoAtNet, CvT, VVT.

The detector: the backbone's last three maps (C3–C5; strides 8/16/32 for every hierarchical model
here except CvT, whose last three are 4/8/16) → FPN (1×1 laterals, top-down nearest upsampling,
3×3 outputs) plus P6/P7 by stride-2 3×3 convolutions on P5 (ReLU between), → two heads shared over
levels: `num_convs` 3×3 conv + ReLU towers of `head_width` channels, then A·K class logits
(prior bias −log((1−π)/π), π = 0.01) and A·4 box deltas. A = 9 anchors per position: sizes
4·stride × {2^0, 2^⅓, 2^⅔}, aspect ratios {½, 1, 2}.

Training (`loss`): anchors with IoU ≥ 0.5 to a ground-truth box are positive, < 0.4 negative, the
rest ignored, and every ground-truth box's best anchor is positive too (detectron2's
allow_low_quality_matches); sigmoid focal loss (α 0.25, γ 2) over all non-ignored anchors and
smooth-L1 (β 0.1) on the deltas — or GIoU on the decoded boxes (`box_loss="giou"`) — over the
positives, both divided by the number of positives. Inference (`detect`): per level the 1000 best
(anchor, class) scores above `score_thresh` (1000 per level, pooled), decoded, clipped, class-wise NMS at 0.5, at most
`max_det` per image. Everything in torch (no torchvision).

The paper's exact RetinaNet figures were not available to this implementation (see
docs/detection.md); parameters and MACs are pinned to ours at 800×1333, the paper's input size.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers.boxes import BoxCoder, batched_nms, box_iou, giou_loss, sigmoid_focal_loss
from hybridzoo.registry import register_model

__all__ = ["RetinaNet", "FPN", "build_backbone", "load_backbone_weights", "check_detector_input"]


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A zoo model with `features_only=True` (its classifier removed); kwargs go to its constructor."""
    from hybridzoo.factory import create_model

    return create_model(name, features_only=True, **kwargs)


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load classification weights (ours or an official layout), or the backbone of another detector's
    weights, into a `features_only` backbone.

    The classifier's keys (head, the last bridge, ...) have no place in the backbone and are
    dropped — their names are returned; any *missing* backbone key is an error.
    """
    from hybridzoo.factory import read_state_dict

    target = backbone.model
    state = read_state_dict(path)
    own = target.state_dict()
    prefix = "backbone.model."
    if set(own) - set(state) and any(k.startswith(prefix) for k in state):
        # another detector's weights (RetinaNet, MF-DETR): its backbone
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if set(own) - set(state):
        convert = getattr(importlib.import_module(type(target).__module__), "convert_official", None)
        if convert is not None:
            state = convert(state, target)
    missing = sorted(set(own) - set(state))
    mismatched = sorted(k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    if missing or mismatched:
        raise ValueError(f"{os.fspath(path)!r} does not fit the backbone {getattr(backbone, 'model_name', '')}: "
                         f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, shape mismatches {mismatched[:10]}")
    dropped = sorted(set(state) - set(own))
    target.load_state_dict({k: state[k] for k in own}, strict=True)
    return dropped


def check_detector_input(model: nn.Module, x: torch.Tensor, min_size: int = 32) -> None:
    from hybridzoo.layers.helpers import check_image_input

    check_image_input(x, getattr(model, "model_name", type(model).__name__), 3, min_size=min_size)


class FPN(nn.Module):
    """Feature pyramid: laterals + top-down sum + 3×3 smoothing, extra levels by stride-2 convs on P5."""

    def __init__(self, in_chs: list[int], width: int, extra_levels: int = 2):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_chs)
        self.output = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in in_chs)
        self.extra = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(extra_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):   # detectron2's c2_xavier_fill
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        outs = [o(t) for o, t in zip(self.output, lat)]
        p = outs[-1]
        for k, conv in enumerate(self.extra):
            p = conv(F.relu(p) if k > 0 else p)
            outs.append(p)
        return outs


class RetinaHead(nn.Module):
    def __init__(self, width: int, num_anchors: int, num_classes: int, num_convs: int = 4, prior: float = 0.01):
        super().__init__()
        def tower():
            layers = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(width, num_anchors * num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(width, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # the focal loss paper's prior: every anchor starts at p(object) = π, so the loss does not explode
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))
        self.num_classes = num_classes

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cls, box = [], []
        for f in feats:
            B, _, H, W = f.shape
            c = self.cls_logits(self.cls_tower(f))     # B × A·K × H × W → B × (H·W·A) × K
            cls.append(c.view(B, -1, self.num_classes, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, self.num_classes))
            b = self.box_deltas(self.box_tower(f))
            box.append(b.view(B, -1, 4, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, 4))
        return torch.cat(cls, 1), torch.cat(box, 1)


def make_anchors(shapes: list[tuple[int, int]], strides: list[int], device, dtype=torch.float32,
                 scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), ratios=(0.5, 1.0, 2.0), size_per_stride: float = 4.0) -> torch.Tensor:
    """(Σ H·W·A, 4) anchors in the heads' order: position-major, then ratio, then scale."""
    out = []
    for (h, w), s in zip(shapes, strides):
        base = []
        for r in ratios:
            for sc in scales:
                size = size_per_stride * s * sc
                aw, ah = size / math.sqrt(r), size * math.sqrt(r)     # r = h / w, area kept
                base.append([-aw / 2, -ah / 2, aw / 2, ah / 2])
        base_t = torch.tensor(base, device=device, dtype=dtype)
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy, cx, cy], -1).reshape(-1, 1, 4)
        out.append((centres + base_t[None]).reshape(-1, 4))
    return torch.cat(out)


class RetinaNet(nn.Module):
    """RetinaNet on a zoo backbone; see the module docstring. `forward` returns a dict of tensors."""

    def __init__(self, backbone: str = "mobile_former_508m", num_classes: int = 80, fpn_width: int = 256,
                 head_width: int | None = None, num_convs: int = 4, extra_levels: int = 2,
                 backbone_kwargs: dict | None = None, pretrained_backbone: str | None = None,
                 box_loss: str = "smooth_l1", score_thresh: float = 0.05, nms_iou: float = 0.5, max_det: int = 100,
                 topk_per_level: int = 1000, in_chans: int = 3):
        super().__init__()
        if in_chans != 3:
            raise ValueError(f"RetinaNet takes RGB images (in_chans=3), got in_chans={in_chans}")
        if box_loss not in ("smooth_l1", "giou"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got {box_loss!r}")
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        if pretrained_backbone:
            load_backbone_weights(self.backbone, pretrained_backbone)
        info = self.backbone.feature_info[-3:]
        self.in_strides = [int(i["reduction"]) for i in info]
        self.strides = self.in_strides + [self.in_strides[-1] * 2 ** (k + 1) for k in range(extra_levels)]
        self.fpn = FPN([int(i["num_chs"]) for i in info], fpn_width, extra_levels)
        self.head = RetinaHead(head_width or fpn_width, 9, num_classes, num_convs)
        if head_width and head_width != fpn_width:
            raise ValueError("head_width must equal fpn_width (the heads read the FPN levels directly)")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.box_loss, self.score_thresh, self.nms_iou = box_loss, score_thresh, nms_iou
        self.max_det, self.topk_per_level = max_det, topk_per_level
        self.coder = BoxCoder()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_detector_input(self, x)
        feats = self.backbone(x)[-3:]
        levels = self.fpn(feats)
        cls, box = self.head(levels)
        anchors = make_anchors([tuple(l.shape[-2:]) for l in levels], self.strides, x.device)
        return {"cls_logits": cls, "box_deltas": box, "anchors": anchors}

    # -- training ---------------------------------------------------------------------------------
    def loss(self, out: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]],
             image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cls, deltas, anchors = out["cls_logits"].float(), out["box_deltas"].float(), out["anchors"]
        cls_terms, box_terms, num_pos = [], [], 0
        for b, t in enumerate(targets):
            keep = ~t["crowd"] if "crowd" in t else torch.ones(len(t["labels"]), dtype=torch.bool, device=cls.device)
            gt, lab = t["boxes"][keep].float(), t["labels"][keep]
            target_cls = torch.zeros_like(cls[b])
            if len(gt) == 0:
                valid = torch.ones(len(anchors), dtype=torch.bool, device=cls.device)
                cls_terms.append(sigmoid_focal_loss(cls[b][valid], target_cls[valid]).sum())
                continue
            iou = box_iou(anchors, gt)                            # A × G
            best, idx = iou.max(1)
            pos = best >= 0.5
            # low-quality matches: each box's best anchors (ties included) are positive
            gt_best = iou.max(0).values
            low = (iou == gt_best[None]) & (gt_best[None] > 0)
            extra = low.any(1)
            idx = torch.where(extra & ~pos, low.float().argmax(1), idx)
            pos = pos | extra
            valid = pos | (best < 0.4)
            target_cls[pos, lab[idx[pos]]] = 1.0
            cls_terms.append(sigmoid_focal_loss(cls[b][valid], target_cls[valid]).sum())
            num_pos += int(pos.sum())
            if pos.any():
                matched = gt[idx[pos]]
                if self.box_loss == "giou":
                    pred = self.coder.decode(anchors[pos], deltas[b][pos])
                    box_terms.append(giou_loss(pred, matched).sum())
                else:
                    enc = self.coder.encode(anchors[pos], matched)
                    box_terms.append(F.smooth_l1_loss(deltas[b][pos], enc, beta=0.1, reduction="sum"))
        norm = max(1.0, float(num_pos))
        loss_cls = torch.stack(cls_terms).sum() / norm
        loss_box = (torch.stack(box_terms).sum() if box_terms else deltas.sum() * 0.0) / norm
        return loss_cls + loss_box, {"loss_cls": float(loss_cls.detach()), "loss_box": float(loss_box.detach())}

    @staticmethod
    def select_image(out: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """Image i's outputs as a batch of one (the anchors are shared)."""
        return {"cls_logits": out["cls_logits"][i:i + 1], "box_deltas": out["box_deltas"][i:i + 1],
                "anchors": out["anchors"]}

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def postprocess(self, out: dict[str, torch.Tensor], image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Per image: boxes (N, 4) in the input's pixels, scores (N,), labels (N,)."""
        cls, deltas, anchors = out["cls_logits"].float(), out["box_deltas"].float(), out["anchors"]
        K = self.num_classes
        h, w = image_size
        # one candidate pool over all levels (the per-level 1000 of detectron2, times the levels)
        topk = self.topk_per_level * len(self.strides)
        results = []
        for b in range(cls.shape[0]):
            scores = cls[b].sigmoid().flatten()
            cand = (scores > self.score_thresh).nonzero().squeeze(1)
            if len(cand) > topk:
                cand = cand[scores[cand].topk(topk).indices]
            a_idx, labels = cand // K, cand % K
            boxes = self.coder.decode(anchors[a_idx], deltas[b, a_idx])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            scores = scores[cand]
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[: self.max_det]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


# -- variants -------------------------------------------------------------------------------------

def _test_kwargs() -> dict:
    from hybridzoo.models.mobile_former import _test_kwargs as mf_test

    return dict(backbone="mobile_former_52m", backbone_kwargs=mf_test(), fpn_width=16, num_convs=1, num_classes=3)


_CARD = dict(paper="Mobile-Former", arxiv="2108.05895", task="detection", params_source="ours",
             input_size=(3, 800, 1333), test_input_size=(3, 64, 64), flops_rtol=0.01)


@register_model(**_CARD, reported=dict(resolution=800), params=17_968_316, macs_g=167.445,
                test_kwargs=_test_kwargs(),
                notes="RetinaNet (FPN P3-P7, 9 anchors, 4-conv 256-wide heads) on Mobile-Former-508M; "
                      "params/MACs are this implementation's at 800x1333 (the paper's table was not available)")
def retinanet_mf_508m(**kwargs):
    return RetinaNet(**{"backbone": "mobile_former_508m", **kwargs})


@register_model(**_CARD, reported=dict(resolution=800), params=16_088_964, macs_g=162.949,
                test_kwargs=_test_kwargs(),
                notes="RetinaNet on Mobile-Former-294M; params/MACs are this implementation's at 800x1333")
def retinanet_mf_294m(**kwargs):
    return RetinaNet(**{"backbone": "mobile_former_294m", **kwargs})


@register_model(paper="Mobile-Former", arxiv="2108.05895", task="detection", params_source="ours",
                reported=dict(resolution=128), params=1_859_195, macs_g=0.06697, input_size=(3, 128, 128),
                test_kwargs=_test_kwargs(), test_input_size=(3, 64, 64), demo=True, flops_rtol=0.01,
                notes="CPU demo: RetinaNet P3-P5, 64-wide single-conv heads on Mobile-Former-52M, 3 classes")
def retinanet_mf_demo(**kwargs):
    return RetinaNet(**{"backbone": "mobile_former_52m", "num_classes": 3, "fpn_width": 64, "num_convs": 1,
                        "extra_levels": 0, **kwargs})
