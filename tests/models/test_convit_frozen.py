"""ConViT's frozen GPSA on the CPU inference path (`optimize_for_cpu_inference`): the same function as eager.

The frozen GPSA merges q, k and the gated v into one product (q's rows carry the attention scale, v's the 1 − σ(λ)
of their head) and runs every image through `gpsa_attend`, (softmax(q kᵀ) + P′)·v′. Gates are drawn at random per
head so that a gate folded into the wrong rows, or one head's map given to another, shows.
"""

from __future__ import annotations

import pytest
import torch

import hybridzoo
from hybridzoo.layers.onednn import OneDNNLinear, onednn_available, optimize_for_cpu_inference
from hybridzoo.models.convit import GPSA, gpsa_attend, relative_indices
from hybridzoo.registry import get_card
from _helpers import perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")


@torch.no_grad()
def _random_gates(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, GPSA):
            m.gating_param.copy_(2.0 * torch.randn(m.gating_param.shape, generator=g))


def test_gpsa_attend_is_the_softmax_plus_the_positional_map_times_the_values():
    torch.manual_seed(0)
    h, n, N, d = 3, 5, 7, 4
    q, k, v, pos = torch.randn(h, n, d), torch.randn(h, N, d), torch.randn(h, N, d), torch.rand(h, n, N)
    ref = torch.stack([((q[i] @ k[i].T).softmax(-1) + pos[i]) @ v[i] for i in range(h)])
    torch.testing.assert_close(gpsa_attend(q, k, v, pos), ref, rtol=1e-5, atol=1e-6)
    # strided views as the frozen GPSA passes them (one image's rows of the merged q | k | v product)
    qkv = torch.randn(N, 3, h, d)
    q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)
    ref = torch.stack([((q[i] @ k[i].T).softmax(-1) + pos[i, :1].expand(N, N)) @ v[i] for i in range(h)])
    torch.testing.assert_close(gpsa_attend(q, k, v, pos[:, :1].expand(h, N, N)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads", [4, 9])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_frozen_gpsa_equals_the_module(heads, bias, batch):
    torch.manual_seed(0)
    gpsa = GPSA(heads * 4, num_heads=heads, qkv_bias=bias).eval()
    perturb(gpsa)
    with torch.no_grad():
        gpsa.gating_param.copy_(2.0 * torch.randn(heads))
    frozen = gpsa.freeze_for_cpu_inference()
    assert type(frozen) is not GPSA and frozen.qkv.out_features == 3 * gpsa.dim
    assert (frozen.qkv.bias is not None) == bias
    rel = relative_indices((3, 5))
    x = torch.randn(batch, 15, gpsa.dim)
    with torch.inference_mode():
        torch.testing.assert_close(frozen(x, rel), gpsa(x, rel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["convit_tiny", "convit_small"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fast_path_equals_eager_at_batch_one_and_more(threads, name, n_threads):
    # batch 1 and 3 (the batch split cuts 3 into 2 + 1 with two threads); `model(x)` computes the class token alone
    # in the last block, `forward_features` every row
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs).eval()
    perturb(model)
    _random_gates(model)
    fast = optimize_for_cpu_inference(model)
    attn = fast.blocks[0].attn
    assert isinstance(attn.qkv, OneDNNLinear) and not hasattr(attn, "qk") and not hasattr(attn, "v")
    threads(n_threads)
    side = card.test_input_size[-1]
    for x in (torch.randn(1, 3, side, side), torch.randn(3, 3, side, side), torch.randn(2, 3, side + 32, side)):
        with torch.inference_mode():
            ref, out = model(x), fast(x)
            ref_features, features = model.forward_features(x), fast.forward_features(x)
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4 * float(ref_features.abs().max()))


def test_frozen_gpsa_names_a_wrong_input():
    torch.manual_seed(0)
    frozen = GPSA(16, num_heads=4).eval().freeze_for_cpu_inference()
    rel = relative_indices((2, 3))
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"B×N×16.*\(6, 16\)"):
            frozen(torch.randn(6, 16), rel)
        with pytest.raises(ValueError, match=r"B×N×16.*\(1, 6, 12\)"):
            frozen(torch.randn(1, 6, 12), rel)
        with pytest.raises(ValueError, match="rel_indices are for 6 tokens, the input has 8"):
            frozen(torch.randn(1, 8, 16), rel)
