"""CvT's blocks on one image in one native call (`native.conv_token_blocks`, batch-1 inference through
`optimize_for_cpu_inference`; `layers.onednn_tokens.ConvTokenBlockList`).

Checked against the blocks written out in float64 (the cls token bypassing the convolutions, odd maps, key / value
strides 1 and 2, head dims 16-64, fc1's activations, missing biases, one to three threads, shares that split a map
row or hold the cls token alone), against the frozen model's blocks in turn and the eager model, for where the
call is taken and where not (hooks, training mode, parts it does not run), and for the errors it gives.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hybridzoo
from hybridzoo.layers import native, onednn_tokens
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.layers.onednn_tokens import ConvTokenBlockList
from _helpers import activation, perturb  # tests/conftest.py puts tests/ on sys.path


def _blocks(L, C, hidden, *, bias=True, seed=0):
    """Random parameters of L CvT blocks (float32 masters, used in float64 by the reference)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(L):
        p = {name: (1 + 0.2 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g))
             for name in ("ln1", "ln2")}
        for name in ("dq", "dk", "dv"):   # depthwise taps (C, 3, 3) and the folded BatchNorm's bias
            p[name] = (0.3 * torch.randn(C, 3, 3, generator=g), 0.1 * torch.randn(C, generator=g) if bias else None)
        for name, (n_out, n_in) in {"q": (C, C), "k": (C, C), "v": (C, C), "proj": (C, C), "fc1": (hidden, C),
                                    "fc2": (C, hidden)}.items():
            p[name] = (torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in),
                       0.1 * torch.randn(n_out, generator=g) if bias else None)
        blocks.append(p)
    return blocks


def _args(blocks, size, cls, kv_stride, H, scale, eps, act, algorithm):
    params = []
    for p in blocks:
        params += [*p["ln1"]]
        for name in ("dq", "dk", "dv"):
            params += [p[name][0].reshape(-1, 9).t().contiguous(), p[name][1]]
        for name in ("q", "k", "v", "proj"):
            params += [native.pack_panels(p[name][0]), p[name][1]]
        params += [*p["ln2"], native.pack_panels(p["fc1"][0]), p["fc1"][1], native.pack_panels(p["fc2"][0]),
                   p["fc2"][1]]
    L = len(blocks)
    return params, size, cls, (1, kv_stride), [H] * L, [scale] * L, [eps] * (2 * L), [act] * L, [algorithm] * L


def _reference(x, blocks, size, cls, kv_stride, H, scale, eps, act, algorithm):
    """The blocks in float64, written out as the paper's block: LayerNorm; the cls token split off; depthwise 3×3
    (padding 1) projections, q at stride 1, k and v at kv_stride; the cls row put back in front; the linear maps;
    softmax attention; the output projection, + x; LayerNorm, fc1, activation, fc2, + x."""
    h = x.double()[0]
    N, C = h.shape
    d, (Hm, Wm) = C // H, size
    lin = lambda t, wb: F.linear(t, wb[0].double(), None if wb[1] is None else wb[1].double())   # noqa: E731

    def conv(y, wb, stride):
        m = y[cls:].t().reshape(1, C, Hm, Wm)
        out = F.conv2d(m, wb[0].double()[:, None], None if wb[1] is None else wb[1].double(), stride, 1, groups=C)
        return torch.cat((y[:cls], out.flatten(2)[0].t()), dim=0)

    for p in blocks:
        y = F.layer_norm(h, (C,), p["ln1"][0].double(), p["ln1"][1].double(), eps)
        q = lin(conv(y, p["dq"], 1), p["q"])
        k, v = lin(conv(y, p["dk"], kv_stride), p["k"]), lin(conv(y, p["dv"], kv_stride), p["v"])
        heads = lambda t: t.view(-1, H, d).transpose(0, 1)   # noqa: E731
        a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * scale, dim=-1)
        h = h + lin((a @ heads(v)).transpose(0, 1).reshape(N, C), p["proj"])
        y = F.layer_norm(h, (C,), p["ln2"][0].double(), p["ln2"][1].double(), eps)
        h = h + lin(activation(lin(y, p["fc1"]), act, algorithm), p["fc2"])
    return h.float()[None]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cls, size, C, H, hidden, kv_stride, act, algorithm, bias", [
    (0, (8, 8), 64, 1, 256, 2, "swish", "", True),       # CvT's stage 1 shape, reduced: 64 tokens, d = 64
    (1, (7, 7), 96, 2, 384, 2, "swish", "", True),       # stage 3: the cls token first; odd map, d = 48
    (1, (5, 9), 64, 4, 144, 2, "gelu", "none", False),   # d = 16, a 5 × 9 map (3 × 5 keys), no biases
    (0, (6, 5), 32, 1, 96, 1, "gelu", "tanh", True),     # keys at stride 1; d = 32
    (1, (3, 4), 48, 1, 32, 2, "relu", "", True),         # 13 tokens: shares of 4-5 rows, 7 keys
    (1, (1, 2), 16, 1, 48, 2, "none", "", True),         # 3 tokens: at 3 threads the cls token is one share
])
def test_conv_token_blocks_are_the_blocks_written_out(kernels, threads, cls, size, C, H, hidden, kv_stride, act,
                                                      algorithm, bias):
    L, eps = 3, 1e-5
    scale = C ** -0.5   # CvT's: the full width
    N = cls + size[0] * size[1]
    blocks = _blocks(L, C, hidden, bias=bias, seed=N * C + H)
    x = torch.randn(1, N, C, generator=torch.Generator().manual_seed(N))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.conv_token_blocks(x, *_args(blocks, size, cls, kv_stride, H, scale, eps, act, algorithm))
    finally:
        torch.set_num_threads(before)
    ref = _reference(x, blocks, size, cls, kv_stride, H, scale, eps, act, algorithm)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))
    if cls:   # the last block computing the cls token's row alone: that row of the whole computation
        torch.set_num_threads(threads)
        try:
            first = kernels.conv_token_blocks(x, *_args(blocks, size, cls, kv_stride, H, scale, eps, act, algorithm),
                                              prefix=1)
        finally:
            torch.set_num_threads(before)
        assert first.shape == (1, 1, C)
        torch.testing.assert_close(first, ref[:, :1], rtol=1e-5, atol=2e-5 * float(ref.abs().max()))


def _good():
    blocks = _blocks(2, 64, 128, seed=1)
    return [torch.randn(1, 1 + 4 * 5, 64), *_args(blocks, (4, 5), 1, 2, 2, 0.125, 1e-5, "swish", "")]


def _bad(change):
    args = _good()
    change(args)
    return args


@pytest.mark.parametrize("make, words", [
    (lambda: _bad(lambda a: a.__setitem__(0, torch.randn(2, 21, 64))), r"one image's tokens"),
    (lambda: _bad(lambda a: a.__setitem__(0, torch.randn(1, 20, 64))), r"\(1, 21, C\) .* 4×5 map and 1 cls token"),
    (lambda: _bad(lambda a: a.__setitem__(0, torch.randn(1, 21, 64).double())), r"one image's tokens"),
    (lambda: _bad(lambda a: a.__setitem__(1, a[1][:-1])), "expected 44 params"),
    (lambda: _bad(lambda a: a.__setitem__(3, 2)), "cls 0 or 1"),
    (lambda: _bad(lambda a: a.__setitem__(4, (1, 3))), r"strides \(q, kv\) each 1 or 2"),
    (lambda: _bad(lambda a: a.__setitem__(4, (2, 2))), "the q projection's stride must be 1"),
    (lambda: _bad(lambda a: a.__setitem__(5, [8, 2])), "head_dim must be 16, 32, 48 or 64"),
    (lambda: _bad(lambda a: a.__setitem__(8, ["gelu", "tanh"])), "act must be none, gelu, relu or swish"),
    (lambda: _bad(lambda a: a[1].__setitem__(2, torch.randn(9, 48))), r"parameter 2 must be .* 576 values"),
    (lambda: _bad(lambda a: a[1].__setitem__(22 + 8, None)), r"block 1: parameter 8 \(a weight\) is missing"),
    (lambda: _bad(lambda a: a.append(2)), "prefix must be 0 .* or 1 with a cls token"),
    (lambda: _bad(lambda a: (a.__setitem__(0, torch.randn(1, 20, 64)), a.__setitem__(3, 0), a.append(1))),
     r"prefix must be 0 .* got prefix 1 with cls 0"),
])
def test_conv_token_blocks_name_what_is_wrong(kernels, make, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.conv_token_blocks(*make())


def _spy(monkeypatch):
    calls = []
    real = native.conv_token_blocks
    monkeypatch.setattr(native, "conv_token_blocks", lambda x, params, size, cls, strides, heads, *a: calls.append(
        (tuple(x.shape), cls, len(heads), a[-1])) or real(x, params, size, cls, strides, heads, *a))
    return calls


def _small_cvt():
    torch.manual_seed(0)
    model = hybridzoo.create_model("cvt_13", dims=(32, 48, 64), heads=(1, 3, 2), depths=(1, 2, 3),
                                   num_classes=10).eval()
    perturb(model)
    return model


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_frozen_cvt_runs_each_stage_in_one_native_call(kernels, threads, monkeypatch):
    """Every stage's blocks in one call at batch 1 (the last stage's last block computing the cls token alone, as
    the model's forward does), with the model's values; `forward_features` takes every row of every block."""
    model = _small_cvt()
    fast = optimize_for_cpu_inference(model)
    lists = [s.blocks for s in fast.stages]
    assert all(type(b) is ConvTokenBlockList for b in lists)
    for b in lists:
        b.mode = "tokens"
    calls = _spy(monkeypatch)
    x = torch.randn(1, 3, 96, 96)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = fast(x)
            assert calls == [((1, 576, 32), 0, 1, 0), ((1, 144, 48), 0, 2, 0), ((1, 37, 64), 1, 3, 1)]
            assert torch.get_num_threads() == threads
            features = fast.forward_features(x)
            assert calls[3:] == [((1, 576, 32), 0, 1, 0), ((1, 144, 48), 0, 2, 0), ((1, 37, 64), 1, 3, 0)]
            for b in lists:
                b.mode = "whole"
            whole, whole_features = fast(x), fast.forward_features(x)
            eager, eager_features = model(x), model.forward_features(x)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 6
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    torch.testing.assert_close(features, whole_features, rtol=1e-5, atol=1e-5 * float(whole_features.abs().max()))
    torch.testing.assert_close(features, eager_features, rtol=1e-4, atol=1e-4 * float(eager_features.abs().max()))


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_hooks_training_and_parts_it_does_not_run_keep_the_blocks_in_turn(kernels, monkeypatch):
    model = _small_cvt()
    fast = optimize_for_cpu_inference(model)
    for s in fast.stages:
        s.blocks.mode = "tokens"
    calls, seen = _spy(monkeypatch), []
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        ref = fast(x)
        assert len(calls) == 3
        # a hook on a module of the second stage's blocks sees its call: that stage runs its blocks in turn
        handle = fast.stages[1].blocks[0].attn.proj_k.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
        out = fast(x)
        handle.remove()
        assert len(calls) == 5 and seen == [torch.Size([1, 36, 48])]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        # stochastic depth in training mode is not the identity: no native call (a slice keeps the mode)
        fast.train()
        assert fast.stages[2].blocks[:-1].training
        fast(x)
        assert len(calls) == 5
        fast.eval()
        assert not fast.stages[2].blocks[:-1].training
    # a head dim without an attention kernel (8) or a product whose outputs are not a multiple of 16: no call
    for kw in (dict(dims=(16, 32, 64), heads=(2, 4, 8)), dict(dims=(16, 40, 64), heads=(1, 1, 1))):
        fast = optimize_for_cpu_inference(hybridzoo.create_model("cvt_13", depths=(1, 1, 1), **kw).eval())
        stages = fast.stages
        assert onednn_tokens._conv_native_args(stages[1].blocks, torch.randn(1, 4, 4)) is None
