"""Vicinity Vision Transformer: what makes the paper the paper."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

import hybridzoo
from hybridzoo.models.vvt import VicinityAttention, abs_clamp, vicinity_angles
from hybridzoo.registry import get_card

TEST_KW = get_card("vvt_tiny").test_kwargs


def _small(**kw):
    torch.manual_seed(0)
    return hybridzoo.create_model("vvt_tiny", **{**TEST_KW, **kw}).eval()


def test_angles_follow_manhattan_distance():
    H, W = 3, 4
    a, b = vicinity_angles(H, W)
    rows, cols = torch.arange(H * W) // W, torch.arange(H * W) % W
    torch.testing.assert_close(a, math.pi / 2 * rows / H)
    torch.testing.assert_close(b, math.pi / 2 * cols / W)
    w = torch.cos(a[:, None] - a[None]) + torch.cos(b[:, None] - b[None])
    manhattan = (rows[:, None] - rows[None]).abs() + (cols[:, None] - cols[None]).abs()
    # the re-weighting is 2 for a token with itself and falls as the tokens move apart
    assert torch.allclose(w.diagonal(), torch.full((H * W,), 2.0))
    for i in range(H * W):
        for j in range(H * W):
            if manhattan[i, j] > 0:
                assert w[i, j] < 2.0
    assert w[0, H * W - 1] == w[0].min()


def test_linear_form_equals_quadratic_vicinity_attention():
    torch.manual_seed(0)
    dim, heads, H, W = 24, 2, 5, 6
    attn = VicinityAttention(dim, heads, fr_ratio=2, se_ratio=1, clamp=False).eval()
    x = torch.randn(2, H * W, dim)
    with torch.no_grad():
        got = attn(x, H, W)
        B, N, _ = x.shape
        d = dim // heads // 2
        q = torch.relu(attn.q_proj(x)).view(B, N, heads, d).transpose(1, 2)
        k = torch.relu(attn.k_proj(x)).view(B, N, heads, d).transpose(1, 2)
        v = attn.v_proj(x).view(B, N, heads, d).transpose(1, 2)
        a, b = vicinity_angles(H, W)
        reweight = torch.cos(a[:, None] - a[None]) + torch.cos(b[:, None] - b[None])
        sim = (q @ k.transpose(-2, -1)) * reweight                  # explicit N×N similarities
        out = (sim @ v) / (sim.sum(-1, keepdim=True) + 1e-4)
        out = attn.out_proj(out.transpose(1, 2).reshape(B, N, -1))
        gate = torch.sigmoid(attn.fpc.fc2(torch.relu(attn.fpc.fc1(x.mean(1)))))
        ref = out + out * gate[:, None]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_feature_reduction_halves_attention_width():
    attn = VicinityAttention(320, 5, fr_ratio=2)
    assert attn.q_proj.out_features == attn.k_proj.out_features == attn.v_proj.out_features == 160
    assert attn.out_proj.in_features == 160 and attn.out_proj.out_features == 320
    assert attn.fpc.fc1.bias is None and attn.fpc.fc1.out_features == 320  # se_ratio 1, no bias


def _attn_flops(attn, H, W, dim):
    x = torch.randn(1, H * W, dim)
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        attn(x, H, W)
    return c.get_total_flops()


def test_attention_cost_is_linear_in_tokens():
    dim = 64
    attn = VicinityAttention(dim, 2, fr_ratio=2).eval()
    f1 = _attn_flops(attn, 16, 16, dim)
    f4 = _attn_flops(attn, 32, 32, dim)   # 4× the tokens
    assert 3.9 < f4 / f1 < 4.1, f4 / f1   # quadratic attention would grow ~16×


def test_abs_clamp_keeps_sign_and_magnitude_range():
    t = torch.tensor([0.0, 1e-6, -1e-6, 0.5, -2.0, 1e6, -1e6])
    out = abs_clamp(t)
    torch.testing.assert_close(out, torch.tensor([0.0, 1e-4, -1e-4, 0.5, -2.0, 1e4, -1e4]))


def test_clamps_are_applied_in_the_attention():
    torch.manual_seed(0)
    attn = VicinityAttention(16, 1, fr_ratio=2).eval()
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        y = attn(x, 4, 4)
        attn.clamp = False
        y_free = attn(x, 4, 4)
    mag = y.abs()
    assert ((mag == 0) | (mag >= 1e-4 * (1 - 1e-6))).all()
    assert torch.allclose(y, y_free, atol=2e-4)


def test_features_only_gives_four_pyramid_levels():
    m = hybridzoo.create_model("vvt_tiny", features_only=True, **TEST_KW).eval()
    x = torch.randn(1, 3, 64, 96)
    feats = m(x)
    assert len(feats) == 4
    for f, info in zip(feats, m.feature_info):
        assert f.shape == (1, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
    assert [i["reduction"] for i in m.feature_info] == [4, 8, 16, 32]


def test_variable_resolution_and_head_contract():
    m = _small(num_classes=7)
    with torch.no_grad():
        for size in [(64, 64), (96, 64), (112, 80)]:
            assert m(torch.randn(2, 3, *size)).shape == (2, 7)
        pre = m.forward_head(m.forward_features(torch.randn(2, 3, 64, 64)), pre_logits=True)
    assert pre.shape == (2, m.num_features)
    m.reset_classifier(3)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def _to_official_key(k: str) -> str:
    # the OpenNLPLab layout: patch_embed{1..4}, block{1..4}.{j}, norm{1..4}; SE as se_fc.{0,2};
    # the FFN's depthwise conv wrapped in a DWConv module (dwconv.dwconv)
    parts = k.split(".")
    if parts[0] == "stages":
        stage = int(parts[1]) + 1
        rest = parts[2:]
        if rest[0] == "patch_embed":
            parts = [f"patch_embed{stage}"] + rest[1:]
        elif rest[0] == "blocks":
            parts = [f"block{stage}"] + rest[1:]
        else:
            parts = [f"norm{stage}"] + rest[1:]
    k = ".".join(parts)
    return (k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
             .replace("attn.fpc.fc1.", "attn.se_fc.0.").replace("attn.fpc.fc2.", "attn.se_fc.2."))


def test_official_checkpoint_layout_loads(tmp_path):
    model = _small()
    official = {_to_official_key(k): v.clone() for k, v in model.state_dict().items()}
    expected_block = {"norm1.weight", "norm1.bias", "attn.k_proj.weight", "attn.k_proj.bias", "attn.v_proj.weight",
                      "attn.v_proj.bias", "attn.q_proj.weight", "attn.q_proj.bias", "attn.out_proj.weight",
                      "attn.out_proj.bias", "attn.se_fc.0.weight", "attn.se_fc.2.weight", "norm2.weight",
                      "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.dwconv.dwconv.weight",
                      "mlp.dwconv.dwconv.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
    assert {k[len("block3.0."):] for k in official if k.startswith("block3.0.")} == expected_block
    assert {"patch_embed1.proj.weight", "patch_embed4.norm.bias", "norm4.weight", "head.weight"} <= set(official)
    path = tmp_path / "vvt_official.pth"
    torch.save({"model": official}, path)
    loaded = hybridzoo.create_model("vvt_tiny", pretrained=str(path), **TEST_KW).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

