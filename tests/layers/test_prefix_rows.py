"""The class-token-only last block: `model(x)` of ViT/DeiT and ConViT computes only the prefix rows of its last
block (`layers.helpers.run_blocks_for_prefix`, `Attention(num_queries=...)`), which must give exactly what the
full computation `forward_head(forward_features(x))` gives — logits and every gradient — eager, in training (drop
path, fast linears, checkpointing) and on the frozen oneDNN path. A shape probe checks that the rows really are
dropped, so a silent return to the full computation fails too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridzoo
from hybridzoo.explain import AttentionRecorder
from hybridzoo.layers.attention import Attention, linear_rows
from hybridzoo.layers.onednn import OneDNNLinear, onednn_available, optimize_for_cpu_inference
from hybridzoo.layers.train_fast import FastLinear, fast_training_available, optimize_for_cpu_training
from hybridzoo.registry import get_card

TOL = dict(rtol=1e-5, atol=1e-5)
MODELS = ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "convit_tiny", "vitc_1gf"]


def _small(name: str, **kw) -> nn.Module:
    card = get_card(name)
    return hybridzoo.create_model(name, **{**card.test_kwargs, **kw}), card.test_input_size


def _full(model: nn.Module, x: torch.Tensor):
    return model.forward_head(model.forward_features(x))


def _rows_seen(model: nn.Module, x: torch.Tensor) -> int:
    """How many token rows the last block's MLP received in `model(x)`."""
    seen = []
    h = model.blocks[-1].mlp.fc1.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    try:
        model(x)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("name", MODELS)
def test_eval_logits_equal_the_full_computation_and_rows_are_dropped(name):
    torch.manual_seed(0)
    model, size = _small(name)
    model.eval()
    x = torch.randn(3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _full(model, x), **TOL)
        assert _rows_seen(model, x) == getattr(model, "num_prefix_tokens", 1)
        # batch 1 as well (the shapes of the pruned attention differ)
        torch.testing.assert_close(model(x[:1]), _full(model, x[:1]), **TOL)


def _train_step_grads(model, x, y, forward, seed):
    torch.manual_seed(seed)   # the same drop-path masks for both ways (one draw per sample and block)
    out = forward(model, x)
    if isinstance(out, tuple):   # a distilled model in training: (cls, dist) logits
        loss = sum(F.cross_entropy(o, y) for o in out)
        out = out[0]
    else:
        loss = F.cross_entropy(out, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_logits_and_every_gradient_equal_the_full_computation(name, fast, checkpointing):
    if fast and not fast_training_available():
        pytest.skip("no oneDNN in this build")
    torch.manual_seed(0)
    model, size = _small(name, drop_path_rate=0.2)
    if fast:
        optimize_for_cpu_training(model, min_weight_numel=1)
        assert isinstance(model.blocks[-1].attn.qkv, FastLinear)
    model.set_grad_checkpointing(checkpointing)
    model.train()
    x, y = torch.randn(4, *size), torch.randint(0, model.num_classes, (4,))
    new_out, new_g = _train_step_grads(model, x, y, lambda m, t: m(t), seed=1)
    old_out, old_g = _train_step_grads(model, x, y, _full, seed=1)
    torch.testing.assert_close(new_out, old_out, **TOL)
    assert new_g.keys() == old_g.keys()
    for n in old_g:
        torch.testing.assert_close(new_g[n], old_g[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 4])
def test_frozen_path_equals_the_full_eager_computation(name, batch, two_threads):
    torch.manual_seed(0)
    model, size = _small(name)
    model.eval()
    x = torch.randn(batch, *size)
    with torch.inference_mode():
        ref = _full(model, x)
        frozen = optimize_for_cpu_inference(model)
        torch.testing.assert_close(frozen(x), ref, rtol=1e-4, atol=1e-4)
        # the frozen qkv computes the query rows and the key/value rows from packed copies of its weight rows
        qkv = frozen.blocks[-1].attn.qkv
        assert isinstance(qkv, OneDNNLinear)
        C = qkv.in_features
        assert set(qkv._slices) == {(0, C), (C, 3 * C)}


def test_attention_num_queries_equals_the_leading_rows_of_the_full_attention():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.randn(2, 1, 9, 9)
    with torch.no_grad():
        full = attn(x, attn_mask=mask)
        for n in (1, 2, 9):
            torch.testing.assert_close(attn(x, attn_mask=mask, num_queries=n), full[:, :n], **TOL)


@pytest.mark.parametrize("bad", [0, 10, -1, 1.0, True, "1"])
def test_attention_num_queries_out_of_range_is_a_clear_error(bad):
    attn = Attention(32, num_heads=4)
    with pytest.raises(ValueError, match=r"num_queries must be an int in \[1, 9\]"):
        attn(torch.randn(1, 9, 32), num_queries=bad)


def test_gpsa_block_refuses_num_queries():
    model, size = _small("convit_tiny")
    x = torch.randn(1, 9, model.embed_dim)
    rel = torch.zeros(1, 9, 9, 3)
    with pytest.raises(ValueError, match="GPSA block computes every token"):
        model.blocks[0](x, rel, num_queries=1)


def test_convit_without_mhsa_blocks_keeps_the_class_token_path():
    # local_up_to_layer = depth: the class token joins after the last block, nothing to prune
    torch.manual_seed(0)
    model, size = _small("convit_tiny", local_up_to_layer=3)
    model.eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _full(model, x), **TOL)


class _Doubling(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_rows_for_each_kind_of_layer():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    x = torch.randn(3, 5, 16)
    ref = lin(x)
    torch.testing.assert_close(linear_rows(lin, x, 4, 12), ref[..., 4:12], **TOL)
    sub = _Doubling(16, 12)
    sub.load_state_dict(lin.state_dict())
    torch.testing.assert_close(linear_rows(sub, x, 4, 12), 2 * ref[..., 4:12], **TOL)   # its own forward, sliced
    fast = copy.deepcopy(lin)
    fast.__class__ = FastLinear
    xr = x.clone().requires_grad_()
    linear_rows(fast, xr, 0, 4).sum().backward()
    xl = x.clone().requires_grad_()
    lin(xl)[..., :4].sum().backward()
    torch.testing.assert_close(xr.grad, xl.grad, **TOL)
    torch.testing.assert_close(fast.weight.grad, lin.weight.grad, **TOL)
    if onednn_available():
        with torch.no_grad():
            packed = OneDNNLinear(lin)
            torch.testing.assert_close(linear_rows(packed, x, 4, 12), ref[..., 4:12], rtol=1e-4, atol=1e-4)
            assert set(packed._slices) == {(4, 12)}
            linear_rows(packed, x, 4, 12)
            assert len(packed._slices) == 1   # packed once per range


def test_attention_recorder_still_sees_every_row_of_the_last_block():
    torch.manual_seed(0)
    model, size = _small("deit_tiny_patch16_224")
    model.eval()
    x = torch.randn(1, *size)
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(x)
    n = model.pos_embed.shape[1]
    assert len(rec.records) == len(model.blocks)
    assert rec.records[-1]["probs"].shape == (1, model.blocks[-1].attn.num_heads, n, n)


def test_every_row_restores_the_full_computation_and_the_paper_flop_count():
    from hybridzoo.layers.helpers import every_row
    from hybridzoo.profile import count_macs
    torch.manual_seed(0)
    model, size = _small("deit_tiny_patch16_224")
    model.eval()
    x = torch.randn(1, *size)
    n = model.pos_embed.shape[1]
    with torch.no_grad():
        with every_row():
            assert _rows_seen(model, x) == n
            full_macs = count_macs(model, x)
        assert _rows_seen(model, x) == 1
        # counted as papers count the model (every row), whether or not the caller is inside every_row
        assert count_macs(model, x) == full_macs
