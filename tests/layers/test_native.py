"""The native CPU kernels (`hybridzoo.layers.native`): built once when a compiler is there, cached, loaded
later without one, off with HYBRIDZOO_NATIVE=0, and with no compiler the CPU paths keep their ATen code.
The dynamic ReLU's kernel computes exactly what the ATen passes compute; the tiny-product kernel is a linear layer
and the attention kernels (forward, and backward for training) are softmax attention, to fp32 rounding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hybridzoo
from hybridzoo.layers import native
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.models import mobile_former as mf
from hybridzoo.registry import get_card
# tests/conftest.py puts tests/ on sys.path
from _helpers import OpNames as _Ops, kernels_with_isa, perturb, small_transformer, with_threads

SRC = Path(__file__).resolve().parents[2] / "src"
HAS_TOOLS = shutil.which(os.environ.get("CXX", "c++").split()[0]) is not None and shutil.which("ninja") is not None
needs_kernels = pytest.mark.skipif(not HAS_TOOLS, reason="no C++ compiler or ninja to build the kernels")


@pytest.fixture(scope="module")
def built():
    """The kernels, built into the user's cache (as a first real use would) and loaded."""
    assert native.load(), "a compiler and ninja are here, yet the kernels did not build (see the warning)"
    return native


@needs_kernels
def test_the_kernels_build_where_a_compiler_is(built):
    assert built.available()
    assert (built.build_dir() / f"{native.NAMESPACE}.so").is_file() and (built.build_dir() / "built").is_file()


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("shape", [(1, 16, 7, 7), (3, 37, 9, 11), (2, 1, 5, 4), (5, 96, 1, 1), (2, 600, 3, 2),
                                   (2, 8, 40, 41)])
def test_dyrelu_is_the_aten_formula_bit_for_bit(built, shape, layout, threads):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape).contiguous(memory_format=layout)
    s1, s2 = torch.randn(2, shape[0], shape[1]).unbind(0)
    s1[0, 0], s2[-1, -1] = 0.0, -0.0   # a saturated hard sigmoid gives an exact zero slope
    ref = torch.maximum(x * s1[:, :, None, None], x * s2[:, :, None, None])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = x.clone(memory_format=layout)
        out = built.dyrelu_(y, s1, s2)
    finally:
        torch.set_num_threads(before)
    assert out.data_ptr() == y.data_ptr()   # in place
    assert torch.equal(out, ref)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("shape", [(3, 37, 9, 11), (5, 96, 1, 1), (2, 8, 40, 41)])
def test_dyrelu_training_kernels_are_autograds_maximum(built, shape, layout, threads):
    """`dyrelu` (out of place, x's layout) is the ATen formula bit for bit; `dyrelu_backward` gives autograd's
    gradients of torch.maximum(s1·x, s2·x), the halves at ties included (x = 0, equal slopes), to fp32 rounding."""
    torch.manual_seed(sum(shape))
    x = torch.randn(shape)
    x.view(-1)[::5] = 0.0
    x = x.contiguous(memory_format=layout)
    g = torch.randn(shape).contiguous(memory_format=layout)
    s1, s2 = torch.randn(2, shape[0], shape[1]).unbind(0)
    s2[0, :3] = s1[0, :3]
    xr, a, b = (t.clone().requires_grad_() for t in (x, s1, s2))
    ref = torch.maximum(xr * a[:, :, None, None], xr * b[:, :, None, None])
    ref.backward(g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = built.dyrelu(x, s1, s2)
        dx, d1, d2 = built.dyrelu_backward(x, g, s1, s2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, ref) and y.is_contiguous(memory_format=layout)
    assert dx.is_contiguous(memory_format=layout)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-6, atol=1e-6)
    scale = shape[2] * shape[3]
    for got, want in ((d1, a.grad), (d2, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale ** 0.5)


@needs_kernels
def test_dyrelu_backward_names_a_gradient_of_another_layout(built):
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="hybridzoo_native::dyrelu_backward: grad must be .* channels-last as x"):
        built.dyrelu_backward(x, torch.randn(2, 3, 4, 5), torch.randn(2, 3), torch.randn(2, 3))
    # a 1×1 map is both layouts: the gradient's strides along its size-1 dimensions may be either's
    x, s1, s2 = torch.randn(4, 32, 1, 1), torch.rand(4, 32), torch.rand(4, 32) - 1
    g = torch.empty_strided((4, 32, 1, 1), (32, 1, 32, 32)).copy_(torch.randn(4, 32, 1, 1))
    dx, d1, d2 = built.dyrelu_backward(x, g, s1, s2)
    torch.testing.assert_close(dx, built.dyrelu_backward(x, g.contiguous(), s1, s2)[0])


@needs_kernels
@pytest.mark.parametrize("bad, words", [
    (lambda: (torch.randn(2, 3, 4, 10)[..., ::2], torch.randn(2, 3), torch.randn(2, 3)), "channels-last"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2, 3)), "4-d"),
    (lambda: (torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 3), torch.randn(2, 3)), "float32"),
    (lambda: (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.randn(2, 4),
              torch.randn(2, 3)), "(2, 3)"),
    (lambda: (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.randn(3, 2).t(),
              torch.randn(2, 3)), "contiguous"),
])
def test_dyrelu_names_what_is_wrong(built, bad, words):
    with pytest.raises(RuntimeError, match="hybridzoo_native::dyrelu_") as e:
        built.dyrelu_(*bad())
    assert words in str(e.value)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("shape", [(1, 16, 7, 7), (3, 37, 9, 11), (2, 1, 5, 4), (5, 96, 1, 1), (2, 20, 40, 41),
                                   (1, 3, 300, 301)])   # rows and planes past one block of the float sums
def test_channel_dot_is_the_per_channel_sum_of_the_product(built, shape, layout, threads):
    torch.manual_seed(sum(shape))
    a, b = (torch.randn(shape).contiguous(memory_format=layout) + 0.5 for _ in range(2))   # sums that do not cancel
    out = with_threads(threads, lambda: built.channel_dot(a, b))
    want = (a.double() * b.double()).sum((2, 3))
    assert out.shape == shape[:2] and out.dtype == torch.float32
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5 * (shape[2] * shape[3]) ** 0.5)


@needs_kernels
@pytest.mark.parametrize("bad, words", [
    (lambda: (torch.randn(2, 3, 4, 10)[..., ::2], torch.randn(2, 3, 4, 5)), "contiguous or channels-last"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4)), "4-d"),
    (lambda: (torch.randn(2, 3, 4, 5).double(), torch.randn(2, 3, 4, 5).double()), "float32"),
    (lambda: (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 4)), "of a's shape [2, 3, 4, 5]"),
    (lambda: (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.randn(2, 3, 4, 5)),
     "channels-last as a"),
])
def test_channel_dot_names_what_is_wrong(built, bad, words):
    with pytest.raises(RuntimeError, match="hybridzoo_native::channel_dot") as e:
        built.channel_dot(*bad())
    assert words in str(e.value)


@pytest.mark.parametrize("kernels", ["native", "aten"])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_two_pass_squeeze_excite_has_autograds_gradients(built, layout, kernels, monkeypatch):
    """The squeeze-excitation's training step on the fast path (`_GatedByMeanFn`: the gate's sum of dy·x in one
    pass, then dx in one) against autograd through the same module: output, input and parameter gradients, in the
    input's layout, with the kernels and without (HYBRIDZOO_NATIVE=0: the sum in ATen); no product-then-sum pass
    where the kernel runs. Without a gradient, or in eval mode, the module is its formula."""
    from hybridzoo.layers.conv import SqueezeExcite

    if kernels == "aten":
        monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
    torch.manual_seed(0)
    plain = SqueezeExcite(48, 12, act_layer=torch.nn.SiLU).train()
    perturb(plain)
    fast = __import__("copy").deepcopy(plain)
    fast.native_training = True
    x = torch.randn(3, 48, 11, 9).contiguous(memory_format=layout)
    g = torch.randn(3, 48, 11, 9)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa).backward(g)
    with _Ops() as ops:
        y = fast(xb)
        y.backward(g)
    assert ops.names.count("hybridzoo_native.channel_dot") == (kernels == "native")
    torch.testing.assert_close(y, x * plain.gate_of(x), rtol=0, atol=0)
    assert xb.grad.is_contiguous(memory_format=layout)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    with _Ops() as ops:
        fast(xb.detach())
        fast.eval()(xb)
    assert "hybridzoo_native.channel_dot" not in ops.names


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@needs_kernels
@pytest.mark.parametrize("batch, threads", [(1, 2), (3, 1)])
def test_frozen_mobile_former_calls_the_kernel_and_computes_the_same(built, batch, threads, monkeypatch):
    """The frozen model's dynamic ReLUs go through the kernel (seen by the dispatcher, so by ceiling.py) and the
    model's output is bit for bit the one of its ATen passes. (A dispatch mode sees one thread: batch 3 runs on
    one, else the batch split would run part of it on another.)"""
    torch.manual_seed(0)
    model = hybridzoo.create_model("mobile_former_26m", **get_card("mobile_former_26m").test_kwargs).eval()
    perturb(model)
    frozen = optimize_for_cpu_inference(model)
    x = torch.randn(batch, 3, 64, 64)
    calls = []
    monkeypatch.setattr(mf._FrozenDynamicReLU, "apply_slopes",
                        lambda self, x, u, f=mf._FrozenDynamicReLU.apply_slopes: calls.append(1) or f(self, x, u))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            frozen(x)   # a first call does more than later ones (see the frozen model); not counted
            calls.clear()
            with _Ops() as ops:
                fused = frozen(x)
            monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
            aten = frozen(x)
            ref = model(x)
    finally:
        torch.set_num_threads(before)
    n_act = sum(isinstance(m, mf._FrozenDynamicReLU) for m in frozen.modules())
    assert n_act > 0 and len(calls) == 2 * n_act   # every activation, in both passes
    assert ops.names.count("hybridzoo_native.dyrelu_") == n_act   # in the first, each one by the kernel
    # each block's token side in one call
    assert ops.names.count("hybridzoo_native.former_tokens") == sum(isinstance(m, mf._FrozenMobileFormerBlock)
                                                                    for m in frozen.modules()) > 0
    torch.testing.assert_close(fused, aten, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2", "none"])
@pytest.mark.parametrize("lead", [(1,), (6,), (1, 6), (2, 3), (7,), (8,), (13,), (2, 0)])
@pytest.mark.parametrize("k, n", [(192, 192), (48, 2304), (385, 96), (1, 16), (192, 48)])
def test_tiny_linear_is_the_linear(built, lead, k, n, isa):
    """With each instruction set (its tiles of 4 and of 1 vector of 16 columns, 6, 2 and 1 rows), and ATen's
    product on CPUs with neither."""
    torch.manual_seed(k + n)
    x, w, b = torch.randn(*lead, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
    with kernels_with_isa(built, isa):
        y = built.tiny_linear(x, w.t().contiguous(), b)
    assert y.shape == (*lead, n)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("bad, words", [
    (lambda: (torch.randn(6, 8), torch.randn(8, 40), torch.randn(40)), "multiple of 16"),
    (lambda: (torch.randn(6, 9), torch.randn(8, 16), torch.randn(16)), "last dimension 8"),
    (lambda: (torch.randn(8, 6).t(), torch.randn(8, 16), torch.randn(16)), "contiguous"),
    (lambda: (torch.randn(6, 8).double(), torch.randn(8, 16), torch.randn(16)), "float32"),
    (lambda: (torch.randn(6, 8), torch.randn(16, 8).t(), torch.randn(16)), "contiguous float32 (K, N)"),
    (lambda: (torch.randn(6, 8), torch.randn(8, 16), torch.randn(32)), "b must be"),
])
def test_tiny_linear_names_what_is_wrong(built, bad, words):
    with pytest.raises(RuntimeError, match="hybridzoo_native::tiny_linear") as e:
        built.tiny_linear(*bad())
    assert words in str(e.value)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@needs_kernels
@pytest.mark.parametrize("act, algorithm, ref", [
    ("none", "", lambda y: y), ("relu", "", torch.relu), ("gelu", "", torch.nn.functional.gelu),
    ("gelu", "tanh", lambda y: torch.nn.functional.gelu(y, approximate="tanh")),
    ("swish", "", torch.nn.functional.silu)])
def test_few_rows_go_to_the_tiny_product_kernel(built, act, algorithm, ref, monkeypatch):
    from hybridzoo.layers.onednn import TINY_ROWS, OneDNNLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 96)
    layer = OneDNNLinear(lin, act, algorithm)

    def run(x):
        with torch.inference_mode(), _Ops() as ops:
            y = layer(x)
        torch.testing.assert_close(y, ref(lin(x)), rtol=1e-5, atol=1e-5)
        return ops.names.count("hybridzoo_native.tiny_linear")

    assert run(torch.randn(1, 6, 48)) == 1
    assert run(torch.randn(TINY_ROWS, 48)) == 1
    assert run(torch.randn(TINY_ROWS + 1, 48)) == 0   # more rows: MKL or oneDNN
    assert run(torch.randn(6, 96)[:, ::2]) == 1       # a strided input is made contiguous first
    assert OneDNNLinear(torch.nn.Linear(48, 40)).tiny_wt is None   # 40 outputs: not a multiple of 16
    assert OneDNNLinear(torch.nn.Linear(48, 96, bias=False)).tiny_b.abs().sum() == 0
    monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
    assert run(torch.randn(1, 6, 48)) == 0


def _load_in_a_fresh_process(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from hybridzoo.layers import native\n"
            "print('LOADED', native.load(), native.available())\n")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC), **env},
                          capture_output=True, text=True, timeout=300)


def test_without_a_compiler_the_path_keeps_its_aten_code(tmp_path):
    r = _load_in_a_fresh_process({"HYBRIDZOO_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")})
    assert r.returncode == 0, r.stderr
    assert "LOADED False False" in r.stdout
    assert "native CPU kernels are unavailable" in r.stderr and "no-such-compiler" in r.stderr
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").rglob("*.so"))


def test_a_library_without_its_marker_is_not_loaded(tmp_path, monkeypatch):
    """A library with no "built" marker may be one another process is still linking: it is built (here: no
    compiler, so the ATen code stays), never loaded half-written."""
    monkeypatch.setenv("HYBRIDZOO_CACHE", str(tmp_path))
    folder = native.build_dir()
    folder.mkdir(parents=True)
    (folder / f"{native.NAMESPACE}.so").write_bytes(b"half a library")
    r = _load_in_a_fresh_process({"HYBRIDZOO_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")})
    assert "LOADED False False" in r.stdout
    assert "no C++ compiler" in r.stderr and "ELF" not in r.stderr


def test_off_linux_the_aten_code_runs_without_a_word(monkeypatch):
    import platform
    import warnings

    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(native, "_build", lambda folder: pytest.fail("built off Linux"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.load()
    assert not native.available()


def test_a_killed_builds_lock_is_removed_a_live_ones_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    assert not native._clear_stale_lock(tmp_path) and lock.exists()   # a build under way
    old = lock.stat().st_mtime - native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        assert native._clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert not native._clear_stale_lock(tmp_path)   # no lock at all


def test_switched_off_nothing_is_built_or_said(tmp_path):
    r = _load_in_a_fresh_process({"HYBRIDZOO_CACHE": str(tmp_path), "HYBRIDZOO_NATIVE": "0"})
    assert r.returncode == 0, r.stderr
    assert "LOADED False False" in r.stdout
    assert "native" not in r.stderr and not (tmp_path / "native").exists()


@needs_kernels
def test_a_built_library_loads_later_without_a_compiler(built, tmp_path):
    """Built once (the fixture), a later process loads it from the cache with no compiler on the machine."""
    env = {"CXX": str(tmp_path / "no-such-compiler"), "PATH": str(tmp_path)}
    if os.environ.get("HYBRIDZOO_CACHE"):
        env["HYBRIDZOO_CACHE"] = os.environ["HYBRIDZOO_CACHE"]
    r = _load_in_a_fresh_process(env)
    assert r.returncode == 0, r.stderr
    assert "LOADED True True" in r.stdout, r.stderr
    assert "compiling" not in r.stderr


# ---- attention ------------------------------------------------------------------------------------------------

def _attention_supported() -> bool:
    return HAS_TOOLS and native.load() and bool(native._STATE["ops"].attention_supported())


needs_attention = pytest.mark.skipif(not HAS_TOOLS, reason="no C++ compiler or ninja to build the kernels")


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def attn(built, request):
    """The kernels with each instruction set this CPU has (an AVX-512 machine tests the AVX2 kernels too)."""
    with kernels_with_isa(built, request.param) as k:
        yield k


def _heads(B, H, n, N, d, seed=0):
    """q, k, v as the strided views of one qkv product (and a separate kv product when N != n)."""
    torch.manual_seed(seed)
    q, k, v = torch.randn(B, n, 3, H, d).permute(2, 0, 3, 1, 4)
    if N != n:
        k, v = torch.randn(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
    return q, k, v


def _attention_ref(q, k, v, pos, scale):
    B, H, n, d = q.shape
    a = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    if pos is not None:
        a = a + pos.double()
    return (a @ v.double()).transpose(1, 2).reshape(B, n, H * d).float()


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, H, n, N, d", [
    (1, 1, 1, 1, 16), (2, 3, 7, 9, 32), (1, 4, 196, 196, 48), (2, 6, 197, 50, 64), (3, 2, 13, 33, 48),
    (1, 2, 45, 17, 16), (1, 1, 301, 100, 64),   # one head, many rows: split into row blocks over the threads
])
@pytest.mark.parametrize("with_pos", [False, True])
def test_attention_is_softmax_attention(attn, B, H, n, N, d, with_pos, threads):
    """Every tail the kernel has (8 / 6-row tiles, then 4, 2, 1; keys not a multiple of 16), the heads in from
    strided views of a product, tokens first out; the positional rows (ConViT) added after the softmax."""
    q, k, v = _heads(B, H, n, N, d, seed=B * H * n * N * d)
    pos = None
    if with_pos:   # a row slice of a larger map, as the token shares pass it
        pos = (torch.softmax(torch.randn(H, n + 3, N), dim=-1) * 0.7)[:, 2:n + 2]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attn.attention(q, k, v, pos, d ** -0.5)
    finally:
        torch.set_num_threads(before)
    assert out.shape == (B, n, H * d) and out.is_contiguous()
    torch.testing.assert_close(out, _attention_ref(q, k, v, pos, d ** -0.5), rtol=1e-4, atol=2e-5)


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, H, n, N, d, per_image", [
    (1, 12, 196, 196, 32, False),    # CoAtNet-0's stage 3 at batch 1, the bias shared by the batch
    (2, 3, 7, 9, 32, True), (3, 2, 13, 33, 48, False), (1, 1, 301, 100, 64, True), (2, 6, 197, 50, 16, False),
])
def test_attention_with_a_bias_is_sdpas_float_mask(attn, B, H, n, N, d, per_image, threads):
    """The bias (1 or B, heads, n, N) is added to the scaled scores before the softmax, as SDPA's float attn_mask:
    its rows follow the row tiles and row blocks, its columns stop at N (the padding keys stay out), and a bias
    that moves a row's maximum (+30 on one key) is accounted for in the softmax."""
    q, k, v = _heads(B, H, n, N, d, seed=B * H * n * N * d + 1)
    bias = torch.randn(B if per_image else 1, H, n, N + 5)[..., 3:N + 3] * 2   # strided rows, unit stride along N
    bias[..., N // 2] += 30.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attn.attention(q, k, v, None, d ** -0.5, bias)
    finally:
        torch.set_num_threads(before)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double(), scale=d ** -0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B, n, H * d).float(), rtol=1e-4, atol=2e-5)


@needs_attention
@pytest.mark.parametrize("side", [64, 96])   # the built grid (the cached bias) and another (the table resized)
def test_coatnet_relative_attention_runs_on_the_kernel_with_its_bias(attn, side, monkeypatch):
    from hybridzoo.factory import get_card
    from hybridzoo.layers.onednn import optimize_for_cpu_inference
    torch.manual_seed(0)
    model = hybridzoo.create_model("coatnet_0", **get_card("coatnet_0").test_kwargs).eval()
    with torch.no_grad():
        for m in model.modules():   # a bias far from zero, so that leaving it out cannot pass
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 2.0)
    fast = optimize_for_cpu_inference(model)
    calls = []
    real = native.attention
    monkeypatch.setattr(native, "attention", lambda q, k, v, pos, scale, bias=None: calls.append(bias.shape) or real(
        q, k, v, pos, scale, bias))
    x = torch.randn(2, 3, side, side)
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    grids = {(side // 16) ** 2, (side // 32) ** 2}   # the two attention stages: 1/16 and 1/32 of the image side
    assert {b[-1] for b in calls} == grids and all(b[-2] == b[-1] for b in calls)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@needs_attention
def test_attention_softmax_holds_far_from_zero(attn):
    """Scores of about -1000 in every row, and a tail of padding keys (17 keys: 15 padding columns): the row's own
    maximum comes off before the exponential and the padding takes no part (counted as a score of 0 it would
    make the maximum 0 and every weight underflow); scores of ±300 give nearly one-hot rows."""
    q, k, v = _heads(2, 2, 11, 17, 16, seed=3)
    q, k = q.clone(), k.clone()
    q[..., 0], k[..., 0] = 100.0, -10.0
    # (fp32 scores near -1000 carry ~1e-4 of rounding into the weights, whoever computes them)
    torch.testing.assert_close(attn.attention(q, k, v, None, 1.0), _attention_ref(q, k, v, None, 1.0),
                               rtol=1e-3, atol=1e-3)
    q, k, v = _heads(1, 3, 9, 40, 32, seed=4)
    torch.testing.assert_close(attn.attention(q * 30, k, v, None, 1.0), _attention_ref(q * 30, k, v, None, 1.0),
                               rtol=1e-4, atol=2e-5)


@needs_attention
@pytest.mark.parametrize("bad, words", [
    (lambda: (*_heads(1, 2, 5, 5, 40), None), "head_dim must be 16, 32, 48 or 64, got 40"),
    (lambda: (*(t.double() for t in _heads(1, 2, 5, 5, 16)), None), "4-d float32"),
    (lambda: (*(t.transpose(2, 3) for t in _heads(1, 2, 16, 16, 16)), None), "unit stride along head_dim"),
    (lambda: (*_heads(1, 2, 5, 5, 16)[:2], torch.randn(1, 2, 6, 16), None), "k and v must be"),
    (lambda: (*_heads(1, 2, 5, 5, 16), torch.randn(2, 5, 4)), "pos must be float32 (2, 5, 5)"),
    (lambda: (*_heads(1, 2, 5, 5, 16), torch.randn(2, 5, 10)[..., ::2]), "unit stride along its last"),
    (lambda: (*_heads(2, 2, 5, 5, 16), None, torch.randn(3, 2, 5, 5)), "bias must be float32 (1 or 2, 2, 5, 5)"),
    (lambda: (*_heads(1, 2, 5, 5, 16), None, torch.randn(1, 2, 5, 5).double()), "bias must be float32"),
    (lambda: (*_heads(1, 2, 5, 5, 16), None, torch.randn(1, 2, 5, 10)[..., ::2]), "unit stride along its last"),
])
def test_attention_names_what_is_wrong(attn, bad, words):
    q, k, v, pos, *bias = bad()
    with pytest.raises(RuntimeError, match="hybridzoo_native::attention") as e:
        attn.attention(q, k, v, pos, 1.0, *bias)
    assert words in str(e.value)


def _small_mobile_former(name: str) -> torch.nn.Module:
    """A reduced Mobile-Former, perturbed (BatchNorm statistics and affine away from the identity); "padded": 5
    tokens and widths that are not multiples of 16 (q|α 24, k|v 40, the slope MLPs' outputs), which the token
    kernel pads."""
    torch.manual_seed(0)
    if name == "padded":
        model = mf.MobileFormer(blocks=(("lite", 2, 12, 1, 0), ("down", 3, 20, 2, 2), ("mobile", 2, 20, 1, 2)),
                                stem_chs=12, num_tokens=5, token_dim=32, num_features=64, num_classes=10)
    else:
        model = hybridzoo.create_model(name, **get_card(name).test_kwargs)
    perturb(model.eval())
    for blk in model.modules():   # a different eps for each of a block's three LayerNorms
        if isinstance(blk, mf.MobileFormerBlock):
            blk.mobile_former.norm.eps, blk.former.norm1.eps, blk.former.norm2.eps = 1e-3, 1e-4, 1e-2
    return model


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@needs_attention
@pytest.mark.parametrize("name", ["mobile_former_294m", "mobile_former_26m", "padded"])
@pytest.mark.parametrize("batch, threads", [(1, 2), (1, 1), (3, 2)])
def test_former_tokens_is_the_token_side(attn, name, batch, threads, monkeypatch):
    """Each frozen block's token side in one call (`native.former_tokens`: one image on the whole team, or an image
    per thread) gives what its ATen operators give, for contiguous and channels-last block inputs."""
    frozen = optimize_for_cpu_inference(_small_mobile_former(name))
    inputs = []
    tokens = mf._FrozenMobileFormerBlock.tokens
    monkeypatch.setattr(mf._FrozenMobileFormerBlock, "tokens",
                        lambda self, x, z: inputs.append((self, x, z)) or tokens(self, x, z))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            frozen(torch.randn(batch, 3, 64, 64))
            assert inputs and all(blk.native_tokens is not None for blk, _, _ in inputs)
            for blk, x, z in inputs:
                for layout in (torch.channels_last, torch.contiguous_format):
                    xl = x.contiguous(memory_format=layout)
                    with _Ops() as ops:
                        got = tokens(blk, xl, z)
                    assert ops.names == ["hybridzoo_native.former_tokens"]
                    monkeypatch.setattr(blk, "NATIVE_TOKENS", False)
                    want = tokens(blk, xl, z)
                    monkeypatch.setattr(blk, "NATIVE_TOKENS", True)
                    for g, w, what in zip(got, want, ("z", "u1", "u2", "kv")):
                        assert g.shape == w.shape, what
                        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()), msg=what)
    finally:
        torch.set_num_threads(before)


def _former_tokens_args():
    frozen = optimize_for_cpu_inference(_small_mobile_former("padded"))
    blk = next(m for m in frozen.modules() if isinstance(m, mf._FrozenMobileFormerBlock))
    params, sizes, eps = blk.native_tokens
    return torch.randn(1, 12, 8, 8), torch.randn(1, 5, 32), list(params), list(sizes), list(eps)


def _with(i, value):
    def make():
        args = list(_former_tokens_args())
        if isinstance(i, tuple):
            args[i[0]][i[1]] = value(args[i[0]][i[1]])
        else:
            args[i] = value(args[i])
        return args
    return make


@needs_attention
@pytest.mark.parametrize("bad, words", [
    (_with(0, lambda x: x.double()), "x must be a float32 map (B, C, H, W)"),
    (_with(0, lambda x: x[..., ::2]), "contiguous or channels-last"),
    (_with(1, lambda z: z.expand(2, 5, 32)), "z must be contiguous float32 tokens (1, T, D)"),
    (_with(1, lambda z: z[..., :24].contiguous()), "D a multiple of 16"),
    (_with(2, lambda p: p[:-1]), "expected 26 params"),
    (_with((2, 2), lambda w: w[:-1]), "param 2 must be contiguous float32 with 384 values"),
    (_with((3, 0), lambda n: 5), "inconsistent sizes: 12 channels for 5 heads"),
])
def test_former_tokens_names_what_is_wrong(attn, bad, words):
    with pytest.raises(RuntimeError, match="hybridzoo_native::former_tokens") as e:
        attn.former_tokens(*bad())
    assert words in str(e.value)


@needs_kernels
def test_the_instruction_set_can_be_lowered_not_raised_and_names_what_is_wrong(built):
    best = built.set_isa("best")
    assert best in {"avx512", "avx2", "none"} and built.isa() == best
    assert built.attention_supported() == (best != "none")
    try:
        assert built.set_isa("none") == "none" and not built.attention_supported()
        with pytest.raises(RuntimeError, match="expected avx512, avx2, none or best, got sse4"):
            built.set_isa("sse4")
        if best != "avx512":
            with pytest.raises(RuntimeError, match=f"cannot run the avx512 kernels \\(best: {best}\\)"):
                built.set_isa("avx512")
        x = torch.randn(4, 32)
        with pytest.raises(RuntimeError, match="needs a CPU with AVX-512 or AVX2 with FMA"):
            built._STATE["ops"].rows_linear(x, built.pack_panels(torch.randn(16, 32)), None, "none", "")
    finally:
        assert built.set_isa("best") == best and built.attention_supported() == (best != "none")


def test_attention_applies_only_where_it_can(monkeypatch):
    """Not for another dtype or head dim, under a tracer or a compiler (no shape function), on a tensor subclass,
    without AVX-512 or with the kernels switched off; with a gradient to take it does (`attend` has a backward)."""
    q = torch.randn(1, 2, 5, 16)
    monkeypatch.setattr(native, "_STATE", {"ops": type("Ops", (), {"attention_supported": lambda: True})})
    assert native.attention_applies(q, q, q)
    assert native.attention_applies(q, q.clone().requires_grad_(), q)
    assert not native.attention_applies(q.double(), q, q)
    assert not native.attention_applies(torch.randn(1, 2, 5, 40), q, q)
    assert not native.attention_applies(q, torch.nn.Parameter(q.clone()), q)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not native.attention_applies(q, q, q)
    monkeypatch.undo()
    monkeypatch.setattr(native, "_STATE", {"ops": type("Ops", (), {"attention_supported": lambda: True})})
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert not native.attention_applies(q, q, q)
    monkeypatch.undo()
    monkeypatch.setattr(native, "_STATE", {"ops": type("Ops", (), {"attention_supported": lambda: True})})
    monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
    assert not native.attention_applies(q, q, q)
    monkeypatch.setattr(native, "_STATE", {"ops": type("Ops", (), {"attention_supported": lambda: False})})
    monkeypatch.setenv("HYBRIDZOO_NATIVE", "1")
    assert not native.attention_applies(q, q, q)   # neither AVX-512 nor AVX2


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, H, n, N, d", [
    (2, 3, 1, 1, 16), (2, 3, 7, 9, 32), (1, 4, 196, 196, 48), (2, 6, 197, 50, 64), (3, 2, 13, 33, 48),
    (1, 2, 45, 17, 16), (1, 1, 301, 100, 64),
    (2, 1, 33, 790, 64), (1, 2, 9, 1000, 48), (1, 1, 10, 3136, 16),   # the keys in blocks (CvT-13's long stages)
])
def test_attention_gradients_are_softmax_attentions(attn, B, H, n, N, d, threads):
    """`attend`'s backward (the probabilities recomputed from the saved log-sum-exps, a tile of rows at a time)
    against autograd through the float64 formula, over the same row tails and key paddings as the forward;
    q, k, v as the strided views of products, as the models pass them."""
    torch.manual_seed(B * H * n * N * d)
    qkv = torch.randn(B, n, 3, H, d, requires_grad=True)
    kv = torch.randn(B, N, 2, H, d, requires_grad=True) if N != n else None
    def heads(x, y):
        q, k, v = x.permute(2, 0, 3, 1, 4)
        return (q, *y.permute(2, 0, 3, 1, 4)) if y is not None else (q, k, v)
    g = torch.randn(B, n, H * d)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attn.attend(*heads(qkv, kv), d ** -0.5)
        grads = torch.autograd.grad(out, [t for t in (qkv, kv) if t is not None], g)
    finally:
        torch.set_num_threads(before)
    x64 = qkv.detach().double().requires_grad_()
    y64 = kv.detach().double().requires_grad_() if kv is not None else None
    ref = _attention_ref(*heads(x64, y64), None, d ** -0.5).double()
    q64, k64, v64 = heads(x64, y64)
    a = torch.softmax(q64 @ k64.transpose(-1, -2) * d ** -0.5, dim=-1)
    ref = (a @ v64).transpose(1, 2).reshape(B, n, H * d)
    want = torch.autograd.grad(ref, [t for t in (x64, y64) if t is not None], g.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=2e-5)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp.float(), rtol=1e-4, atol=2e-5)


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, N, H, d, apart", [
    (2, 7, 3, 32, False), (1, 197, 6, 64, False), (3, 13, 2, 48, True), (1, 196, 9, 48, True), (2, 1, 1, 16, False),
    (1, 45, 2, 16, True),
])
def test_packed_attention_is_softmax_attention_with_the_packed_gradient(attn, B, N, H, d, apart, threads):
    """`attend_packed` on a qkv product's output (or qk's, v apart: GPSA) against the float64 formula on the same
    views: its output, and the gradients of the packed tensor (in its own layout, contiguous) and of v."""
    C = H * d
    torch.manual_seed(B * N * H * d)
    packed = torch.randn(B, N, (2 if apart else 3) * C, requires_grad=True)
    v = torch.randn(B, N, C, requires_grad=True) if apart else None
    g = torch.randn(B, N, C)
    assert attn.packed_attention_applies(packed, H, v)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attn.attend_packed(packed, H, 0.7, v)
        grads = torch.autograd.grad(out, [t for t in (packed, v) if t is not None], g)
        with torch.no_grad():
            plain = attn.attend_packed(packed, H, 0.7, v)
    finally:
        torch.set_num_threads(before)
    p64 = packed.detach().double().requires_grad_()
    v64 = v.detach().double().requires_grad_() if apart else None
    parts = p64.view(B, N, 2 if apart else 3, H, d).permute(2, 0, 3, 1, 4)
    vh = v64.view(B, N, H, d).transpose(1, 2) if apart else parts[2]
    a = torch.softmax(parts[0] @ parts[1].transpose(-1, -2) * 0.7, dim=-1)
    ref = (a @ vh).transpose(1, 2).reshape(B, N, C)
    want = torch.autograd.grad(ref, [t for t in (p64, v64) if t is not None], g.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(plain, ref.float(), rtol=1e-4, atol=2e-5)
    assert grads[0].shape == packed.shape and grads[0].is_contiguous()
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp.float(), rtol=1e-4, atol=2e-5)


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, N, H, d, per_image", [
    (3, 49, 4, 32, False),     # CoAtNet's last stage, one bias for the batch: its gradient sums the images
    (2, 7, 3, 16, True), (1, 45, 2, 48, False), (4, 20, 1, 64, False), (2, 17, 5, 32, True),
    (2, 400, 1, 16, False),    # keys in two blocks
])
def test_packed_attention_with_a_bias_trains_as_sdpas_float_mask(attn, B, N, H, d, per_image, threads):
    """`attend_packed` with a bias (CoAtNet's relative positions): the output, and the gradients of the packed
    product and of the bias against autograd through float64 SDPA with that float attn_mask. One bias for the batch
    gets the sum of every image's gradient whatever the threads take (they split the heads); a bias spike that moves
    a row's maximum is in the recomputed probabilities; keys past a multiple of 16 stay out of the bias's gradient.
    The gradients are checked to be far from zero, so that a wrong one cannot pass as rounding."""
    C = H * d
    torch.manual_seed(B * N * H * d + per_image)
    packed = torch.randn(B, N, 3 * C, requires_grad=True)
    bias = torch.randn(B if per_image else 1, H, N, N) * 2
    bias[..., ::3, N // 2] += 30.0   # every third row (a spike in all would leave every other score's gradient ~0)
    bias.requires_grad_()
    g = torch.randn(B, N, C)
    assert attn.attention_bias_applies(bias, packed, H)

    def run():
        out = attn.attend_packed(packed, H, d ** -0.5, bias=bias)
        with torch.no_grad():
            plain = attn.attend_packed(packed, H, d ** -0.5, bias=bias)
        return out, plain, *torch.autograd.grad(out, [packed, bias], g)

    out, plain, d_packed, d_bias = with_threads(threads, run)
    p64, b64 = packed.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    q, k, v = p64.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=b64).transpose(1, 2).reshape(B, N, C)
    want_packed, want_bias = torch.autograd.grad(ref, [p64, b64], g.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(plain, ref.float(), rtol=1e-4, atol=2e-5)
    assert d_bias.shape == bias.shape and d_bias.is_contiguous() and float(want_bias.abs().mean()) > 1e-3
    torch.testing.assert_close(d_packed, want_packed.float(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(d_bias, want_bias.float(), rtol=1e-4, atol=2e-5)
    # without a gradient for the bias (a frozen table), none comes back
    out = attn.attend_packed(packed, H, d ** -0.5, bias=bias.detach())
    assert torch.autograd.grad(out, [packed], g)[0].shape == packed.shape


@needs_attention
@pytest.mark.parametrize("bad, words", [
    (lambda b: (b, None), "bias and dbias come together"),
    (lambda b: (b, torch.empty(2, *b.shape[1:])), "dbias must be contiguous float32 of the bias's shape"),
    (lambda b: (b, torch.empty(b.shape[::-1]).transpose(0, 3).transpose(1, 2)), "dbias must be contiguous"),
    (lambda b: (b[..., :4], torch.empty(1, 2, 5, 4)), "bias must be float32 (1 or 1, 2, 5, 5)"),
])
def test_attention_backward_with_a_bias_names_what_is_wrong(attn, bad, words):
    q, k, v = _heads(1, 2, 5, 5, 16)
    bias = torch.randn(1, 2, 5, 5)
    out, lse = attn._STATE["ops"].attention_lse(q, k, v, 1.0, bias)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with pytest.raises(RuntimeError, match="hybridzoo_native::attention_backward_") as e:
        attn._STATE["ops"].attention_backward_(torch.randn_like(out), q, k, v, out, lse, 1.0, dq, dk, dv,
                                               *bad(bias))
    assert words in str(e.value)


def test_attention_bias_applies_only_to_what_it_can_read(built):
    packed = torch.randn(2, 5, 3 * 64)
    assert native.attention_bias_applies(torch.randn(1, 2, 5, 5), packed, 2)
    assert native.attention_bias_applies(torch.randn(2, 2, 5, 5), packed, 2)
    assert not native.attention_bias_applies(torch.randn(3, 2, 5, 5), packed, 2)       # neither 1 nor B images
    assert not native.attention_bias_applies(torch.randn(1, 1, 5, 5), packed, 2)       # heads
    assert not native.attention_bias_applies(torch.randn(2, 5, 5), packed, 2)          # 3-D
    assert not native.attention_bias_applies(torch.randn(1, 2, 5, 5).double(), packed, 2)
    assert not native.attention_bias_applies(torch.randn(1, 2, 5, 5).transpose(2, 3), packed, 2)   # strided keys


def test_packed_attention_applies_only_to_what_it_can_read(built):
    assert not native.packed_attention_applies(torch.randn(2, 5, 3 * 40), 1)             # head dim 40
    assert not native.packed_attention_applies(torch.randn(2, 5, 3 * 64 + 1), 2)         # not three parts
    assert not native.packed_attention_applies(torch.randn(2, 3 * 64, 5).transpose(1, 2), 2)   # not contiguous
    assert not native.packed_attention_applies(torch.randn(2, 5, 2 * 64), 2, torch.randn(2, 5, 32))   # v's width
    assert not native.packed_attention_applies(torch.randn(2, 5, 2 * 64), 2, torch.randn(2, 64, 5).transpose(1, 2))
    assert not native.packed_attention_applies(torch.randn(2, 5, 3 * 64).double(), 2)
    assert native.packed_attention_applies(torch.randn(2, 5, 3 * 64), 2) == native.attention_supported()


@needs_attention
@pytest.mark.parametrize("bad, words", [
    (lambda q, k, v: (torch.empty(1, 2, 6, 16), torch.empty_like(k), torch.empty_like(v)), "q's, k's and v's shapes"),
    (lambda q, k, v: (torch.empty_like(q), torch.empty(1, 2, 16, 5).transpose(2, 3), torch.empty_like(v)),
     "unit stride along head_dim"),
    (lambda q, k, v: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v).double()), "float32"),
])
def test_attention_backward_into_names_what_is_wrong(attn, bad, words):
    q, k, v = _heads(1, 2, 5, 5, 16)
    out, lse = attn._STATE["ops"].attention_lse(q, k, v, 1.0)
    with pytest.raises(RuntimeError, match="hybridzoo_native::attention_backward_") as e:
        attn._STATE["ops"].attention_backward_(torch.randn_like(out), q, k, v, out, lse, 1.0, *bad(q, k, v))
    assert words in str(e.value)


def _gelu_against_float64(attn, shape, threads, quick, formula):
    """`attn.gelu` forward and backward on `threads` threads over a seeded x (with ±60, ±1e30, 0 and NaN first) and
    g, and the float64 formula's values and autograd gradient: (x, g, y, dx, ref, want)."""
    torch.manual_seed(len(shape) + shape[0])
    x = torch.randn(shape) * 4
    x.view(-1)[:6] = torch.tensor([60.0, -60.0, 1e30, -1e30, 0.0, float("nan")])[: x.numel()]
    g = torch.randn(shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, dx = attn.gelu(x, quick=quick), attn.gelu(x, g, quick=quick)
    finally:
        torch.set_num_threads(before)
    x64 = x.double().requires_grad_()
    ref = formula(x64)
    (want,) = torch.autograd.grad(ref, x64, g.double())
    return x, g, y, dx, ref.detach(), want


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1,), (15,), (16,), (17,), (3, 7, 5), (8, 196, 1728), (70001,)])
def test_gelu_and_its_gradient_are_the_erf_formula(attn, shape, threads):
    """The training GELU's forward and backward against float64 GELU and autograd's gradient: within the rational
    erf's bound (5e-7 absolute on erf) and fp32 rounding, over row tails (n mod 16) and the threads' chunks; exactly x
    and 0 (forward), g and 0 (gradient) far out; NaN stays NaN."""
    x, g, y, dx, ref, want = _gelu_against_float64(attn, shape, threads, False, F.gelu)
    finite = ~torch.isnan(x)
    assert torch.isnan(y[~finite]).all() and torch.isnan(dx[~finite]).all()
    err = (y.double() - ref).abs()[finite]
    assert (err <= 2.3e-7 * x.double().abs()[finite] + 2e-6 * ref.abs()[finite] + 1e-30).all()
    derr = (dx.double() - want).abs()[finite]
    assert (derr <= (4e-7 + 4e-7 * x.double().abs()[finite]) * g.double().abs()[finite] + 1e-30).all()
    far = x.abs() >= 6   # erf(x/√2) is ±1 in float32: GELU is x, or 0
    assert torch.equal(y[far & (x > 0)], x[far & (x > 0)]) and (y[far & (x < 0)] == 0).all()
    assert torch.equal(dx[far & (x > 0)], g[far & (x > 0)])
    assert (dx[x <= -14] == 0).all()   # x·φ(x) below float32's range (above it, x·φ is tiny, not 0)


@needs_attention
@pytest.mark.parametrize("bad, words", [
    (lambda: (torch.randn(5, 4).t(), None), "contiguous"),
    (lambda: (torch.randn(5).double(), None), "float32"),
    (lambda: (torch.randn(5), torch.randn(6)), "grad must be contiguous float32 of x's shape [5]"),
    (lambda: (torch.randn(5, 4), torch.randn(4, 5).t()), "grad must be contiguous"),
])
def test_gelu_names_what_is_wrong(attn, bad, words):
    with pytest.raises(RuntimeError, match="hybridzoo_native::gelu") as e:
        attn.gelu(*bad())
    assert words in str(e.value)


@needs_attention
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("T, O, I", [(1, 1, 16), (5, 11, 48), (37, 13, 80), (9, 8, 32), (20, 9, 16), (300, 100, 64),
                                     (600, 30, 208), (70, 1536, 32), (40, 200, 512)])
def test_weight_grad_is_the_transposed_product(attn, T, O, I, threads):
    """gᵀ·x against float64: every row tail of the 6-row tiles (O mod 6 = 1-5), panels of 16-64 columns and groups of
    192 with a tail (I = 208), several token chunks (T = 300, 600), a row stride past 4 KB (O = 1,536), one, two and
    four threads, so that they split the rows (fewer than two panels each: I ≤ 128), the columns (I = 512) or both
    (I = 208 at four); leading dims flattened."""
    torch.manual_seed(T + O + I)
    g, x = torch.randn(T, O), torch.randn(T, I)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dw = attn.weight_grad(g, x)
        dw3 = attn.weight_grad(g.reshape(1, T, O), x.reshape(1, T, I))
    finally:
        torch.set_num_threads(before)
    want = g.double().t() @ x.double()
    assert dw.shape == (O, I) and dw.is_contiguous()
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-5 * T ** 0.5)
    assert torch.equal(dw3, dw)


@needs_attention
def test_weight_grad_of_no_tokens_is_zero(attn):
    assert torch.equal(attn.weight_grad(torch.randn(0, 5), torch.randn(0, 32)), torch.zeros(5, 32))


@needs_attention
@pytest.mark.parametrize("bad, words", [
    (lambda: (torch.randn(4, 5), torch.randn(4, 20)), "I a positive multiple of 16"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 16)), "the same leading shape"),
    (lambda: (torch.randn(5, 4).t(), torch.randn(4, 16)), "contiguous"),
    (lambda: (torch.randn(4, 5).double(), torch.randn(4, 16)), "Double"),
])
def test_weight_grad_names_what_is_wrong(attn, bad, words):
    with pytest.raises(RuntimeError, match="hybridzoo_native::weight_grad") as e:
        attn.weight_grad(*bad())
    assert words in str(e.value)


@needs_attention
def test_fast_training_gelu_is_gelu_on_the_kernel_in_training_only(attn, monkeypatch):
    """`optimize_for_cpu_training` makes exact GELUs `FastGELU`: in training with a gradient, the kernel, with the
    plain module's output and gradient to fp32 rounding; in eval mode, without a gradient, for the tanh form and with
    HYBRIDZOO_NATIVE=0, `F.gelu` bit for bit."""
    from hybridzoo.layers.train_fast import FastGELU

    model = torch.nn.Sequential(torch.nn.Linear(8, 40), torch.nn.GELU(), torch.nn.Linear(40, 8),
                                torch.nn.GELU(approximate="tanh"))
    fast = _check_fast_activation(model, torch.randn(6, 8), F.gelu, monkeypatch)
    assert type(fast[1]) is FastGELU and type(fast[3]) is torch.nn.GELU


@needs_attention
def test_fast_training_gelu_keeps_a_channels_last_map_channels_last(attn):
    """A channels-last map goes through `FastGELU` as its NHWC storage, both ways: the output and the input gradient
    channels-last (the layout BatchNorm's backward wants beside it), no copy of the map, the values `F.gelu`'s."""
    from hybridzoo.layers.train_fast import FastGELU

    torch.manual_seed(0)
    x = torch.randn(2, 48, 5, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(2, 48, 5, 3).contiguous(memory_format=torch.channels_last)
    with _Ops() as ops:
        y = FastGELU()(x)
        y.backward(g)
    assert ops.names.count("hybridzoo_native.gelu") == 2
    assert not {"aten.clone", "aten.copy_", "aten.contiguous"} & set(ops.names), ops.names
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    ref = x.detach().clone().requires_grad_()
    F.gelu(ref).backward(g)
    torch.testing.assert_close(y, F.gelu(x.detach()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)


def _check_fast_activation(model, x, reference, monkeypatch):
    """`model` (Linear, activation, Linear, ...) through `optimize_for_cpu_training`: in a training step the
    activation at [1] runs the native GELU kernel once each way, with the plain model's output and gradients to
    fp32 rounding; without a gradient, in eval mode and with HYBRIDZOO_NATIVE=0 it is `reference` bit for bit.
    Returns the optimised model."""
    from hybridzoo.layers.train_fast import optimize_for_cpu_training

    fast = optimize_for_cpu_training(__import__("copy").deepcopy(model))
    with _Ops() as ops:
        out = fast(x)
        out.sum().backward()
    assert ops.names.count("hybridzoo_native.gelu") == 2   # forward and backward
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    t = torch.randn(4, model[0].out_features)
    with _Ops() as ops:
        with torch.no_grad():
            plain = fast[1](t)
        evaluated = fast.eval()[1](t.requires_grad_())   # and t needs a gradient from here on: the training path
        fast.train()
        monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
        off = fast[1](t)
    assert "hybridzoo_native.gelu" not in ops.names
    for y in (plain, evaluated, off):
        assert torch.equal(y, reference(t.detach()))
    return fast


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@needs_attention
@pytest.mark.parametrize("name, kwargs, n_attn", [
    ("deit_small_patch16_224", dict(img_size=32, embed_dim=96, depth=2, num_heads=2), 2),
    ("cvt_13", None, 4),
    ("convit_tiny", dict(img_size=64, embed_dim=96, depth=3, num_heads=2, local_up_to_layer=2), 3),   # 2 GPSA
    ("coatnet_0", None, 3),   # relative attention: the bias table's gradient from the kernel's backward
])
def test_fast_cpu_training_attends_through_the_kernels(attn, name, kwargs, n_attn, monkeypatch):
    """`optimize_for_cpu_training` (what `hybridzoo train` does on the CPU) sends attention's forward and backward
    to the kernels: the same loss and parameter gradients as the plain model's SDPA to fp32 rounding, and with
    HYBRIDZOO_NATIVE=0 no kernel call at all."""
    from hybridzoo.layers.train_fast import optimize_for_cpu_training

    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **(kwargs or get_card(name).test_kwargs)).train()
    perturb(model)
    fast = optimize_for_cpu_training(__import__("copy").deepcopy(model))
    size = 32 if name.startswith("deit") else 64
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))

    def step(m):
        m.zero_grad()
        torch.manual_seed(1)   # the same stochastic depth draws
        with _Ops() as ops:
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}, ops.names

    ref_loss, ref_grads, _ = step(model)
    loss, grads, names = step(fast)
    assert names.count("hybridzoo_native.attention_lse") == n_attn
    # a packed qkv (or GPSA's qk) product's gradient is written in its own layout (attention_backward_); CvT's
    # separate q, k, v products, and the last block of DeiT and ConViT (its class token alone queries), get three
    packed = 0 if name.startswith("cvt") else n_attn if name.startswith("coatnet") else n_attn - 1
    assert names.count("hybridzoo_native.attention_backward_") == packed
    assert names.count("hybridzoo_native.attention_backward") == n_attn - packed
    # CoAtNet's MBConv squeeze-excitations: the gate's gradient summed by the kernel, in one pass
    n_se = sum(type(m).__name__ == "SqueezeExcite" for m in model.modules())
    assert names.count("hybridzoo_native.channel_dot") == n_se and (n_se > 0) == name.startswith("coatnet")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=k)
    monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
    *_, names = step(fast)
    assert not any(n.startswith("hybridzoo_native.attention") for n in names)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@needs_attention
@pytest.mark.parametrize("name, kwargs, n_attn", [
    ("deit_small_patch16_224", dict(img_size=32, embed_dim=96, depth=2, num_heads=2), 2),   # head dim 48
    ("convit_tiny", dict(img_size=64, embed_dim=96, depth=3, num_heads=2, local_up_to_layer=2), 3),   # 2 GPSA
    ("cvt_13", None, 4),   # the card's test size: head dim 16, 1 + 1 + 2 blocks
])
def test_frozen_transformers_attend_through_the_kernel(attn, name, kwargs, n_attn, monkeypatch):
    """DeiT's / ViT's attention, ConViT's GPSA (with its positional map) and MHSA, and CvT's convolutional
    attention go through the kernel on the inference path, seen by the dispatcher, with the eager model's
    output; HYBRIDZOO_NATIVE=0 gives them back to SDPA and bmm. Batch 3 on one thread: no batch split."""
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **(kwargs or get_card(name).test_kwargs)).eval()
    perturb(model)
    frozen = optimize_for_cpu_inference(model)
    size = {"deit_small_patch16_224": 32, "convit_tiny": 64}.get(name, 64)
    x = torch.randn(3, 3, size, size)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            frozen(x)
            with _Ops() as ops:
                out = frozen(x)
            monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
            with _Ops() as off:
                aten = frozen(x)
            ref = model(x)
    finally:
        torch.set_num_threads(before)
    assert ops.names.count("hybridzoo_native.attention") == n_attn
    assert off.names.count("hybridzoo_native.attention") == 0
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, aten, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@needs_attention
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "convit_tiny"])
def test_token_shares_attend_through_the_kernel(attn, name, monkeypatch):
    """At batch 1 with two threads, each token share's attention on the Python threads (its own query rows, every
    key; GPSA with its rows of the positional map) goes through the kernel, with the sequential blocks' output.
    (The shares' native call, `token_blocks`, calls the kernel from C++: tests/layers/test_token_blocks.py.)"""
    from hybridzoo.layers import onednn_tokens
    monkeypatch.setattr(onednn_tokens, "_native_args", lambda blocks, plan: None)
    model = small_transformer(name, img_size=96, embed_dim=96, depth=3, num_heads=2)   # 36 patches: 18+ rows a share
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    calls = []   # the MHSA blocks call `attend`, the GPSA blocks (with their positional rows) `attention`
    for fn in ("attend", "attention"):
        monkeypatch.setattr(native, fn, lambda q, *a, f=getattr(native, fn): calls.append(q.shape[2]) or f(q, *a))
    x = torch.randn(1, 3, 96, 96)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = fast(x)
    finally:
        torch.set_num_threads(before)
    # the first two blocks in two shares each (ConViT's GPSA blocks have no class token), the last block's
    # class token alone
    n = 36 + (name != "convit_tiny")
    assert sorted(calls) == [1] + [n // 2] * 2 + [n - n // 2] * 2
    with torch.inference_mode():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@needs_attention
def test_compiled_training_keeps_sdpa_in_one_graph(attn):
    """Under `torch.compile` (`hybridzoo train --compile`) a module switched to the kernels traces SDPA, in one
    graph each way (fullgraph: the check itself must not break the graph), with the eager model's outputs and
    gradients."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from hybridzoo.layers.attention import Attention
    from hybridzoo.layers.train_fast import optimize_for_cpu_training

    graphs: list[str] = []

    def keep(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    plain = Attention(64, num_heads=2).train()
    fast = optimize_for_cpu_training(__import__("copy").deepcopy(plain), min_weight_numel=1)
    assert fast.native_attention
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    x, g = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    y_ref, y = plain(x), compiled(x)
    y_ref.backward(g)
    y.backward(g)
    assert len(graphs) == 2 and not any("hybridzoo_native" in gr for gr in graphs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 7, 5), (8, 196, 768), (70001,)])
def test_quick_gelu_and_its_gradient_are_the_formula(attn, shape, threads):
    """QuickGELU x·σ(1.702x) and its gradient against float64 and autograd: within a few fp32 roundings of x (the
    derivative crosses 0, so the bound scales with 1 + |x|), over row tails and the threads' chunks; exactly x and g
    far above, -0 / 0 far below (not x times hz_exp's floor); NaN stays NaN."""
    x, g, y, dx, ref, want = _gelu_against_float64(attn, shape, threads, True,
                                                   lambda v: v * torch.sigmoid(1.702 * v))
    finite, xa = ~torch.isnan(x), x.double().abs()
    assert torch.isnan(y[~finite]).all() and torch.isnan(dx[~finite]).all()
    assert ((y.double() - ref).abs() <= 4e-7 * xa + 1e-30)[finite].all()
    assert ((dx.double() - want).abs() <= 4e-7 * (1 + xa) * g.double().abs() + 1e-30)[finite].all()
    assert torch.equal(y[x >= 60], x[x >= 60]) and torch.equal(dx[x >= 60], g[x >= 60])
    assert (y[x <= -60] == 0).all() and (dx[x <= -60] == 0).all()


@needs_attention
def test_fast_training_quick_gelu_is_quick_gelu_on_the_kernel_in_training_only(attn, monkeypatch):
    """`optimize_for_cpu_training` makes every `QuickGELU` (CvT's MLPs) `FastQuickGELU`: in training with a gradient,
    the kernel forward and back, with the plain module's output and gradients to fp32 rounding; in eval mode, without
    a gradient and with HYBRIDZOO_NATIVE=0, `QuickGELU` bit for bit."""
    from hybridzoo.layers.mlp import QuickGELU
    from hybridzoo.layers.train_fast import FastQuickGELU

    model = torch.nn.Sequential(torch.nn.Linear(8, 40), QuickGELU(), torch.nn.Linear(40, 8))
    fast = _check_fast_activation(model, torch.randn(6, 8) * 3, QuickGELU(), monkeypatch)
    assert type(fast[1]) is FastQuickGELU
