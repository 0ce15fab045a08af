"""CvT-specific tests: what makes the paper the paper, and parity with HuggingFace's port and the
Microsoft checkpoint layout (cls_cvt.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridzoo
from hybridzoo.models import cvt as cvt_module

SMALL = dict(dims=(16, 32, 48), heads=(1, 2, 3), depths=(1, 2, 3), num_classes=7)


def _randomise_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and norm affines, so that a mis-mapped norm cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


# --- parity with HuggingFace transformers' CvT -----------------------------------------------------

def _hf_model(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    # HF indexes its per-stage drop-path list with the stage number, so stage i needs depth > i.
    cfg = transformers.CvtConfig(embed_dim=list(SMALL["dims"]), num_heads=list(SMALL["heads"]),
                                 depth=list(SMALL["depths"]), num_labels=SMALL["num_classes"])
    hf = transformers.CvtForImageClassification(cfg).eval()
    _randomise_norms_(hf, seed)
    with torch.no_grad():
        # logits of order 1: large enough to be a real comparison, small enough for a 1e-5 fp32 bound
        hf.classifier.weight.normal_(0, 0.1)
        hf.classifier.bias.normal_(0, 0.1)
    return hf


def test_hf_parity_logits_and_stage_maps(tmp_path):
    hf = _hf_model()
    path = tmp_path / "hf_cvt.pth"
    torch.save(hf.state_dict(), path)
    # HF's MLP uses exact GELU where the official code uses QuickGELU; build ours to match HF.
    ours = hybridzoo.create_model("cvt_13", pretrained=str(path), act_layer=nn.GELU, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        got = ours(x)
        maps = ours.forward_intermediates(x)
    assert ref.logits.abs().max() > 0.5  # a comparison of near-zero logits would prove little
    assert (ref.logits - got).abs().max().item() <= 1e-5
    for a, b in zip(ref.hidden_states, maps):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fast", [False, True])
def test_hf_parity_in_training_mode_outputs_gradients_and_statistics(tmp_path, fast):
    """One training step against HF's port: batch-statistics BatchNorm, every parameter's gradient and the
    updated running statistics (the layout levers of ConvAttention must not change what training computes),
    plain and through the trainer's oneDNN path."""
    transformers = pytest.importorskip("transformers")
    from hybridzoo.layers.train_fast import optimize_for_cpu_training
    torch.manual_seed(0)
    cfg = transformers.CvtConfig(embed_dim=list(SMALL["dims"]), num_heads=list(SMALL["heads"]),
                                 depth=list(SMALL["depths"]), num_labels=SMALL["num_classes"],
                                 drop_path_rate=[0.0, 0.0, 0.0])
    hf = _randomise_norms_(transformers.CvtForImageClassification(cfg))
    with torch.no_grad():
        hf.classifier.weight.normal_(0, 0.1)
    path = tmp_path / "hf_cvt.pth"
    torch.save(hf.state_dict(), path)
    ours = hybridzoo.create_model("cvt_13", pretrained=str(path), act_layer=nn.GELU, drop_path_rate=0.0, **SMALL)
    if fast:
        optimize_for_cpu_training(ours, min_weight_numel=1)  # the reduced build's layers are all small
    hf.train()
    ours.train()
    x = torch.randn(3, 3, 64, 64)
    w = torch.randn(3, SMALL["num_classes"])
    ref, got = hf(x).logits, ours(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    (ref * w).sum().backward()
    (got * w).sum().backward()
    ref_grads = cvt_module.convert_official({k: p.grad for k, p in hf.named_parameters()})
    mine = dict(ours.named_parameters())
    assert set(ref_grads) == set(mine)
    for k, g in ref_grads.items():
        torch.testing.assert_close(mine[k].grad, g, rtol=1e-3, atol=1e-4 * float(g.abs().max()) + 1e-7, msg=k)
    ref_bufs = cvt_module.convert_official(dict(hf.named_buffers()))
    for k, b in ours.named_buffers():
        torch.testing.assert_close(b, ref_bufs[k], rtol=1e-5, atol=1e-6, msg=k)


def test_convolutions_see_dense_channels_last_maps_and_batchnorm_a_dense_gradient():
    """The speed lever in ConvAttention: with a cls token the three depthwise convolutions share one dense
    channels-last map (a strided slice is copied inside each of them), and their BatchNorm gets a gradient in
    its input's layout (a slice sends BatchNorm's CPU backward down a per-channel path several times slower)."""
    model = hybridzoo.create_model("cvt_13", **SMALL).train()
    seen = []

    def dense(t):
        return t.is_contiguous(memory_format=torch.channels_last)

    def conv_hook(module, inputs):
        seen.append(("conv input", dense(inputs[0])))

    def bn_hook(module, inputs, output):
        seen.append(("bn input", dense(inputs[0])))
        output.register_hook(lambda g: seen.append(("bn grad", dense(g))))

    attn = model.stages[2].blocks[0].attn
    assert attn.with_cls_token
    for proj in (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v):
        proj.conv.register_forward_pre_hook(conv_hook)
        proj.bn.register_forward_hook(bn_hook)
    for stage in model.stages:  # the token embeddings' convolutions, the image's included
        stage.patch_embed.proj.register_forward_pre_hook(conv_hook)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert len(seen) == 12 and all(ok for _, ok in seen), seen


def test_hf_weights_with_official_quickgelu_differ(tmp_path):
    """Our default follows cls_cvt.py (QuickGELU), which is not what HF computes."""
    hf = _hf_model()
    path = tmp_path / "hf_cvt.pth"
    torch.save(hf.state_dict(), path)
    ours = hybridzoo.create_model("cvt_13", pretrained=str(path), **SMALL).eval()
    assert isinstance(ours.stages[0].blocks[0].mlp.act, cvt_module.QuickGELU)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() > 1e-4


def test_hf_full_cvt13_param_count_equals_ours():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=1000))
    assert sum(p.numel() for p in hf.parameters()) == 19_997_480 == hybridzoo.model_card("cvt_13").params


# --- the Microsoft (cls_cvt.py) checkpoint layout --------------------------------------------------

def _official_keys(dims, depths, cls_stage=2) -> list[tuple[str, tuple[int, ...]]]:
    """The state-dict keys and shapes of cls_cvt.py's ConvolutionalVisionTransformer (spec read from
    microsoft/CvT: `stage{i}` VisionTransformer modules, `ConvEmbed` proj/norm, `Block` norm1/attn/
    norm2/mlp, Attention conv_proj_{q,k,v}.{conv,bn} + proj_{q,k,v} + proj, then `norm` and `head`)."""
    keys, cin = [], 3
    for i, (d, n) in enumerate(zip(dims, depths)):
        k = 7 if i == 0 else 3
        s = f"stage{i}."
        keys += [(s + "patch_embed.proj.weight", (d, cin, k, k)), (s + "patch_embed.proj.bias", (d,)),
                 (s + "patch_embed.norm.weight", (d,)), (s + "patch_embed.norm.bias", (d,))]
        if i == cls_stage:
            keys.append((s + "cls_token", (1, 1, d)))
        for j in range(n):
            b = f"{s}blocks.{j}."
            keys += [(b + "norm1.weight", (d,)), (b + "norm1.bias", (d,))]
            for t in "qkv":
                c = f"{b}attn.conv_proj_{t}."
                keys += [(c + "conv.weight", (d, 1, 3, 3)), (c + "bn.weight", (d,)), (c + "bn.bias", (d,)),
                         (c + "bn.running_mean", (d,)), (c + "bn.running_var", (d,)), (c + "bn.num_batches_tracked", ())]
            for t in "qkv":
                keys += [(f"{b}attn.proj_{t}.weight", (d, d)), (f"{b}attn.proj_{t}.bias", (d,))]
            keys += [(b + "attn.proj.weight", (d, d)), (b + "attn.proj.bias", (d,)),
                     (b + "norm2.weight", (d,)), (b + "norm2.bias", (d,)),
                     (b + "mlp.fc1.weight", (4 * d, d)), (b + "mlp.fc1.bias", (4 * d,)),
                     (b + "mlp.fc2.weight", (d, 4 * d)), (b + "mlp.fc2.bias", (d,))]
        cin = d
    return keys + [("norm.weight", (dims[-1],)), ("norm.bias", (dims[-1],))]


def _to_official_name(ours: str) -> str:
    stage, rest = ours.removeprefix("stages.").split(".", 1)
    return ours if not ours.startswith("stages.") else f"stage{stage}.{rest}"


def test_official_layout_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    src = _randomise_norms_(hybridzoo.create_model("cvt_13", **SMALL)).eval()
    sd = src.state_dict()
    official = {_to_official_name(k): v.clone() for k, v in sd.items()}
    expected = _official_keys(SMALL["dims"], SMALL["depths"]) + [("head.weight", (7, 48)), ("head.bias", (7,))]
    assert sorted(official) == sorted(k for k, _ in expected)
    for k, shape in expected:
        assert tuple(official[k].shape) == shape, k
    path = tmp_path / "cvt_official.pth"
    torch.save({"model": official}, path)
    torch.manual_seed(1)
    dst = hybridzoo.create_model("cvt_13", pretrained=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_full_size_official_key_set():
    with torch.device("meta"):
        model = hybridzoo.create_model("cvt_w24_384")
    expected = _official_keys((192, 768, 1024), (2, 2, 20)) + [("head.weight", (1000, 1024)), ("head.bias", (1000,))]
    converted = cvt_module.convert_official({k: torch.empty(s, device="meta") for k, s in expected})
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)


# --- what makes CvT CvT ----------------------------------------------------------------------------

def test_kv_stride_reduces_keys_4x(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[-2], k.shape[-2], v.shape[-2]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(cvt_module.F, "scaled_dot_product_attention", spy)
    model = hybridzoo.create_model("cvt_13", **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.forward_features(x)
    # maps 16×16, 8×8, 4×4; the last stage also carries the cls token in q, k and v
    expected = [(256, 64, 64)] * 1 + [(64, 16, 16)] * 2 + [(17, 5, 5)] * 3
    assert seen == expected
    for q_len, k_len, _ in seen:
        cls = q_len % 2  # odd token count only where the cls token is present
        assert (q_len - cls) == 4 * (k_len - cls)
    seen.clear()
    with torch.no_grad():
        model(x)
    # the classifier's forward: the last block's only query is the cls token, against every key
    assert seen == expected[:-1] + [(1, 5, 5)]


def test_cls_token_only_in_last_stage():
    model = hybridzoo.create_model("cvt_13", **SMALL).eval()
    assert [s.cls_token is None for s in model.stages] == [True, True, False]
    assert [k for k in model.state_dict() if "cls_token" in k] == ["stages.2.cls_token"]
    assert [b.attn.with_cls_token for s in model.stages for b in s.blocks] == [False] * 3 + [True] * 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        logits = model(x)
        model.stages[2].cls_token.add_(1.0)
        maps2 = model.forward_intermediates(x)
        logits2 = model(x)
    assert torch.equal(maps[0], maps2[0]) and torch.equal(maps[1], maps2[1])
    assert not torch.allclose(logits, logits2)


def test_attention_matches_official_formula_with_full_width_scale():
    """cls_cvt.py scores with dim_out**-0.5 (the whole width), not head_dim**-0.5."""
    torch.manual_seed(0)
    block = hybridzoo.create_model("cvt_13", **SMALL).stages[2].blocks[0]
    attn = _randomise_norms_(block).attn.eval()
    assert attn.scale == 48 ** -0.5
    B, h, w, C, H = 2, 4, 4, 48, 3
    x = torch.randn(B, 1 + h * w, C)
    with torch.no_grad():
        cls_tok, rest = x[:, :1], x[:, 1:].transpose(1, 2).reshape(B, C, h, w)
        q, k, v = (torch.cat((cls_tok, getattr(attn, f"conv_proj_{t}")(rest)), 1) for t in "qkv")
        q, k, v = (getattr(attn, f"proj_{t}")(u).reshape(B, -1, H, C // H).transpose(1, 2)
                   for t, u in zip("qkv", (q, k, v)))
        p = torch.softmax(torch.einsum("bhlk,bhtk->bhlt", q, k) * C ** -0.5, dim=-1)
        ref = attn.proj(torch.einsum("bhlt,bhtv->bhlv", p, v).transpose(1, 2).reshape(B, -1, C))
        assert torch.allclose(attn(x, h, w), ref, atol=1e-6)


def test_blocks_and_embeddings_follow_the_paper():
    with torch.device("meta"):
        model = hybridzoo.create_model("cvt_13")
    assert [(s.patch_embed.proj.kernel_size[0], s.patch_embed.proj.stride[0], s.patch_embed.proj.padding[0])
            for s in model.stages] == [(7, 4, 2), (3, 2, 1), (3, 2, 1)]
    assert [len(s.blocks) for s in model.stages] == [1, 2, 10]
    attn = model.stages[1].blocks[0].attn
    for t, stride in (("q", 1), ("k", 2), ("v", 2)):
        conv = getattr(attn, f"conv_proj_{t}").conv
        assert conv.groups == conv.in_channels == 192 and conv.bias is None and conv.stride == (stride, stride)
        assert getattr(attn, f"proj_{t}").bias is not None
    assert isinstance(model.stages[0].blocks[0].mlp.act, cvt_module.QuickGELU)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))


@pytest.mark.parametrize("name,last_rate", [("cvt_13", 0.1), ("cvt_21", 0.1), ("cvt_w24_384", 0.3)])
def test_drop_path_rates_per_stage_as_official(name, last_rate):
    with torch.device("meta"):
        model = hybridzoo.create_model(name)
    for i, stage in enumerate(model.stages):
        rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in stage.blocks]
        want = torch.linspace(0, last_rate if i == 2 else 0.0, len(stage.blocks)).tolist()
        assert rates == pytest.approx(want)


def test_variable_input_size_and_feature_info():
    model = hybridzoo.create_model("cvt_13", **SMALL).eval()
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16]
    assert [f["num_chs"] for f in model.feature_info] == [16, 32, 48]
    feats = hybridzoo.create_model("cvt_13", features_only=True, **SMALL).eval()
    with torch.no_grad():
        maps = feats(torch.randn(1, 3, 96, 64))  # batch 1: the official squeeze quirk is not reproduced
        logits = model(torch.randn(1, 3, 96, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 16, 24, 16), (1, 32, 12, 8), (1, 48, 6, 4)]
    assert logits.shape == (1, 7)
    demo = hybridzoo.create_model("cvt_tiny_demo")
    assert [f["reduction"] for f in demo.feature_info] == [2, 4, 8]


def test_too_small_input_is_a_clear_error():
    model = hybridzoo.create_model("cvt_13", **SMALL)
    model.model_name = "cvt_13"
    with pytest.raises(ValueError, match="cvt_13"):
        model(torch.randn(1, 3, 2, 2))


def test_reset_classifier_and_pre_logits():
    model = hybridzoo.create_model("cvt_13", **SMALL).eval()
    model.reset_classifier(3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 2 * 2, 48)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, 48)
        assert model(x).shape == (2, 3)


# --- the classifier's forward computes only the cls token's row in the last block --------------------

def _full(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The old forward: every token through every block, then the head on the cls token."""
    return model.forward_head(model.forward_features(x))


def _last_rows(model: nn.Module) -> list[int]:
    """Rows the last block's MLP saw at each call (a hook left on the model)."""
    seen = []
    model.stages[-1].blocks[-1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    return seen


@pytest.mark.parametrize("batch", [1, 3])
def test_cls_only_forward_equals_the_full_computation_in_eval(batch):
    torch.manual_seed(0)
    model = _randomise_norms_(hybridzoo.create_model("cvt_13", **SMALL)).eval()
    rows = _last_rows(model)
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        ref, got = _full(model, x), model(x)
    assert rows == [1 + 4 * 4, 1]  # the full path ran every token; model(x) only the cls token
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _train_pair(checkpointing: bool, drop_path_rate: float = 0.3):
    torch.manual_seed(0)
    full = _randomise_norms_(hybridzoo.create_model("cvt_13", drop_path_rate=drop_path_rate, **SMALL)).train()
    full.set_grad_checkpointing(checkpointing)
    fast = copy.deepcopy(full)
    return full, fast


def _assert_same_step(full, fast, x, seed=1):
    """Logits, every parameter's gradient (the skipped query projection's exact zeros included) and every
    buffer (BatchNorm running statistics) after one training forward + backward, drop-path masks drawn alike."""
    w = torch.randn(x.shape[0], SMALL["num_classes"], generator=torch.Generator().manual_seed(5))
    torch.manual_seed(seed)
    ref = _full(full, x)
    torch.manual_seed(seed)
    got = fast(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (ref * w).sum().backward()
    (got * w).sum().backward()
    mine = dict(fast.named_parameters())
    for k, p in full.named_parameters():
        assert mine[k].grad is not None, k
        torch.testing.assert_close(mine[k].grad, p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()) + 1e-8,
                                   msg=k)
    skipped = fast.stages[-1].blocks[-1].attn.conv_proj_q
    assert all(p.grad is not None and not p.grad.any() for p in skipped.parameters())
    bufs = dict(fast.named_buffers())
    for k, b in full.named_buffers():
        torch.testing.assert_close(bufs[k], b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cls_only_forward_in_training_has_the_full_gradients_and_statistics(batch, checkpointing):
    full, fast = _train_pair(checkpointing)
    rows = _last_rows(fast)
    x = torch.randn(batch, 3, 64, 64)
    _assert_same_step(full, fast, x)
    # with checkpointing the block's forward runs again in backward
    assert rows == [1] * (2 if checkpointing else 1)


def test_cls_only_forward_through_the_trainers_fast_path():
    from hybridzoo.layers.train_fast import optimize_for_cpu_training
    full, fast = _train_pair(False)
    optimize_for_cpu_training(full, min_weight_numel=1)
    optimize_for_cpu_training(fast, min_weight_numel=1)
    _assert_same_step(full, fast, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("batch", [1, 4])
def test_cls_only_forward_on_the_frozen_path_equals_eager(batch, two_threads):
    """optimize_for_cpu_inference (folded projections, oneDNN linears; with two threads a batch is split)."""
    from hybridzoo.layers.onednn import optimize_for_cpu_inference
    torch.manual_seed(0)
    model = _randomise_norms_(hybridzoo.create_model("cvt_13", **SMALL)).eval()
    frozen = optimize_for_cpu_inference(model)
    rows = _last_rows(frozen)
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        ref, got = _full(model, x), frozen(x)
    assert rows and set(rows) == {1}
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_without_a_cls_token_the_head_pools_every_token():
    torch.manual_seed(0)
    model = hybridzoo.create_model("cvt_13", with_cls_token=(False, False, False), **SMALL).eval()
    rows = _last_rows(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _full(model, x), rtol=0, atol=0)
    assert rows == [16, 16]


def test_num_queries_needs_the_cls_token():
    model = hybridzoo.create_model("cvt_13", **SMALL)
    x = torch.randn(2, 16 * 16, 16)
    with pytest.raises(ValueError, match="num_queries must be None or 1"):
        model.stages[0].blocks[0](x, 16, 16, num_queries=1)
    with pytest.raises(ValueError, match="num_queries must be None or 1"):
        model.stages[2].blocks[0](torch.randn(2, 17, 48), 4, 4, num_queries=2)
    with pytest.raises(ValueError, match="with_cls_token=True"):
        model.stages[0].forward_cls(torch.randn(2, 3, 64, 64))


def test_cls_only_forward_skips_exactly_the_dead_rows_work():
    """model(x) executes the full computation's MACs less, exactly, the spatial rows' work in the last block:
    depthwise query conv, query projection, their attention against every key, output projection and MLP.
    The model's MAC count (`hybridzoo.profile`, the cards) stays the papers' (every row, `every_row`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from hybridzoo.layers.helpers import every_row
    from hybridzoo.profile import count_macs

    def executed(f):   # attention through the math kernel, whose products the counter sees (as count_macs does)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            f()
        return counter.get_total_flops() // 2

    model = hybridzoo.create_model("cvt_13", **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    hw, c, keys = 4 * 4, SMALL["dims"][-1], 1 + 2 * 2  # the last map 4×4, keys strided by 2, plus the cls token
    skipped = hw * c * 9 + hw * c * c + 2 * hw * keys * c + hw * c * c + hw * 2 * 4 * c * c
    full = executed(lambda: _full(model, x))
    assert full - executed(lambda: model(x)) == skipped

    def in_every_row():
        with every_row():
            model(x)
    assert executed(in_every_row) == full
    assert count_macs(model, x) == full
