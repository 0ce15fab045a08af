"""Dense 3×3 convolutions (stride 1, padding 1) by Winograd's F(2×2, 3×3) and F(4×4, 3×3) on the native kernels
(`native.winograd_weight`, `native.winograd3x3`) and the frozen path's use of them (`OneDNNConv2d`).

Checked against the convolution in float64: partial tiles at sides that are not a multiple of the tile, maps of one
pixel, a thread's share of the tiles running across images and in several passes, a last panel narrower than 64
outputs, every epilogue activation; the weight transforms against G·g·Gᵀ written out; the errors; which frozen
convolutions take the kernel, and BoT50's frozen model through it.
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


# the 4×4 tile's transforms have larger coefficients (up to 8, and 1/24 in G): errors ~10x the 2×2 tile's
_ATOL = {2: 2e-5, 4: 1e-4}


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, Cin, Cout, H, W", [
    (1, 64, 64, 14, 14),     # BoT50's stage-3 shape, reduced
    (2, 16, 80, 7, 9),       # odd sides: partial tiles; 80 outputs: a last panel of 16
    (1, 48, 16, 1, 1),       # one pixel: the tile's other three outputs are off the map
    (3, 32, 48, 5, 2),       # a thread's tiles run across images
    (1, 16, 16, 40, 36),     # 360 / 90 tiles: each thread's share in several passes
    (2, 16, 16, 6, 13),      # sides 2 and 1 past a multiple of 4
])
@pytest.mark.parametrize("act", list(EPILOGUES))
def test_winograd3x3_is_the_convolution(kernels, tile, threads, B, Cin, Cout, H, W, act):
    torch.manual_seed(B * Cin + H)
    conv = torch.nn.Conv2d(Cin, Cout, 3, 1, 1, bias=Cout != 48)
    x = torch.randn(B, Cin, H, W).contiguous(memory_format=torch.channels_last)
    bias = None if conv.bias is None else conv.bias.detach()
    u = kernels.winograd_weight(conv.weight, tile)
    assert u.shape == ((tile + 2) ** 2, Cout, Cin)
    out = with_threads(threads, lambda: kernels.winograd3x3(x, u, bias, *EPILOGUES[act]))
    conv64 = F.conv2d(x.double(), conv.weight.double(), None if bias is None else bias.double(), padding=1)
    ref = activation(conv64, *EPILOGUES[act])
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=_ATOL[tile])


_G = {2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
      4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
          [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]}


@pytest.mark.parametrize("tile", [2, 4])
def test_the_weight_transform_is_g_w_gt_packed(kernels, tile):
    """Position (i, j) of the transform: Σ G[i][k]·w[k][l]·G[j][l], each (Cout, Cin) matrix as pack_panels lays it."""
    torch.manual_seed(1)
    w = torch.randn(80, 24, 3, 3)
    g = torch.tensor(_G[tile], dtype=torch.float64)
    d = tile + 2
    u = kernels.winograd_weight(w, tile)
    assert u.shape == (d * d, 80, 24) and u.dtype == torch.float32
    for i in range(d):
        for j in range(d):
            ref = sum(g[i, k] * g[j, ll] * w[:, :, k, ll].double() for k in range(3) for ll in range(3))
            torch.testing.assert_close(u[d * i + j].reshape(-1), kernels.pack_panels(ref.float()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("w", [torch.randn(16, 8, 5, 5), torch.randn(24, 8, 3, 3), torch.randn(16, 8, 3),
                               torch.ones(16, 8, 3, 3, dtype=torch.int64)])
def test_the_weight_transform_names_what_is_wrong(kernels, w):
    with pytest.raises(ValueError, match=r"\(Cout, Cin, 3, 3\) weight with Cout a multiple of 16, got"):
        kernels.winograd_weight(w)
    with pytest.raises(ValueError, match="tile must be 2 or 4, got 3"):
        kernels.winograd_weight(torch.randn(16, 8, 3, 3), 3)


def _x(C=16, layout=torch.channels_last):
    return torch.randn(1, C, 4, 4).contiguous(memory_format=layout)


@pytest.mark.parametrize("args, words", [
    ((_x(layout=torch.contiguous_format), torch.zeros(16, 16, 16), None, "none", ""), "channels-last"),
    ((_x(24), torch.zeros(16, 16, 24), None, "none", ""), "multiple of 16"),
    ((_x(), torch.zeros(25, 16, 16), None, "none", ""), r"u must be a contiguous float32 \(16 or 36, Cout, 16\)"),
    ((_x(), torch.zeros(36, 16, 32), None, "none", ""), r"u must be a contiguous float32 \(16 or 36, Cout, 16\)"),
    ((_x(), torch.zeros(16, 24, 16), None, "none", ""), "Cout a multiple of 16"),
    ((_x(), torch.zeros(16, 16, 16), torch.zeros(8), "none", ""), r"bias must be contiguous float32 \(16\)"),
    ((_x(), torch.zeros(16, 16, 16), None, "hardswish", ""), "act must be"),
])
def test_winograd3x3_names_what_is_wrong(kernels, args, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.winograd3x3(*args)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, Cin, Cout, H, W", [
    (1, 64, 64, 14, 14),     # BoT50's stage-3 shape, reduced
    (2, 16, 80, 7, 9),       # odd sides: partial tiles, whose cut-off outputs have no gradient
    (1, 48, 16, 1, 1),       # one pixel
    (3, 32, 48, 5, 2),       # a thread's tiles run across images
    (1, 16, 32, 40, 36),     # each thread's share in several passes
])
def test_winograd_weight_grad_is_the_convolutions(kernels, tile, threads, B, Cin, Cout, H, W):
    """The weight gradient by the tiles (Σ over tiles of Ãᵀ_e·V_e per position, then Gᵀ·M·G) against the
    convolution's in float64; each thread's partial sums added (one, two and three threads)."""
    torch.manual_seed(B * Cin + H + tile)
    x = torch.randn(B, Cin, H, W).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(B, Cout, H, W).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(Cout, Cin, 3, 3, dtype=torch.float64)
    ref = torch.ops.aten.convolution_backward(dy.double(), x.double(), w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                              1, [False, True, False])[1]
    got = with_threads(threads, lambda: kernels.winograd_weight_grad(x, dy, tile))
    assert got.shape == (Cout, Cin, 3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=_ATOL[tile] * (B * H * W) ** 0.5)


@pytest.mark.parametrize("args, words", [
    ((_x(layout=torch.contiguous_format), _x()), "x must be a channels-last"),
    ((_x(24), _x()), "x must be a channels-last float32 .* multiple of 16"),
    ((_x(), _x(layout=torch.contiguous_format)), "dy must be a channels-last"),
    ((_x(), torch.zeros(1, 16, 4, 5).contiguous(memory_format=torch.channels_last)), "of x's batch and size"),
    ((_x(), _x(24)), "Cout a multiple of 16"),
    ((_x(), _x().double()), "dy must be a channels-last float32"),
])
def test_winograd_weight_grad_names_what_is_wrong(kernels, args, words):
    with pytest.raises(RuntimeError, match=words):
        kernels.winograd_weight_grad(*args)
    with pytest.raises(RuntimeError, match="tile must be 2 or 4, got 3"):
        kernels.winograd_weight_grad(_x(), _x(), 3)


def _spy(monkeypatch) -> list:
    calls = []
    real = native.winograd3x3
    monkeypatch.setattr(native, "winograd3x3", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    return calls


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_frozen_3x3_convolutions_take_winograd(kernels, monkeypatch):
    """A frozen dense 3×3 stride-1 convolution with its BatchNorm folded runs on `native.winograd3x3` and gives the
    eager output; switched off (WINOGRAD_3X3) it is oneDNN's convolution again. Strides, other kernels, groups,
    channel counts off the multiple of 16, a residual and Hardswish keep oneDNN."""
    torch.manual_seed(0)
    calls = _spy(monkeypatch)
    conv, bn = torch.nn.Conv2d(32, 48, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(48).eval()
    perturb(bn)
    frozen = OneDNNConv2d(conv, bn, torch.nn.ReLU())
    assert frozen.winograd_weight.shape == (36, 48, 32)   # 4×4 tiles by default
    x = torch.randn(2, 32, 9, 8)   # NCHW in: made channels-last on the way
    with torch.inference_mode():
        out = frozen(x)
        monkeypatch.setattr(OneDNNConv2d, "WINOGRAD_3X3", False)
        onednn = frozen(x)
        monkeypatch.setattr(OneDNNConv2d, "WINOGRAD_3X3", True)
        frozen(x, torch.randn(2, 48, 9, 8))   # a residual sum: oneDNN's post-op
    ref = F.relu(bn(conv(x)))
    assert calls == [(2, 32, 9, 8)] and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn, ref, rtol=1e-5, atol=1e-5)
    for other in (torch.nn.Conv2d(32, 48, 3, 2, 1), torch.nn.Conv2d(32, 48, 5, 1, 2), torch.nn.Conv2d(32, 48, 3, 1, 0),
                  torch.nn.Conv2d(32, 48, 3, 1, 1, dilation=2), torch.nn.Conv2d(32, 48, 3, 1, 1, groups=2),
                  torch.nn.Conv2d(3, 48, 3, 1, 1), torch.nn.Conv2d(32, 40, 3, 1, 1)):
        assert OneDNNConv2d(other).winograd_weight is None
    assert OneDNNConv2d(conv, act=torch.nn.Hardswish()).winograd_weight is None
    # 4×4 tiles up to 128² channel pairs, 2×2 tiles above (fewer transformed weights to stream)
    assert OneDNNConv2d(torch.nn.Conv2d(128, 128, 3, 1, 1)).winograd_weight.shape == (36, 128, 128)
    assert OneDNNConv2d(torch.nn.Conv2d(128, 144, 3, 1, 1)).winograd_weight.shape == (16, 144, 128)
    monkeypatch.setattr(OneDNNConv2d, "WINOGRAD_TILE", 2)
    assert OneDNNConv2d(conv).winograd_weight.shape == (16, 48, 32)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_frozen_bot50_runs_its_3x3_convolutions_on_winograd(kernels, monkeypatch):
    """A reduced BoT50 wide enough for the kernel (16-160 channels, two blocks a stage): each of its stride-1 3×3
    convolutions once per forward (the first block of stages 2 and 3 has its stride in the 3×3: oneDNN), and the
    model's values."""
    torch.manual_seed(0)
    model = hybridzoo.create_model("botnet_bot50", stem_width=16, stage_sizes=(1, 2, 2, 2), num_heads=2,
                                   img_size=64).eval()
    perturb(model)
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and m.stride == (1, 1) and m.groups == 1 and m.in_channels % 16 == 0]
    fast = optimize_for_cpu_inference(model)
    calls = _spy(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    assert len(dense) == 3 and len(calls) == 3
    assert sum(isinstance(m, OneDNNConv2d) and m.winograd_weight is not None for m in fast.modules()) == 3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # a batch of 5 on two threads: split into parts, each on a thread of its own calling the kernel at one thread
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        # the first batch of a shape also probes one image's memory (one more forward)
        with_threads(2, lambda: fast(x))
        calls.clear()
        ref, out = model(x), with_threads(2, lambda: fast(x))
    assert len(calls) == 6 and sorted({c[0] for c in calls}) == [2, 3]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
