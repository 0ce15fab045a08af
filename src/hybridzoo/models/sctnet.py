"""SCTNet: Single-Branch CNN with Transformer Semantic Information for Real-Time Segmentation —
Xu et al., AAAI 2024, arXiv 2312.17071.

What is hybrid: at inference SCTNet is a single-branch CNN (ResNet basic blocks, then CFBlocks —
transformer-shaped blocks whose "attention" is two learnable 7×1 / 1×7 kernels with a spatial
softmax and a channel normalisation — and DDRNet's DAPPM). During training only, a frozen SegFormer
teacher transfers its semantics through the semantic information alignment module (SIAM): backbone
feature alignment at 1/16 and 1/32 and shared-decoder-head alignment, all with a channel-wise
distillation loss (τ = 4, weights 3/15/15/15). `model.deploy()` drops the auxiliary head and SIAM.

Official code: xzz777/SCTNet (mmseg 0.26) `mmseg/models/backbones/sctnet.py`,
`decode_heads/{sct_head,sct_head_auxiliary,vit_guidance_head}.py`, `losses/alignment_loss.py`.
Deviations: none in the network. SyncBatchNorm becomes BatchNorm2d (convert with
`nn.SyncBatchNorm.convert_sync_batchnorm` for multi-GPU training, as the recipes use). As in the
official code, the init calls have no effect (mmcv's init helpers receive tensors, not modules):
everything keeps PyTorch's default init and the CFBlock attention kernels start at zero.
The registered variants count backbone + SCTHead + auxiliary head (what is trained; 4,693,062 /
17,588,326 for 19 classes); `deploy()` gives the deployed network (4,654,643 / 17,437,779).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import DropPath, check_image_input
from hybridzoo.registry import register_model

__all__ = ["SCTNet", "SCTNetBackbone", "CFBlock", "ConvolutionalAttention", "DAPPM", "SCTHead", "SIAM",
           "channel_wise_divergence", "convert_official", "official_fps_settings", "sctnet_s_seg50", "sctnet_s_seg75",
           "sctnet_b_seg50", "sctnet_b_seg75", "sctnet_b_seg100"]


# ---------------------------------------------------------------------------------- CNN stages

class BasicBlock(nn.Module):
    """ResNet basic block; the last block of a stage leaves out its final ReLU (`no_relu`)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, downsample: nn.Module | None = None,
                 no_relu: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample = downsample
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out + (self.downsample(x) if self.downsample is not None else x)
        return out if self.no_relu else self.relu(out)


def _make_layer(in_chs: int, out_chs: int, blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_chs != out_chs:
        downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride), nn.BatchNorm2d(out_chs))
    layers = [BasicBlock(in_chs, out_chs, stride, downsample)]
    layers += [BasicBlock(out_chs, out_chs, 1, no_relu=(i == blocks - 1)) for i in range(1, blocks)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------- CFBlock

class ConvolutionalAttention(nn.Module):
    """The CFBlock's attention: learnable 7×1 and 1×7 kernels act as shared keys/values.

    Each branch convolves the (BN-normalised) input with its kernel (C → 64 "queries·keys"),
    applies a softmax over the spatial positions of every channel and divides by the sum over the
    channels of each of the 8 heads (a double normalisation), then convolves back with the same
    kernel transposed (64 → C, the "values"). The two branches are summed.
    """

    def __init__(self, in_chs: int, out_chs: int, inter_chs: int = 64, num_heads: int = 8):
        super().__init__()
        if out_chs % num_heads:
            raise ValueError(f"out_chs ({out_chs}) must be a multiple of num_heads ({num_heads})")
        self.inter_chs, self.num_heads = inter_chs, num_heads
        self.norm = nn.BatchNorm2d(in_chs)
        # Zero, as the official model starts: its trunc-normal init call is a no-op on a tensor.
        self.kv = nn.Parameter(torch.zeros(inter_chs, in_chs, 7, 1))
        self.kv3 = nn.Parameter(torch.zeros(inter_chs, in_chs, 1, 7))

    def _act_dn(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n, self.num_heads, self.inter_chs // self.num_heads, h * w).softmax(dim=3)
        x = x / (x.sum(dim=2, keepdim=True) + 1e-6)
        return x.reshape(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x1 = F.conv2d(self._act_dn(F.conv2d(x, self.kv, padding=(3, 0))), self.kv.transpose(1, 0), padding=(3, 0))
        x3 = F.conv2d(self._act_dn(F.conv2d(x, self.kv3, padding=(0, 3))), self.kv3.transpose(1, 0), padding=(0, 3))
        return x1 + x3


class MLP(nn.Module):
    """BN → 3×3 conv → GELU → dropout → 3×3 conv → dropout (hidden ratio 1)."""

    def __init__(self, chs: int, drop: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(chs, eps=1e-6)
        self.conv1 = nn.Conv2d(chs, chs, 3, 1, 1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(chs, chs, 3, 1, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv2(self.drop(self.act(self.conv1(self.norm(x))))))


class CFBlock(nn.Module):
    """Conv-Former block: x + DropPath(ConvAttention(x)), then x + DropPath(MLP(x))."""

    def __init__(self, in_chs: int, out_chs: int, num_heads: int = 8, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.attn_l = ConvolutionalAttention(in_chs, out_chs, inter_chs=64, num_heads=num_heads)
        self.mlp_l = MLP(out_chs, drop_rate)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn_l(x))
        return x + self.drop_path(self.mlp_l(x))


# --------------------------------------------------------------------------------------- DAPPM

def _bn_relu_conv(in_chs: int, out_chs: int, k: int = 1, pool: nn.Module | None = None) -> nn.Sequential:
    layers = ([pool] if pool is not None else []) + [nn.BatchNorm2d(in_chs), nn.ReLU(), nn.Conv2d(in_chs, out_chs, k, padding=k // 2)]
    return nn.Sequential(*layers)


class DAPPM(nn.Module):
    """DDRNet's deep aggregation pyramid pooling: pooled branches (k5/s2, k9/s4, k17/s8, global)
    merged hierarchically by 3×3 "process" convs, compressed, plus a 1×1 shortcut."""

    def __init__(self, in_chs: int, inter_chs: int, out_chs: int):
        super().__init__()
        self.scale1 = _bn_relu_conv(in_chs, inter_chs, pool=nn.AvgPool2d(5, 2, 2))
        self.scale2 = _bn_relu_conv(in_chs, inter_chs, pool=nn.AvgPool2d(9, 4, 4))
        self.scale3 = _bn_relu_conv(in_chs, inter_chs, pool=nn.AvgPool2d(17, 8, 8))
        self.scale4 = _bn_relu_conv(in_chs, inter_chs, pool=nn.AdaptiveAvgPool2d((1, 1)))
        self.scale0 = _bn_relu_conv(in_chs, inter_chs)
        self.process1 = _bn_relu_conv(inter_chs, inter_chs, 3)
        self.process2 = _bn_relu_conv(inter_chs, inter_chs, 3)
        self.process3 = _bn_relu_conv(inter_chs, inter_chs, 3)
        self.process4 = _bn_relu_conv(inter_chs, inter_chs, 3)
        self.compression = _bn_relu_conv(inter_chs * 5, out_chs)
        self.shortcut = _bn_relu_conv(in_chs, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        outs = [self.scale0(x)]
        for scale, process in ((self.scale1, self.process1), (self.scale2, self.process2),
                               (self.scale3, self.process3), (self.scale4, self.process4)):
            outs.append(process(up(scale(x)) + outs[-1]))
        return self.compression(torch.cat(outs, 1)) + self.shortcut(x)


# ------------------------------------------------------------------------------------ backbone

class SCTNetBackbone(nn.Module):
    """Stem (1/4) → 2 basic blocks (1/4) → 2 (1/8, x2) → 2 (1/16) → CFBlock (x3) → conv down (1/32)
    → 2 CFBlocks (x5) → DAPPM, upsampled to 1/8 and concatenated with x2 (x_out, 4c channels)."""

    def __init__(self, *, in_chans: int = 3, base_channels: int = 64, spp_channels: int = 128,
                 layer_nums: Sequence[int] = (2, 2, 2), num_heads: int = 8, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1):
        super().__init__()
        c = base_channels
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.relu = nn.ReLU()
        self.layer1 = _make_layer(c, c, layer_nums[0])
        self.layer2 = _make_layer(c, 2 * c, layer_nums[1], stride=2)
        self.layer3 = _make_layer(2 * c, 4 * c, layer_nums[2], stride=2)
        # Every CFBlock gets the same drop-path rate in the official code (no linear decay).
        self.layer3_2 = CFBlock(4 * c, 4 * c, num_heads, drop_rate, drop_path_rate)
        self.convdown4 = nn.Sequential(nn.Conv2d(4 * c, 8 * c, 3, 2, 1), nn.BatchNorm2d(8 * c), nn.ReLU())
        self.layer4 = CFBlock(8 * c, 8 * c, num_heads, drop_rate, drop_path_rate)
        self.layer5 = CFBlock(8 * c, 8 * c, num_heads, drop_rate, drop_path_rate)
        self.spp = DAPPM(8 * c, spp_channels, 2 * c)
        self.base_channels = c

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x1 = self.layer1(self.conv1(x))                  # c, 1/4
        x2 = self.layer2(self.relu(x1))                  # 2c, 1/8
        x3 = self.layer3_2(self.relu(self.layer3(self.relu(x2))))  # 4c, 1/16
        x4 = self.layer4(self.relu(self.convdown4(x3)))  # 8c, 1/32
        x5 = self.layer5(self.relu(x4))                  # 8c, 1/32
        x6 = F.interpolate(self.spp(x5), size=x2.shape[-2:], mode="bilinear", align_corners=False)
        return {"x_out": torch.cat([x2, x6], 1), "x2": x2, "x3": x3, "x5": x5}


class SCTHead(nn.Module):
    """BN → ReLU → 3×3 conv → BN → ReLU → 1×1 classifier (`conv_seg`), at 1/8 resolution."""

    def __init__(self, in_chs: int, chs: int, num_classes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, chs, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(chs)
        self.relu = nn.ReLU()
        self.conv_seg = nn.Conv2d(chs, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.relu(self.bn2(self.conv1(self.relu(self.bn1(x))))))


# ----------------------------------------------------------------------------------------- SIAM

def channel_wise_divergence(feat_t: torch.Tensor, feat_s: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """CWD (Shu et al. 2021): per channel, KL(softmax(t/τ) ‖ softmax(s/τ)) over H·W, × τ², / (N·C).

    The student map is bilinearly resized to the teacher's size first, as the official loss does.
    """
    if feat_s.shape[-2:] != feat_t.shape[-2:]:
        feat_s = F.interpolate(feat_s, size=feat_t.shape[-2:], mode="bilinear", align_corners=False)
    n, c, h, w = feat_s.shape
    t = feat_t.float().reshape(-1, h * w) / tau
    s = feat_s.float().reshape(-1, h * w) / tau
    p_t = t.softmax(dim=1)
    return (p_t * (t.log_softmax(dim=1) - s.log_softmax(dim=1))).sum() * tau ** 2 / (n * c)


def _align_scale(stu: torch.Tensor, tea: torch.Tensor) -> torch.Tensor:
    """Standardise every student channel over N·H·W, then give it the teacher channel's mean and std."""
    n, c, h, w = stu.shape
    s = stu.transpose(0, 1).reshape(c, -1)
    s = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + 1e-6)
    t = tea.transpose(0, 1).reshape(c, -1)
    s = s * t.std(-1, keepdim=True) + t.mean(-1, keepdim=True)
    return s.reshape(c, n, h, w).transpose(0, 1)


class SIAM(nn.Module):
    """Semantic information alignment (training only): a frozen SegFormer teacher and the student's
    1×1 alignment projections (official names `feature_transforms`, `convstage4`, `convstage3`).

    Pairs (teacher ← student), CWD weights 3, 15, 15, 15:
    SDHA: teacher logits ← the frozen teacher decoder's `fusion_conv` + classifier applied to the
    student's x_out projected to 4×256 channels, upsampled to 1/4 and re-coloured with the teacher's
    per-channel statistics; teacher fused feature ← the student's fused feature.
    BFA: MiT stage 4 ← Conv1×1(x5); MiT stage 3 ← Conv1×1(x3).
    """

    def __init__(self, teacher: nn.Module, base_channels: int, loss_weights: Sequence[float] = (3, 15, 15, 15),
                 tau: float = 4.0):
        super().__init__()
        dims = teacher.encoder.embed_dims
        dec = teacher.decode_head.linear_fuse.conv.out_channels
        n_in = len(teacher.decode_head.linear_c)
        self.feature_transforms = nn.Conv2d(4 * base_channels, dec * n_in, 1)
        self.convstage4 = nn.Conv2d(8 * base_channels, dims[3], 1)
        self.convstage3 = nn.Conv2d(4 * base_channels, dims[2], 1)
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.loss_weights, self.tau = tuple(loss_weights), tau

    def train(self, mode: bool = True) -> "SIAM":
        super().train(mode)
        self.teacher.eval()   # the teacher is frozen: BN statistics and dropout stay in eval mode
        return self

    def features(self, img: torch.Tensor, feats: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        head = self.teacher.decode_head
        with torch.no_grad():
            mit = self.teacher.encoder(img)
            fused_t, logits_t, cat_t = head(mit)
        stu = self.feature_transforms(feats["x_out"])
        stu = F.interpolate(stu, size=mit[0].shape[-2:], mode="bilinear", align_corners=False)
        stu_fused = head.linear_fuse(_align_scale(stu, cat_t))   # gradients pass through the frozen decoder
        stu_logits = head.classify(stu_fused)
        feat_t = [logits_t, fused_t, mit[3], mit[2]]
        feat_s = [stu_logits, stu_fused, self.convstage4(feats["x5"]), self.convstage3(feats["x3"])]
        return feat_t, feat_s

    def forward(self, img: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        feat_t, feat_s = self.features(img, feats)
        return sum(w * channel_wise_divergence(t, s, self.tau) for w, t, s in zip(self.loss_weights, feat_t, feat_s))


def build_teacher(base_channels: int, num_classes: int, in_chans: int = 3, teacher_model: str | None = None,
                  **overrides: Any) -> nn.Module:
    """The official teacher: mmseg SegFormer with a 256-wide conv+BN decoder, MiT-B2 for S, B3 for B."""
    from hybridzoo.factory import create_model

    name = teacher_model or ("segformer_b2" if base_channels <= 32 else "segformer_b3")
    cfg = dict(decoder_dim=256, head_style="mmseg", ln_eps=1e-6, embed_ln_eps=1e-6, drop_path_rate=0.0,
               num_classes=num_classes, in_chans=in_chans)
    cfg.update(overrides)
    return create_model(name.replace("-", "_"), **cfg)


# ---------------------------------------------------------------------------------------- model

class SCTNet(nn.Module):
    """SCTNet: eval output logits (B, K, H, W) at the input size; training output a dict with
    `logits`, `aux_logits` (weight `aux_loss_weights`) and, with SIAM enabled, `loss_siam`."""

    # `hybridzoo train` on the fast CPU path takes channels-last unless told otherwise: a step 1.14x at
    # 2 x 512 x 1024, level at the demo's 64² scenes (benchmarks/RESULTS.md, session 34)
    train_channels_last = True

    def __init__(self, *, num_classes: int = 19, in_chans: int = 3, base_channels: int = 64, spp_channels: int = 128,
                 num_heads: int = 8, drop_rate: float = 0.0, drop_path_rate: float = 0.1, aux_head: bool = True,
                 siam: bool = False, teacher_kwargs: dict[str, Any] | None = None):
        super().__init__()
        c = base_channels
        self.num_classes, self.in_chans, self.base_channels = num_classes, in_chans, c
        self.backbone = SCTNetBackbone(in_chans=in_chans, base_channels=c, spp_channels=spp_channels,
                                       num_heads=num_heads, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.decode_head = SCTHead(4 * c, 4 * c, num_classes)
        self.auxiliary_head = SCTHead(2 * c, 2 * c, num_classes) if aux_head else None
        self.aux_loss_weights = (0.4,)
        self.siam: SIAM | None = None
        if siam:
            self.siam = SIAM(build_teacher(c, num_classes, in_chans, **(teacher_kwargs or {})), c)

    def enable_siam(self, teacher: str | os.PathLike | nn.Module | None = None, teacher_model: str | None = None,
                    **teacher_kwargs: Any) -> "SCTNet":
        """Attach SIAM with a frozen teacher: a module, or weights (mmseg / SCTNet `teacher_*` / HF /
        ours) loaded into the official teacher architecture."""
        if isinstance(teacher, nn.Module):
            model = teacher
        else:
            from hybridzoo.factory import load_weights

            model = build_teacher(self.base_channels, self.num_classes, self.in_chans, teacher_model, **teacher_kwargs)
            if teacher is not None:
                try:
                    load_weights(model, teacher)
                except ValueError as official_error:
                    # a teacher trained with `hybridzoo train --model segformer_bX` has the registered
                    # decoder (its width, the MLP head); SIAM reads either head style
                    from hybridzoo.factory import create_model

                    name = (teacher_model or ("segformer_b2" if self.base_channels <= 32 else "segformer_b3"))
                    model = create_model(name.replace("-", "_"), num_classes=self.num_classes, in_chans=self.in_chans)
                    try:
                        load_weights(model, teacher)
                    except ValueError:
                        raise official_error from None
        device = next(self.parameters()).device
        self.siam = SIAM(model, self.base_channels).to(device)
        self.siam.train(self.training)
        return self

    def deploy(self) -> "SCTNet":
        """The single-branch CNN used at inference: backbone + SCTHead, no auxiliary head, no SIAM."""
        model = copy.copy(self)
        model._modules = dict(self._modules)
        model._modules["auxiliary_head"] = None
        model._modules["siam"] = None
        model = copy.deepcopy(model)
        return model.eval()

    def bench_configs(self) -> list[dict[str, Any]]:
        """What `hybridzoo bench` times: the deployed network at 1024×2048 and 512×1024, batch 1 (the
        paper's FPS setting), each next to the SegFormer teacher it learned from at the same size."""
        deployed = self.deploy()
        teacher = build_teacher(self.base_channels, self.num_classes, self.in_chans)
        teacher_name = "segformer_b2" if self.base_channels <= 32 else "segformer_b3"
        rows = []
        for h, w in ((1024, 2048), (512, 1024)):
            rows.append(dict(name=f"deployed {h}x{w}", module=deployed, input_size=(3, h, w), batch_size=1, train=False))
            rows.append(dict(name=f"teacher {teacher_name} {h}x{w}", module=teacher, input_size=(3, h, w),
                             batch_size=1, train=False))
        return rows

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image_input(x, self, self.in_chans)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        feats = self.forward_features(x)
        logits = self.decode_head(feats["x_out"])
        if not self.training:
            return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # training: the heads' own 1/8 maps, which the loss resizes to the labels (bilinear, as mmseg's decode heads
        # do in their losses); on the CPU its one-pass kernel does so a row at a time and never holds the full-size
        # logits (tasks.segmentation.cross_entropy)
        out = {"logits": logits}
        if self.auxiliary_head is not None:
            out["aux_logits"] = self.auxiliary_head(feats["x2"])
        if self.siam is not None:
            out["loss_siam"] = self.siam(x, feats)
        return out


# ------------------------------------------------------------------------- official checkpoints

def convert_official(state_dict: dict[str, torch.Tensor], model: SCTNet) -> dict[str, torch.Tensor]:
    """mmseg 0.26 `EncoderDecoder_Distill` layout → ours.

    backbone.* and decode_head.* keep their names; auxiliary_head.0.* (AU_SCTHead) → auxiliary_head.*;
    auxiliary_head.1.{feature_transforms,convstage3,convstage4} → siam.*; the teacher
    (auxiliary_head.1.teacher_backbone / teacher_head, mmseg MiT + SegformerHead) → siam.teacher.*.
    Parts the model does not have (no auxiliary head, SIAM not enabled) are dropped.
    """
    from hybridzoo.models.segformer import _convert_mmseg

    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    teacher_keys = {}
    for k, v in state_dict.items():
        if k.startswith("auxiliary_head.0."):
            out["auxiliary_head." + k[len("auxiliary_head.0."):]] = v
        elif k.startswith(("auxiliary_head.1.teacher_backbone.", "auxiliary_head.1.teacher_head.")):
            teacher_keys[k[len("auxiliary_head.1."):]] = v
        elif k.startswith("auxiliary_head.1."):
            out["siam." + k[len("auxiliary_head.1."):]] = v
        else:
            out[k] = v
    if teacher_keys and model.siam is not None:
        depths = [len(s.blocks) for s in model.siam.teacher.encoder.stages]
        for k, v in _convert_mmseg(teacher_keys, depths, "teacher_backbone", "teacher_head").items():
            out["siam.teacher." + k] = v
    return {k: v for k, v in out.items() if k in own}


def adapt_to_checkpoint(state_dict: dict[str, torch.Tensor], model: SCTNet) -> str | None:
    """A deployed checkpoint (backbone + decode head only, as exported for inference) builds the
    deployed network: the auxiliary head is dropped from `model` instead of being reported missing."""
    has_aux = any(k.startswith("auxiliary_head.") for k in state_dict)
    if model.auxiliary_head is None or has_aux or not any(k.startswith("decode_head.") for k in state_dict):
        return None
    model.auxiliary_head = None
    return ("the checkpoint holds the deployed network (no auxiliary head), so the model is built as "
            "create_model(..., aux_head=False); train from it with a fresh auxiliary head by building with "
            "aux_head=True and load_weights(..., strict=False)")


# ------------------------------------------------------------------------------------- variants

def official_fps_settings() -> list[dict[str, Any]]:
    """The official FPS settings (batch 1, FP32, eval model
    = backbone + SCTHead + final resize, as `speed/torch_speed.py`); FPS reported on an RTX 3090."""
    return [
        dict(model="sctnet_b_seg100", input_size=(3, 1024, 2048), batch_size=1, reported_fps=62.8, device="RTX 3090"),
        dict(model="sctnet_b_seg75", input_size=(3, 768, 1536), batch_size=1, reported_fps=105.2, device="RTX 3090"),
        dict(model="sctnet_b_seg50", input_size=(3, 512, 1024), batch_size=1, reported_fps=144.9, device="RTX 3090"),
        dict(model="sctnet_s_seg75", input_size=(3, 768, 1536), batch_size=1, reported_fps=149.2, device="RTX 3090"),
        dict(model="sctnet_s_seg50", input_size=(3, 512, 1024), batch_size=1, reported_fps=160.3, device="RTX 3090"),
    ]


_S = dict(base_channels=32, spp_channels=64)
_B = dict(base_channels=64, spp_channels=128)
_TEST = dict(base_channels=16, spp_channels=16, num_classes=5)
_NOTE = ("Cityscapes, 19 classes. params counts backbone + SCTHead + auxiliary head (training network without the "
         "SIAM teacher); deploy() → {deployed:,} (the paper's figure). Seg50/75/100 = test input 512×1024 / 768×1536 / "
         "1024×2048, same weights per size class. gflops: GCNet's README (third party), which leaves out the CFBlock attention convolutions (functional F.conv2d calls that "
         "mmcv's module-hook counter does not see: 0.94 G for S, 1.88 G for B at 512×1024); macs_g = FlopCounterMode on the "
         "official eval network, which counts them. mIoU and FPS: official README.")


def _card(reported, params, deployed, size, macs):
    return dict(paper="SCTNet", arxiv="2312.17071", task="segmentation", reported=reported, params=params,
                macs_g=macs, input_size=size, test_kwargs=_TEST, test_input_size=(3, 64, 96), notes=_NOTE.format(deployed=deployed))


@register_model(**_card(dict(params_m=4.6, gflops=7.1, miou=72.94, fps=160.3, resolution=(512, 1024)),
                        4_693_062, 4_654_643, (3, 512, 1024), 8.007))
def sctnet_s_seg50(**kwargs):
    return SCTNet(**{**_S, **kwargs})


@register_model(**_card(dict(params_m=4.6, gflops=16.0, miou=76.33, fps=149.2, resolution=(768, 1536)),
                        4_693_062, 4_654_643, (3, 768, 1536), 18.015))
def sctnet_s_seg75(**kwargs):
    return SCTNet(**{**_S, **kwargs})


@register_model(**_card(dict(params_m=17.4, gflops=28.1, miou=76.46, fps=144.9, resolution=(512, 1024)),
                        17_588_326, 17_437_779, (3, 512, 1024), 29.881))
def sctnet_b_seg50(**kwargs):
    return SCTNet(**{**_B, **kwargs})


@register_model(**_card(dict(params_m=17.4, gflops=63.2, miou=79.83, fps=105.2, resolution=(768, 1536)),
                        17_588_326, 17_437_779, (3, 768, 1536), 67.232))
def sctnet_b_seg75(**kwargs):
    return SCTNet(**{**_B, **kwargs})


@register_model(**_card(dict(params_m=17.4, gflops=112.3, miou=80.51, fps=62.8, resolution=(1024, 2048)),
                        17_588_326, 17_437_779, (3, 1024, 2048), 119.523))
def sctnet_b_seg100(**kwargs):
    return SCTNet(**{**_B, **kwargs})
