"""BoTNet: what makes the paper the paper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridzoo
from hybridzoo.models.botnet import MHSA, BoTBlock, Bottleneck, RelPosLogits, count_params_paper_style
from hybridzoo.registry import get_card

TEST_KW = get_card("botnet_t3").test_kwargs


def _meta(name, **kw):
    with torch.device("meta"):
        return hybridzoo.create_model(name, **kw)


# --- relative position logits -------------------------------------------------------------------

def _rel_to_abs_pad_trick(rel: torch.Tensor) -> torch.Tensor:
    """The authors' relative→absolute conversion: pad a column, flatten, pad, reshape, slice."""
    b, h, L, _ = rel.shape
    x = torch.cat([rel, rel.new_zeros(b, h, L, 1)], dim=3).reshape(b, h, L * 2 * L)
    x = torch.cat([x, x.new_zeros(b, h, L - 1)], dim=2).reshape(b, h, L + 1, 2 * L - 1)
    return x[:, :, :L, L - 1:]


def _rel_logits_reference(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """q: B×heads×H×W×d → B×heads×(H·W)×(H·W), built the way the authors' TF code does."""
    B, n, H, W, d = q.shape
    lw = torch.einsum("bnxyd,md->bnxym", q, rel_w).reshape(B, n * H, W, 2 * W - 1)
    lw = _rel_to_abs_pad_trick(lw).reshape(B, n, H, W, W)              # [x, y, y']
    lh = torch.einsum("bnxyd,md->bnyxm", q, rel_h).reshape(B, n * W, H, 2 * H - 1)
    lh = _rel_to_abs_pad_trick(lh).reshape(B, n, W, H, H).transpose(2, 3)  # [x, y, x']
    return (lh[..., :, None] + lw[..., None, :]).reshape(B, n, H * W, H * W)


def test_relative_logits_match_the_pad_reshape_trick():
    torch.manual_seed(0)
    H, W, d = 4, 5, 8
    pos = RelPosLogits((H, W), d)
    q = torch.randn(2, 3, H * W, d)
    got = pos(q, H, W)
    ref = _rel_logits_reference(q.reshape(2, 3, H, W, d), pos.rel_height, pos.rel_width)
    torch.testing.assert_close(got, ref)
    # query (0, 0) and key (1, 2): offsets +1 row and +2 columns index the tables at centre + offset
    g = got.reshape(2, 3, H, W, H, W)
    expected = (q.reshape(2, 3, H, W, d)[:, :, 0, 0] * (pos.rel_height[H] + pos.rel_width[W + 1])).sum(-1)
    torch.testing.assert_close(g[:, :, 0, 0, 1, 2], expected)


def test_mhsa_is_softmax_of_scaled_content_plus_scaled_position_logits():
    torch.manual_seed(0)
    dim, heads, H, W = 32, 4, 3, 5
    attn = MHSA(dim, heads, (H, W)).eval()
    x = torch.randn(2, dim, H, W)
    with torch.no_grad():
        got = attn(x)
        q, k, v = attn.qkv(x).flatten(2).transpose(1, 2).reshape(2, H * W, 3, heads, dim // heads).permute(
            2, 0, 3, 1, 4)
        q = q / (dim // heads) ** 0.5          # the authors scale q once, before both products
        logits = q @ k.transpose(-2, -1) + _rel_logits_reference(q.reshape(2, heads, H, W, -1),
                                                                 attn.pos.rel_height, attn.pos.rel_width)
        ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, H, W, dim).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_relative_tables_interpolate_for_a_new_size():
    torch.manual_seed(0)
    pos = RelPosLogits((4, 4), 8)
    q = torch.randn(1, 2, 36, 8)
    assert pos(q, 6, 6).shape == (1, 2, 36, 36)
    # offset 0 stays offset 0 after resampling
    from hybridzoo.models.botnet import _resize_table
    t = _resize_table(pos.rel_height, 11)
    torch.testing.assert_close(t[5], pos.rel_height[3])
    torch.testing.assert_close(t[0], pos.rel_height[0])
    m = hybridzoo.create_model("botnet_t3", **TEST_KW).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 96, 128)).shape == (1, 1000)


# --- architecture ---------------------------------------------------------------------------------

def test_bot50_is_resnet50_with_mhsa_in_c5():
    m = _meta("botnet_bot50")
    c5 = m.stages[3]
    assert all(isinstance(b, BoTBlock) for b in c5) and len(c5) == 3
    assert all(isinstance(b, Bottleneck) and b.se is None for s in m.stages[:3] for b in s)
    assert [len(s) for s in m.stages] == [3, 4, 6, 3]
    first = c5[0]
    assert isinstance(first.pool, nn.AvgPool2d) and first.shortcut[0].stride == (2, 2)
    # MHSA runs at 14×14 (before the pool) at 224, on 4 heads of 128
    assert first.mhsa.pos.rel_height.shape == (27, 128) and first.mhsa.num_heads == 4
    assert c5[1].mhsa.pos.rel_height.shape == (13, 128)
    assert isinstance(m.stem[2], nn.ReLU)
    assert m.feature_info[-1] == dict(num_chs=2048, reduction=32, module="stages.3")
    # ResNet-50 (25,557,032) minus three 3×3 convs (3·512·512·9) plus their q/k/v and relative tables
    resnet50 = 25_557_032
    expected = resnet50 - 3 * 512 * 512 * 9 + 3 * 3 * 512 * 512 + 128 * (27 + 27 + 2 * (13 + 13))
    assert sum(p.numel() for p in m.parameters()) == expected


@pytest.mark.parametrize("name,sizes,res", [("botnet_t3", (3, 4, 6, 6), 224), ("botnet_t4", (3, 4, 23, 6), 224),
                                            ("botnet_t5", (3, 4, 23, 12), 256), ("botnet_t6", (3, 4, 6, 12), 320),
                                            ("botnet_t7", (3, 4, 23, 12), 384)])
def test_s1_nets(name, sizes, res):
    m = _meta(name)
    assert [len(s) for s in m.stages] == list(sizes)
    assert 3 * sum(sizes) + 2 in (59, 77, 110, 128)
    assert get_card(name).input_size == (3, res, res)
    c5 = m.stages[3]
    assert all(isinstance(b, BoTBlock) and isinstance(b.pool, nn.Identity) for b in c5)   # stride one
    assert m.feature_info[-1]["reduction"] == 16
    assert c5[0].mhsa.pos.rel_width.shape == (2 * (res // 16) - 1, 128) and c5[0].mhsa.num_heads == 4
    convs = [b for s in m.stages[:3] for b in s]
    assert all(b.se is not None and b.se.fc1.out_channels == b.bn3.num_features // 16 for b in convs)
    assert all(not hasattr(b, "se") for b in c5)
    assert isinstance(m.stem[2], nn.SiLU)


def _analytic_params(sizes, res, se=True, se_on_attention=False, heads=4, classes=1000):
    """Count BoTNet-S1 parameters by hand, independently of the model code."""
    def se_params(c):
        r = c // 16
        return c * r + r + r * c + c
    total = 3 * 64 * 49 + 2 * 64
    prev, feat = 64, res // 4
    for i, n in enumerate(sizes):
        w = 64 * 2 ** i
        if 0 < i < 3:
            feat //= 2
        for j in range(n):
            total += prev * w + 2 * w                      # 1×1 reduce + BN
            if i < 3:
                total += 9 * w * w + 2 * w                 # 3×3 + BN
            else:
                total += 3 * w * w + (2 * (2 * feat - 1)) * (w // heads) + 2 * w  # q,k,v + R_h,R_w + BN
            total += w * 4 * w + 8 * w                      # 1×1 expand + BN
            if (i < 3 and se) or (i == 3 and se_on_attention):
                total += se_params(4 * w)
            if j == 0:
                total += prev * 4 * w + 8 * w               # projection shortcut + BN
            prev = 4 * w
    return total + prev * classes + classes


PAPER = {"botnet_t3": ((3, 4, 6, 6), 224, 33.5), "botnet_t4": ((3, 4, 23, 6), 224, 54.7),
         "botnet_t5": ((3, 4, 23, 12), 256, 75.1), "botnet_t6": ((3, 4, 6, 12), 320, 53.9),
         "botnet_t7": ((3, 4, 23, 12), 384, 75.1), "botnet_t7_320": ((3, 4, 23, 12), 320, 75.1)}
OURS = {"botnet_t3": 30_500_696, "botnet_t4": 51_739_544, "botnet_t5": 69_131_672, "botnet_t6": 47_917_400,
        "botnet_t7": 69_180_824, "botnet_t7_320": 69_156_248}


@pytest.mark.parametrize("name", list(PAPER))
def test_param_counts_and_the_papers_se_on_attention_count(name):
    sizes, res, paper_m = PAPER[name]
    m = _meta(name)
    ours = sum(p.numel() for p in m.parameters())
    assert ours == OURS[name] == _analytic_params(sizes, res)
    # the paper's figure: the authors' script also counted an SE layer in every BoT block
    paper_style = count_params_paper_style(m)
    assert paper_style == _analytic_params(sizes, res, se_on_attention=True)
    assert abs(paper_style / 1e6 - paper_m) / paper_m < 0.01
    assert abs(ours / 1e6 - paper_m) / paper_m > 0.05   # the faithful model really is smaller
    card = get_card(name)
    assert abs(ours - paper_m * 1e6) <= card.params_rtol * paper_m * 1e6


@pytest.mark.parametrize("name,nz99", [("botnet_t3", 30.4), ("botnet_t4", 51.6), ("botnet_t5", 69.0),
                                       ("botnet_t6", 47.8)])
def test_independent_port_count_is_ours_without_batchnorm_affine(name, nz99):
    m = _meta(name)
    bn = sum(p.numel() for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters())
    assert round((sum(p.numel() for p in m.parameters()) - bn) / 1e6, 1) == nz99


# --- contract -------------------------------------------------------------------------------------

def test_features_only_and_channels_last():
    m = hybridzoo.create_model("botnet_bot50", features_only=True, **TEST_KW).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = m(x)
        feats_cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in m.feature_info]
    assert [96 // f.shape[-1] for f in feats] == [i["reduction"] for i in m.feature_info] == [4, 8, 16, 32]
    for a, b in zip(feats, feats_cl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_head_contract_and_gradients():
    torch.manual_seed(0)
    m = hybridzoo.create_model("botnet_t3", num_classes=5, **TEST_KW).eval()
    for p in m.parameters():   # the zero-initialised last BN γ would hide the attention path
        if p.ndim == 1:
            nn.init.normal_(p, 1.0, 0.1)
    x = torch.randn(2, 3, 64, 64)
    ref = m(x)
    assert ref.shape == (2, 5)
    ref.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.stages[3][0].mhsa.pos.rel_height.grad.abs().sum() > 0
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)


def test_input_size_must_fit_the_strides():
    m = hybridzoo.create_model("botnet_bot50", **TEST_KW).eval()
    with pytest.raises(ValueError, match="multiple of 32"):
        m(torch.randn(1, 3, 48, 64))
