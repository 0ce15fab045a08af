"""ACT-specific behaviour: tokenisation order, cross-scale token attention with summed overlaps,
the fusion hand-over order, padding of arbitrary sizes, the unused conv and the official layout."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import hybridzoo
from hybridzoo.models.act import CSTABlock, image_to_tokens, tokens_to_image
from hybridzoo.profile import count_params

SMALL = dict(n_feats=8, num_stages=2, n_resblocks=1, reduction=4, num_heads=4, mlp_ratio=2)


def _small(name="act_x2", seed=0, **kw):
    torch.manual_seed(seed)
    return hybridzoo.create_model(name, **{**SMALL, **kw}).eval()


def test_full_size_params_and_frozen_mean_shift():
    expected = {"act_x2": 46_029_723, "act_x3": 46_214_363, "act_x4": 46_177_435}
    for name, n in expected.items():
        with torch.device("meta"):
            m = hybridzoo.create_model(name)
        assert count_params(m) == n
        frozen = [p for p in m.parameters() if not p.requires_grad]
        assert sum(p.numel() for p in frozen) == 24  # the two mean-shift 1×1 convs
        assert count_params(m.unused_conv) == 36_928


def test_tokens_match_unfold_and_fold():
    x = torch.randn(2, 5, 9, 12)
    t = image_to_tokens(x, 3)
    assert torch.equal(t, F.unfold(x, 3, stride=3).transpose(1, 2))
    assert torch.equal(tokens_to_image(t, (9, 12), 3), F.fold(t.transpose(1, 2), (9, 12), 3, stride=3))


def _csta_reference(block: CSTABlock, x: torch.Tensor, size) -> torch.Tensor:
    """CSTA with explicit loops over the overlapping 6×6 tokens (no unfold/fold)."""
    H, W = size
    k = block.token_size
    a, b = x.chunk(2, dim=-1)
    img = tokens_to_image(b, size, k)
    nh, nw = H // k - 1, W // k - 1
    large = torch.stack([img[:, :, i * k:i * k + 2 * k, j * k:j * k + 2 * k].flatten(1)
                         for i in range(nh) for j in range(nw)], dim=1)
    large = block.large_embed(large)
    a2 = a + block.attn_small(a, large)
    large2 = large + block.attn_large(large, a)
    patches = block.large_unembed(large2)
    out = torch.zeros_like(img)
    for n in range(nh * nw):
        i, j = divmod(n, nw)
        out[:, :, i * k:i * k + 2 * k, j * k:j * k + 2 * k] += patches[:, n].reshape(img.shape[0], -1, 2 * k, 2 * k)
    y = torch.cat((a2, image_to_tokens(out, k)), dim=-1)
    return y + block.mlp(block.norm(y))


def test_csta_overlapping_tokens_are_summed():
    torch.manual_seed(0)
    block = CSTABlock(dim=8 * 9, num_heads=4, mlp_ratio=2, token_size=3).eval()
    size = (12, 15)
    x = torch.randn(2, (12 // 3) * (15 // 3), 72)
    with torch.no_grad():
        torch.testing.assert_close(block(x, size), _csta_reference(block, x, size), rtol=1e-5, atol=1e-5)


def test_cross_attention_heads_and_large_token_width():
    m = hybridzoo.create_model("act_x4", n_feats=64, num_stages=1, n_resblocks=1)
    blk = m.csta_blocks[0]
    assert blk.attn_small.num_heads == 4 and blk.attn_small.head_dim == 72  # n_heads//2, 576//8
    assert blk.large_embed.fc1.in_features == 32 * 36 == 1152 and blk.large_embed.fc2.out_features == 288
    assert m.head[1].conv1.kernel_size == (5, 5)  # head ResBlocks use 5×5 kernels


def test_fusion_hands_cnn_slot_to_transformer():
    m = _small()
    rec = {}
    m.fusion_blocks[0].register_forward_hook(lambda mod, inp, out: rec.__setitem__("f", inp[0] + out))
    m.fusion_mlps[0].register_forward_hook(lambda mod, inp, out: rec.__setitem__("t", inp[0]))
    m.fusion_cnns[0].register_forward_hook(lambda mod, inp, out: rec.__setitem__("c", inp[0]))
    with torch.no_grad():
        m(torch.rand(1, 3, 12, 12) * 255)
    f = rec["f"]
    torch.testing.assert_close(rec["t"], image_to_tokens(f[:, :8], 3))  # first half: the CNN's slot
    torch.testing.assert_close(rec["c"], f[:, 8:])


@pytest.mark.parametrize("name,scale", [("act_x2", 2), ("act_x3", 3), ("act_x4", 4)])
def test_output_size_any_input(name, scale):
    m = _small(name)
    with torch.no_grad():
        for h, w in [(12, 9), (7, 10), (2, 1)]:
            assert m(torch.rand(1, 3, h, w) * 255).shape == (1, 3, scale * h, scale * w)


def test_padding_is_reflect_and_cropped():
    m = _small()
    x = torch.rand(1, 3, 10, 13) * 255
    with torch.no_grad():
        y = m(x)
        ref = m(F.pad(x, (0, 2, 0, 2), mode="reflect"))[..., :20, :26]
    torch.testing.assert_close(y, ref)


def test_unused_conv_does_not_change_output():
    m = _small()
    x = torch.rand(1, 3, 9, 9) * 255
    with torch.no_grad():
        y = m(x)
        m.unused_conv.weight.normal_()
        assert torch.equal(m(x), y)


# ---- official layout: our key → jinsuyoo/act key, written from the official module tree ----------

_OURS_TO_OFFICIAL = [
    (r"^head\.(\d)\.conv1\.", r"head.\1.body.0."),
    (r"^head\.(\d)\.conv2\.", r"head.\1.body.2."),
    (r"^mhsa_blocks\.(\d+)\.norm1\.", r"mhsa_block.\1.0.norm."),
    (r"^mhsa_blocks\.(\d+)\.attn\.qkv\.", r"mhsa_block.\1.0.fn.to_qkv."),
    (r"^mhsa_blocks\.(\d+)\.attn\.proj\.", r"mhsa_block.\1.0.fn.to_out.0."),
    (r"^mhsa_blocks\.(\d+)\.norm2\.", r"mhsa_block.\1.1.norm."),
    (r"^mhsa_blocks\.(\d+)\.mlp\.fc1\.", r"mhsa_block.\1.1.fn.net.0."),
    (r"^mhsa_blocks\.(\d+)\.mlp\.fc2\.", r"mhsa_block.\1.1.fn.net.3."),
    (r"^csta_blocks\.(\d+)\.large_embed\.norm\.", r"csta_block.\1.0.0."),
    (r"^csta_blocks\.(\d+)\.large_embed\.fc1\.", r"csta_block.\1.0.1."),
    (r"^csta_blocks\.(\d+)\.large_embed\.fc2\.", r"csta_block.\1.0.3."),
    (r"^csta_blocks\.(\d+)\.large_unembed\.norm\.", r"csta_block.\1.3.0."),
    (r"^csta_blocks\.(\d+)\.large_unembed\.fc1\.", r"csta_block.\1.3.1."),
    (r"^csta_blocks\.(\d+)\.large_unembed\.fc2\.", r"csta_block.\1.3.3."),
    (r"^csta_blocks\.(\d+)\.norm\.", r"csta_block.\1.4.norm."),
    (r"^csta_blocks\.(\d+)\.mlp\.fc1\.", r"csta_block.\1.4.fn.net.0."),
    (r"^csta_blocks\.(\d+)\.mlp\.fc2\.", r"csta_block.\1.4.fn.net.3."),
    (r"^csta_blocks\.(\d+)\.attn_small\.", r"csta_block.\1.1."),
    (r"^csta_blocks\.(\d+)\.attn_large\.", r"csta_block.\1.2."),
    (r"^(csta_block\.\d+\.[12])\.norm_q\.", r"\1.norm."),
    (r"^(csta_block\.\d+\.[12])\.norm_kv\.", r"\1.norm2."),
    (r"^(csta_block\.\d+\.[12])\.q\.", r"\1.fn.to_q."),
    (r"^(csta_block\.\d+\.[12])\.kv\.", r"\1.fn.to_kv."),
    (r"^(csta_block\.\d+\.[12])\.proj\.", r"\1.fn.to_out.0."),
    (r"^cnn_branch\.(\d+)\.blocks\.(\d+)\.conv1\.", r"cnn_branch.\1.body.\2.body.0."),
    (r"^cnn_branch\.(\d+)\.blocks\.(\d+)\.conv2\.", r"cnn_branch.\1.body.\2.body.2."),
    (r"^cnn_branch\.(\d+)\.blocks\.(\d+)\.ca\.fc1\.", r"cnn_branch.\1.body.\2.body.3.conv_du.0."),
    (r"^cnn_branch\.(\d+)\.blocks\.(\d+)\.ca\.fc2\.", r"cnn_branch.\1.body.\2.body.3.conv_du.2."),
    (r"^fusion_blocks\.(\d+)\.(\d+)\.conv1\.", r"fusion_block.\1.\2.body.0."),
    (r"^fusion_blocks\.(\d+)\.(\d+)\.conv2\.", r"fusion_block.\1.\2.body.2."),
    (r"^fusion_mlps\.(\d+)\.norm\.", r"fusion_mlp.\1.0."),
    (r"^fusion_mlps\.(\d+)\.fc1\.", r"fusion_mlp.\1.1."),
    (r"^fusion_mlps\.(\d+)\.fc2\.", r"fusion_mlp.\1.3."),
    (r"^fusion_cnns\.(\d+)\.conv1\.", r"fusion_cnn.\1.0."),
    (r"^fusion_cnns\.(\d+)\.conv2\.", r"fusion_cnn.\1.2."),
    (r"^upsample\.", r"tail.0."),
    (r"^conv_out\.", r"tail.1."),
]


def _official_state_dict(model) -> dict[str, torch.Tensor]:
    n_blocks = len(model.cnn_branch[0].blocks)
    out = {}
    for key, v in model.state_dict().items():
        new = key
        if key.startswith("unused_conv."):
            new = f"cnn_branch.{model.num_stages}." + key.split(".", 1)[1]
        new = re.sub(r"^cnn_branch\.(\d+)\.conv\.", rf"cnn_branch.\1.body.{n_blocks}.", new)
        for pattern, repl in _OURS_TO_OFFICIAL:
            new = re.sub(pattern, repl, new)
        out[new] = v.clone()
    return out


@pytest.mark.parametrize("name,lightning", [("act_x4", False), ("act_x3", True)])
def test_official_layout_loads(tmp_path, name, lightning):
    model = _small(name, seed=3)
    with torch.no_grad():  # norms away from their identity init, so a swapped key would show
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    sd = _official_state_dict(model)
    assert "cnn_branch.2.weight" in sd and "csta_block.1.2.fn.to_kv.weight" in sd
    assert "cnn_branch.0.body.1.weight" in sd and "sub_mean.weight" in sd
    if lightning:  # a PyTorch-Lightning checkpoint of ACTLitModule
        sd = {"state_dict": {f"net.{k}": v for k, v in sd.items()}, "epoch": 3}
    path = tmp_path / "act_official.pt"
    torch.save(sd, path)
    loaded = hybridzoo.create_model(name, pretrained=str(path), **SMALL).eval()
    x = torch.rand(1, 3, 12, 9) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bad_scale_is_rejected():
    with pytest.raises(ValueError, match="upscale"):
        hybridzoo.create_model("act_x2", upscale=5)
