"""CoAtNet: C-C-T-T layout, relative attention (bias before the softmax), pooled downsampling, timm layout."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import hybridzoo
from hybridzoo.models.coatnet import MBConv, RelativeAttention, TransformerBlock
from hybridzoo.profile import count_params
from hybridzoo.registry import get_card

# parameter counts of timm's paper-like `coatnet_N_224` (maxxvit.py), an independent implementation
TIMM_PARAMS = {"coatnet_0": 25_036_820, "coatnet_1": 42_225_776, "coatnet_2": 74_684_744,
               "coatnet_3": 166_966_264, "coatnet_4": 275_425_288}


def _reduced(name: str = "coatnet_0", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return hybridzoo.create_model(name, **{**get_card(name).test_kwargs, **kw})


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_params_equal_timm_paper_like_configs(name):
    with torch.device("meta"):
        model = hybridzoo.create_model(name)
    assert count_params(model) == TIMM_PARAMS[name]


def test_c_c_t_t_layout_and_stage_strides():
    with torch.device("meta"):
        model = hybridzoo.create_model("coatnet_1")
    kinds = [{type(b) for b in stage} for stage in model.stages]
    assert kinds == [{MBConv}, {MBConv}, {TransformerBlock}, {TransformerBlock}]
    assert [len(s) for s in model.stages] == [2, 6, 14, 2]
    assert all(stage[0].stride == 2 and all(b.stride == 1 for b in stage[1:]) for stage in model.stages)
    assert all(b.attn.dim_head == 32 for s in model.stages[2:] for b in s)
    assert model.stages[0][0].se.fc1.out_channels == 96 // 4          # SE ratio 0.25 of the output width
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 32]


def test_relative_attention_adds_offset_bias_before_softmax():
    torch.manual_seed(0)
    H, W, dim, dh = 3, 4, 16, 8
    attn = RelativeAttention(dim, dim, (H, W), dim_head=dh).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, H, W, dim)
    heads, n = dim // dh, H * W
    q, k, v = attn.qkv(x).view(2, n, 3, heads, dh).unbind(2)
    table = attn.relative_position_bias_table
    bias = torch.empty(heads, n, n)
    for i in range(n):              # w[i − j] looked up by the 2-D offset, independently of the model's index
        for j in range(n):
            dy, dx = i // W - j // W, i % W - j % W
            bias[:, i, j] = table[(dy + H - 1) * (2 * W - 1) + (dx + W - 1)]
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / dh ** 0.5 + bias
    out = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v).reshape(2, H, W, dim)
    torch.testing.assert_close(attn(x), attn.proj(out), rtol=1e-5, atol=1e-5)
    # the bias depends on the offset only (translation equivariance of the depthwise-conv prior)
    b = attn.relative_bias(H, W)
    assert torch.equal(b[:, 0, 1], b[:, W + 1, W + 2])


def test_attention_goes_through_sdpa_with_float_bias(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = RelativeAttention(16, 32, (4, 4), dim_head=8)
    attn(torch.randn(2, 4, 4, 16))
    # 4-D: with a 3-D mask PyTorch's CPU SDPA takes its (much slower) math path instead of the fused kernel
    assert len(seen) == 1 and seen[0].is_floating_point() and tuple(seen[0].shape) == (1, 4, 16, 16)


def test_bias_table_is_resized_for_other_resolutions():
    model = _reduced().eval()
    blk = model.stages[2][1]
    h, w = blk.attn.feat_size
    with torch.no_grad():
        blk.attn.relative_position_bias_table.copy_(torch.arange(blk.attn.num_heads, dtype=torch.float).expand(
            (2 * h - 1) * (2 * w - 1), -1))
    # a table constant per head stays constant per head once resized to a 6×2 grid
    bias = blk.attn.relative_bias(6, 2)
    assert tuple(bias.shape) == (blk.attn.num_heads, 12, 12)
    torch.testing.assert_close(bias, torch.arange(blk.attn.num_heads, dtype=torch.float)[:, None, None].expand_as(bias))
    model.train()
    out = model(torch.randn(2, 3, 96, 128))
    out.sum().backward()
    assert out.shape == (2, 1000) and blk.attn.relative_position_bias_table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="coatnet_0"):
        model(torch.randn(1, 3, 72, 64))


@pytest.mark.parametrize("block", ["mbconv", "transformer"])
def test_downsampling_pools_both_branches(block):
    torch.manual_seed(0)
    if block == "mbconv":
        blk, x = MBConv(8, 16, stride=2).eval(), torch.randn(2, 8, 8, 8)
        main, proj = blk.conv1, blk.shortcut
    else:
        blk, x = TransformerBlock(8, 16, (4, 4), stride=2, dim_head=8).eval(), torch.randn(2, 8, 8, 8)
        main, proj = blk.attn, blk.shortcut
    shapes = {}
    main.register_forward_hook(lambda m, i, o: shapes.__setitem__("main", tuple(i[0].shape)))
    proj.register_forward_hook(lambda m, i, o: shapes.__setitem__("proj", tuple(i[0].shape)))
    out = blk(x)
    half = (2, 8, 4, 4) if block == "mbconv" else (2, 4, 4, 8)
    assert shapes == {"main": half, "proj": half}
    assert out.shape[1:3] == ((16, 4) if block == "mbconv" else (4, 4))


def test_transformer_block_is_pre_norm():
    blk = TransformerBlock(16, 16, (4, 4), dim_head=8).eval()
    seen = {}
    blk.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    x = torch.randn(2, 4, 4, 16) * 3 + 5
    blk(x)
    torch.testing.assert_close(seen["in"], F.layer_norm(x, (16,), eps=1e-6))


def test_features_only_returns_stem_and_four_stages():
    model = _reduced(features_only=True)
    x = torch.randn(2, 3, 64, 96)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, i["num_chs"], 64 // i["reduction"], 96 // i["reduction"])
                                              for i in model.feature_info]
    assert len(feats) == 5
    sum(f.sum() for f in feats).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_matches():
    model = _reduced().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(ref, cl, rtol=1e-4, atol=1e-5)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)


# -- timm's maxxvit layout -------------------------------------------------------------------------

def _to_timm(model, state):
    """Our state dict in timm's `coatnet_N_224` layout, written from timm's module names."""
    out = {}
    for key, value in state.items():
        m = re.match(r"stages\.(\d+)\.(\d+)\.(.*)", key)
        if not m:
            key = {"norm.weight": "head.norm.weight", "norm.bias": "head.norm.bias",
                   "head.weight": "head.fc.weight", "head.bias": "head.fc.bias"}.get(key, key)
            out[key if not key.startswith("pre_logits.") else "head." + key] = value
            continue
        s, b, rest = int(m.group(1)), m.group(2), m.group(3)
        blk = model.stages[s][int(b)]
        if s < 2:
            rest = re.sub(r"^conv(\d)\.", lambda g: {"1": "conv1_1x1.", "2": "conv2_kxk.", "3": "conv3_1x1."}[g.group(1)], rest)
            rest = re.sub(r"^shortcut\.", "shortcut.expand.", rest)
        else:
            if rest.startswith("attn.qkv."):
                heads = blk.attn.num_heads
                v = value.view(3, heads, -1, *value.shape[1:])          # (q|k|v, head, ...) → (head, q|k|v, ...)
                value = v.permute(1, 0, *range(2, v.ndim)).reshape(value.shape)
            if value.ndim == 2 and "bias_table" not in rest:
                value = value[:, :, None, None]
            rest = re.sub(r"^shortcut\.", "shortcut.expand.", rest)
            rest = re.sub(r"^attn\.relative", "attn.rel_pos.relative", rest)
            if blk.stride == 2:
                rest = re.sub(r"^norm1\.", "norm1.norm.", rest)
        out[f"stages.{s}.blocks.{b}.{rest}"] = value.contiguous()
    return out


def test_loads_timm_layout(tmp_path):
    model = _reduced(seed=5).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    timm_state = _to_timm(model, state)
    assert "stages.2.blocks.0.attn.rel_pos.relative_position_bias_table" in timm_state
    assert timm_state["stages.3.blocks.0.mlp.fc1.weight"].ndim == 4
    assert len(timm_state) == len(state)
    path = tmp_path / "timm.safetensors"
    save_file(timm_state, str(path))
    # the file cannot say whether timm strided the depthwise conv (its default, another function) or
    # pooled first (ours): refused until the caller says it was trained with stride_mode="pool"
    with pytest.raises(ValueError, match="stride_mode='dw'.*timm_stride_mode = 'pool'"):
        hybridzoo.create_model("coatnet_0", pretrained=str(path), **get_card("coatnet_0").test_kwargs)
    loaded = hybridzoo.create_model("coatnet_0", **get_card("coatnet_0").test_kwargs).eval()
    loaded.timm_stride_mode = "pool"
    hybridzoo.load_weights(loaded, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    loaded.timm_stride_mode = "dw"
    with pytest.raises(ValueError, match="no matching model"):
        hybridzoo.load_weights(loaded, str(path))
    # our own layout (no timm names) is never questioned
    hybridzoo.load_weights(hybridzoo.create_model("coatnet_0", **get_card("coatnet_0").test_kwargs), state)


def test_every_gelu_takes_the_fast_training_kernel():
    """The stem's and MBConvs' GELUs are modules, so `optimize_for_cpu_training` gives them the one-pass kernel:
    a training step on the fast path (channels-last, as `hybridzoo train` runs CoAtNet) calls no ATen GELU."""
    from hybridzoo.layers import native
    from hybridzoo.layers.train_fast import optimize_for_cpu_training

    from _helpers import OpNames  # tests/conftest.py puts tests/ on sys.path

    if not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels here")
    model = optimize_for_cpu_training(_reduced().train()).to(memory_format=torch.channels_last)
    assert model.train_channels_last
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with OpNames() as ops:
        model(x).sum().backward()
    assert ops.names.count("hybridzoo_native.gelu") >= 2 * (1 + 2 * 3)   # stem + two per MBConv, each way
    assert not {"aten.gelu", "aten.gelu_backward"} & set(ops.names)
