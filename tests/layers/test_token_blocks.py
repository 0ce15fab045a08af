"""The native token-share kernel (`native.token_blocks`, batch-1 inference), its product kernel (`pack_panels`) and
the patch embedding on that product (`native.patch_embed`, the frozen path's convolutions whose kernel is their
stride).

`token_blocks` is pre-norm transformer blocks on one image's tokens, the rows shared by an OpenMP team: checked
against the same blocks written out in float64 (every row tail of the product kernel, head dims 16-64, fc1's
activations, missing biases, ConViT's positional maps, CoAtNet's relative biases, the last block's leading rows
alone, one to three threads), against the frozen models' blocks run in turn (DeiT, ConViT, CoAtNet's transformer
stages), and for the errors it gives. The Python threads' way of running the shares is tested in
tests/layers/test_token_parallel.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hybridzoo
from hybridzoo.layers import native, onednn_tokens
from hybridzoo.layers.onednn import OneDNNConv2d, onednn_available, optimize_for_cpu_inference
from _helpers import activation, perturb, small_transformer  # tests/conftest.py puts tests/ on sys.path


def _blocks(L, C, H, hidden, N, *, act="gelu", algorithm="none", bias=True, pos_blocks=(), bias_blocks=(), seed=0):
    """Random parameters of L blocks: float64 masters for the reference and the kernel's arguments."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for i in range(L):
        p = {
            "ln1": (1 + 0.2 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)),
            "ln2": (1 + 0.2 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)),
        }
        for name, (n_out, n_in) in {"qkv": (3 * C, C), "proj": (C, C), "fc1": (hidden, C), "fc2": (C, hidden)}.items():
            w = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
            b = 0.1 * torch.randn(n_out, generator=g) if bias else None
            p[name] = (w, b)
        p["pos"] = None
        if i in pos_blocks:   # a GPSA-like map: nonnegative rows
            p["pos"] = 0.3 * torch.softmax(torch.randn(H, N, N, generator=g), dim=-1)
        # a relative-position bias before the softmax (CoAtNet's)
        p["bias"] = 2.0 * torch.randn(1, H, N, N, generator=g) if i in bias_blocks else None
        blocks.append(p)
    return blocks


def _args(blocks, H, scale, eps, act, algorithm):
    """token_blocks' arguments after x (the biases, if any, go by keyword: `_bias`)."""
    params, pos = [], []
    for p in blocks:
        params += [p["ln1"][0], p["ln1"][1], native.pack_panels(p["qkv"][0]), p["qkv"][1],
                   native.pack_panels(p["proj"][0]), p["proj"][1], p["ln2"][0], p["ln2"][1],
                   native.pack_panels(p["fc1"][0]), p["fc1"][1], native.pack_panels(p["fc2"][0]), p["fc2"][1]]
        pos.append(p["pos"])
    L = len(blocks)
    return params, [H] * L, [scale] * L, [eps] * (2 * L), [act] * L, [algorithm] * L, pos


def _bias(blocks) -> dict:
    return {"bias": [p["bias"] for p in blocks]} if any(p["bias"] is not None for p in blocks) else {}


def _reference(x, blocks, H, scale, eps, act, algorithm):
    """The blocks in float64, written out."""
    h = x.double()[0]
    N, C = h.shape
    d = C // H
    lin = lambda t, wb: F.linear(t, wb[0].double(), None if wb[1] is None else wb[1].double())   # noqa: E731
    for p in blocks:
        y = F.layer_norm(h, (C,), p["ln1"][0].double(), p["ln1"][1].double(), eps)
        q, k, v = lin(y, p["qkv"]).view(N, 3, H, d).permute(1, 2, 0, 3)
        s = q @ k.transpose(-1, -2) * scale
        a = torch.softmax(s if p["bias"] is None else s + p["bias"][0].double(), dim=-1)
        if p["pos"] is not None:
            a = a + p["pos"].double()
        h = h + lin((a @ v).transpose(0, 1).reshape(N, C), p["proj"])
        y = F.layer_norm(h, (C,), p["ln2"][0].double(), p["ln2"][1].double(), eps)
        h = h + lin(activation(lin(y, p["fc1"]), act, algorithm), p["fc2"])
    return h.float()[None]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("N, C, H, hidden, act, algorithm, bias, pos_blocks, bias_blocks", [
    (197, 64, 2, 256, "gelu", "none", True, (), ()),      # DeiT-like; 98 / 99 rows: 6-row tiles and tails of 2, 3
    (196, 96, 2, 384, "gelu", "none", False, (0, 1), ()),    # ConViT's GPSA: positional maps, no qkv bias; d = 48
    (50, 128, 2, 80, "relu", "", True, (1,), ()),      # d = 64; a hidden layer of 5 vectors (a 16-wide panel)
    (37, 64, 4, 144, "gelu", "tanh", True, (), ()),      # d = 16; tanh GELU
    (23, 32, 1, 96, "swish", "", False, (), ()),      # one head; swish (x·σ(x))
    (19, 48, 1, 32, "none", "", True, (0,), ()),      # no activation; 48 columns: a 3-vector panel
    (49, 64, 2, 256, "gelu", "none", True, (), (0, 1, 2)),   # CoAtNet's: a relative bias before every softmax
    (37, 96, 3, 192, "gelu", "none", True, (2,), (0,)),      # a bias in one block, a positional map in another
])
def test_token_blocks_are_the_blocks_written_out(kernels, threads, N, C, H, hidden, act, algorithm, bias,
                                                   pos_blocks, bias_blocks):
    L, eps = 3, 1e-6
    scale = (C // H) ** -0.5
    blocks = _blocks(L, C, H, hidden, N, act=act, algorithm=algorithm, bias=bias, pos_blocks=pos_blocks,
                     bias_blocks=bias_blocks, seed=N * C + H)
    x = torch.randn(1, N, C, generator=torch.Generator().manual_seed(N))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.token_blocks(x, *_args(blocks, H, scale, eps, act, algorithm), **_bias(blocks))
    finally:
        torch.set_num_threads(before)
    ref = _reference(x, blocks, H, scale, eps, act, algorithm)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))
    # the last block computing its first rows alone (class / distillation tokens): those rows of the whole
    torch.set_num_threads(threads)
    try:
        firsts = [kernels.token_blocks(x, *_args(blocks, H, scale, eps, act, algorithm), prefix=p, **_bias(blocks))
                  for p in (1, 2)]
    finally:
        torch.set_num_threads(before)
    for p, first in zip((1, 2), firsts):
        assert first.shape == (1, p, C)
        torch.testing.assert_close(first, ref[:, :p], rtol=1e-5, atol=2e-5 * float(ref.abs().max()))


def test_the_fused_gelu_is_the_exact_erf_one(kernels):
    """fc1's GELU in the product's epilogue, over pre-activations from -12 to 12: within the fp32 rounding of the
    erf form, and far from the tanh form (which differs by up to ~5e-4 there)."""
    C, H, hidden, N = 64, 2, 512, 40
    blocks = _blocks(1, C, H, hidden, N, seed=3)
    w, b = blocks[0]["fc1"]
    blocks[0]["fc1"] = (w * 12.0, b * 12.0)   # wide pre-activations (LayerNorm gives unit rows)
    x = torch.randn(1, N, C, generator=torch.Generator().manual_seed(1))
    out = kernels.token_blocks(x, *_args(blocks, H, 0.25, 1e-6, "gelu", "none"))
    ref = _reference(x, blocks, H, 0.25, 1e-6, "gelu", "none")
    tanh = _reference(x, blocks, H, 0.25, 1e-6, "gelu", "tanh")
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    assert float((out - tanh).abs().max()) > 5 * float((out - ref).abs().max())


def test_pack_panels_lays_out_64_columns_by_k(kernels):
    w = torch.randn(80, 5)   # one 64-wide panel and one 16-wide
    p = kernels.pack_panels(w)
    assert p.shape == (80 * 5,)
    torch.testing.assert_close(p[:64 * 5].view(5, 64), w[:64].t(), rtol=0, atol=0)
    torch.testing.assert_close(p[64 * 5:].view(5, 16), w[64:].t(), rtol=0, atol=0)
    torch.testing.assert_close(kernels.pack_panels(w.t().contiguous().t()), p, rtol=0, atol=0)   # strided in


def test_pack_panels_lays_out_strips_of_16_columns_from_k_256(kernels):
    w = torch.randn(80, 256)   # one 64-wide panel (four strips) and one 16-wide
    p = kernels.pack_panels(w)
    for j in range(5):   # strip j: columns 16j .. 16j + 15, K × 16 contiguous
        torch.testing.assert_close(p[j * 16 * 256:(j + 1) * 16 * 256].view(256, 16), w[16 * j:16 * (j + 1)].t(),
                                   rtol=0, atol=0)
    # a transposed contiguous weight (read as it lies) and another strided one (copied first) pack the same
    assert torch.equal(kernels.pack_panels(w.t().contiguous().t()), p)
    wide = torch.randn(80, 512)
    assert torch.equal(kernels.pack_panels(wide[:, ::2]), kernels.pack_panels(wide[:, ::2].contiguous()))


def _packed_layout(w: torch.Tensor) -> torch.Tensor:
    """pack_panels's layout from its rule: panels of 64 rows of w (the last narrower), each K × width flat, or from
    K = 256 on strips of 16 rows, each K × 16."""
    parts = []
    for n0 in range(0, w.shape[0], 64):
        panel = w[n0:n0 + 64]
        for strip in (panel.split(16) if w.shape[1] >= 256 else [panel]):
            parts.append(strip.t().reshape(-1))
    return torch.cat(parts)


# K not a multiple of 4 (the transposing blocks' tail), K of 1, panels of 16-48 rows, strips with a tail panel
@pytest.mark.parametrize("N, K", [(80, 5), (48, 7), (16, 1), (64, 4), (80, 259), (144, 300), (208, 384)])
def test_pack_panels_matches_its_layout_from_every_kind_of_weight(kernels, N, K):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N + K))
    want = _packed_layout(w)
    assert torch.equal(kernels.pack_panels(w), want)
    assert torch.equal(kernels.pack_panels(w.t().contiguous().t()), want)   # Wᵀ read as it lies
    wide = torch.randn(N, 2 * K, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kernels.pack_panels(wide[:, ::2]), _packed_layout(wide[:, ::2]))   # strided: copied first


@pytest.mark.parametrize("w, words", [
    (torch.randn(40, 8), "multiple of 16"),
    (torch.randn(32, 8, dtype=torch.float64), "float32"),
    (torch.randn(32), r"\(N, K\)"),
])
def test_pack_panels_names_what_is_wrong(kernels, w, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.pack_panels(w)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N, K", [(80, 5), (96, 200), (80, 256), (48, 384), (208, 96)])
def test_scale_panels_is_the_packed_weight_of_w_times_diag_s(kernels, threads, N, K):
    """Both layouts (rows below K = 256, strips from it), a last panel narrower than 64, the groups of 16 columns
    shared by the threads; exactly the packing of W·diag(s), and the product on it is (x·diag(s))·Wᵀ."""
    torch.manual_seed(N + K)
    w, s = torch.randn(N, K), torch.rand(K) + 0.5
    p = kernels.pack_panels(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scaled = kernels.scale_panels(p, s)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(scaled, kernels.pack_panels(w * s), rtol=0, atol=0)
    x = torch.randn(7, K)
    torch.testing.assert_close(kernels.rows_linear(x, scaled, None, "none", ""), (x * s) @ w.t(),
                               rtol=1e-5, atol=1e-4)
    assert torch.equal(p, kernels.pack_panels(w))   # the packed weight itself is left as it was


@pytest.mark.parametrize("s, words", [
    (torch.rand(7), r"panels must be a weight of \(N, 7\)"),
    (torch.rand(8, dtype=torch.float64), "float32"),
    (torch.rand(2, 4), "vector"),
])
def test_scale_panels_names_what_is_wrong(kernels, s, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.scale_panels(kernels.pack_panels(torch.randn(32, 8)), s)


def _good(N=20, C=64, H=2, hidden=128):
    blocks = _blocks(2, C, H, hidden, N, pos_blocks=(0,))
    x = torch.randn(1, N, C)
    return [x, *_args(blocks, H, 0.2, 1e-6, "gelu", "none")]


def _bad(change):
    args = _good()
    change(args)
    return args


@pytest.mark.parametrize("make, words", [
    (lambda: _bad(lambda a: a.__setitem__(0, torch.randn(2, 20, 64))), r"one image's tokens"),
    (lambda: _bad(lambda a: a.__setitem__(0, torch.randn(1, 20, 64).double())), r"one image's tokens"),
    (lambda: _bad(lambda a: a.__setitem__(1, a[1][:-1])), "expected 24 params"),
    (lambda: _bad(lambda a: a.__setitem__(5, ["gelu", "tanh"])), "act must be none, gelu, relu or swish"),
    (lambda: _bad(lambda a: a.__setitem__(2, [8, 2])), "head_dim must be 16, 32, 48 or 64"),
    (lambda: _bad(lambda a: a[1].__setitem__(2, torch.randn(64 * 64))), r"parameter 2 must be .* 12288 values"),
    (lambda: _bad(lambda a: a[1].__setitem__(16, None)), r"parameter 4 \(a product's packed weight\) is missing"),
    (lambda: _bad(lambda a: a[1].__setitem__(0, torch.randn(48))), "parameter 0 must be .* 64 values"),
    (lambda: _bad(lambda a: a[7].__setitem__(0, torch.rand(2, 20, 19))), r"pos must be float32 \(2, 20, 20\)"),
    (lambda: _bad(lambda a: a.append(21)), r"prefix must be 0 \(every row\) or .* got 21"),
    (lambda: _bad(lambda a: (a.append(0), a.append([torch.rand(1, 2, 20, 20), torch.rand(1, 2, 20, 19)]))),
     r"block 1: bias must be float32 \(1, 2, 20, 20\)"),
    (lambda: _bad(lambda a: a.append(-1)), r"prefix must be 0 \(every row\) or .* got -1"),
])
def test_token_blocks_name_what_is_wrong(kernels, make, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.token_blocks(*make())


def _spy(monkeypatch):
    calls = []
    real = native.token_blocks
    # (blocks in the call, prefix: the last block's leading rows computed alone, 0 for every row)
    monkeypatch.setattr(native, "token_blocks", lambda x, params, heads, *a: calls.append((len(heads), a[-1])) or real(
        x, params, heads, *a))
    return calls


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_a_wide_mlp_sums_fc2_in_chunks_and_adds_the_residual_once(kernels, monkeypatch):
    """fc2 of a hidden width above 1,536 sums its K in chunks inside the one native call, the residual (read from
    the other buffer) added at the last chunk only."""
    model = small_transformer("deit_small_patch16_224", img_size=128, embed_dim=448, depth=2, num_heads=7)
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    calls = _spy(monkeypatch)
    x = torch.randn(1, 3, 128, 128)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out, eager = fast(x), model(x)
    finally:
        torch.set_num_threads(before)
    assert calls == [(2, 1)] and model.blocks[0].mlp.fc1.out_features == 1792
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "convit_tiny"])
def test_frozen_models_run_their_token_shares_in_one_native_call(kernels, name, threads, monkeypatch):
    model = small_transformer(name, img_size=128, embed_dim=64, depth=4, num_heads=2)   # 64 patches: 21+ rows a share
    plain = optimize_for_cpu_inference(model, split_tokens=False)
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    calls = _spy(monkeypatch)
    x = torch.randn(1, 3, 128, 128)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out, ref = fast(x), plain(x)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    # DeiT: the four blocks in one call, the last computing the class token alone; ConViT: its two GPSA blocks,
    # then the two MHSA blocks (the class token joins between), the last computing the class token alone
    assert calls == ([(4, 1)] if name == "deit_small_patch16_224" else [(2, 0), (2, 1)])
    with torch.inference_mode():
        eager = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_hooks_on_the_blocks_keep_the_python_shares(kernels, monkeypatch):
    """A forward hook on a module of the blocks sees its calls: the shares then run the modules on Python threads."""
    torch.manual_seed(0)
    model = hybridzoo.create_model("deit_small_patch16_224", img_size=96, embed_dim=64, depth=3, num_heads=2).eval()
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    calls, seen = _spy(monkeypatch), []
    x = torch.randn(1, 3, 96, 96)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            fast(x)
            assert calls == [(3, 1)] and seen == []
            handle = fast.blocks[1].mlp.fc2.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
            out = fast(x)
            handle.remove()
    finally:
        torch.set_num_threads(before)
    assert calls == [(3, 1)] and sorted(seen) == [18, 19]
    with torch.inference_mode():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_products_the_kernel_does_not_run_keep_the_python_shares(kernels):
    """Head dims without an attention kernel (8 here) or outputs not a multiple of 16: no native arguments."""
    torch.manual_seed(0)
    for kw in (dict(embed_dim=32, num_heads=4), dict(embed_dim=40, num_heads=1, mlp_ratio=2.0)):
        model = hybridzoo.create_model("deit_small_patch16_224", img_size=96, depth=2, **kw).eval()
        fast = optimize_for_cpu_inference(model)
        plan = [(onednn_tokens._kernel(b), None) for b in fast.blocks]
        assert onednn_tokens._native_args(fast.blocks, plan) is None
    model = hybridzoo.create_model("deit_small_patch16_224", img_size=96, depth=2, embed_dim=64, num_heads=2).eval()
    fast = optimize_for_cpu_inference(model)
    plan = [(onednn_tokens._kernel(b), None) for b in fast.blocks]
    assert onednn_tokens._native_args(fast.blocks, plan) is not None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, Cin, H, W, ph, pw, N, bias", [
    (1, 3, 224, 224, 16, 16, 192, True),    # ViT / DeiT / ConViT at 224²: 196 patches
    (3, 3, 64, 48, 16, 16, 64, False),      # several images, a non-square grid, no bias
    (2, 4, 37, 30, 8, 4, 80, True),         # non-square patches; the rows and columns left over are dropped
    (1, 1, 20, 20, 5, 5, 48, True),         # 16 patches: fewer rows than a thread's block
    (5, 3, 32, 32, 16, 16, 16, True),       # 20 patches in blocks over the threads
])
def test_patch_embed_is_the_strided_convolution(kernels, threads, B, Cin, H, W, ph, pw, N, bias):
    torch.manual_seed(B * H + N)
    conv = torch.nn.Conv2d(Cin, N, (ph, pw), (ph, pw), bias=bias)
    x = torch.randn(B, Cin, H, W)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.patch_embed(x, native.pack_panels(conv.weight.detach().reshape(N, -1)),
                                  None if conv.bias is None else conv.bias.detach(), ph, pw)
    finally:
        torch.set_num_threads(before)
    ref = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                   stride=(ph, pw))
    assert out.shape == (B, (H // ph) * (W // pw), N)
    torch.testing.assert_close(out, ref.flatten(2).transpose(1, 2).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, words", [
    ((torch.randn(3, 16, 16), torch.randn(16 * 3 * 16), None, 4, 4), "batch of images"),
    ((torch.randn(1, 3, 8, 8), torch.randn(16 * 48), None, 16, 16), "do not fit"),
    ((torch.randn(1, 3, 16, 16), torch.randn(20 * 48), None, 4, 4), "multiple of 16"),
    ((torch.randn(1, 3, 16, 16), torch.randn(16 * 48), torch.randn(15), 4, 4), r"bias must be contiguous float32 \(16\)"),
])
def test_patch_embed_names_what_is_wrong(kernels, args, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.patch_embed(*args)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_frozen_patch_convolutions_take_the_native_product(kernels, monkeypatch):
    """The frozen convolution of a patch embedding gives oneDNN's map (values and channels-last strides) through
    `native.patch_embed`; other convolutions keep oneDNN."""
    torch.manual_seed(0)
    calls = []
    real = native.patch_embed
    monkeypatch.setattr(native, "patch_embed", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    conv = torch.nn.Conv2d(3, 64, 16, 16)
    frozen = OneDNNConv2d(conv)
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        out = frozen(x)
        frozen.patchify = False
        onednn = frozen(x)
    assert calls == [(2, 3, 64, 80)]
    assert out.stride() == onednn.stride() and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, onednn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    assert not OneDNNConv2d(torch.nn.Conv2d(3, 64, 3, 3, padding=1)).patchify          # padded
    assert not OneDNNConv2d(torch.nn.Conv2d(3, 64, 4, 2)).patchify                     # overlapping
    assert not OneDNNConv2d(torch.nn.Conv2d(3, 40, 4, 4)).patchify                     # 40 outputs
    model = hybridzoo.create_model("deit_small_patch16_224", img_size=64, embed_dim=64, depth=1, num_heads=2).eval()
    fast = optimize_for_cpu_inference(model)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    assert any(c[1:] == (3, 64, 64) for c in calls[1:])   # the model's patch embedding (batch split or not)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


_ACTS = {"none": lambda t: t, "gelu": lambda t: F.gelu(t), "gelu-tanh": lambda t: F.gelu(t, approximate="tanh"),
         "relu": F.relu, "swish": F.silu}


def _act_args(name: str) -> tuple[str, str]:
    return ("gelu", "tanh") if name == "gelu-tanh" else (name, "none" if name == "gelu" else "")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lead, K, N", [((1,), 192, 576), ((5,), 33, 16), ((197,), 384, 1152), ((785,), 64, 80),
                                        ((3, 7), 48, 64), ((2, 0), 16, 16), ((49,), 3072, 48), ((26,), 1700, 96),
                                        ((7, 7), 256, 464), ((63,), 96, 256)])
@pytest.mark.parametrize("act", list(_ACTS))
def test_rows_linear_is_the_linear_with_its_activation(kernels, threads, lead, K, N, act):
    """Every row block split over the threads (785 rows: blocks of 131, as many per thread), row tails (their tiles
    wider on AVX2), panels of 16-64 columns, K summed in chunks (3,072 and 1,700: more than 1,536), oneDNN's post-ops
    in the epilogue; below 64 rows with at least two panels a thread, the panels split over the threads instead (49
    rows: 8 panels, the last 16 columns wide, 4 and 4; weights in strips from K = 256 and in rows below)."""
    torch.manual_seed(K * N)
    lin = torch.nn.Linear(K, N, bias=N != 80)
    x = torch.randn(*lead, K) * 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.rows_linear(x, native.pack_panels(lin.weight.detach()),
                                  None if lin.bias is None else lin.bias.detach(), *_act_args(act))
    finally:
        torch.set_num_threads(before)
    ref = _ACTS[act](F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double()))
    assert out.shape == (*lead, N)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_rows_linear_splits_few_rows_by_panels_and_gives_the_same_values(kernels):
    """`set_column_split_rows` returns the value before, refuses a negative count, and a product of 49 rows on two
    threads gives the same values split by its panels (the default) as split by its rows (0)."""
    lin = torch.nn.Linear(256, 512)
    x, panels = torch.randn(49, 256), native.pack_panels(lin.weight.detach())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        by_panels = kernels.rows_linear(x, panels, lin.bias.detach(), "gelu", "none")
        assert native.set_column_split_rows(0) == 64
        by_rows = kernels.rows_linear(x, panels, lin.bias.detach(), "gelu", "none")
        with pytest.raises(RuntimeError, match="set_column_split_rows: rows must be 0 or more, got -1"):
            native.set_column_split_rows(-1)
    finally:
        assert native.set_column_split_rows(64) == 0
        torch.set_num_threads(before)
    assert torch.equal(by_panels, by_rows)
    torch.testing.assert_close(by_panels, F.gelu(lin(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", list(_ACTS))
def test_the_epilogue_activations_hold_from_minus_60_to_60(kernels, act):
    """The activations on values from -60 to 60 (an identity product): the exponentials saturate without NaN or
    overflow, within a few fp32 ulp of ATen's float64 values (the erf GELU within its rational erf's 4.5e-7 on erf,
    times |x|/2; exactly x above x/√2 = 4 and 0 below -4)."""
    x = torch.linspace(-60, 60, 16 * 64).view(64, 16)
    out = kernels.rows_linear(x, native.pack_panels(torch.eye(16)), None, *_act_args(act))
    ref = _ACTS[act](x.double())
    assert torch.isfinite(out).all()
    if act == "gelu":
        assert ((out.double() - ref).abs() <= 4.5e-7 * x.double().abs() / 2 + 2e-6 * ref.abs() + 1e-12).all()
        far = x.abs() >= 4 * 2 ** 0.5
        assert torch.equal(out[far], torch.where(x[far] > 0, x[far], torch.zeros(())))
    else:
        torch.testing.assert_close(out, ref.float(), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("lead, K, N", [((49,), 3072, 48), ((26,), 1700, 96), ((3, 7), 48, 64), ((49,), 512, 400)])
@pytest.mark.parametrize("act", ["relu", "gelu", "none"])
def test_rows_linear_adds_a_residual_before_the_activation(kernels, lead, K, N, act):
    """act(x·Wᵀ + b + res) (a residual 1×1 convolution), into a new tensor (K summed in chunks where it is long)
    and into the residual itself (one chunk: each output is its own residual's place); on two threads, so that 49
    rows against 7 panels split the panels."""
    torch.manual_seed(K + N)
    lin = torch.nn.Linear(K, N)
    x, res = torch.randn(*lead, K), torch.randn(*lead, N)
    panels = native.pack_panels(lin.weight.detach())
    ref = _ACTS[act](F.linear(x.double(), lin.weight.double(), lin.bias.double()) + res.double()).float()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = kernels.rows_linear(x, panels, lin.bias.detach(), *_act_args(act), res)
        buf = res.clone()
        into = kernels.rows_linear_add_(buf, x, panels, lin.bias.detach(), *_act_args(act))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert into.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, words", [
    ((torch.randn(4, 8), torch.randn(16 * 7), None, "none", ""), r"packed by pack_panels"),
    ((torch.randn(4, 8), torch.randn(16 * 8), torch.randn(8), "none", ""), r"bias must be contiguous float32 \(16\)"),
    ((torch.randn(4, 8).double(), torch.randn(16 * 8), None, "none", ""), "float32"),
    ((torch.randn(4, 8), torch.randn(16 * 8), None, "tanh", ""), "act must be none, gelu, relu or swish"),
    ((torch.randn(4, 8), torch.randn(16 * 8), None, "none", "", torch.randn(4, 32)),
     r"the residual must be contiguous float32 of the output's shape \[4, 16\]"),
])
def test_rows_linear_names_what_is_wrong(kernels, args, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.rows_linear(*args)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_frozen_linears_take_the_panel_product_and_keep_onednn_when_switched_off(kernels, monkeypatch):
    """`OneDNNLinear` in fp32 runs on `native.rows_linear` (its oneDNN copy not packed); with HYBRIDZOO_NATIVE=0 set
    later it packs oneDNN's copy at its first call and gives the same outputs; bf16 copies keep oneDNN."""
    from hybridzoo.layers.onednn import OneDNNLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160)
    calls = []
    real = native.rows_linear
    monkeypatch.setattr(native, "rows_linear", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    frozen = OneDNNLinear(lin, act="swish", scale=1.702)   # QuickGELU's folding: swish(1.702 · (x·Wᵀ + b))
    assert frozen.panels is not None and frozen.packed_weight is None
    x = torch.randn(2, 50, 96)
    with torch.inference_mode():
        out = frozen(x)
        monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
        onednn = frozen(x)
    assert calls == [(2, 50, 96)] and frozen.packed_weight is not None
    ref = F.silu(1.702 * lin(x))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("HYBRIDZOO_NATIVE", "1")
    assert OneDNNLinear(lin, dtype=torch.bfloat16).panels is None
    assert OneDNNLinear(torch.nn.Linear(96, 100)).panels is None   # 100 outputs: padded panels (below)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("K,N,bias,act", [(96, 1000, True, "none"), (192, 500, False, "gelu"), (768, 100, True, "relu")])
@pytest.mark.parametrize("lead", [(1,), (3, 7), (63,)])
def test_frozen_linears_of_other_widths_take_the_panel_product_padded(kernels, monkeypatch, K, N, bias, act, lead):
    """A large weight of a width that is not a multiple of 16 (a classifier's 1,000 classes) runs on
    `native.rows_linear` too for fewer than 64 rows: padded by zero rows to a multiple of 16, the output cut back to
    N, contiguous. `panels` stays None (the token kernels read exact widths). With HYBRIDZOO_NATIVE=0 set later, 64
    rows or more, or a small weight: the products as before."""
    from hybridzoo.layers.onednn import OneDNNLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=bias)
    padded = -(-N // 16) * 16
    calls = []
    real = native.rows_linear
    monkeypatch.setattr(native, "rows_linear", lambda x, w, *a: calls.append(w.numel()) or real(x, w, *a))
    frozen = OneDNNLinear(lin, act=act)
    assert frozen.panels is None and frozen.packed_weight is None
    assert OneDNNLinear(torch.nn.Linear(72, 72)).padded_panels is None   # a small weight
    x, more = torch.randn(*lead, K), torch.randn(64, K)
    with torch.inference_mode():
        out, out_more = frozen(x), frozen(more)
        monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
        onednn = frozen(x)
    assert calls == [K * padded]
    assert out.shape == (*lead, N) and out.is_contiguous()
    ref = _ACTS[act](lin(x))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_more, _ACTS[act](lin(more)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("residual", [False, True])
def test_a_gated_pointwise_convolution_folds_the_gate_into_its_weight_for_one_image(kernels, monkeypatch, residual):
    """forward_gated(x, g) is forward(x · g): for one image on the panel product through `scale_panels` (x left as
    it was, even when the caller owns it), for two images, or with the kernels off, by scaling x (in place only
    where the caller owns it)."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(48, 32, 1)
    frozen = OneDNNConv2d(conv)
    scaled = []
    real = native.scale_panels
    monkeypatch.setattr(native, "scale_panels", lambda p, s: scaled.append(tuple(s.shape)) or real(p, s))
    with torch.inference_mode():
        for B, native_on in ((1, True), (2, True), (1, False)):
            monkeypatch.setenv("HYBRIDZOO_NATIVE", "1" if native_on else "0")
            scaled.clear()
            x = torch.randn(B, 48, 5, 7).contiguous(memory_format=torch.channels_last)
            g = torch.rand(B, 48, 1, 1)
            other = torch.randn(B, 32, 5, 7).contiguous(memory_format=torch.channels_last) if residual else None
            ref = conv(x * g) + (other if residual else 0)
            before = x.clone()
            out = frozen.forward_gated(x, g, None if other is None else other.clone())
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(x, before)
            assert scaled == ([(48,)] if B == 1 and native_on else [])
            out = frozen.forward_gated(x, g, None if other is None else other.clone(), x_owned=True)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(x, before) == (B == 1 and native_on)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("act", [None, torch.nn.ReLU(), torch.nn.GELU(approximate="tanh"), torch.nn.SiLU(),
                                 torch.nn.Hardswish()])
def test_frozen_pointwise_convolutions_take_the_panel_product(kernels, monkeypatch, act):
    """A 1×1 convolution (BatchNorm folded) with an activation the epilogue has runs on `native.rows_linear` over the
    channels-last pixels; Hardswish keeps oneDNN; switched off later, oneDNN's copy is packed and gives the same."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(48, 32, 1), torch.nn.BatchNorm2d(32).eval()
    perturb(bn)
    calls = []
    real = native.rows_linear
    monkeypatch.setattr(native, "rows_linear", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    frozen = OneDNNConv2d(conv, bn, act)
    x = torch.randn(2, 48, 5, 7)
    ref = bn(conv(x))
    ref = act(ref) if act is not None else ref
    with torch.inference_mode():
        out = frozen(x)
        monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")
        onednn = frozen(x)
    native_kind = not isinstance(act, torch.nn.Hardswish)
    assert calls == ([(70, 48)] if native_kind else []) and (frozen.panels is not None) == native_kind
    for y in (out, onednn):
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, C, H, W, stride", [(1, 384, 14, 14, 1), (2, 48, 7, 9, 2), (1, 16, 1, 1, 1),
                                                 (3, 64, 10, 5, 2), (1, 32, 2, 3, 1), (1, 32, 5, 21, 2),
                                                 (1, 16, 3, 8, 1)])
@pytest.mark.parametrize("act", ["none", "gelu", "relu", "swish", "gelu-tanh"])
def test_depthwise3x3_is_the_grouped_convolution(kernels, threads, B, C, H, W, stride, act):
    torch.manual_seed(B * C + H)
    conv = torch.nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=C != 48)
    x = torch.randn(B, C, H, W).contiguous(memory_format=torch.channels_last)
    taps = conv.weight.detach().reshape(C, 9).t().contiguous()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.depthwise3x3(x, taps, None if conv.bias is None else conv.bias.detach(), stride,
                                   *_act_args(act))
    finally:
        torch.set_num_threads(before)
    ref = _ACTS[act](F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                              stride=stride, padding=1, groups=C))
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    # with each image's channel means, summed by the kernel as it stores the rows
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pooled, mean = kernels.depthwise3x3_pooled(x, taps, None if conv.bias is None else conv.bias.detach(), stride,
                                                   *_act_args(act))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(pooled, out) and mean.shape == (B, C)
    torch.testing.assert_close(mean, ref.mean((2, 3)).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, C, m, H, W, stride", [(1, 16, 6, 11, 12, 2), (1, 192, 4, 7, 7, 1), (2, 48, 6, 9, 7, 2),
                                                    (3, 32, 2, 5, 6, 1), (1, 16, 3, 1, 1, 1)])
@pytest.mark.parametrize("act", ["none", "relu"])
def test_depthwise3x3_with_a_multiplier_is_the_grouped_convolution(kernels, threads, B, C, m, H, W, stride, act):
    """C → m·C, groups C: output j·C + g of the kernel is the grouped convolution's output g·m + j."""
    torch.manual_seed(B * C + m)
    conv = torch.nn.Conv2d(C, m * C, 3, stride, 1, groups=C)
    x = torch.randn(B, C, H, W).contiguous(memory_format=torch.channels_last)
    order = torch.arange(m * C).view(C, m).t().reshape(-1)   # position j·C + g holds channel g·m + j
    taps = conv.weight.detach()[order].reshape(m * C, 9).t().contiguous()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.depthwise3x3(x, taps, conv.bias.detach()[order].contiguous(), stride, *_act_args(act),
                                   multiplier=m)
    finally:
        torch.set_num_threads(before)
    ref = _ACTS[act](F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=stride, padding=1,
                              groups=C))[:, order]
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    _, mean = kernels.depthwise3x3_pooled(x, taps, conv.bias.detach()[order].contiguous(), stride, *_act_args(act),
                                          multiplier=m)
    torch.testing.assert_close(mean, ref.mean((2, 3)).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, words", [
    ((torch.randn(1, 16, 4, 4), torch.randn(9, 16), None, 1, "none", ""), "channels-last"),
    ((torch.randn(1, 24, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(9, 24), None, 1, "none",
      ""), "multiple of 16"),
    ((torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(3, 3, 16), None, 1,
      "none", ""), r"w9 must be contiguous float32 \(9, 16\)"),
    ((torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(9, 16), None, 3, "none",
      ""), "stride must be 1 or 2"),
    ((torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(9, 16), None, 1,
      "hardswish", ""), "act must be"),
    ((torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(9, 16), None, 1,
      "none", "", 0), "multiplier must be at least 1, got 0"),
    ((torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(9, 16), None, 1,
      "none", "", 2), r"w9 must be contiguous float32 \(9, 32\)"),
])
def test_depthwise3x3_names_what_is_wrong(kernels, args, words):
    with pytest.raises(RuntimeError, match="depthwise3x3: .*" + words):
        kernels.depthwise3x3(*args)
    with pytest.raises(RuntimeError, match="depthwise3x3_pooled: .*" + words):
        kernels.depthwise3x3_pooled(*args)


def test_the_pooled_depthwise_of_an_empty_map_is_nan(kernels):
    x = torch.randn(2, 16, 0, 5).contiguous(memory_format=torch.channels_last)
    y, mean = kernels.depthwise3x3_pooled(x, torch.randn(9, 16), None, 1)
    assert y.shape == (2, 16, 0, 5) and mean.shape == (2, 16) and bool(mean.isnan().all())
    assert bool(x.mean((2, 3)).isnan().all())   # as ATen's mean


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_frozen_depthwise_convolutions_take_the_native_kernel(kernels, monkeypatch):
    """A frozen depthwise 3×3 convolution with its BatchNorm folded (CvT's projections, MBConv) runs on
    `native.depthwise3x3` and gives the eager output; other kernels, strides and Hardswish keep oneDNN."""
    torch.manual_seed(0)
    calls = []
    real = native.depthwise3x3
    monkeypatch.setattr(native, "depthwise3x3", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    conv, bn = torch.nn.Conv2d(32, 32, 3, 2, 1, groups=32, bias=False), torch.nn.BatchNorm2d(32).eval()
    perturb(bn)
    frozen = OneDNNConv2d(conv, bn, torch.nn.GELU())
    x = torch.randn(2, 32, 9, 8)   # NCHW in: made channels-last on the way
    with torch.inference_mode():
        out = frozen(x)
        frozen.depthwise_taps = None
        onednn = frozen(x)
    ref = F.gelu(bn(conv(x)))
    assert calls == [(2, 32, 9, 8)] and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn, ref, rtol=1e-5, atol=1e-5)
    # with the channel means: the kernel's own (depthwise3x3 not called), or a pass over oneDNN's output
    pooled_calls = []
    real_pooled = native.depthwise3x3_pooled
    monkeypatch.setattr(native, "depthwise3x3_pooled", lambda x, *a: pooled_calls.append(1) or real_pooled(x, *a))
    with torch.inference_mode():
        for taps in (None, OneDNNConv2d(conv, bn, torch.nn.GELU()).depthwise_taps):
            frozen.depthwise_taps = taps
            y, mean = frozen.forward_pooled(x)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mean, ref.mean((2, 3)), rtol=1e-5, atol=1e-6)
    assert pooled_calls == [1] and calls == [(2, 32, 9, 8)]
    for other in (torch.nn.Conv2d(32, 32, 5, 1, 2, groups=32), torch.nn.Conv2d(32, 32, 3, 3, 1, groups=32),
                  torch.nn.Conv2d(32, 32, 3, 1, 1, groups=2)):
        assert OneDNNConv2d(other).depthwise_taps is None
    assert OneDNNConv2d(conv, act=torch.nn.Hardswish()).depthwise_taps is None


def _small_coatnet():
    torch.manual_seed(0)
    model = hybridzoo.create_model("coatnet_0", img_size=128, dims=(16, 32, 64, 64), depths=(1, 2, 3, 2),
                                   stem_width=16, head_hidden_size=64, num_classes=10).eval()
    perturb(model)
    return model


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("threads", [1, 2])
def test_frozen_coatnet_runs_its_transformer_stages_past_their_first_block_in_one_call(kernels, threads, monkeypatch):
    """S3 (8×8 tokens at 128 px) and S4 (4×4): each stage's first block (pooling, widening) as a module, the rest
    in one `token_blocks` call with their relative biases; S4's 16 tokens are too few rows for two threads. The
    model's values; another grid than the biases were built for, and hooks, keep the blocks in turn."""
    model = _small_coatnet()
    fast = optimize_for_cpu_inference(model)
    stages = [s for s in fast.stages if type(s) is onednn_tokens.RelativeTokenBlocks]
    assert len(stages) == 2
    for s in stages:
        s.mode = "tokens"
    calls = []
    real = native.token_blocks
    monkeypatch.setattr(native, "token_blocks", lambda x, params, heads, *a, bias=None: calls.append(
        (x.shape[1], len(heads), sum(b is not None for b in bias))) or real(x, params, heads, *a, bias=bias))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            x = torch.randn(1, 3, 128, 128)
            out = fast(x)
            assert calls == ([(64, 2, 2), (16, 1, 1)] if threads == 1 else [(64, 2, 2)])
            for s in stages:
                s.mode = "whole"
            whole, eager = fast(x), model(x)
            for s in stages:
                s.mode = "tokens"
            calls.clear()
            other = torch.randn(1, 3, 160, 160)   # a 10×10 grid at S3: biases resized by the blocks in turn
            torch.testing.assert_close(fast(other), model(other), rtol=1e-4, atol=1e-4)
            handle = stages[0][1].mlp.fc2.register_forward_hook(lambda m, a, o: calls.append("hook"))
            hooked = fast(x)
            handle.remove()
    finally:
        torch.set_num_threads(before)
    assert calls == (["hook", (16, 1, 1)] if threads == 1 else ["hook"])
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    torch.testing.assert_close(hooked, out, rtol=1e-5, atol=1e-5 * float(out.abs().max()))


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_one_thread_takes_the_native_call_and_never_python_shares(kernels, monkeypatch):
    """At one intra-op thread the blocks run as one native call (no Python between the kernels); where that call
    cannot run them (a hook) they run in turn, not as one Python share."""
    model = small_transformer("deit_small_patch16_224", img_size=128, embed_dim=64, depth=3, num_heads=2)
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    calls, shares = _spy(monkeypatch), []
    monkeypatch.setattr(onednn_tokens, "_run_shares", lambda *a: shares.append(1))
    x = torch.randn(1, 3, 128, 128)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = fast(x)
            assert calls == [(3, 1)]
            handle = fast.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: None)
            hooked = fast(x)
            handle.remove()
            eager = model(x)
    finally:
        torch.set_num_threads(before)
    assert calls == [(3, 1)] and shares == []
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    torch.testing.assert_close(hooked, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
