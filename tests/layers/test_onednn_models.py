"""The oneDNN frozen inference path (`optimize_for_cpu_inference`) on whole models: same outputs as eager.

Every parameter and BatchNorm statistic is perturbed first, so zero-initialised heads or residual
gammas (DeiT-style heads, BoTNet's last BN γ) cannot hide a wrong fused layer behind a zero output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridzoo
from hybridzoo.layers.mlp import Mlp, QuickGELU
from hybridzoo.layers.conv import ConvBnAct
from hybridzoo.models.convit import GPSA
from hybridzoo.layers import onednn
from hybridzoo.layers.onednn import OneDNNConv2d, OneDNNLinear, onednn_available, optimize_for_cpu_inference
from hybridzoo.registry import get_card
from _helpers import perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")

# the brief's four, then the other image classifiers that take the path today
MODELS = ["deit_small_patch16_224", "cvt_13", "vvt_tiny", "botnet_t3", "vit_small_patch16_224",
          "deit_small_distilled_patch16_224", "vitc_1gf", "convit_tiny", "coatnet_0", "ceit_tiny",
          "mobile_former_26m"]


def _compare(model: nn.Module, x: torch.Tensor, *more: torch.Tensor) -> nn.Module:
    """The frozen copy's output against eager on x (and on inputs of other sizes: caches must follow)."""
    model.eval()
    fast = optimize_for_cpu_inference(model)
    for inp in (x, *more, x):
        with torch.inference_mode():
            ref, out = model(inp), fast(inp)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        out = out if isinstance(out, torch.Tensor) else out[0]
        assert out.shape == ref.shape
        assert ref.abs().max() > 1e-3, "degenerate reference output; the comparison would prove nothing"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    return fast


@pytest.mark.parametrize("name", MODELS)
def test_reduced_model_matches_eager(name):
    if name not in hybridzoo.list_models():
        pytest.skip(f"{name} is not registered in this checkout")
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs)
    perturb(model)
    x = torch.randn(2, *(card.test_input_size or card.input_size))
    fast = _compare(model, x)
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert not any(isinstance(m, nn.Linear) for m in fast.modules())
    # the original is untouched and still trainable
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())


# the conv models: every BatchNorm folded into a convolution (BoTNet's post-attention BN has none before it)
@pytest.mark.parametrize("name, bn_left, act", [("coatnet_0", 0, True), ("botnet_t3", 2, True),
                                                ("mobile_former_26m", 0, True), ("cvt_13", 0, False)])
def test_batch_norms_are_folded(name, bn_left, act):
    card = get_card(name)
    torch.manual_seed(0)
    fast = optimize_for_cpu_inference(hybridzoo.create_model(name, **card.test_kwargs))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == bn_left
    assert not any(type(m) is nn.Conv2d for m in fast.modules())
    assert any(isinstance(m, OneDNNConv2d) and m.folded_bn and (m.attr != "none") == act for m in fast.modules())


@pytest.mark.parametrize("name, kwargs, sizes", [
    ("coatnet_0", {}, [96]),                       # another grid: the relative bias is resized, not the cached one
    ("coatnet_0", {"pool_type": "max"}, []),      # max pool: the pre-norm cannot fold into conv1
    ("botnet_t3", {}, [96]),                       # other relative tables than the cached ones
    ("botnet_bot50", {"act_layer": nn.ReLU}, []),  # ReLU rides on the fused residual add
    ("convit_tiny", {}, [96]),                     # another token grid: the positional attention is rebuilt
    ("mobile_former_26m", {}, []),
    # ungrouped: the frozen dynamic ReLU works in the conv's buffer, its scratch buffer grows at 128 px
    ("mobile_former_294m", {}, [128]),
])
def test_frozen_blocks_match_eager_at_other_sizes(name, kwargs, sizes):
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **{**card.test_kwargs, **kwargs})
    perturb(model)
    side = (card.test_input_size or card.input_size)[-1]
    _compare(model, torch.randn(2, 3, side, side), *[torch.randn(1, 3, s, s) for s in sizes])


def test_a_model_off_the_cpu_is_refused_naming_where_it_is():
    # a model on a GPU ("meta" stands in for one here) would fail deep inside with an error about one layer
    card = get_card("cvt_13")
    model = hybridzoo.create_model("cvt_13", **card.test_kwargs)
    model.head.to("meta")
    with pytest.raises(ValueError, match=r"weights are on meta: pass the model on the CPU \(model.cpu\(\)\)"):
        optimize_for_cpu_inference(model)


def test_gpsa_with_a_saturated_gate_keeps_the_original_computation():
    # σ(λ) rounds to 1: v cannot be rescaled by 1 − σ(λ), the frozen GPSA falls back to the module's own forward
    card = get_card("convit_tiny")
    torch.manual_seed(0)
    model = hybridzoo.create_model("convit_tiny", **card.test_kwargs)
    perturb(model)
    with torch.no_grad():
        model.blocks[0].attn.gating_param[1] = 30.0
    fast = _compare(model, torch.randn(2, *card.test_input_size))
    assert type(fast.blocks[0].attn) is GPSA and type(fast.blocks[1].attn) is not GPSA


@pytest.mark.parametrize("name", ["convit_tiny", "convit_small"])
def test_convit_one_image_path_and_cached_positional_attention(name):
    # batch 1 takes the frozen GPSA's merged product ((softmax + P')·v'), batch 2 the SDPA route; the same grid
    # again reuses the cached map, another grid rebuilds it, and back again
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs)
    perturb(model)
    side = card.test_input_size[-1]
    _compare(model, torch.randn(1, 3, side, side), torch.randn(2, 3, side, side), torch.randn(1, 3, side + 32, side),
             torch.randn(1, 3, side, side))


def test_frozen_gpsa_notices_rel_indices_changed_in_place():
    card = get_card("convit_tiny")
    torch.manual_seed(0)
    model = hybridzoo.create_model("convit_tiny", **card.test_kwargs)
    perturb(model)
    gpsa = model.blocks[0].attn.eval()
    with torch.no_grad():
        frozen = gpsa.freeze_for_cpu_inference()
    assert type(frozen) is not GPSA
    n = (card.test_input_size[-1] // 16) ** 2
    x, rel = torch.randn(1, n, gpsa.dim), model._relative_indices((4, 4), torch.zeros(1))
    assert n == 16 and model._relative_indices((4, 4), torch.zeros(1)) is rel   # built once per grid
    rel = rel.clone()
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(frozen(x, rel), gpsa(x, rel), rtol=1e-4, atol=1e-5)
            rel.mul_(0.5)   # same object, new values: the cached positional map must not be reused


def test_convit_trains_after_inference_with_the_cached_relative_indices():
    # the cache is filled under inference_mode; an inference tensor could not be saved for backward later
    card = get_card("convit_tiny")
    torch.manual_seed(0)
    model = hybridzoo.create_model("convit_tiny", **card.test_kwargs)
    x = torch.randn(2, *card.test_input_size)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert model.blocks[0].attn.pos_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("act", [None, nn.ReLU, nn.SiLU, nn.GELU, nn.ReLU6, nn.Hardswish])
@pytest.mark.parametrize("kernel, stride, groups", [(1, 1, 1), (1, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 12), (1, 1, 3)])
def test_conv_bn_act_is_one_fused_convolution(act, kernel, stride, groups):
    torch.manual_seed(0)
    block = ConvBnAct(12, 24 if groups != 12 else 12, kernel, stride, groups=groups, act_layer=act)
    perturb(block)
    fast = optimize_for_cpu_inference(nn.Sequential(block))
    conv = fast[0][0]
    assert isinstance(conv, OneDNNConv2d) and conv.folded_bn and isinstance(fast[0][1], nn.Identity)
    assert conv.pointwise == (kernel == 1 and stride == 1 and groups == 1)
    x = 2 * torch.randn(2, 12, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), block.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.SiLU(), nn.GELU()])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("inplace", [False, True])
def test_conv_with_a_fused_residual_add(act, kernel, inplace):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, padding=kernel // 2)
    bn = nn.BatchNorm2d(16)
    perturb(nn.Sequential(conv, bn))
    fused = OneDNNConv2d(conv, bn.eval(), act)
    x = torch.randn(2, 8, 7, 7)
    other = torch.randn(2, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    ref = bn(conv(x)) + other
    ref = ref if act is None else act(ref)
    kept = other.clone()
    with torch.inference_mode():
        out = fused(x, other, inplace=inplace)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if inplace:   # the sum post-op wrote into `other` itself (the activation too, when it is ReLU)
        assert out.data_ptr() == other.data_ptr() or not isinstance(act, (nn.ReLU, type(None)))
        assert not torch.equal(other, kept)
    else:
        assert torch.equal(other, kept)


def test_inplace_residual_add_falls_back_for_a_buffer_it_cannot_write():
    torch.manual_seed(0)
    fused = OneDNNConv2d(nn.Conv2d(8, 16, 1), act=nn.ReLU())
    x, other = torch.randn(2, 8, 5, 5), torch.randn(2, 16, 5, 5)   # contiguous, not channels-last
    kept = other.clone()
    with torch.inference_mode():
        out = fused(x, other, inplace=True)
    assert torch.equal(other, kept) and out.data_ptr() != other.data_ptr()
    ref = torch.relu(nn.functional.conv2d(x, fused.weight, fused.bias) + other)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_conv_weight_is_packed_once_per_input_shape():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    fused = OneDNNConv2d(conv, act=nn.ReLU())
    shapes = [(1, 8, 9, 9), (3, 8, 9, 9), (1, 8, 16, 12), (2, 8, 5, 5), (1, 8, 7, 7), (1, 8, 9, 9)]
    for shape in shapes:
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(fused(x), torch.relu(conv(x)), rtol=1e-4, atol=1e-4)
        assert (*shape, torch.get_num_threads()) in fused._packed
        assert len(fused._packed) <= OneDNNConv2d.MAX_PACKED_SHAPES


def test_conv_weight_is_packed_again_under_another_thread_count(monkeypatch):
    # oneDNN lays the packed weight out for the threads it was packed under; reused under another count it ran
    # 13–14× slower (BoT50's 1×1 residual convolutions at 14², batch 1 after a batch of 2 split into 1-thread parts).
    # The oneDNN route: with the native kernels on, a residual 1×1 convolution runs on the panel product instead
    monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1)
    fused = OneDNNConv2d(conv, act=nn.ReLU())
    x, other = torch.randn(1, 8, 6, 6), torch.randn(1, 16, 6, 6)
    ref = torch.relu(conv(x) + other)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                torch.testing.assert_close(fused(x, other.clone()), ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(saved)
    assert set(fused._packed) == {(1, 8, 6, 6, 1), (1, 8, 6, 6, 2)}


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), None])
def test_a_residual_1x1_convolution_adds_before_its_activation_on_the_panel_product(act, monkeypatch):
    """act(conv(x) + b + other), in place into `other` (the caller's fresh shortcut) or into a new map, on the
    native panel product where it is built (no oneDNN convolution weight packed), else oneDNN's sum post-op."""
    from hybridzoo.layers import native
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 32, 1)
    fused = OneDNNConv2d(conv, act=act)
    x = torch.randn(2, 24, 5, 7).contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = conv(x) + other
        ref = act(ref) if act is not None else ref
    calls = []
    for name in ("rows_linear", "rows_linear_add_"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    with torch.inference_mode():
        out = fused(x, other.clone())
        buf = other.clone()
        into = fused(x, buf, inplace=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(into, ref, rtol=1e-5, atol=1e-5)
    assert into.data_ptr() == buf.data_ptr()   # written into the shortcut's buffer
    if native.attention_supported():
        assert calls == ["rows_linear", "rows_linear_add_"] and not fused._packed
    # more pixels than RESIDUAL_PANEL_ROWS (a batch split's share at batch 32): oneDNN's convolution and sum
    monkeypatch.setattr(OneDNNConv2d, "RESIDUAL_PANEL_ROWS", 2 * 5 * 7 - 1)
    calls.clear()
    with torch.inference_mode():
        torch.testing.assert_close(fused(x, other.clone(), inplace=True), ref, rtol=1e-5, atol=1e-5)
    assert not calls and fused._packed


def test_conv_weight_packing_from_several_threads_at_once():
    # the batch split packs from two threads at once; more new shapes than the cache holds must neither
    # raise (the eviction popping one entry twice) nor give a wrong result
    from concurrent.futures import ThreadPoolExecutor
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    fused = OneDNNConv2d(conv)
    xs = [torch.randn(1 + i % 3, 4, 5 + i, 6) for i in range(12)]

    def check(x):
        with torch.inference_mode():
            torch.testing.assert_close(fused(x), conv(x), rtol=1e-4, atol=1e-4)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, xs * 3))
    assert len(fused._packed) <= OneDNNConv2d.MAX_PACKED_SHAPES


def _identity_shortcut_stage(kind: str) -> nn.Module:
    from hybridzoo.models.botnet import Bottleneck, Stage
    from hybridzoo.models.coatnet import MBConv
    torch.manual_seed(0)
    if kind == "botnet":
        blocks = [Bottleneck(32, 8, 1, nn.ReLU, None) for _ in range(3)]   # 32 → 32: identity shortcuts
        stage = nn.Sequential(Stage(*blocks))
    else:
        stage = nn.Sequential(nn.Sequential(*[MBConv(16, 16) for _ in range(3)]))
    perturb(stage)
    return stage.eval()


@pytest.mark.parametrize("kind", ["botnet", "coatnet"])
def test_residual_blocks_write_into_buffers_only_the_stage_holds(kind):
    from hybridzoo.layers.onednn import InplaceChain
    model = _identity_shortcut_stage(kind)
    # whole batches: with several threads the batch split would run the chain in two threads at once and
    # interleave the hooks' records (the split has its own tests)
    fast = optimize_for_cpu_inference(model, split_batch=False)
    chain = fast[0]
    assert type(chain) is InplaceChain and all(getattr(b, "reuses_input", False) for b in chain)
    seen = []
    for b in chain:
        b.register_forward_hook(lambda m, args, out: seen.append((args[0].data_ptr(), out.data_ptr())))
    x = torch.randn(2, *((32, 8, 8) if kind == "botnet" else (16, 8, 8))).contiguous(
        memory_format=torch.channels_last)
    kept = x.clone()
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(x, kept), "the chain's own input was overwritten"
    # the first block writes a fresh buffer; every later one writes into its input (the previous output)
    assert seen[0][1] != seen[0][0] and all(i == o for i, o in seen[1:])


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "cvt_13"])
def test_full_size_model_matches_eager(name):
    torch.manual_seed(0)
    model = hybridzoo.create_model(name)
    perturb(model)
    _compare(model, torch.randn(1, 3, 64, 64))


def test_activations_are_fused_into_fc1():
    torch.manual_seed(0)
    deit = optimize_for_cpu_inference(hybridzoo.create_model("deit_small_patch16_224", **get_card(
        "deit_small_patch16_224").test_kwargs))
    mlp = deit.blocks[0].mlp
    assert (mlp.fc1.act, mlp.fc1.algorithm) == ("gelu", "none") and type(mlp) is onednn.FrozenMlp
    cvt = optimize_for_cpu_inference(hybridzoo.create_model("cvt_13", **get_card("cvt_13").test_kwargs))
    mlp = cvt.stages[0].blocks[0].mlp
    assert mlp.fc1.act == "swish" and mlp.fc1.scale == pytest.approx(1.702)
    assert mlp.fc2.scale == pytest.approx(1 / 1.702)


@pytest.mark.parametrize("route", ["onednn", "mkl"])
@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), QuickGELU()])
def test_every_fusable_activation(act, route, monkeypatch):
    # tiny products run through MKL with the activation applied after it; the others as oneDNN post-ops
    monkeypatch.setattr(onednn, "TINY_PRODUCT", 10**9 if route == "mkl" else 0)
    torch.manual_seed(0)
    mlp = Mlp(24, 96, act_layer=lambda: act)
    x = 3 * torch.randn(2, 7, 24)
    fast = optimize_for_cpu_inference(nn.Sequential(mlp))
    assert fast[0].fc1.act != "none" and type(fast[0]) is onednn.FrozenMlp
    # the plain weights stay readable, unscaled
    torch.testing.assert_close(fast[0].fc1.weight, mlp.fc1.weight)
    torch.testing.assert_close(fast[0].fc2.weight, mlp.fc2.weight)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), mlp.eval()(x), rtol=1e-5, atol=1e-5)


def test_mlp_subclass_is_not_fused():
    class DwMlp(Mlp):  # something between fc1 and act: fusing would skip it
        def forward(self, x):
            return self.fc2(self.act(2 * self.fc1(x)))

    torch.manual_seed(0)
    m = DwMlp(8, 16)
    fast = optimize_for_cpu_inference(m)
    assert fast.fc1.act == "none" and isinstance(fast.act, nn.GELU)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), m.eval()(x), rtol=1e-5, atol=1e-5)


def test_quick_gelu_without_autograd_is_bitwise_the_autograd_formula():
    x = 4 * torch.randn(3, 257)
    ref = x * torch.sigmoid(1.702 * x)
    with torch.inference_mode():
        assert torch.equal(QuickGELU()(x), ref)
    with torch.no_grad():
        assert torch.equal(QuickGELU()(x), ref)
    xr = x.clone().requires_grad_()
    y = QuickGELU()(xr)
    assert torch.equal(y.detach(), ref)
    y.sum().backward()
    assert xr.grad is not None


@pytest.mark.parametrize("act, bias", [(nn.SiLU, True), (nn.ReLU, False)])
def test_squeeze_excitation_freezes_to_products_on_the_pooled_rows(act, bias):
    """The frozen SE's gate: its two 1×1 convolutions as products on the pooled (B, C) rows, no convolution left."""
    from hybridzoo.layers.conv import SqueezeExcite
    torch.manual_seed(0)
    se = SqueezeExcite(48, 12, act_layer=act, bias=bias).eval()
    perturb(se)
    fast = optimize_for_cpu_inference(nn.Sequential(se), split_batch=False)
    frozen = fast[0]
    assert type(frozen).__name__ == "_FrozenSqueezeExcite"
    assert not any(isinstance(m, (nn.Conv2d, OneDNNConv2d)) for m in frozen.modules())
    x = torch.randn(3, 48, 5, 6)
    with torch.inference_mode():
        gate, ref = se.gate_of(x), se(x)
        assert gate.shape == (3, 48, 1, 1) and float(gate.std()) > 1e-3
        torch.testing.assert_close(frozen.gate_of(x), gate, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(frozen.gate_of_mean(x.mean((2, 3))), gate, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(se.gate_of_mean(x.mean((2, 3))), gate, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fast(x), ref, rtol=1e-5, atol=1e-6)


def test_coatnet_folds_each_se_gate_into_the_projection_for_one_image(monkeypatch):
    """At batch 1 every MBConv's SE gate scales conv3's packed weight (`native.scale_panels`), not conv2's output,
    its pooling summed by the depthwise kernel (`native.depthwise3x3_pooled`), and the model still gives eager's
    outputs."""
    from hybridzoo.layers import native
    from hybridzoo.models.coatnet import _FrozenMBConv
    if not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels for this CPU")
    card = get_card("coatnet_0")
    torch.manual_seed(0)
    model = hybridzoo.create_model("coatnet_0", **card.test_kwargs)
    perturb(model)
    calls = []
    real = native.scale_panels
    monkeypatch.setattr(native, "scale_panels", lambda p, s: calls.append(s.numel()) or real(p, s))
    pooled = []
    real_pooled = native.depthwise3x3_pooled
    monkeypatch.setattr(native, "depthwise3x3_pooled", lambda x, *a: pooled.append(x.shape[1]) or real_pooled(x, *a))
    fast = _compare(model, torch.randn(1, *card.test_input_size))   # runs the frozen copy twice
    gated = [b.conv3.in_channels for b in fast.modules() if isinstance(b, _FrozenMBConv)]
    assert gated and calls == 2 * gated and pooled == 2 * gated


@pytest.mark.parametrize("name", [*MODELS, "mobile_former_294m"])
def test_building_and_running_the_copy_leaves_the_global_generator_alone(name):
    # `hybridzoo train` validates on a frozen copy built at each epoch's end: a draw there (a throwaway layer's
    # initial weights, a probe's random input) would move the training's random stream with the path chosen
    card = get_card(name)
    full = name == "mobile_former_294m"   # its multiplier depthwise convolutions are not in the reduced variants
    model = hybridzoo.create_model(name, **({} if full else card.test_kwargs)).eval()
    x = torch.randn(2, *(card.input_size if full else (card.test_input_size or card.input_size)))
    before = torch.get_rng_state()
    fast = optimize_for_cpu_inference(model)
    if not full:
        with torch.inference_mode():
            fast(x), fast(x[:1])
    assert torch.equal(torch.get_rng_state(), before)
