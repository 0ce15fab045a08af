"""The PVTv2 feed-forward block shared by SegFormer and VVT: its computation, the official key layouts
it is renamed from, and that both models use it under the names their checkpoints always had."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import hybridzoo
from hybridzoo.layers import CONV_FFN_LAYOUTS, ConvFFN, convert_conv_ffn

SEG_SMALL = dict(embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 8), depths=(1, 2, 1, 1), decoder_dim=24, num_classes=5)
VVT_SMALL = dict(embed_dims=(16, 24, 32, 48), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))


def _reference(ffn: ConvFFN, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The block written out: tokens → NCHW map (a copy), depthwise conv, GELU, back to tokens."""
    y = F.linear(x, ffn.fc1.weight, ffn.fc1.bias)
    b, n, c = y.shape
    y = F.conv2d(y.transpose(1, 2).reshape(b, c, h, w), ffn.dwconv.weight, ffn.dwconv.bias, padding=1, groups=c)
    return F.linear(F.gelu(y.flatten(2).transpose(1, 2)), ffn.fc2.weight, ffn.fc2.bias)


def test_conv_ffn_is_linear_depthwise_conv_gelu_linear():
    torch.manual_seed(0)
    ffn = ConvFFN(8, 20).eval()
    x = torch.randn(2, 6 * 5, 8)
    torch.testing.assert_close(ffn(x, 6, 5), _reference(ffn, x, 6, 5))
    assert sorted(ffn.state_dict()) == ["dwconv.bias", "dwconv.weight", "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    with pytest.raises(ValueError, match="30 tokens do not form a 5×5 map"):
        ffn(x, 5, 5)


@pytest.mark.parametrize("layout", sorted(CONV_FFN_LAYOUTS))
def test_every_official_layout_renames_to_the_same_block(layout):
    torch.manual_seed(0)
    ffn = ConvFFN(8, 16).eval()
    theirs = {}
    for ours, name in CONV_FFN_LAYOUTS[layout].items():
        for t in ("weight", "bias"):
            v = ffn.state_dict()[f"{ours}.{t}"].clone()
            if layout == "mmseg" and ours != "dwconv" and t == "weight":
                v = v[:, :, None, None]          # mmseg's MixFFN uses 1×1 convolutions
            theirs[f"block.3.ffn.{name}.{t}"] = v
    converted = convert_conv_ffn(theirs, "block.3.ffn", "stages.1.mlp", layout)
    other = ConvFFN(8, 16).eval()
    other.load_state_dict({k[len("stages.1.mlp."):]: v for k, v in converted.items()})
    x = torch.randn(1, 12, 8)
    assert torch.equal(other(x, 3, 4), ffn(x, 3, 4))
    with pytest.raises(KeyError, match="fc1|dense1|layers.0"):
        convert_conv_ffn({}, "block.3.ffn", "m", layout)


@pytest.mark.parametrize("name, kw, prefix", [("segformer_b0", SEG_SMALL, "encoder.stages"),
                                               ("vvt_tiny", VVT_SMALL, "stages")])
def test_both_models_use_the_shared_block_under_their_old_names(name, kw, prefix):
    model = hybridzoo.create_model(name, **kw)
    ffns = [m for m in model.modules() if isinstance(m, ConvFFN)]
    assert len(ffns) == sum(kw["depths"])
    # the keys weights were saved under before the block moved to layers/: such files load as they are
    pattern = re.compile(rf"^{re.escape(prefix)}\.\d\.blocks\.\d\.mlp\.(fc1|dwconv|fc2)\.(weight|bias)$")
    mlp_keys = [k for k in model.state_dict() if ".mlp." in k]
    assert mlp_keys and all(pattern.match(k) for k in mlp_keys)


def _to_nvlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our SegFormer state dict in NVlabs/SegFormer's layout (`backbone.block{n}`, `mlp.dwconv.dwconv`)."""
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"^encoder\.stages\.(\d)\.patch_embed\.", lambda m: f"backbone.patch_embed{int(m[1]) + 1}.", k)
        k2 = re.sub(r"^encoder\.stages\.(\d)\.blocks\.", lambda m: f"backbone.block{int(m[1]) + 1}.", k2)
        k2 = re.sub(r"^encoder\.stages\.(\d)\.norm\.", lambda m: f"backbone.norm{int(m[1]) + 1}.", k2)
        k2 = k2.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
        m = re.match(r"^decode_head\.linear_c\.(\d)\.(weight|bias)$", k2)
        if m:
            k2, v = f"decode_head.linear_c{int(m[1]) + 1}.proj.{m[2]}", v.flatten(1) if v.ndim == 4 else v
        k2 = k2.replace("decode_head.classifier.", "decode_head.linear_pred.")
        out[k2] = v
    return out


def test_segformer_nvlabs_layout_loads_through_the_shared_converter(tmp_path):
    torch.manual_seed(0)
    model = hybridzoo.create_model("segformer_b0", **SEG_SMALL).eval()
    official = _to_nvlabs(model.state_dict())
    assert "backbone.block2.1.mlp.dwconv.dwconv.weight" in official
    path = tmp_path / "nvlabs.pth"
    torch.save({"state_dict": official}, path)
    torch.manual_seed(1)
    other = hybridzoo.create_model("segformer_b0", pretrained=str(path), **SEG_SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
