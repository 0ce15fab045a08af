"""SegFormer (SCTNet's teacher): MiT encoder sizes, parity with HuggingFace transformers after weight
conversion, the mmseg / SCTNet-teacher layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import hybridzoo
from hybridzoo.profile import count_params

from _seg_layouts import segformer_to_mmseg

SMALL = dict(embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 8), depths=(1, 2, 1, 1), decoder_dim=24, num_classes=5)


@pytest.mark.parametrize("name, encoder_params", [("segformer_b2", 24_196_288), ("segformer_b3", 44_072_128)])
def test_mit_encoder_sizes(name, encoder_params):
    with torch.device("meta"):
        model = hybridzoo.create_model(name)
        teacher = hybridzoo.create_model(name, decoder_dim=256, head_style="mmseg", num_classes=19)
    assert count_params(model.encoder) == encoder_params
    assert count_params(teacher.encoder) == encoder_params
    # mmseg's head: conv (no bias) + BN per stage; the official one: linear with bias, no BN
    assert count_params(teacher.decode_head.linear_c[0]) == 64 * 256 + 2 * 256
    assert count_params(model.decode_head.linear_c[0]) == 64 * 768 + 768


def test_matches_huggingface_after_conversion(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SegformerConfig(hidden_sizes=list(SMALL["embed_dims"]), num_attention_heads=list(SMALL["num_heads"]),
                                       depths=list(SMALL["depths"]), decoder_hidden_size=SMALL["decoder_dim"],
                                       num_labels=SMALL["num_classes"], sr_ratios=[8, 4, 2, 1])
    torch.manual_seed(0)
    hf = transformers.SegformerForSemanticSegmentation(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics in the decode head
        hf.decode_head.batch_norm.running_mean.normal_()
        hf.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    # HuggingFace uses LayerNorm's default eps everywhere
    ours = hybridzoo.create_model("segformer_b0", pretrained=str(path), ln_eps=1e-5, embed_ln_eps=1e-5, **SMALL).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        got = ours.forward_logits(x)
        full = ours(x)
    assert got.shape == ref.shape == (2, 5, 16, 24)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    up = torch.nn.functional.interpolate(ref, size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, up, atol=1e-5, rtol=1e-5)


def test_mmseg_layout_loads(tmp_path):
    torch.manual_seed(0)
    model = hybridzoo.create_model("segformer_b0", head_style="mmseg", **SMALL).eval()
    official = segformer_to_mmseg(model.state_dict())
    assert "backbone.layers.1.1.1.attn.attn.in_proj_weight" in official
    path = tmp_path / "mmseg_segformer.pth"
    torch.save({"state_dict": official}, path)
    torch.manual_seed(1)
    other = hybridzoo.create_model("segformer_b0", head_style="mmseg", pretrained=str(path), **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_head_styles_differ_in_concat_order():
    torch.manual_seed(0)
    model = hybridzoo.create_model("segformer_b0", head_style="mlp", **SMALL).eval()
    feats = model.forward_intermediates(torch.randn(1, 3, 64, 64))
    cat = model.decode_head.concat(feats)
    d = SMALL["decoder_dim"]
    # official order c4, c3, c2, c1: the first block is the 1/32 stage, projected and upsampled
    c4 = torch.nn.functional.interpolate(model.decode_head.linear_c[3](feats[3]), size=feats[0].shape[-2:],
                                         mode="bilinear", align_corners=False)
    torch.testing.assert_close(cat[:, :d], c4)
    torch.testing.assert_close(cat[:, -d:], model.decode_head.linear_c[0](feats[0]))


def test_small_input_is_a_clear_error():
    model = hybridzoo.create_model("segformer_b0", **SMALL).eval()
    with pytest.raises(ValueError, match="segformer_b0"):
        model(torch.randn(1, 3, 16, 16))
