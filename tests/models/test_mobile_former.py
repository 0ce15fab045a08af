"""Mobile-Former: the two-way bridge, dynamic ReLU from the first token, the merged head, official layout."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import hybridzoo
from hybridzoo.models.mobile_former import (DynamicReLU, Former, FormerToMobile, MobileToFormer, channel_shuffle)
from hybridzoo.registry import get_card

VARIANTS = ["mobile_former_508m", "mobile_former_294m", "mobile_former_214m", "mobile_former_151m",
            "mobile_former_96m", "mobile_former_52m", "mobile_former_26m"]


def _reduced(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return hybridzoo.create_model(name, **{**get_card(name).test_kwargs, **kw})


def _randomize_norms(model):
    # non-trivial BatchNorm statistics so that a wrong mapping of them shows in the outputs
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name, tokens, dim", [("mobile_former_508m", 6, 192), ("mobile_former_151m", 6, 192),
                                               ("mobile_former_96m", 4, 128), ("mobile_former_26m", 3, 128)])
def test_global_tokens_per_variant(name, tokens, dim):
    with torch.device("meta"):
        model = hybridzoo.create_model(name)
    assert tuple(model.tokens.shape) == (tokens, dim)


def test_mobile_to_former_attends_raw_local_features():
    torch.manual_seed(0)
    C, d, heads, T = 16, 24, 2, 3
    bridge = MobileToFormer(C, d, heads, dynamic=True).eval()
    # no key/value projection on the local side: q, the dynamic gate, the output projection and the norm
    assert sorted(n.split(".")[0] for n, _ in bridge.named_parameters()) == ["alpha", "alpha", "norm", "norm",
                                                                            "proj", "proj", "q", "q"]
    x, z = torch.randn(2, C, 5, 7), torch.randn(2, T, d)
    c = C // heads
    q = bridge.q(z)
    outs = []
    for h in range(heads):  # an independent per-head computation of softmax(q·xᵀ/√c)·x
        xh = x[:, h * c:(h + 1) * c].flatten(2).transpose(1, 2)          # B×HW×c
        a = torch.softmax(q[..., h * c:(h + 1) * c] @ xh.transpose(1, 2) / c ** 0.5, dim=-1)
        outs.append(a @ xh)
    att = torch.cat(outs, -1) * 2 * F.hardsigmoid(bridge.alpha(z))
    expected = F.layer_norm(z + bridge.proj(att), (d,), bridge.norm.weight, bridge.norm.bias)
    torch.testing.assert_close(bridge(x, z), expected, rtol=1e-5, atol=1e-5)


def test_former_to_mobile_queries_with_raw_pixels():
    torch.manual_seed(0)
    C, d, heads, T = 16, 24, 2, 4
    bridge = FormerToMobile(C, d, heads).eval()
    assert sorted({n.split(".")[0] for n, _ in bridge.named_parameters()}) == ["k", "v"]
    x, z = torch.randn(2, C, 3, 5), torch.randn(2, T, d)
    c = C // heads
    k, v = bridge.k(z), bridge.v(z)
    outs = []
    for h in range(heads):
        xh = x[:, h * c:(h + 1) * c].flatten(2).transpose(1, 2)          # B×HW×c: queries, no projection
        a = torch.softmax(xh @ k[..., h * c:(h + 1) * c].transpose(1, 2) / c ** 0.5, dim=-1)
        outs.append((a @ v[..., h * c:(h + 1) * c]).transpose(1, 2).reshape(2, c, 3, 5))
    torch.testing.assert_close(bridge(x, z), x + torch.cat(outs, 1), rtol=1e-5, atol=1e-5)


def test_former_is_post_norm_with_four_heads_and_ffn_ratio_two():
    former = Former(32)
    assert former.num_heads == 4 and former.fc1.out_features == 64
    z = torch.randn(2, 6, 32) * 5 + 3
    out = former(z)
    # post-LN: the output itself is layer-normalised
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)


def test_dynamic_relu_slopes_span_paper_ranges():
    act = DynamicReLU(channels=4, token_dim=8)
    x = torch.linspace(-2, 2, 4 * 9).view(1, 4, 3, 3)
    with torch.no_grad():
        act.fc2.weight.zero_()
        act.fc2.bias.fill_(10.0)              # h = 1 → a1 = 2, a2 = 1
        torch.testing.assert_close(act(x, torch.randn(1, 8)), torch.maximum(2 * x, x))
        act.fc2.bias.fill_(-10.0)             # h = 0 → a1 = 0, a2 = −1
        torch.testing.assert_close(act(x, torch.randn(1, 8)), torch.maximum(0 * x, -x))


def test_head_concatenates_pooled_local_features_with_first_token():
    model = _reduced("mobile_former_508m").eval()
    assert model.pre_logits[0].in_features == model.conv_head[0].out_channels + model.token_dim
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, z = model.forward_features(x)
        other = z.clone()
        other[:, 1:] += torch.randn_like(other[:, 1:])
        # only token 0 reaches the classifier
        assert torch.equal(model.forward_head((feats, z)), model.forward_head((feats, other)))
        first = z.clone()
        first[:, 0] += 1.0
        assert not torch.allclose(model.forward_head((feats, z)), model.forward_head((feats, first)))


def test_26m_uses_grouped_pointwise_convs_and_shuffle():
    with torch.device("meta"):
        model = hybridzoo.create_model("mobile_former_26m")
    pw = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert pw and all(m.groups == 4 for m in pw)
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("name", ["mobile_former_508m", "mobile_former_52m"])
def test_features_only_returns_mobile_stages(name):
    with torch.device("meta"):
        full = hybridzoo.create_model(name, features_only=True)
    assert [f["reduction"] for f in full.feature_info] == [2, 4, 8, 16, 32]
    model = _reduced(name, features_only=True).eval()
    x = torch.randn(2, 3, 64, 96)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, i["num_chs"], 64 // i["reduction"], 96 // i["reduction"])
                                              for i in model.feature_info]
    feats[-1].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_variable_resolution_channels_last():
    model = _reduced("mobile_former_26m").eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(ref, cl, rtol=1e-5, atol=1e-5)


# -- official checkpoint layout (AAboys/MobileFormer) -----------------------------------------------
# Our name → the official module path, written from the official `DnaBlock` / `DnaBlock3` /
# `Local2Global` / `GlobalBlock` / `Global2Local` / `MergeClassifier` definitions.
_OFFICIAL_LITE = [(r"\.dw\.0\.", ".conv.0."), (r"\.dw\.1\.", ".conv.1."), (r"\.pw\.0\.", ".conv.4."),
                  (r"\.pw\.1\.", ".conv.5.")]
_OFFICIAL_DOWN = [(r"mobile\.dw1\.", "conv1."), (r"mobile\.pw1\.", "conv2."), (r"mobile\.dw2\.", "conv3."),
                  (r"mobile\.pw2\.", "conv4."), (r"mobile\.act1\.fc1\.", "hyper1.hyper.0."),
                  (r"mobile\.act1\.fc2\.", "hyper1.hyper.2."), (r"mobile\.act2\.fc1\.", "hyper3.hyper.0."),
                  (r"mobile\.act2\.fc2\.", "hyper3.hyper.2.")]
_OFFICIAL_MOBILE = [(r"mobile\.pw1\.", "conv1."), (r"mobile\.dw\.", "conv2."), (r"mobile\.pw2\.", "conv3."),
                    (r"mobile\.act1\.fc1\.", "hyper1.hyper.0."), (r"mobile\.act1\.fc2\.", "hyper1.hyper.2."),
                    (r"mobile\.act2\.fc1\.", "hyper2.hyper.0."), (r"mobile\.act2\.fc2\.", "hyper2.hyper.2.")]
_OFFICIAL_BRIDGES = [(r"mobile_former\.alpha\.", "local_global.alpha.0."), (r"mobile_former\.norm\.", "local_global.layer_norm."),
                     (r"mobile_former\.", "local_global."), (r"former\.proj\.", "global_block.channel_mlp."),
                     (r"former\.norm1\.", "global_block.layer_norm."), (r"former\.fc1\.", "global_block.ffn.0."),
                     (r"former\.fc2\.", "global_block.ffn.2."), (r"former\.norm2\.", "global_block.ffn_norm."),
                     (r"former\.q\.", "global_block.q."), (r"former_mobile\.v\.", "global_local.proj."),
                     (r"former_mobile\.k\.", "global_local.k.")]
_OFFICIAL_TOP = [(r"^tokens$", "tokens.weight"), (r"^bridge\.alpha\.", "local_global.alpha.0."),
                 (r"^bridge\.norm\.", "local_global.layer_norm."), (r"^bridge\.", "local_global."),
                 (r"^conv_head\.0\.", "classifier.conv.1."), (r"^conv_head\.1\.", "classifier.conv.2."),
                 (r"^pre_logits\.", "classifier.fc."), (r"^head\.", "classifier.classifier.1.")]


def _to_official_key(model, key: str) -> str:
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    if not m:
        for pat, rep in _OFFICIAL_TOP:
            if re.search(pat, key):
                return re.sub(pat, rep, key, count=1)
        return key
    i, rest = int(m.group(1)), m.group(2)
    blk = model.blocks[i]
    if type(blk).__name__ == "LiteBottleneck":
        table = _OFFICIAL_LITE
        rest = "." + rest
    else:
        table = _OFFICIAL_BRIDGES + (_OFFICIAL_DOWN if blk.downsample else _OFFICIAL_MOBILE)
    for pat, rep in table:
        if re.match(pat, rest):
            rest = re.sub(pat, rep, rest, count=1)
            break
    else:
        raise AssertionError(f"unmapped key {key}")
    return f"features.{i}{rest}" if rest.startswith(".") else f"features.{i}.{rest}"


@pytest.mark.parametrize("name", ["mobile_former_508m", "mobile_former_26m"])
def test_loads_official_checkpoint_layout(name, tmp_path):
    model = _reduced(name, seed=3).eval()
    _randomize_norms(model)
    official = {_to_official_key(model, k): v.clone().contiguous() for k, v in model.state_dict().items()}
    assert len(official) == len(model.state_dict())
    assert "tokens.weight" in official and "features.1.global_local.proj.weight" in official
    assert not any(k.startswith(("blocks.", "bridge.", "head.")) for k in official)
    path = tmp_path / "official.safetensors"
    save_file(official, str(path))
    loaded = hybridzoo.create_model(name, pretrained=str(path), **get_card(name).test_kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_dynamic_relu_without_autograd_is_bitwise_the_autograd_formula():
    # the no-grad path writes the maximum into the first product's buffer; it must stay max(a1·x, a2·x)
    torch.manual_seed(0)
    act = DynamicReLU(12, 16)
    x = torch.randn(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    token = torch.randn(2, 16)
    h = F.hardsigmoid(act.fc2(torch.relu(act.fc1(token)))).detach()
    a1, a2 = 2 * h[:, :12, None, None], 2 * h[:, 12:, None, None] - 1
    ref = torch.maximum(a1 * x, a2 * x)
    with torch.inference_mode():
        fast = act(x, token)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast, act(x, token).detach())  # the autograd path, parameters requiring grad


def test_torch_compile_matches_eager_at_batch_1():
    # regression: inductor's attention pattern matcher crashed on Former→Mobile's queries at batch 1
    # ("Attempting to broadcast a dimension of length 2 ... [1, 2]"), which broke `--compile` and
    # `bench_timm.py --inductor`; the reduced model compiles in ~8 s
    model = _reduced("mobile_former_294m").eval()
    _randomize_norms(model)
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model)(x)
            torch.testing.assert_close(compiled, model(x), rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_training_takes_the_dynamic_relu_kernels_with_the_same_gradients(channels_last):
    """`optimize_for_cpu_training` (what `hybridzoo train` does on the CPU) runs every dynamic ReLU's training forward
    and backward on the native kernels, one pass each: the plain model's loss and parameter gradients to fp32
    rounding, and no ATen maximum left; without it the autograd formula runs."""
    from hybridzoo.layers import native
    from hybridzoo.layers.train_fast import optimize_for_cpu_training

    from _helpers import OpNames  # tests/conftest.py puts tests/ on sys.path

    if not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels here")
    plain = _reduced("mobile_former_26m").train()
    _randomize_norms(plain)
    fast = optimize_for_cpu_training(__import__("copy").deepcopy(plain))
    n_act = sum(isinstance(m, DynamicReLU) for m in plain.modules())
    assert n_act > 0 and all(m.native_training for m in fast.modules() if isinstance(m, DynamicReLU))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, y = torch.randn(3, 3, 64, 64).contiguous(memory_format=fmt), torch.tensor([0, 1, 2])
    if channels_last:
        plain, fast = plain.to(memory_format=fmt), fast.to(memory_format=fmt)
    with OpNames() as ops:
        loss = F.cross_entropy(fast(x), y)
        loss.backward()
    assert ops.names.count("hybridzoo_native.dyrelu") == n_act
    assert ops.names.count("hybridzoo_native.dyrelu_backward") == n_act
    assert "aten.maximum" not in ops.names
    with OpNames() as ops:
        ref = F.cross_entropy(plain(x), y)
        ref.backward()
    assert ops.names.count("aten.maximum") == n_act and "hybridzoo_native.dyrelu" not in ops.names
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 * scale, msg=n)
