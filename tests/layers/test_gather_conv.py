"""Dense convolutions as a product of gathered patches on the native kernels (`native.gather_weight`,
`native.gather_conv`) and the frozen path's use of them (`OneDNNConv2d`: image stems, strided convolutions).

Checked against the convolution in float64: both layouts the patches are read in (an NCHW image's planes, a
channels-last map), padding on every side (including more padding than the kernel reaches), non-square kernels,
strides and maps, the kernel widths with loops of their own (3 and 7) and others, few rows against a wide weight (the
product split by the weight's panels), several images in a thread's block, every epilogue activation; the errors;
which frozen convolutions take the kernel, and the models that have them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hybridzoo
from hybridzoo.layers import native
from hybridzoo.layers.onednn import OneDNNConv2d, onednn_available, optimize_for_cpu_inference
# tests/conftest.py puts tests/ on sys.path
from _helpers import EPILOGUES, activation, perturb, with_threads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B, C, N, k, s, p, H, W", [
    (1, 3, 64, (7, 7), (2, 2), (3, 3), 38, 30),     # BoT50's stem, reduced: the 7-wide loop inside the map
    (2, 3, 32, (3, 3), (2, 2), (1, 1), 17, 20),     # CoAtNet's stem: the 3-wide loop; odd sides
    (1, 5, 48, (5, 3), (1, 3), (2, 0), 11, 14),     # non-square kernel and stride; a width of its own loop
    (3, 16, 16, (1, 1), (2, 2), (0, 0), 9, 7),      # a strided 1×1 (a ResNet shortcut), several images
    (1, 4, 16, (3, 3), (1, 1), (4, 4), 3, 2),       # padding past the kernel's reach: rows and columns of zeros
    (1, 16, 160, (1, 1), (2, 2), (0, 0), 6, 5),     # 9 rows against 3 panels: the product split by panels
    (2, 24, 80, (3, 3), (2, 2), (1, 1), 7, 7),      # a last panel of 16 outputs
])
@pytest.mark.parametrize("act", list(EPILOGUES))
def test_gather_conv_is_the_convolution(kernels, threads, channels_last, B, C, N, k, s, p, H, W, act):
    torch.manual_seed(B * C + N + H)
    conv = torch.nn.Conv2d(C, N, k, s, p, bias=N != 16)
    x = torch.randn(B, C, H, W)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    bias = None if conv.bias is None else conv.bias.detach()
    panels = kernels.gather_weight(conv.weight, channels_last)
    out = with_threads(threads, lambda: kernels.gather_conv(x, panels, bias, k, s, p, channels_last,
                                                            *EPILOGUES[act]))
    conv64 = F.conv2d(x.double(), conv.weight.double(), None if bias is None else bias.double(), s, p)
    ref = activation(conv64, *EPILOGUES[act])
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=2e-5)


def test_the_input_is_read_in_the_panels_layout(kernels):
    """An input in the other layout is copied to the panels' one (same values); panels of the other layout give
    another convolution (the rows' order is the weight's)."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(16, 32, 3, 2, 1)
    x = torch.randn(2, 16, 9, 9)
    ref = conv(x)
    for channels_last in (False, True):
        panels = kernels.gather_weight(conv.weight, channels_last)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = kernels.gather_conv(x.contiguous(memory_format=layout), panels, conv.bias.detach(), (3, 3),
                                      (2, 2), (1, 1), channels_last)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    wrong = kernels.gather_conv(x, kernels.gather_weight(conv.weight, True), conv.bias.detach(), (3, 3), (2, 2), (1, 1),
                                False)
    assert (wrong - ref).abs().max() > 0.1


@pytest.mark.parametrize("w", [torch.randn(24, 8, 3, 3), torch.randn(16, 8, 3), torch.ones(16, 8, 3, 3,
                                                                                            dtype=torch.int64)])
def test_gather_weight_names_what_is_wrong(kernels, w):
    with pytest.raises(ValueError, match=r"\(N, C, kh, kw\) weight with N a multiple of 16, got"):
        kernels.gather_weight(w, True)


_P = torch.zeros(16 * 27)   # a 3-channel 3×3 weight of 16 outputs, packed


@pytest.mark.parametrize("args, words", [
    ((torch.randn(3, 8, 8), _P, None, (3, 3), (1, 1), (1, 1), False), "batch of images"),
    ((torch.randn(1, 3, 8, 8, dtype=torch.float64), _P, None, (3, 3), (1, 1), (1, 1), False), "batch of images"),
    ((torch.randn(1, 3, 2, 8), _P, None, (3, 3), (1, 1), (0, 0), False), "do not fit images of 2×8 padded by 0×0"),
    ((torch.randn(1, 3, 8, 8), _P, None, (3, 3), (0, 1), (1, 1), False), "must be positive"),
    ((torch.randn(1, 3, 8, 8), _P, None, (3, 3), (1, 1), (-1, 1), False), "not negative"),
    ((torch.randn(1, 3, 8, 8), _P, None, (3,), (1, 1), (1, 1), False), "must be pairs"),
    ((torch.randn(1, 4, 8, 8), _P, None, (3, 3), (1, 1), (1, 1), False), r"weight of \(N, 36\) packed"),
    ((torch.randn(1, 3, 8, 8), _P, torch.zeros(8), (3, 3), (1, 1), (1, 1), False), r"bias must be contiguous "
                                                                                   r"float32 \(16\)"),
])
def test_gather_conv_names_what_is_wrong(kernels, args, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.gather_conv(*args)
    with pytest.raises(RuntimeError, match="act must be"):
        kernels.gather_conv(torch.randn(1, 3, 8, 8), _P, None, (3, 3), (1, 1), (1, 1), False, "hardswish")


def _spy(monkeypatch) -> list:
    calls = []
    real = native.gather_conv
    monkeypatch.setattr(native, "gather_conv", lambda x, *a: calls.append((tuple(x.shape), a[-3])) or real(x, *a))
    return calls


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_frozen_stems_and_strided_convolutions_take_the_gathered_product(kernels, monkeypatch):
    """A frozen image stem (BatchNorm folded, ReLU) runs on `native.gather_conv` from the image's planes, a strided
    3×3 of many channels from its channels-last map, and both give the eager output; switched off (GATHER_CONV) they
    are oneDNN's convolutions again. Fewer than 64 outputs, groups, dilation, a residual and Hardswish keep oneDNN;
    1×1 stride-1, patch, depthwise and Winograd convolutions keep their own kernels."""
    torch.manual_seed(0)
    calls = _spy(monkeypatch)
    stem, bn = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64).eval()
    perturb(bn)
    strided = torch.nn.Conv2d(32, 80, 3, 2, 1)
    frozen, frozen_strided = OneDNNConv2d(stem, bn, torch.nn.ReLU()), OneDNNConv2d(strided, act=torch.nn.GELU())
    assert frozen.gather and frozen_strided.gather
    x, y = torch.randn(2, 3, 30, 26), torch.randn(1, 32, 15, 12)   # y NCHW: read channels-last, as oneDNN's copy
    with torch.inference_mode():
        out, out_strided = frozen(x), frozen_strided(y)
        monkeypatch.setattr(OneDNNConv2d, "GATHER_CONV", False)
        onednn, onednn_strided = frozen(x), frozen_strided(y)
        monkeypatch.setattr(OneDNNConv2d, "GATHER_CONV", True)
        frozen(x, torch.randn(2, 64, 15, 13))   # a residual sum: oneDNN's post-op
    assert calls == [((2, 3, 30, 26), False), ((1, 32, 15, 12), True)]
    assert sorted(frozen._gather_panels) == [False] and sorted(frozen_strided._gather_panels) == [True]
    for got, oned, ref in ((out, onednn, F.relu(bn(stem(x)))), (out_strided, onednn_strided, F.gelu(strided(y)))):
        assert got.stride() == oned.stride() and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(oned, ref, rtol=1e-5, atol=1e-5)
    for other in (torch.nn.Conv2d(3, 48, 7, 2, 3), torch.nn.Conv2d(64, 64, 3, 2, 1, groups=2),
                  torch.nn.Conv2d(64, 64, 3, 2, 2, dilation=2), torch.nn.Conv2d(64, 72, 3, 2, 1),
                  torch.nn.Conv2d(64, 64, 1), torch.nn.Conv2d(3, 64, 16, 16), torch.nn.Conv2d(64, 64, 3, 2, 1, groups=64),
                  torch.nn.Conv2d(64, 64, 3, 1, 1)):
        assert not OneDNNConv2d(other).gather, other
    assert not OneDNNConv2d(stem, act=torch.nn.Hardswish()).gather
    assert OneDNNConv2d(torch.nn.Conv2d(64, 128, 1, 2)).gather   # a strided 1×1 (BoT50's shortcut)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("name, kwargs, gathered", [
    # the 7×7 stem, the strided 3×3 of stages 2 and 3 (stage 4 pools in its attention) and the strided 1×1
    # shortcuts of stages 2-4
    ("botnet_bot50", dict(stem_width=64, stage_sizes=(1, 1, 1, 1), num_heads=2, img_size=64), 6),
    # the 3×3 stride-2 stem convolution of 64 outputs
    ("coatnet_0", dict(img_size=64, dims=(64, 64, 64, 64), depths=(1, 1, 1, 1), stem_width=64, head_hidden_size=64,
                       dim_head=16), 1),
])
def test_frozen_models_run_their_gathered_convolutions(kernels, monkeypatch, name, kwargs, gathered):
    """Each convolution that takes the gathered product runs once per forward of one image and once per part of a
    split batch, and the model gives its eager values."""
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **kwargs).eval()
    perturb(model)
    fast = optimize_for_cpu_inference(model)
    assert sum(isinstance(m, OneDNNConv2d) and m.gather for m in fast.modules()) == gathered
    calls = _spy(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    assert len(calls) == gathered
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        with_threads(2, lambda: fast(x))   # the first batch of a shape also probes one image's memory
        calls.clear()
        ref, out = model(x), with_threads(2, lambda: fast(x))
    assert len(calls) == 2 * gathered
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
