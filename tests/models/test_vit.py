"""ViT / DeiT: what makes the papers the papers, and parity with independent implementations.

- HuggingFace transformers' DeiT (with teacher) and ViT, converted through `create_model(pretrained=)`,
  give the same logits (≤ 1e-5), in both the hub's legacy key names and transformers 5's;
- the official facebookresearch/deit (timm) layout loads as is and computes what a hand-written
  functional ViT computes from those weights;
- distilled models: a second token and head, a tuple in training, the average of both heads in eval;
- inputs at other multiples of the patch size resample the position embedding (checked against HF).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import hybridzoo
from hybridzoo.models.vit import default_out_indices
from hybridzoo.profile import count_params
from hybridzoo.registry import get_card

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32,
             patch_size=8, num_labels=10, layer_norm_eps=1e-6, hidden_act="gelu")
OURS_SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def _save(state: dict, path) -> str:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return str(path)


def _hf_deit_teacher(seed=0, **cfg):
    torch.manual_seed(seed)
    m = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**{**SMALL, **cfg}))
    # HF initialises biases and norms to constants; randomise everything so that a swapped key shows.
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def _hf_vit(seed=0, **cfg):
    torch.manual_seed(seed)
    m = transformers.ViTForImageClassification(transformers.ViTConfig(**{**SMALL, **cfg}))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


_LEGACY = [  # the hub checkpoints' names (transformers 4), from transformers 5's own names
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
]


def _to_legacy_hf(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for new, old in _LEGACY:
            k = k.replace(new, old)
        k = k.replace("deit.layers.", "deit.encoder.layer.").replace("vit.layers.", "vit.encoder.layer.")
        out[k] = v
    return out


# -- full-size facts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hf_cls,width,heads,size", [
    ("deit_tiny_patch16_224", "vit", 192, 3, 224),
    ("deit_small_patch16_224", "vit", 384, 6, 224),
    ("deit_base_patch16_384", "vit", 768, 12, 384),
    ("deit_tiny_distilled_patch16_224", "deit", 192, 3, 224),
    ("deit_base_distilled_patch16_384", "deit", 768, 12, 384),
])
def test_param_counts_equal_independent_implementation(name, hf_cls, width, heads, size):
    cfg = dict(hidden_size=width, num_hidden_layers=12, num_attention_heads=heads, intermediate_size=4 * width,
               image_size=size, patch_size=16, num_labels=1000)
    with torch.device("meta"):
        if hf_cls == "vit":
            ref = transformers.ViTForImageClassification(transformers.ViTConfig(**cfg))
        else:
            ref = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**cfg))
        ours = hybridzoo.create_model(name)
    assert count_params(ours) == count_params(ref) == get_card(name).params


def test_distilled_adds_token_position_and_head():
    with torch.device("meta"):
        plain = hybridzoo.create_model("deit_small_patch16_224")
        dist = hybridzoo.create_model("deit_small_distilled_patch16_224")
    D = 384
    assert count_params(dist) - count_params(plain) == D + D + (D * 1000 + 1000)
    assert dist.pos_embed.shape == (1, 14 * 14 + 2, D) and plain.pos_embed.shape == (1, 14 * 14 + 1, D)
    assert not hasattr(plain, "head_dist") or plain.head_dist is None


# -- HuggingFace parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_hf_deit_with_teacher_parity(tmp_path, legacy):
    hf = _hf_deit_teacher()
    state = hf.state_dict()
    path = _save(_to_legacy_hf(state) if legacy else state, tmp_path / "hf.safetensors")
    ours = hybridzoo.create_model("deit_tiny_distilled_patch16_224", pretrained=path, **OURS_SMALL).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = ours(x)
    diff = (out - ref.logits).abs().max().item()
    assert diff <= 1e-5, diff
    # training mode: the two heads separately (no dropout in either model)
    ours.train()
    with torch.no_grad():
        cls_logits, dist_logits = ours(x)
    assert (cls_logits - ref.cls_logits).abs().max() <= 1e-5
    assert (dist_logits - ref.distillation_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("legacy", [False, True])
def test_hf_vit_parity(tmp_path, legacy):
    hf = _hf_vit()
    state = hf.state_dict()
    path = _save(_to_legacy_hf(state) if legacy else state, tmp_path / "hf.safetensors")
    ours = hybridzoo.create_model("deit_small_patch16_224", pretrained=path, **OURS_SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x) - hf(pixel_values=x).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_other_resolution_matches_hf_interpolation(tmp_path):
    hf = _hf_deit_teacher(seed=1)
    path = _save(hf.state_dict(), tmp_path / "hf.safetensors")
    ours = hybridzoo.create_model("deit_tiny_distilled_patch16_224", pretrained=path, **OURS_SMALL).eval()
    x = torch.randn(2, 3, 48, 40)  # 6×5 patches against a 4×4 table
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).logits
        diff = (ours(x) - ref).abs().max().item()
    assert diff <= 1e-5, diff


def test_hf_checkpoint_resampled_to_a_larger_img_size(tmp_path):
    hf = _hf_deit_teacher(seed=2)
    path = _save(hf.state_dict(), tmp_path / "hf.safetensors")
    ours = hybridzoo.create_model("deit_tiny_distilled_patch16_224", pretrained=path,
                                  **{**OURS_SMALL, "img_size": 48}).eval()
    assert ours.pos_embed.shape == (1, 36 + 2, 64)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        diff = (ours(x) - hf(pixel_values=x, interpolate_pos_encoding=True).logits).abs().max().item()
    assert diff <= 1e-5, diff


# -- the official (timm / facebookresearch/deit) layout ------------------------------------------------

def _official_deit_state(D=32, depth=2, heads=2, patch=8, img=32, ncls=7, distilled=True, seed=0):
    """A checkpoint in facebookresearch/deit's names and shapes, written from its module tree."""
    g = torch.Generator().manual_seed(seed)
    n = (img // patch) ** 2 + (2 if distilled else 1)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, n, D),
          "patch_embed.proj.weight": r(D, 3, patch, patch), "patch_embed.proj.bias": r(D)}
    if distilled:
        sd["dist_token"] = r(1, 1, D)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D),
                   p + "attn.qkv.weight": r(3 * D, D), p + "attn.qkv.bias": r(3 * D),
                   p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
                   p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D),
                   p + "mlp.fc1.weight": r(4 * D, D), p + "mlp.fc1.bias": r(4 * D),
                   p + "mlp.fc2.weight": r(D, 4 * D), p + "mlp.fc2.bias": r(D)})
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D), "head.weight": r(ncls, D), "head.bias": r(ncls)})
    if distilled:
        sd.update({"head_dist.weight": r(ncls, D), "head_dist.bias": r(ncls)})
    return sd


def _reference_deit(sd, x, heads, patch, depth, distilled):
    """DeiT's forward written out with functional ops from the official checkpoint (eval mode)."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    B, _, D = t.shape
    prefix = [sd["cls_token"].expand(B, -1, -1)] + ([sd["dist_token"].expand(B, -1, -1)] if distilled else [])
    t = torch.cat(prefix + [t], 1) + sd["pos_embed"]
    hd = D // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (z.reshape(B, -1, heads, hd).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(B, -1, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + h
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    logits = F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])
    if distilled:
        logits = (logits + F.linear(t[:, 1], sd["head_dist.weight"], sd["head_dist.bias"])) / 2
    return logits


@pytest.mark.parametrize("distilled", [False, True])
def test_official_layout_loads_and_computes_deit(tmp_path, distilled):
    sd = _official_deit_state(distilled=distilled)
    path = tmp_path / "deit_official.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 299}, path)  # the official checkpoint's wrapper
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    ours = hybridzoo.create_model(name, pretrained=str(path), img_size=32, patch_size=8, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=7).eval()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x) - _reference_deit(sd, x, heads=2, patch=8, depth=2, distilled=distilled)).abs().max().item()
    assert diff <= 1e-5, diff


def test_wrong_keys_are_a_clear_error(tmp_path):
    sd = _official_deit_state(distilled=True)
    sd["blocks.0.attn.qkv_weight_typo"] = sd.pop("blocks.0.attn.qkv.weight")
    path = _save(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="deit_tiny_distilled_patch16_224") as err:
        hybridzoo.create_model("deit_tiny_distilled_patch16_224", pretrained=path, img_size=32, patch_size=8,
                               embed_dim=32, depth=2, num_heads=2, num_classes=7)
    msg = str(err.value)
    assert "missing keys" in msg and "blocks.0.attn.qkv.weight" in msg
    assert "unexpected keys" in msg and "blocks.0.attn.qkv_weight_typo" in msg
    # a non-distilled checkpoint into a distilled model names the distillation token and head
    path = _save(_official_deit_state(distilled=False), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="dist_token") as err:
        hybridzoo.create_model("deit_tiny_distilled_patch16_224", pretrained=path, img_size=32, patch_size=8,
                               embed_dim=32, depth=2, num_heads=2, num_classes=7)
    assert "head_dist.weight" in str(err.value)


# -- DeiT's distilled heads ---------------------------------------------------------------------------

def _tiny(name="deit_tiny_distilled_patch16_224", **kw):
    torch.manual_seed(0)
    return hybridzoo.create_model(name, **{**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                  num_classes=5), **kw})


def test_distilled_train_tuple_and_eval_average():
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    cls_logits, dist_logits = out
    assert cls_logits.shape == dist_logits.shape == (2, 5)
    assert not torch.allclose(cls_logits, dist_logits)
    model.eval()
    with torch.no_grad():
        avg = model(x)
        tokens = model.forward_features(x)
    torch.testing.assert_close(avg, (cls_logits + dist_logits).detach() / 2)
    # the distillation head reads the second token, the class head the first
    torch.testing.assert_close(dist_logits.detach(), model.head_dist(tokens[:, 1]))
    torch.testing.assert_close(cls_logits.detach(), model.head(tokens[:, 0]))


def test_plain_deit_returns_one_tensor_in_training():
    model = _tiny("deit_tiny_patch16_224").train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_reset_classifier_replaces_both_heads():
    model = _tiny()
    model.reset_classifier(3)
    assert model.head.out_features == model.head_dist.out_features == 3
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)


# -- resolution, features, checkpointing ---------------------------------------------------------------

def test_variable_resolution_and_clear_errors():
    model = _tiny().eval()
    with torch.no_grad():
        at_native = model(torch.randn(1, 3, 32, 32))
        other = model(torch.randn(1, 3, 56, 24))
    assert at_native.shape == other.shape == (1, 5) and torch.isfinite(other).all()
    with pytest.raises(ValueError, match=r"multiple of 8"):
        model(torch.randn(1, 3, 36, 32))


def test_forward_intermediates_and_features_only():
    assert default_out_indices(12) == (2, 5, 8, 11)
    assert default_out_indices(2) == (0, 1)
    torch.manual_seed(0)
    name = "deit_small_patch16_224"
    kw = dict(img_size=64, embed_dim=32, depth=12, num_heads=2)
    model = hybridzoo.create_model(name, **kw).eval()
    x = torch.randn(2, 3, 64, 96)
    feats = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 6)] * 4
    assert [f["module"] for f in model.feature_info] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert all(f["reduction"] == 16 and f["num_chs"] == 32 for f in model.feature_info)
    # the last map is the last block's patch tokens, before the final norm
    with torch.no_grad():
        t = model.blocks(model._embed(x))[:, 1:]
    torch.testing.assert_close(feats[-1], t.transpose(1, 2).reshape(2, 32, 4, 6))

    torch.manual_seed(0)
    fx = hybridzoo.create_model(name, features_only=True, **kw)
    fx.train()
    maps = fx(x)
    assert len(maps) == 4 and len(fx.feature_info) == 4
    sum(m.sum() for m in maps).backward()
    no_grad = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


def test_drop_path_rate_reaches_blocks():
    model = _tiny(drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.2])
