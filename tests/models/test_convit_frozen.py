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
from hybridzoo.layers import native
from hybridzoo.models.convit import GPSA, ConViT, gpsa_attend, relative_indices
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


def _one_image_model(threads, n_threads: int):
    """A ConViT the native kernels run whole (head dim 16, 64 patches: 32 rows per thread at two), frozen, its
    blocks' container set to split the tokens (no timed choice)."""
    if not (native.load() and native.attention_supported()):
        pytest.skip("no native kernels for this CPU (or no compiler to build them)")
    torch.manual_seed(0)
    model = hybridzoo.create_model("convit_tiny", embed_dim=64, num_heads=4, depth=4, local_up_to_layer=2,
                                   img_size=64, patch_size=8).eval()
    perturb(model)
    _random_gates(model)
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    threads(n_threads)
    return model, fast


def _general_path(fast, x):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConViT, "_one_image", lambda self, x: None)
        return fast(x)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_one_image_in_native_calls_gives_the_general_paths_values(threads, monkeypatch, n_threads):
    model, fast = _one_image_model(threads, n_threads)
    x = torch.randn(1, 3, 64, 64)
    calls = []
    token_blocks = native.token_blocks
    monkeypatch.setattr(native, "token_blocks", lambda t, *a: calls.append((tuple(t.shape), a[-1])) or token_blocks(t, *a))
    monkeypatch.setattr(ConViT, "_tokens", lambda *a, **k: pytest.fail("the general path ran"))
    with torch.inference_mode():
        out = fast(x)
        out2 = fast(x)   # the kept plan
        monkeypatch.undo()
        general, eager = _general_path(fast, x), model(x)
    # the GPSA blocks on the 64 patches, then the MHSA blocks on 65 rows computing the class row alone
    assert calls == [((1, 64, 64), 0), ((1, 65, 64), 1)] * 2
    torch.testing.assert_close(out, general, rtol=0, atol=0)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


def test_one_image_leaves_to_the_general_path_what_it_does_not_run(threads):
    model, fast = _one_image_model(threads, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert fast._one_image(x) is not None
        # another image size (the position embedding resampled), a batch, a hook anywhere, a global hook, "whole"
        # blocks or blocks not yet timed, training
        for other in (torch.randn(1, 3, 96, 64), torch.randn(2, 3, 64, 64)):
            assert fast._one_image(other) is None
            torch.testing.assert_close(fast(other), model(other), rtol=1e-4, atol=1e-4)
        seen = []
        handle = fast.norm.register_forward_hook(lambda m, a, o: seen.append(o.shape))
        assert fast._one_image(x) is None
        fast(x)
        assert seen == [(1, 1, 64)]
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
        assert fast._one_image(x) is None
        handle.remove()
        assert fast._one_image(x) is not None
        fast.blocks.mode = "whole"
        assert fast._one_image(x) is None
        fast.blocks.mode = "auto"
        assert fast._one_image(x) is None   # until the first call has timed both ways
        fast(x)
        timed = fast.blocks._choices   # (first block, blocks, rows, threads) → split the tokens
        assert (fast._one_image(x) is not None) == (timed[(id(fast.blocks[0]), 2, 64, 2)]
                                                    and timed[(id(fast.blocks[2]), 2, 65, 2)])
        fast.blocks.mode = "tokens"
        fast.training = True
        assert fast._one_image(x) is None
        fast.training = False
        assert fast._one_image(x) is not None


def test_one_image_follows_a_block_replaced_in_the_container(threads):
    _, fast = _one_image_model(threads, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = fast(x)
        fast.blocks[3] = fast.blocks[2]   # the last MHSA block now the one before it, twice
        after = fast(x)
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, _general_path(fast, x), rtol=0, atol=0)
        # a new head, with a hook: the general path, which calls it as a module
        seen, head = [], torch.nn.Linear(fast.embed_dim, fast.num_classes)
        head.register_forward_hook(lambda m, a, o: seen.append(o.shape))
        fast.head = head
        assert fast._one_image(x) is None
        fast(x)
        assert seen == [(1, fast.num_classes)]
