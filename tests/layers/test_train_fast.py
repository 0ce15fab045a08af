"""The fp32 CPU training path (`optimize_for_cpu_training`): the same function and gradients as plain PyTorch.

Values only (speed is benchmarks/train_levers.py's job). Each comparison also checks that the oneDNN
route really ran (the output's grad_fn), so a silent fallback to `F.linear` cannot pass for the fast path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridzoo
from hybridzoo.layers import native, train_fast
from hybridzoo.layers.mlp import QuickGELU
from hybridzoo.layers.train_fast import (FastConv3x3, FastLinear, FastPointwiseConv2d, fast_linear,
                                        fast_training_available, onednn_linear, optimize_for_cpu_training)
from hybridzoo.registry import get_card

from _helpers import OpNames  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not fast_training_available(), reason="no oneDNN in this build")

TOL = dict(rtol=1e-5, atol=1e-5)
WGRAD = "hybridzoo_native.winograd_weight_grad"


@pytest.fixture(autouse=True)
def onednn_products(monkeypatch):
    """The oneDNN route under test on every CPU (the default on AVX-512 ones; AVX2-only ones default to the native
    panel kernel's, which `test_fast_linear_matches_linear` also covers, and others to MKL's, which
    `test_the_mkl_route_is_f_linear_bit_for_bit` covers)."""
    monkeypatch.setattr(train_fast, "PRODUCTS", "onednn")


# each route's default: the function that chooses it and the environment variable that overrides it
ROUTE_CHOICES = {"products": ("_default_products", "HYBRIDZOO_TRAIN_PRODUCTS"),
                 "weight gradients": ("_default_weight_grads", "HYBRIDZOO_TRAIN_WEIGHT_GRADS")}


@pytest.mark.parametrize("choice, capability, env, want", [
    ("products", "AVX512", "", "native"), ("products", "AVX512_BF16", None, "native"),
    ("products", "AVX2", "", "native"), ("products", "DEFAULT", None, "mkl"), ("products", "AVX2", "onednn", "onednn"),
    ("products", "AVX512", " MKL ", "mkl"), ("products", "AVX512", "native", "native"),
    ("weight gradients", "AVX512", None, "native"), ("weight gradients", "AVX512_BF16", "", "native"),
    ("weight gradients", "AVX2", None, "mkl"), ("weight gradients", "DEFAULT", "", "mkl"),
    ("weight gradients", "AVX2", "native", "native"), ("weight gradients", "AVX512", " MKL ", "mkl"),
])
def test_each_route_follows_the_cpu_unless_told(monkeypatch, choice, capability, env, want):
    default, variable = ROUTE_CHOICES[choice]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if env is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, env)
    assert getattr(train_fast, default)() == want


def test_an_unknown_products_route_is_named_and_the_cpu_decides(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("HYBRIDZOO_TRAIN_PRODUCTS", "blas")
    with pytest.warns(UserWarning, match="HYBRIDZOO_TRAIN_PRODUCTS='blas' is not one of onednn, native, mkl"):
        assert train_fast._default_products() == "native"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NEON")
    with pytest.warns(UserWarning, match="choosing by the CPU"):
        assert train_fast._default_products() == "mkl"


def test_an_unknown_weight_gradient_route_is_named_and_the_cpu_decides(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("HYBRIDZOO_TRAIN_WEIGHT_GRADS", "onednn")
    with pytest.warns(UserWarning, match="HYBRIDZOO_TRAIN_WEIGHT_GRADS='onednn' is not one of native, mkl"):
        assert train_fast._default_weight_grads() == "mkl"


@pytest.mark.parametrize("route", ["native", "mkl"])
@pytest.mark.parametrize("K", [32, 12])
def test_the_weight_gradient_takes_its_route(monkeypatch, route, K):
    """dW on the native kernel when so routed and the input width is in 16s (else MKL), `nn.Linear`'s gradient
    either way, from a non-contiguous input too."""
    if route == "native" and not (train_fast.native.load() and train_fast.native.attention_supported()):
        pytest.skip("the native kernels do not build or run on this CPU")
    calls = []
    real = train_fast.native.weight_grad
    monkeypatch.setattr(train_fast.native, "weight_grad", lambda g, x: calls.append(x.shape) or real(g, x))
    monkeypatch.setattr(train_fast, "WEIGHT_GRADS", route)
    torch.manual_seed(0)
    ref = nn.Linear(K, 20)
    fast = copy.deepcopy(ref)
    fast.__class__ = FastLinear
    x = torch.randn(3, 2 * K, 7).transpose(1, 2)[..., ::2]   # (3, 7, K), strided
    g = torch.randn(3, 7, 20)
    y = fast(x)
    assert _fast_ran(y)
    y.backward(g)
    ref(x).backward(g)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, **TOL)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, **TOL)
    assert calls == ([(21, K)] if route == "native" and K % 16 == 0 else [])


@pytest.mark.parametrize("route", ["mkl", "native"])
def test_the_mkl_route_is_f_linear_bit_for_bit(monkeypatch, route):
    """MKL's route is `F.linear`; so is the native route's for 12 → 9 features (the panel kernel's outputs come in
    16s) where oneDNN does not stand beside it (AVX2 CPUs)."""
    monkeypatch.setattr(train_fast, "PRODUCTS", route)
    monkeypatch.setattr(train_fast, "ONEDNN_BESIDE_NATIVE", False)
    torch.manual_seed(0)
    ref = nn.Linear(12, 9)
    fast = copy.deepcopy(ref)
    fast.__class__ = FastLinear
    x = torch.randn(3, 5, 12)
    g = torch.randn(3, 5, 9)
    y_ref, y = ref(x), fast(x)
    assert not _fast_ran(y) and torch.equal(y, y_ref)
    y_ref.backward(g)
    y.backward(g)
    for a, b in zip(fast.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)


def _fast_ran(y: torch.Tensor) -> bool:
    """y came from the product routes' autograd Function, seen through the views of its output (oneDNN's products
    of more than 2-D rows and the pointwise convolutions' NCHW view)."""
    fn = y.grad_fn
    while fn is not None and type(fn).__name__ in ("ViewBackward0", "PermuteBackward0"):
        fn = fn.next_functions[0][0]
    return fn is not None and "_FastLinearFn" in type(fn).__name__


@pytest.mark.parametrize("route", ["onednn", "native"])
def test_an_in_place_activation_may_follow_the_products(monkeypatch, route):
    """`ReLU(inplace=True)` after a FastLinear of token rows (B, N, C) trains as after `nn.Linear`: the products hand
    back an output that may be written in place."""
    monkeypatch.setattr(train_fast, "PRODUCTS", route)
    if route == "native" and not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels here")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(128, 144), nn.ReLU(inplace=True), nn.Linear(144, 128))
    fast = optimize_for_cpu_training(copy.deepcopy(plain))
    x = torch.randn(2, 7, 128)
    y = fast(x)
    assert _fast_ran(fast[0](x))
    y.sum().backward()
    plain(x).sum().backward()
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=n)


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("route, K, N", [("onednn", 12, 9), ("native", 32, 48)])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_linear_matches_linear(monkeypatch, route, K, N, shape, bias):
    """Both routes (oneDNN's forward and input gradient; the native panel kernel's, whose outputs come in 16s) give
    `nn.Linear`'s values and gradients, the weight gradient on the CPU's route (`WEIGHT_GRADS`) in both."""
    products = []
    if route == "native":
        if not (train_fast.native.load() and train_fast.native.attention_supported()):
            pytest.skip("the native kernels do not build or run on this CPU")
        real = train_fast.native.rows_linear
        monkeypatch.setattr(train_fast.native, "rows_linear", lambda *a: products.append(a[0].shape) or real(*a))
        monkeypatch.setattr(train_fast, "NATIVE_MIN_FEATURES", 16)
    monkeypatch.setattr(train_fast, "PRODUCTS", route)
    torch.manual_seed(0)
    ref = nn.Linear(K, N, bias=bias)
    fast = copy.deepcopy(ref)
    fast.__class__ = FastLinear
    shape = (*shape, K)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(*shape[:-1], N)
    y_ref, y = ref(x), fast(x2)
    assert _fast_ran(y) and not _fast_ran(y_ref)
    torch.testing.assert_close(y, y_ref, **TOL)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    if route == "native":   # the forward, then the input gradient (dy against Wᵀ), on the panel kernel
        assert products == [x2.shape, g.shape]


@pytest.mark.parametrize("K, N", [(12, 9), (64, 256), (256, 64)])
@pytest.mark.parametrize("beside", [True, False])
def test_the_native_route_leaves_what_it_does_not_take_to_onednn_on_avx512(monkeypatch, K, N, beside):
    """On the native route a layer with widths not in 16s, or narrower than NATIVE_MIN_FEATURES (128), takes oneDNN's
    products where oneDNN stands beside the kernel (AVX-512 CPUs); elsewhere (AVX2) widths in 16s take the kernel
    at any size, others `F.linear`. The same values every way."""
    if not (train_fast.native.load() and train_fast.native.attention_supported()):
        pytest.skip("the native kernels do not build or run on this CPU")
    products = []
    real = train_fast.native.rows_linear
    monkeypatch.setattr(train_fast.native, "rows_linear", lambda *a: products.append(a[0].shape) or real(*a))
    monkeypatch.setattr(train_fast, "PRODUCTS", "native")
    monkeypatch.setattr(train_fast, "ONEDNN_BESIDE_NATIVE", beside)
    torch.manual_seed(0)
    ref = nn.Linear(K, N)
    fast = copy.deepcopy(ref)
    fast.__class__ = FastLinear
    x = torch.randn(4, 3, K, requires_grad=True)
    g = torch.randn(4, 3, N)
    y, y_ref = fast(x), ref(x)
    on_kernel = not beside and K != 12
    assert _fast_ran(y) is (beside or on_kernel)
    torch.testing.assert_close(y, y_ref, **TOL)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    assert products == ([(4, 3, K), (4, 3, N)] if on_kernel else [])
    if beside:
        monkeypatch.setattr(train_fast, "NATIVE_MIN_FEATURES", 64)   # 64 → 256 and 256 → 64 now wide enough
        fast(x).backward(g)
        assert products == ([] if K == 12 else [(4, 3, K), (4, 3, N)])


def test_non_contiguous_input_and_frozen_parts():
    torch.manual_seed(0)
    w = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(6)  # no gradient wanted for the bias
    base = torch.randn(5, 4, 8)
    x = base.transpose(0, 1)  # not contiguous, no gradient (a first layer's input)
    y = fast_linear(x, w, b)
    assert _fast_ran(y)
    g = torch.randn(4, 5, 6)
    (dw,) = torch.autograd.grad(y, [w], g)
    w2 = w.detach().clone().requires_grad_(True)
    (dw_ref,) = torch.autograd.grad(F.linear(x, w2, b), [w2], g)
    torch.testing.assert_close(dw, dw_ref, **TOL)
    torch.testing.assert_close(y, F.linear(x, w, b), **TOL)


def test_without_autograd_it_is_exactly_f_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    fast = copy.deepcopy(lin)
    fast.__class__ = FastLinear
    with torch.no_grad():
        assert torch.equal(fast(x), lin(x))
    fast.eval()  # eval mode with autograd on (a user's model(x) after training): plain too
    xg = x.clone().requires_grad_(True)
    y = fast(xg)
    assert not _fast_ran(y) and torch.equal(y, lin(xg))
    fast.train()
    with torch.inference_mode():
        assert torch.equal(fast(x), lin(x))
    # bf16 and double tensors take the plain operator too
    xd = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert not _fast_ran(fast_linear(xd, lin.weight.double(), lin.bias.double()))


def test_switch_is_in_place_and_leaves_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4), nn.Sequential(nn.Linear(4, 2)), nn.Linear(128, 127))
    params = list(model.parameters())
    keys = list(model.state_dict())
    assert optimize_for_cpu_training(model, min_weight_numel=1) is model
    assert type(model[0]) is FastLinear and type(model[1]) is MyLinear and type(model[2][0]) is FastLinear
    assert all(a is b for a, b in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    # by default, layers too small for oneDNN to win stay on MKL
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 127))
    optimize_for_cpu_training(model)
    assert type(model[0]) is FastLinear and type(model[1]) is nn.Linear


@pytest.mark.parametrize("route", ["onednn", "native", "mkl"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_convolutions_train_as_products_over_a_channels_last_map(monkeypatch, route, channels_last):
    """`optimize_for_cpu_training` makes 1×1 stride-1 convolutions `FastPointwiseConv2d`: on a channels-last map in
    training, FastLinear's products over its pixels (the output channels-last too), with the convolution's output
    and gradients to fp32 rounding; an NCHW map, the MKL route (where FastLinear is `F.linear`), eval mode and no
    gradient are the convolution bit for bit. Other convolutions and small ones stay `nn.Conv2d`."""
    monkeypatch.setattr(train_fast, "PRODUCTS", route)
    if route == "native" and not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels here")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(128, 144, 1), nn.Conv2d(144, 128, 1, bias=False), nn.Conv2d(128, 128, 3),
                          nn.Conv2d(128, 128, 1, stride=2), nn.Conv2d(8, 8, 1))
    fast = optimize_for_cpu_training(copy.deepcopy(plain))
    assert [type(m) for m in fast] == [FastPointwiseConv2d, FastPointwiseConv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 128, 5, 7).contiguous(memory_format=fmt)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with OpNames() as ops:   # with an in-place activation between them, as ResNet blocks have
        y = fast[1](F.relu_(fast[0](xs[0])))
    y_ref = plain[1](F.relu_(plain[0](xs[1])))
    products = channels_last and route != "mkl"
    assert ("aten.convolution" not in ops.names) == products
    assert _fast_ran(y) == products   # the product route itself ran, not F.linear
    if not products:
        assert torch.equal(y, y_ref)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL)
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=n)
    with torch.no_grad():
        assert torch.equal(fast[0](x), plain[0](x))
    assert torch.equal(fast.eval()[0](x), plain[0](x))


def test_only_dense_3x3_stride_1_convolutions_with_channels_in_16s_train_by_winograd():
    """`optimize_for_cpu_training` makes `FastConv3x3` of exact 3×3 stride-1 padding-1 dense convolutions whose
    channels come in 16s (both ways: the input gradient is the same product with the two swapped); any other
    convolution stays `nn.Conv2d`."""
    if not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels here")
    keep = [nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(16, 16, 3, 2, 1),
            nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3, padding=1, groups=2),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2),
            nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), nn.Conv2d(16, 16, 5, padding=2)]
    model = optimize_for_cpu_training(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), *keep))
    assert type(model[0]) is FastConv3x3
    assert [type(m) for m in model[1:]] == [nn.Conv2d] * len(keep)


@pytest.mark.parametrize("cin, cout, side, bias", [(32, 16, 9, True), (128, 144, 7, False), (160, 48, 5, True)])
def test_dense_3x3_convolutions_train_by_winograd_on_a_channels_last_map(monkeypatch, cin, cout, side, bias):
    """`FastConv3x3` on a channels-last map in training: the forward, the input gradient and the weight gradient by
    Winograd's tiles on the native kernels (4×4 tiles up to 128·128 channel pairs, 2×2 above; sides that leave part
    tiles), the bias gradient dy's sum; output and gradients as float64's convolution to the transforms' fp32
    rounding, the output channels-last. A map too small to pay for the transforms (`MIN_VALUES`,
    doubled for 32 input channels), an NCHW map, eval mode and no gradient are the convolution bit for bit; an input
    without a gradient gets none computed."""
    if not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels here")
    torch.manual_seed(cin + side)
    plain = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    fast = optimize_for_cpu_training(copy.deepcopy(plain))
    assert type(fast) is FastConv3x3
    x = torch.randn(2, cin, side, side + 2).contiguous(memory_format=torch.channels_last)
    side = 64 if cin < 64 else 32   # 524-655 K values: Winograd (32 channels: twice the threshold, exactly)
    big = torch.randn(4, cin, side, side).contiguous(memory_format=torch.channels_last)
    mid = torch.randn(4, cin, 48, 48).contiguous(memory_format=torch.channels_last)   # 32 channels: 288 K, too few
    cases = [(x, False), (big, True)] + [(mid, False)] * (cin < 64)   # x: 6-16 K values, too few
    for m, winograd in cases:
        with OpNames() as ops:
            y = fast(m.clone().requires_grad_())
        assert ("hybridzoo_native.winograd3x3" in ops.names) == winograd
        if not winograd:
            assert torch.equal(y, plain(m))
    monkeypatch.setattr(FastConv3x3, "MIN_VALUES", 0)
    xs = x.clone().requires_grad_()
    with OpNames() as ops:
        y = fast(xs)
        g = torch.randn_like(y)
        y.backward(g)
    assert ops.names.count("hybridzoo_native.winograd3x3") == 2 and ops.names.count(WGRAD) == 1
    assert "aten.convolution" not in ops.names and "aten.convolution_backward" not in ops.names
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(plain).double()
    xd = x.double().requires_grad_()
    y_ref = ref(xd)
    y_ref.backward(g.double())
    scale = dict(rtol=1e-4, atol=1e-4 * y_ref.abs().max().item())
    torch.testing.assert_close(y.double(), y_ref, **scale)
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=1e-4, atol=1e-4 * xd.grad.abs().max().item())
    torch.testing.assert_close(fast.weight.grad.double(), ref.weight.grad, rtol=1e-5,
                               atol=1e-5 * ref.weight.grad.abs().max().item())
    if bias:
        torch.testing.assert_close(fast.bias.grad.double(), ref.bias.grad, rtol=1e-5,
                                   atol=1e-5 * ref.bias.grad.abs().max().item())
    nchw = x.contiguous()
    assert torch.equal(fast(nchw), plain(nchw))
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
    assert torch.equal(fast.eval()(x), plain(x))
    fast.train().weight.grad = None
    with OpNames() as ops:   # the input without a gradient (an image): the weight's alone
        fast(x).backward(g)
    assert ops.names.count("hybridzoo_native.winograd3x3") == 1 and ops.names.count(WGRAD) == 1
    torch.testing.assert_close(fast.weight.grad.double(), ref.weight.grad, rtol=1e-5,
                               atol=1e-5 * ref.weight.grad.abs().max().item())


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "convit_small", "cvt_13"])
def test_model_forward_and_gradients_match_plain(name):
    """A reduced build of each transformer: loss and every parameter's gradient as the plain model's."""
    card = get_card(name)
    torch.manual_seed(0)
    plain = hybridzoo.create_model(name, **card.test_kwargs).train()
    with torch.no_grad():  # perturb, so zero-initialised heads / biases cannot hide a wrong gradient
        g = torch.Generator().manual_seed(1)
        for p in plain.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    fast = optimize_for_cpu_training(copy.deepcopy(plain), min_weight_numel=1)  # reduced builds: all of them
    n_fast = sum(isinstance(m, FastLinear) for m in fast.modules())
    assert n_fast == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    x = torch.randn(3, *(card.test_input_size or card.input_size))
    target = torch.tensor([0, 1, 2])
    torch.manual_seed(2)  # the same stochastic-depth draws on both sides (CvT-13 has drop path 0.1)
    out_p = plain(x)
    torch.manual_seed(2)
    out_f = fast(x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-4 * float(out_p.detach().abs().max()))
    F.cross_entropy(out_p, target).backward()
    F.cross_entropy(out_f, target).backward()
    # a gradient that is zero in exact arithmetic (ConViT's pos_proj bias shifts a softmax's inputs) is
    # rounding noise on both sides: tolerances are relative to the tensor's and to the largest gradient
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert b.grad is not None, n
        atol = 1e-4 * float(b.grad.abs().max()) + 1e-6 * scale
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=atol, msg=n)


def test_botnet_trains_its_3x3_convolutions_by_winograd_on_the_fast_channels_last_path(monkeypatch):
    """A reduced BoTNet (widths 16-64, so its bottlenecks' 3×3 convolutions qualify; two blocks in each convolution
    stage, so that each has a stride-1 one) on the trainer's fast path with channels-last maps: its output, loss and
    every gradient as the plain model's, through Winograd's tiles."""
    if not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels here")
    card = get_card("botnet_t3")
    torch.manual_seed(0)
    monkeypatch.setattr(FastConv3x3, "MIN_VALUES", 0)   # a reduced build's maps are under the threshold
    kw = dict(card.test_kwargs, stem_width=16, stage_sizes=(2, 2, 2, 1))
    plain = hybridzoo.create_model("botnet_t3", **kw).train()
    fast = optimize_for_cpu_training(copy.deepcopy(plain)).to(memory_format=torch.channels_last)
    assert sum(type(m) is FastConv3x3 for m in fast.modules()) == 4
    x = torch.randn(3, *card.test_input_size)
    target = torch.tensor([0, 1, 2])
    out_p = plain(x)
    with OpNames() as ops:
        out_f = fast(x.contiguous(memory_format=torch.channels_last))
        F.cross_entropy(out_f, target).backward()
    assert ops.names.count("hybridzoo_native.winograd3x3") == 8 and ops.names.count(WGRAD) == 4
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-4 * float(out_p.detach().abs().max()))
    F.cross_entropy(out_p, target).backward()
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 * float(b.grad.abs().max()) + 1e-6 * scale,
                                   msg=n)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_custom_op_registration(bias, contiguous):
    """`hybridzoo::onednn_linear` (what `torch.compile` sees): schema, fake kernel (shapes and strides of the real
    output), autograd registration and AOT dispatch, checked by torch's own opcheck."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12) if contiguous else torch.randn(5, 2, 12).transpose(0, 1)
    w, b = torch.randn(9, 12), torch.randn(9) if bias else None
    y = onednn_linear(x, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b), **TOL)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True) if bias else None)
    torch.library.opcheck(onednn_linear, args)


def test_compiled_model_keeps_onednn_products_and_gradients():
    """Under torch.compile, FastLinear's forward and input-gradient products are the registered oneDNN operator
    (not traced back to addmm) and the compiled model's outputs and gradients are the plain eager model's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def keep(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 5)).train()
    fast = optimize_for_cpu_training(copy.deepcopy(plain), min_weight_numel=1)
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    x = torch.randn(3, 7, 16)
    g = torch.randn(3, 7, 5)
    y_ref, y = plain(x), compiled(x)
    y_ref.backward(g)
    y.backward(g)
    assert len(graphs) == 2  # one forward graph, one backward graph: no graph break
    assert graphs[0].count("hybridzoo.onednn_linear") == 3 and "addmm" not in graphs[0]
    assert graphs[1].count("hybridzoo.onednn_linear") >= 2  # dx of the 2nd and 3rd layer (the 1st needs none)
    torch.testing.assert_close(y, y_ref, **TOL)
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=n)


def test_fused_adamw_steps_like_the_default():
    """The optimiser half of the fast path: AdamW(fused=True) on the CPU makes the default's update."""
    torch.manual_seed(0)
    a = nn.Linear(32, 16)
    b = copy.deepcopy(a)
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.05)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    for step in range(3):
        x = torch.randn(8, 32)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_quick_gelu_two_pass_backward():
    """QuickGELU under autograd: the plain output bitwise, and the gradient of x·σ(1.702x)."""
    torch.manual_seed(0)
    x = (4 * torch.randn(3, 257, dtype=torch.float64)).requires_grad_(True)
    g = torch.randn(3, 257, dtype=torch.float64)
    y = QuickGELU()(x)
    assert "QuickGELU" in type(y.grad_fn).__name__  # the custom backward, not autograd's five passes
    with torch.no_grad():
        assert torch.equal(y, QuickGELU()(x))
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref * torch.sigmoid(1.702 * x_ref)).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(QuickGELU(), (x[0, :16].detach().clone().requires_grad_(True),))
    xf = x.detach().float().requires_grad_(True)
    QuickGELU()(xf).backward(g.float())
    torch.testing.assert_close(xf.grad, x_ref.grad.float(), rtol=1e-5, atol=1e-6)
    # the backward writes into its own temporary: bitwise the out-of-place silu_backward, the incoming gradient intact
    assert torch.equal(xf.grad, torch.ops.aten.silu_backward(g.float(), torch.mul(xf.detach(), 1.702)))
