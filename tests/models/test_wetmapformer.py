"""WetMapFormer: what makes the paper the paper, and the notebook faults we do not reproduce."""

from __future__ import annotations

import pytest
import torch

import hybridzoo
from hybridzoo.models.wetmapformer import (FExtractor, LocalWindowAttention, MultiScalePosEmbed, WetMapFormer,
                                           neighbourhood_indices)

SMALL = dict(out_channels=(32, 64), spectral_filters=(4, 8), fe_width=16)


def _reference_lwa(lwa: LocalWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel neighbourhood attention written out directly (NAT's definition), for comparison."""
    B, H, W, C = x.shape
    k, h, d = lwa.kernel_size, lwa.num_heads, lwa.head_dim
    q, key, v = lwa.qkv(x).reshape(B, H, W, 3, h, d).unbind(3)          # B, H, W, heads, d
    out = torch.zeros(B, H, W, h, d)
    for i in range(H):
        for j in range(W):
            kh, kw = min(k, H), min(k, W)
            r0 = min(max(i - kh // 2, 0), H - kh)
            c0 = min(max(j - kw // 2, 0), W - kw)
            keys = [(r, c) for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
            logits = torch.stack([(q[:, i, j] * key[:, r, c]).sum(-1) * d ** -0.5
                                  + lwa.rpb[:, (r - i + k - 1) * (2 * k - 1) + (c - j + k - 1)] for r, c in keys], -1)
            attn = logits.softmax(-1)                                         # B, heads, K
            vals = torch.stack([v[:, r, c] for r, c in keys], -2)             # B, heads, K, d
            out[:, i, j] = (attn.unsqueeze(-1) * vals).sum(-2)
    return lwa.proj(out.reshape(B, H, W, C))


@pytest.mark.parametrize("size,kernel", [((5, 6), 3), ((4, 4), 3), ((7, 5), 5), ((2, 3), 3)])
@pytest.mark.parametrize("dense", [True, False])
def test_local_window_attention_matches_per_pixel_reference(size, kernel, dense):
    torch.manual_seed(0)
    lwa = LocalWindowAttention(16, num_heads=2, kernel_size=kernel).eval()
    torch.nn.init.normal_(lwa.rpb, std=1.0)   # a bias large enough to matter
    lwa.dense_max_tokens = 10 ** 6 if dense else 0
    x = torch.randn(2, *size, 16)
    torch.testing.assert_close(lwa(x), _reference_lwa(lwa, x), atol=1e-5, rtol=1e-5)


def test_dense_and_gathered_paths_agree_with_gradients():
    torch.manual_seed(0)
    lwa = LocalWindowAttention(8, num_heads=2, kernel_size=3)
    torch.nn.init.normal_(lwa.rpb)
    x = torch.randn(1, 6, 6, 8, requires_grad=True)
    grads = []
    for limit in (10 ** 6, 0):
        lwa.dense_max_tokens = limit
        lwa.zero_grad()
        x.grad = None
        lwa(x).pow(2).sum().backward()
        grads.append((x.grad.clone(), lwa.rpb.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)


def test_lwa_is_local():
    """A pixel outside a query's 3×3 window cannot change that query's output."""
    torch.manual_seed(0)
    lwa = LocalWindowAttention(8, num_heads=1, kernel_size=3).eval()
    x = torch.randn(1, 6, 6, 8)
    y = x.clone()
    y[0, 5, 5] += 10.0
    a, b = lwa(x), lwa(y)
    assert torch.equal(a[0, 0, 0], b[0, 0, 0]) and torch.equal(a[0, 2, 2], b[0, 2, 2])
    assert not torch.allclose(a[0, 4, 4], b[0, 4, 4])      # inside its window


def test_neighbourhood_is_clamped_at_borders():
    key, bias = neighbourhood_indices(4, 4, 3)
    # corner query (0, 0) sees rows/cols 0..2 (shifted window), not a padded 3×3 around it
    assert sorted(key[0].tolist()) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    # its bias indices are offsets 0..2 → rows/cols (k−1)..(2k−2) of the 5×5 table
    assert sorted(bias[0].tolist()) == [12, 13, 14, 17, 18, 19, 22, 23, 24]
    # an interior query is centred: offset −1..1 → the middle of the table
    assert sorted(bias[5].tolist()) == [6, 7, 8, 11, 12, 13, 16, 17, 18]


def test_transformer_stage_sees_a_map_larger_than_one_pixel():
    """The notebook's 4×4 stem leaves LWA a single token (fault (a)); ours runs it at 4×4."""
    m = WetMapFormer(**SMALL).eval()
    x = torch.randn(2, 16, 8, 8)
    feats = m.forward_intermediates(x)
    assert [f.shape[-1] for f in feats] == [8, 4]
    nb = WetMapFormer(stem_patch=4, **SMALL).eval()
    assert nb.forward_intermediates(x)[-1].shape[-2:] == (1, 1)


def test_variants_heads_kernel_and_mlp_ratio():
    for name, heads in (("wetmapformer_small", 8), ("wetmapformer_medium", 1), ("wetmapformer_large", 1)):
        with torch.device("meta"):
            m = hybridzoo.create_model(name)
        blocks = [b for s in m.stages for b in s.blocks]
        conv = [b for b in blocks if b.is_conv]
        attn = [b for b in blocks if not b.is_conv]
        depths = {"wetmapformer_small": (1, 1), "wetmapformer_medium": (3, 4), "wetmapformer_large": (6, 8)}[name]
        assert (len(conv), len(attn)) == depths, name
        for b in attn:
            # large: the notebook's 256 // 1024 = 0 heads would silently make these conv blocks (fault)
            assert b.attn.num_heads == heads and b.attn.kernel_size == 3
        for b in blocks:
            # MLP ratio 4, not the notebook's shifted-argument 0
            assert b.mlp.fc1.out_channels == 4 * b.mlp.fc1.in_channels


def test_multiscale_positional_mixing_uses_1_3_5_depthwise():
    pe = MultiScalePosEmbed(8)
    assert [c.kernel_size for c in pe.convs] == [(1, 1), (3, 3), (5, 5)]
    assert all(c.groups == 8 for c in pe.convs)


def test_fextractor_is_spectral_then_spatial():
    fe = FExtractor(in_chans=6, spectral_filters=(4, 8), width=16).eval()
    assert fe.spectral1.kernel_size == (3, 1) and fe.spectral2.kernel_size == (5, 1)   # along the bands
    x = torch.randn(2, 6, 8, 8)
    assert fe(x).shape == (2, 16, 8, 8)
    # spectral convs mix bands only: changing pixel (0, 0) leaves the spectral features of (7, 7) alone
    y = x.clone()
    y[:, :, 0, 0] += 5
    s = lambda t: fe.spectral2(torch.relu(fe.spectral1(t.reshape(2, 1, 6, 64)))).reshape(2, -1, 6, 8, 8)
    assert torch.equal(s(x)[..., 7, 7], s(y)[..., 7, 7]) and not torch.equal(s(x)[..., 0, 0], s(y)[..., 0, 0])


@pytest.mark.parametrize("in_chans", [4, 16, 21])
def test_any_number_of_bands_and_classes(in_chans):
    m = hybridzoo.create_model("wetmapformer_small", in_chans=in_chans, num_classes=5, **SMALL).eval()
    assert m(torch.randn(2, in_chans, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="wetmapformer_small"):
        m(torch.randn(2, in_chans, 7, 8))   # odd side: the extractor pools by 2 then upsamples


def test_center_pool_reads_the_labelled_pixels_token():
    m = WetMapFormer(global_pool="center", **SMALL).eval()
    x = torch.randn(2, 16, 8, 8)
    feats = m.forward_features(x)
    # labelled pixel (4, 4) lies in token (2, 2) of the 4×4 map at stride 2
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, :, 2, 2])


def test_channels_last():
    m = WetMapFormer(**SMALL).eval()
    x = torch.randn(2, 16, 8, 8)
    ref = m(x)
    m = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-5)


def test_official_layout_is_refused_with_the_reason():
    from hybridzoo.factory import load_weights

    m = WetMapFormer(**SMALL)
    with pytest.raises(ValueError, match="no weights"):
        load_weights(m, {"conv2d/kernel:0": torch.zeros(1)})


def test_baseline_cnn_is_registered_for_land_cover():
    card = hybridzoo.model_card("cnn2d_landcover")
    assert card.task == "land-cover"
    m = hybridzoo.create_model("cnn2d_landcover", in_chans=5, num_classes=3).eval()
    assert m(torch.randn(2, 5, 8, 8)).shape == (2, 3)
