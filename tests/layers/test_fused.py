"""The fused CPU training kernels compute exactly what the plain PyTorch ops compute."""

import pytest
import torch
import torch.nn.functional as F

from hybridzoo.layers.fused import FastDropout, _draws, chunked_attention, fast_dropout, linear_cross_entropy
from hybridzoo.models.sasrec import recbole_attention_mask


def _mask(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    seq = torch.randint(1, 9, (B, L), generator=g).masked_fill(torch.arange(L)[None] >= lengths[:, None], 0)
    return recbole_attention_mask(seq)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 2 * 7 * 7 * 8, 1 << 20])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_attention_matches_sdpa_forward_and_backward(chunk_bytes, causal):
    """Groups of sequences sorted by length and cut to their visible keys give SDPA's values and gradients."""
    torch.manual_seed(0)
    B, H, L, d = 11, 2, 7, 4
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    seq = torch.randint(1, 9, (B, L), generator=g).masked_fill(torch.arange(L)[None] >= lengths[:, None], 0)
    mask = recbole_attention_mask(seq, causal=causal).double()
    ours = chunked_attention(q, k, v, mask, 0.0, chunk_bytes=chunk_bytes)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_chunked_attention_with_dropout_is_differentiated_exactly():
    B, H, L, d = 3, 2, 5, 3
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = _mask(B, L, seed=1).double()

    def f(q, k, v):
        torch.manual_seed(7)  # the same dropout mask at every evaluation
        return chunked_attention(q, k, v, mask, 0.5, chunk_bytes=2 * H * L * L * 8)

    assert torch.autograd.gradcheck(f, (q, k, v))
    # dropout acts on the attention probabilities, scaled by 1/keep: with v = identity the output *is*
    # the dropped probability matrix, whatever order the groups were drawn in
    B, H, L = 64, 2, 6
    q, k = torch.randn(B, H, L, 4, dtype=torch.float64), torch.randn(B, H, L, 4, dtype=torch.float64)
    v = torch.eye(L, dtype=torch.float64).expand(B, H, L, L)
    mask = _mask(B, L, seed=2).double()
    probs = (q @ k.transpose(-2, -1) / 2 + mask).softmax(-1)
    out = chunked_attention(q, k, v, mask, 0.5, chunk_bytes=5 * H * L * L * 8)
    visible = mask.expand(B, H, L, L) == 0
    kept = out[visible] != 0
    torch.testing.assert_close(out[visible][kept], probs[visible][kept] / 0.5)
    assert abs(kept.double().mean().item() - 0.5) < 0.05
    assert torch.all(out[~visible] == 0)


@pytest.mark.parametrize("p", [0.1, 0.43, 0.57, 0.9])
def test_fast_dropout_rate_and_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = fast_dropout(x, p)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 4e-3  # ~5 standard deviations
    keep_prob = 1 - round(p * 65536) / 65536
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / keep_prob))
    assert fast_dropout(x, p, training=False) is x
    drop = FastDropout(p).eval()
    assert drop(x) is x and isinstance(drop, torch.nn.Dropout)


def test_fast_dropout_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(1000, requires_grad=True)
    y = fast_dropout(x, 0.5)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.where(y == 0, 0.0, 2.0))


def test_draws_are_uniform_16_bit():
    torch.manual_seed(0)
    d = _draws((1 << 20,), "cpu").long()
    assert d.min() == -32768 and d.max() == 32767
    hist = torch.bincount((d + 32768) >> 12, minlength=16).double()
    assert (hist / hist.mean() - 1).abs().max() < 0.02


@pytest.mark.parametrize("chunk_bytes", [1, 7 * 101 * 8, 1 << 22])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(chunk_bytes):
    torch.manual_seed(0)
    h = torch.randn(37, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 101, (37,))
    ours = linear_cross_entropy(h, w, t, chunk_bytes=chunk_bytes)
    ref = F.cross_entropy(h @ w.t(), t)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(2.5 * ours, (h, w)), torch.autograd.grad(2.5 * ref, (h, w))):
        torch.testing.assert_close(a, b)


def test_linear_cross_entropy_float32_path_and_bad_shapes():
    torch.manual_seed(0)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(500, 16, requires_grad=True)
    t = torch.randint(0, 500, (64,))
    ours, ref = linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.t(), t)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ga, gb = torch.autograd.grad(ours, (h, w)), torch.autograd.grad(ref, (h, w))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"weight \(N, D\)"):
        linear_cross_entropy(h, w[:, :8], t)


@pytest.mark.parametrize("name", ["adamct_toys", "sasrec"])
def test_recommenders_fused_training_step_equals_the_plain_one(name):
    """Without dropout, a float32 CPU training step (fused kernels) equals the float64 one (plain SDPA + CE)."""
    import hybridzoo

    torch.manual_seed(0)
    kw = dict(num_items=40, max_len=10, hidden_size=16, n_heads=2, hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    model = hybridzoo.create_model(name, **kw, **({"inner_size": 32} if name == "sasrec" else {})).train()
    ref = hybridzoo.create_model(name, **kw, **({"inner_size": 32} if name == "sasrec" else {})).double().train()
    ref.load_state_dict(model.state_dict())
    seq, lengths = model.example_input(6)
    target = torch.randint(1, 40, (6,))
    loss = model.calculate_loss(seq, lengths, target)
    assert loss.grad_fn is not None and "LinearCrossEntropy" in type(loss.grad_fn).__name__
    loss_ref = ref.calculate_loss(seq, lengths, target)
    assert "LinearCrossEntropy" not in type(loss_ref.grad_fn).__name__
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())),
                    torch.autograd.grad(loss_ref, list(ref.parameters()))):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-5)
