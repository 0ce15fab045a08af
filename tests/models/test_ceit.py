"""CeiT: the Image-to-Tokens stem, LeFF and layer-wise class-token attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridzoo
from hybridzoo.models.ceit import I2T, LCABlock, LeFF

from _helpers import OpNames  # tests/conftest.py puts tests/ on sys.path

SMALL = dict(embed_dim=24, num_heads=2, depth=3, stem_chans=8, img_size=64, num_classes=5)


def test_i2t_stem_is_conv_bn_maxpool_then_patch_conv():
    stem = I2T(in_chans=3, stem_chans=64, embed_dim=192)
    assert stem.conv.kernel_size == (7, 7) and stem.conv.stride == (2, 2) and stem.conv.bias is None
    assert isinstance(stem.bn, nn.BatchNorm2d)
    assert stem.maxpool.kernel_size == 3 and stem.maxpool.stride == 2
    assert stem.proj.kernel_size == (4, 4) and stem.proj.stride == (4, 4)
    # the paper's I2T has no activation after the BN
    assert not any(isinstance(m, (nn.ReLU, nn.GELU)) for m in stem.modules())
    assert stem(torch.randn(1, 3, 224, 224)).shape == (1, 192, 14, 14)


def test_leff_passes_the_cls_token_and_mixes_only_3x3_neighbours():
    torch.manual_seed(0)
    leff = LeFF(8, 32).eval()
    x = torch.randn(1, 1 + 36, 8)
    with torch.no_grad():
        y = leff(x, (6, 6))
        assert torch.equal(y[:, 0], x[:, 0])  # the cls token is handed back as it came in
        x2 = x.clone()
        x2[:, 1 + 2 * 6 + 2] += 1.0  # perturb patch (2, 2)
        diff = (leff(x2, (6, 6)) - y)[0, 1:].abs().sum(-1).reshape(6, 6)
    changed = (diff > 0).nonzero().tolist()
    assert sorted(changed) == [[r, c] for r in (1, 2, 3) for c in (1, 2, 3)]


def _leff_as_official(leff: LeFF, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The official forward: the patch tokens transposed to an NCHW map, three convolutions with BN, back to tokens."""
    B, N, C = x.shape
    y = x[:, 1:].transpose(1, 2).reshape(B, C, *grid)
    y = leff.act(leff.bn1(leff.conv1(y)))
    y = leff.act(leff.bn2(leff.conv2(y)))
    y = leff.bn3(leff.conv3(y))
    return torch.cat([x[:, :1], y.flatten(2).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("fast", [False, True])
def test_leff_on_a_channels_last_map_is_the_official_nchw_computation(fast):
    """LeFF lays the tokens out as a channels-last map (its 1×1 convolutions become products over the token rows):
    output, batch statistics, running statistics and gradients as the official NCHW computation, in training and
    in eval mode; `fast`: through `optimize_for_cpu_training`, to fp32 rounding."""
    from hybridzoo.layers.train_fast import optimize_for_cpu_training

    torch.manual_seed(0)
    ref = LeFF(32, 128)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    leff = __import__("copy").deepcopy(ref)
    if fast:
        optimize_for_cpu_training(leff, min_weight_numel=1)
    layouts = []
    leff.conv1.register_forward_pre_hook(
        lambda m, i: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(3, 1 + 30, 32)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with OpNames() as ops:
        y = leff(xs[0], (5, 6))
    y_ref = _leff_as_official(ref, xs[1], (5, 6))
    assert layouts == [True]
    assert ops.names.count("aten.convolution") == (1 if fast else 3)   # fast: the depthwise one alone
    tol = dict(rtol=1e-4, atol=1e-4) if fast else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol)
    for (n, a), b in zip(leff.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3 if fast else 1e-5, atol=1e-3 if fast else 1e-5, msg=n)
    for (n, a), b in zip(leff.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(leff.eval()(x, (5, 6)), _leff_as_official(ref.eval(), x, (5, 6)), rtol=1e-6,
                                   atol=1e-6)


def test_block_adds_normalised_cls_token_through_leff():
    model = hybridzoo.create_model("ceit_tiny", **SMALL).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 17, 24)
    with torch.no_grad():
        after_attn = x + blk.attn(blk.norm1(x))
        out = blk(x, (4, 4))
    torch.testing.assert_close(out[:, 0], after_attn[:, 0] + blk.norm2(after_attn)[:, 0])


def test_lca_equals_full_attention_read_at_the_last_token():
    """The first official commit's LCA: self-attention + MLP over all cls tokens, last row kept."""
    torch.manual_seed(0)
    lca = LCABlock(24, num_heads=2).eval()
    t = torch.randn(3, 12, 24)
    with torch.no_grad():
        h = lca.norm1(t)
        q, k, v = lca.attn.qkv(h).reshape(3, 12, 3, 2, 12).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) * 12 ** -0.5).softmax(-1)
        full = t + lca.attn.proj((a @ v).transpose(1, 2).reshape(3, 12, 24))
        full = full + lca.mlp(lca.norm2(full))
        torch.testing.assert_close(lca(t), full[:, -1], atol=1e-5, rtol=1e-5)


def test_every_layer_cls_token_reaches_the_head():
    torch.manual_seed(0)
    model = hybridzoo.create_model("ceit_tiny", **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    # pos_layer_embed has one row per layer; each row receives gradient through LCA
    assert (model.pos_layer_embed.grad.abs().sum(-1) > 0).all()
    assert model.pos_layer_embed.shape == (1, 3, 24)


def test_variable_input_size():
    model = hybridzoo.create_model("ceit_tiny", **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 128))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(2, 3, 72, 64), (2, 4, 64, 64)])
def test_bad_input(shape):
    model = hybridzoo.create_model("ceit_small", **SMALL).eval()
    with pytest.raises(ValueError, match="ceit_small"):
        model(torch.randn(*shape))


def _to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names → coeusguo/ceit's: the stem sits in HybridEmbed.backbone, LCA's MLP is `feedforward`."""
    out = {}
    for k, v in state.items():
        if k.startswith(("i2t.conv.", "i2t.bn.")):
            k = "i2t.backbone." + k[len("i2t."):]
        elif k.startswith("lca.mlp."):
            k = "lca.feedforward." + k[len("lca.mlp."):]
        out[k] = v.clone()
    return out


def test_loads_official_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = hybridzoo.create_model("ceit_tiny", **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    official = _to_official(model.state_dict())
    assert "i2t.backbone.conv.weight" in official and "lca.feedforward.fc1.weight" in official
    assert "lca.attn.qkv.weight" in official and official["lca.attn.qkv.weight"].shape == (72, 24)
    path = tmp_path / "ceit.pth"
    torch.save({"model": official}, path)
    loaded = hybridzoo.create_model("ceit_tiny", pretrained=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_384_variant_has_24x24_position_grid():
    with torch.device("meta"):
        model = hybridzoo.create_model("ceit_small_384")
    assert model.pos_embed.shape == (1, 24 * 24 + 1, 384)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_the_frozen_copy_folds_leff_batchnorms_into_its_convolutions():
    """`optimize_for_cpu_inference`: every LeFF's BatchNorms folded into its convolutions and its GELUs into their
    epilogues (no BatchNorm left in the blocks), the eval model's logits; a LeFF normalising with batch statistics
    in eval mode is left as it is."""
    from hybridzoo.layers.onednn import optimize_for_cpu_inference
    from hybridzoo.models.ceit import _FrozenLeFF

    torch.manual_seed(0)
    model = hybridzoo.create_model("ceit_tiny", **SMALL)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    frozen = optimize_for_cpu_inference(model, split_batch=False)
    assert all(type(b.leff) is _FrozenLeFF for b in frozen.blocks)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.blocks.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(frozen(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    model.blocks[0].leff.bn2.track_running_stats = False
    assert type(optimize_for_cpu_inference(model, split_batch=False).blocks[0].leff) is LeFF
