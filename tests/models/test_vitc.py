"""ViT_C / ViT_P (Early Convolutions Help Transformers See Better): the stem rule, one block fewer,
pycls's init and complexity figures, and pycls checkpoints computing what pycls's forward computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import hybridzoo
from hybridzoo.profile import count_params, measure_model
from hybridzoo.registry import get_card

# Paper Table 1: hidden, MLP dim, heads, blocks, 3×3 stem (widths, strides) or None for patchify.
_SMALL = [2, 2, 2, 2]
_LARGE = ([64, 128, 128, 256, 256, 512], [2, 2, 1, 2, 1, 2])
TABLE = {
    "vitp_1gf": (192, 576, 3, 12, None), "vitp_4gf": (384, 1152, 6, 12, None),
    "vitp_18gf": (768, 3072, 12, 12, None), "vitp_36gf": (1024, 4096, 16, 14, None),
    "vitc_1gf": (192, 576, 3, 11, ([24, 48, 96, 192], _SMALL)),
    "vitc_4gf": (384, 1152, 6, 11, ([48, 96, 192, 384], _SMALL)),
    "vitc_18gf": (768, 3072, 12, 11, _LARGE), "vitc_36gf": (1024, 4096, 16, 13, _LARGE),
}


def pycls_complexity(hidden, mlp, heads, layers, stem, img=224, ncls=1000, bias_flops=True):
    """pycls `ViT.complexity()` written out: (params, flops); its FLOPs count bias additions too."""
    flops = params = 0
    b = 1 if bias_flops else 0
    if stem is None:
        h = img // 16
        flops += 16 * 16 * 3 * hidden * h * h + b * hidden * h * h
        params += 16 * 16 * 3 * hidden + hidden
    else:
        h, c = img, 3
        for w, s in zip(*stem):
            h = (h - 1) // s + 1
            flops += 9 * c * w * h * h
            params += 9 * c * w + 2 * w  # conv + BN affine
            c = w
        flops += c * hidden * h * h + b * hidden * h * h
        params += c * hidden + hidden
    L = h * h + 1
    params += hidden + L * hidden  # class token, position embedding
    for _ in range(layers):
        params += 4 * hidden  # two LayerNorms
        flops += L * (3 * hidden * hidden + b * 3 * hidden) + 2 * heads * L * L * (hidden // heads)
        flops += L * (hidden * hidden + b * hidden)
        params += 4 * hidden * hidden + 4 * hidden
        flops += L * (2 * hidden * mlp + b * (mlp + hidden))
        params += 2 * hidden * mlp + mlp + hidden
    params += 2 * hidden + hidden * ncls + ncls
    flops += hidden * ncls + b * ncls
    return params, flops


@pytest.mark.parametrize("name", sorted(TABLE))
def test_pycls_complexity_params_and_flops(name):
    hidden, mlp, heads, layers, stem = TABLE[name]
    card = get_card(name)
    params, flops = pycls_complexity(hidden, mlp, heads, layers, stem)
    m = measure_model(name)
    assert m["params"] == params == card.params
    # the paper's table is pycls's count, rounded
    assert abs(params / 1e6 - card.reported["params_m"]) <= 0.02 * card.reported["params_m"]
    assert abs(flops / 1e9 - card.reported["gflops"]) <= 0.02 * card.reported["gflops"]
    # FlopCounterMode sees the same convs and matmuls, without bias additions
    _, macs = pycls_complexity(hidden, mlp, heads, layers, stem, bias_flops=False)
    assert m["macs"] == macs
    assert card.macs_g == pytest.approx(macs / 1e9, abs=1e-4)


@pytest.mark.parametrize("name", ["vitc_1gf", "vitc_4gf", "vitc_18gf", "vitc_36gf"])
def test_conv_stem_rule_and_one_block_fewer(name):
    with torch.device("meta"):
        model = hybridzoo.create_model(name)
        baseline = hybridzoo.create_model(name.replace("vitc", "vitp"))
    assert len(model.blocks) == len(baseline.blocks) - 1
    assert model.blocks[0].mlp.fc1.out_features == baseline.blocks[0].mlp.fc1.out_features
    ratio = model.blocks[0].mlp.fc1.out_features / model.embed_dim
    assert ratio == (3 if name in ("vitc_1gf", "vitc_4gf") else 4)
    c, stride = 3, 1
    for layer in model.patch_embed.convs:
        conv, bn, act = layer
        assert conv.kernel_size == (3, 3) and conv.bias is None
        assert isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)
        s = conv.stride[0]
        if c != 3:  # stride 2 doubles the channels, stride 1 keeps them
            assert conv.out_channels == (2 * c if s == 2 else c), (c, s, conv.out_channels)
        c, stride = conv.out_channels, stride * s
    proj = model.patch_embed.proj
    assert proj.kernel_size == (1, 1) and proj.bias is not None and proj.out_channels == model.embed_dim
    assert stride == 16


def test_pycls_init():
    torch.manual_seed(0)
    model = hybridzoo.create_model("vitc_1gf")
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc1.bias.abs().max() < 1e-5
    fc1 = model.blocks[0].mlp.fc1.weight
    bound = (6 / (fc1.shape[0] + fc1.shape[1])) ** 0.5  # xavier-uniform
    assert fc1.abs().max() <= bound and fc1.abs().max() > 0.9 * bound
    proj = model.patch_embed.proj.weight
    assert proj.std().item() == pytest.approx((1 / 192) ** 0.5, rel=0.05)
    conv = model.patch_embed.convs[1][0].weight
    assert conv.std().item() == pytest.approx((2 / 48) ** 0.5, rel=0.05)
    assert model.norm.eps == 1e-5


def test_variable_resolution_and_stride_errors():
    torch.manual_seed(0)
    model = hybridzoo.create_model("vitc_1gf", **get_card("vitc_1gf").test_kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 48)).shape == (1, 1000)
        feats = model.forward_intermediates(torch.randn(1, 3, 64, 48))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 4, 3)] * 2
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="strides"):
        hybridzoo.create_model("vitc_1gf", stem_strides=(2, 2, 2, 1))


# -- pycls checkpoints ------------------------------------------------------------------------------

def _pycls_state(D=32, mlp=96, depth=2, stem=((8, 16, 16, 32), (2, 2, 2, 2)), img=32, ncls=5, seed=0):
    """A checkpoint in pycls's names and shapes (`pycls/models/vit.py` module tree, sequence-first)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {}
    if stem is None:
        sd.update({"stem.patchify.weight": r(D, 3, 16, 16), "stem.patchify.bias": r(D)})
    else:
        c = 3
        for i, w in enumerate(stem[0]):
            sd.update({f"stem.cstem{i}_conv.weight": r(w, c, 3, 3), f"stem.cstem{i}_bn.weight": 1 + r(w),
                       f"stem.cstem{i}_bn.bias": r(w), f"stem.cstem{i}_bn.running_mean": r(w),
                       f"stem.cstem{i}_bn.running_var": 1 + r(w).abs(),
                       f"stem.cstem{i}_bn.num_batches_tracked": torch.tensor(7)})
            c = w
        sd.update({"stem.cstem_last_conv.weight": r(D, c, 1, 1), "stem.cstem_last_conv.bias": r(D)})
    L = (img // 16) ** 2 + 1
    sd.update({"class_token": r(1, 1, D), "pos_embedding": r(L, 1, D)})
    for i in range(depth):
        p = f"encoder.block_{i}."
        sd.update({p + "ln_1.weight": 1 + r(D), p + "ln_1.bias": r(D),
                   p + "self_attention.block.in_proj_weight": r(3 * D, D),
                   p + "self_attention.block.in_proj_bias": r(3 * D),
                   p + "self_attention.block.out_proj.weight": r(D, D),
                   p + "self_attention.block.out_proj.bias": r(D),
                   p + "ln_2.weight": 1 + r(D), p + "ln_2.bias": r(D),
                   p + "mlp_block.linear_1.weight": r(mlp, D), p + "mlp_block.linear_1.bias": r(mlp),
                   p + "mlp_block.linear_2.weight": r(D, mlp), p + "mlp_block.linear_2.bias": r(D)})
    sd.update({"encoder.ln.weight": 1 + r(D), "encoder.ln.bias": r(D),
               "head.head_fc.weight": r(ncls, D), "head.head_fc.bias": r(ncls)})
    return sd


def _pycls_forward(sd, x, heads, depth, stem_len):
    """pycls's ViT forward (eval), sequence-first, with nn.MultiheadAttention's functional form."""
    if stem_len is None:
        x = F.conv2d(x, sd["stem.patchify.weight"], sd["stem.patchify.bias"], stride=16)
    else:
        for i in range(stem_len):
            w = sd[f"stem.cstem{i}_conv.weight"]
            x = F.conv2d(x, w, stride=2, padding=1)
            x = F.batch_norm(x, sd[f"stem.cstem{i}_bn.running_mean"], sd[f"stem.cstem{i}_bn.running_var"],
                             sd[f"stem.cstem{i}_bn.weight"], sd[f"stem.cstem{i}_bn.bias"], False, 0.1, 1e-5)
            x = F.relu(x)
        x = F.conv2d(x, sd["stem.cstem_last_conv.weight"], sd["stem.cstem_last_conv.bias"])
    D = x.shape[1]
    x = x.reshape(x.shape[0], D, -1).permute(2, 0, 1)
    x = torch.cat([sd["class_token"].expand(-1, x.shape[1], -1), x], 0) + sd["pos_embedding"]
    for i in range(depth):
        p = f"encoder.block_{i}."
        h = F.layer_norm(x, (D,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
        h, _ = F.multi_head_attention_forward(
            h, h, h, D, heads, sd[p + "self_attention.block.in_proj_weight"],
            sd[p + "self_attention.block.in_proj_bias"], None, None, False, 0.0,
            sd[p + "self_attention.block.out_proj.weight"], sd[p + "self_attention.block.out_proj.bias"],
            training=False, need_weights=False)
        x = x + h
        h = F.layer_norm(x, (D,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp_block.linear_1.weight"], sd[p + "mlp_block.linear_1.bias"])),
                     sd[p + "mlp_block.linear_2.weight"], sd[p + "mlp_block.linear_2.bias"])
        x = x + h
    x = F.layer_norm(x, (D,), sd["encoder.ln.weight"], sd["encoder.ln.bias"], eps=1e-5)
    return F.linear(x[0], sd["head.head_fc.weight"], sd["head.head_fc.bias"])


@pytest.mark.parametrize("name", ["vitc_4gf", "vitp_4gf"])
def test_pycls_checkpoint_loads_and_computes_pycls_forward(tmp_path, name):
    conv = name.startswith("vitc")
    stem = ((8, 16, 16, 32), (2, 2, 2, 2)) if conv else None
    sd = _pycls_state(stem=stem)
    path = tmp_path / "pycls.pyth"
    torch.save({"epoch": 99, "model_state": sd, "optimizer_state": {}}, path)  # pycls's checkpoint wrapper
    kw = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0, num_classes=5)
    if conv:
        kw.update(stem_widths=stem[0], stem_strides=stem[1])
    model = hybridzoo.create_model(name, pretrained=str(path), **kw).eval()
    assert count_params(model) == sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model(x) - _pycls_forward(sd, x, heads=2, depth=2, stem_len=4 if conv else None)).abs().max().item()
    assert diff <= 1e-5, diff


def test_pycls_checkpoint_with_wrong_keys_is_a_clear_error(tmp_path):
    sd = _pycls_state()
    del sd["encoder.ln.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"vitc_1gf(.|\n)*missing keys(.|\n)*norm\.weight"):
        hybridzoo.create_model("vitc_1gf", pretrained=str(path), img_size=32, embed_dim=32, depth=2, num_heads=2,
                               mlp_ratio=3.0, num_classes=5, stem_widths=(8, 16, 16, 32), stem_strides=(2, 2, 2, 2))
