"""The frozen MLP (`layers.onednn.FrozenMlp`): fc1 with its activation fused → fc2, in row chunks when the hidden
layer is big. Every chunking equals the eager `Mlp` to fp32 rounding: row counts not divisible by the chunk,
one row, one-row chunks, widths nobody tuned for, and whole models through `optimize_for_cpu_inference`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridzoo
from hybridzoo.layers.mlp import Mlp, QuickGELU
from hybridzoo.layers.onednn import FrozenMlp, OneDNNLinear, onednn_available, optimize_for_cpu_inference
from hybridzoo.registry import get_card
from _helpers import perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")


def _frozen(mlp: Mlp) -> FrozenMlp:
    fast = optimize_for_cpu_inference(nn.Sequential(mlp))[0]
    assert type(fast) is FrozenMlp
    return fast


def _chunks_seen(fast: FrozenMlp) -> list[int]:
    """Rows of every fc1 call in the next forward (a hook on the packed layer)."""
    seen: list[int] = []
    fast.fc1.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0] if a[0].dim() == 2 else -1))
    return seen


@pytest.mark.parametrize("act", [QuickGELU, nn.GELU, nn.ReLU])
@pytest.mark.parametrize("shape, chunk", [((2, 37, 5), 8), ((1, 1, 5), 4), ((3, 16, 5), 16), ((2, 5, 5), 1),
                                          ((11, 5), 3)])
def test_chunked_mlp_is_the_eager_mlp(act, shape, chunk, monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(5, 7, out_features=6, act_layer=act).eval()   # widths nobody tuned for, out ≠ in
    x = 3 * torch.randn(shape)
    fast = _frozen(mlp)
    rows = x.numel() // 5
    # every hidden layer chunked, `chunk` rows per chunk (7 fp32 hidden features per row)
    monkeypatch.setattr(FrozenMlp, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(FrozenMlp, "CHUNK_BYTES", chunk * 7 * 4 + 3)
    seen = _chunks_seen(fast)
    with torch.inference_mode():
        ref, out = mlp(x), fast(x)
    assert out.shape == ref.shape == (*shape[:-1], 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    expected = [min(chunk, rows - i) for i in range(0, rows, chunk)] if chunk < rows else [-1]
    assert seen == expected


def test_small_hidden_layers_run_whole_and_big_ones_in_chunks(monkeypatch):
    fast = _frozen(Mlp(192, 768, act_layer=QuickGELU))
    # CvT-13's stage 2 at 16 images (one thread's share of batch 32): 38 MB of hidden layer → chunks of ~2 MB
    assert fast.chunk_rows(16 * 784) == 2 * 1024 * 1024 // (768 * 4) == 682
    # at one image (2.4 MB) and up to the 32 MB limit it runs whole
    assert fast.chunk_rows(784) == 784
    # exactly 32 MB of hidden layer runs whole, one row more in chunks (stage 1's width: 1 KiB per row)
    stage1 = _frozen(Mlp(64, 256, act_layer=QuickGELU))
    assert stage1.chunk_rows(32 * 1024) == 32 * 1024 and stage1.chunk_rows(32 * 1024 + 1) == 2048
    # DeiT-S / stage 3's shape (3152 × 1536, 19 MB) runs whole: chunking it measured 1–5% slower
    assert _frozen(Mlp(384, 1536)).chunk_rows(3152) == 3152
    # a chunk is at least one row, however small CHUNK_BYTES is
    monkeypatch.setattr(FrozenMlp, "CHUNK_BYTES", 1)
    assert fast.chunk_rows(10**6) == 1


def test_whole_models_with_every_mlp_chunked(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(FrozenMlp, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(FrozenMlp, "CHUNK_BYTES", 4096 + 5)   # a few rows of every test-size model's hidden layer
    for name, size in (("cvt_13", 64), ("deit_small_patch16_224", 32)):
        model = hybridzoo.create_model(name, **get_card(name).test_kwargs).eval()
        perturb(model)
        fast = optimize_for_cpu_inference(model)
        mlps = [m for m in fast.modules() if type(m) is FrozenMlp]
        assert mlps and not any(type(m) is Mlp for m in fast.modules())
        calls: list[int] = []
        for m in mlps:
            m.fc1.register_forward_hook(lambda mod, a, out: calls.append(1))
        for batch in (3, 1):
            x = torch.randn(batch, 3, size, size)
            calls.clear()
            with torch.inference_mode():
                ref, out = model(x), fast(x)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
            assert len(calls) > len(mlps), "no MLP ran in chunks"


def test_frozen_mlp_names_what_is_wrong():
    fast = _frozen(Mlp(6, 12))
    with torch.inference_mode(), pytest.raises(ValueError, match=r"6 features in the last dimension.*\(2, 5\)"):
        fast(torch.randn(2, 5))
    fc1 = OneDNNLinear(nn.Linear(4, 8), "relu")
    with pytest.raises(ValueError, match="fc1 gives 8 features but fc2 takes 9"):
        FrozenMlp(fc1, OneDNNLinear(nn.Linear(9, 4)))


def test_unfusable_activation_keeps_the_mlp():
    # no oneDNN post-op for Tanh: the Mlp stays, its linears packed one by one
    fast = optimize_for_cpu_inference(nn.Sequential(Mlp(4, 8, act_layer=nn.Tanh)))[0]
    assert type(fast) is Mlp and isinstance(fast.fc1, OneDNNLinear) and isinstance(fast.act, nn.Tanh)


def test_bf16_chunks_count_bf16_bytes(monkeypatch):
    mlp = Mlp(8, 16).eval()
    fast = optimize_for_cpu_inference(nn.Sequential(mlp), dtype=torch.bfloat16)[0]
    monkeypatch.setattr(FrozenMlp, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(FrozenMlp, "CHUNK_BYTES", 16 * 2 * 3)   # 3 rows of bf16 hidden layer
    assert fast.chunk_rows(10) == 3
    x = torch.randn(10, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    with torch.inference_mode():
        ref = mlp(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
