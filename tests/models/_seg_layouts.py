"""Test helpers: write our SegFormer / SCTNet weights in the official (mmseg 0.x) key layout.

Written from the official module names (mmseg `mit.py` / SCTNet `vit_guidance_head.py`:
`layers.i.0.projection`, `layers.i.1.j.attn.attn.in_proj_weight`, `ffn.layers.{0,1,4}`, `layers.i.2`;
`SegformerHead.convs.i.conv/bn`, `fusion_conv`, `conv_seg`), independently of `convert_official`.
"""

from __future__ import annotations

import torch


def segformer_to_mmseg(sd: dict[str, torch.Tensor], enc: str = "backbone", head: str = "decode_head") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "encoder":
            i = parts[2]
            rest = parts[3:]
            if rest[0] == "patch_embed":
                name = f"{enc}.layers.{i}.0.{'projection' if rest[1] == 'proj' else 'norm'}.{rest[2]}"
            elif rest[0] == "norm":
                name = f"{enc}.layers.{i}.2.{rest[1]}"
            else:  # blocks.j....
                j, sub = rest[1], rest[2:]
                base = f"{enc}.layers.{i}.1.{j}"
                if sub[0] in ("norm1", "norm2"):
                    name = f"{base}.{sub[0]}.{sub[1]}"
                elif sub[:2] == ["attn", "q"] or sub[:2] == ["attn", "kv"]:
                    continue  # merged below into in_proj
                elif sub[:2] == ["attn", "proj"]:
                    name = f"{base}.attn.attn.out_proj.{sub[2]}"
                elif sub[:2] in (["attn", "sr"], ["attn", "norm"]):
                    name = f"{base}.attn.{sub[1]}.{sub[2]}"
                elif sub[0] == "mlp":
                    idx = {"fc1": 0, "dwconv": 1, "fc2": 4}[sub[1]]
                    if v.ndim == 2:
                        v = v[:, :, None, None]
                    name = f"{base}.ffn.layers.{idx}.{sub[2]}"
                else:
                    raise KeyError(k)
            out[name] = v
        elif parts[0] == "decode_head":
            if parts[1] == "linear_c":
                out[f"{head}.convs.{parts[2]}.{'.'.join(parts[3:])}"] = v
            elif parts[1] == "linear_fuse":
                out[f"{head}.fusion_conv.{'.'.join(parts[2:])}"] = v
            elif parts[1] == "classifier":
                out[f"{head}.conv_seg.{parts[2]}"] = v
        else:
            raise KeyError(k)
    # nn.MultiheadAttention keeps q, k, v stacked in one in_proj
    for k in sd:
        if k.endswith("attn.q.weight"):
            stem = k[: -len("attn.q.weight")]
            i, j = stem.split(".")[2], stem.split(".")[4]
            base = f"{enc}.layers.{i}.1.{j}.attn.attn"
            out[f"{base}.in_proj_weight"] = torch.cat([sd[stem + "attn.q.weight"], sd[stem + "attn.kv.weight"]], 0)
            out[f"{base}.in_proj_bias"] = torch.cat([sd[stem + "attn.q.bias"], sd[stem + "attn.kv.bias"]], 0)
    return out


def sctnet_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our SCTNet state dict → mmseg 0.26 EncoderDecoder_Distill keys."""
    out, teacher = {}, {}
    for k, v in sd.items():
        if k.startswith(("backbone.", "decode_head.")):
            out[k] = v
        elif k.startswith("auxiliary_head."):
            out["auxiliary_head.0." + k[len("auxiliary_head."):]] = v
        elif k.startswith("siam.teacher."):
            teacher[k[len("siam.teacher."):]] = v
        elif k.startswith("siam."):
            out["auxiliary_head.1." + k[len("siam."):]] = v
        else:
            raise KeyError(k)
    if teacher:
        for k, v in segformer_to_mmseg(teacher, "teacher_backbone", "teacher_head").items():
            out["auxiliary_head.1." + k] = v
    return out
