"""CoAtNet's transformer stages on the frozen inference path with one image's token rows shared among threads.

`TokenParallelMapStage` runs each stage's first block (it pools and widens the map) whole and the stride-1 blocks
after it as one share of the H·W token rows per thread (`layers.onednn_tokens`, kernel `_relative_block_rows`). The
outputs must be those of the blocks run in turn and of the eager model (to fp32 rounding), at the built grid and at
another one (the bias table resized), at batch 1 and batch > 1; the shares must run on threads of their own with one
intra-op thread each; errors must be named and reach the caller without a hang.
"""

from __future__ import annotations

import threading

import pytest
import torch

import hybridzoo
from hybridzoo.layers import onednn_tokens
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.layers.onednn_tokens import TokenParallelMapStage, token_parallel_forward
from hybridzoo.models.coatnet import TransformerBlock
from hybridzoo.registry import get_card
from _helpers import error_on_watchdog, perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")

# the reduced model of the card with enough tokens per thread (MIN_ROWS_PER_THREAD) in its transformer stages, and
# a second variant: C-T-T-T, another head width, max pooling
VARIANTS = {
    "reduced": dict(depths=(1, 1, 3, 2), img_size=256),
    "ctt-max": dict(layout="C-T-T-T", depths=(1, 3, 2, 1), dim_head=8, pool_type="max", img_size=128),
}


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _coatnet(variant: str):
    card = get_card("coatnet_0")
    torch.manual_seed(0)
    model = hybridzoo.create_model("coatnet_0", **{**card.test_kwargs, **VARIANTS[variant]}).eval()
    perturb(model)
    return model


def _record_qkv_calls(stage):
    """(rows, thread, intra-op threads) of every qkv product of the stage's blocks after the first."""
    calls = []
    for blk in list(stage)[stage.lead:]:
        blk.attn.qkv.register_forward_hook(lambda m, args, out: calls.append(
            (args[0].shape[-2] * (args[0].shape[-3] if args[0].dim() == 4 else 1), threading.get_ident(),
             torch.get_num_threads())))
    return calls


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n_threads", [2, 3])
def test_transformer_stages_in_token_shares_give_the_sequential_outputs(threads, variant, n_threads):
    model = _coatnet(variant)
    plain = optimize_for_cpu_inference(model, split_tokens=False)
    fast = optimize_for_cpu_inference(model)
    stages = [s for s in fast.stages if isinstance(s, TokenParallelMapStage)]
    assert len(stages) == 2   # a stage of one (downsampling) block is left as it is: ctt-max's S4
    assert not any(isinstance(s, TokenParallelMapStage) for s in plain.stages)
    assert all(s.lead == 1 and all(type(b) is TransformerBlock for b in s) for s in stages)
    for s in stages:
        s.mode = "tokens"   # not the timed choice of "auto"
    first = stages[0]
    calls = _record_qkv_calls(first)
    threads(n_threads)
    img = model.img_size[0]
    for size in (img, img - 32):   # the built grid, and another one (the relative-bias table resized)
        calls.clear()
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            ref, out, eager = plain(x), fast(x), model(x)
        assert torch.get_num_threads() == n_threads
        N = (size // 16) ** 2 if variant == "reduced" else (size // 8) ** 2   # tokens of the first split stage
        shares = sorted(N * (t + 1) // n_threads - N * t // n_threads for t in range(n_threads))
        tail = len(first) - first.lead
        assert sorted(c[0] for c in calls) == sorted(shares * tail)
        assert len({c[1] for c in calls}) == n_threads and {c[2] for c in calls} == {1}
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        # the stage itself against its blocks in turn, on the map its first block takes
        g = 2 * int(N ** 0.5)
        h = torch.randn(1, g, g, first[0].norm1.normalized_shape[0])
        with torch.inference_mode():
            got, want = first(h), torch.nn.Sequential(*first)(h)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_full_size_coatnet_0_matches_eager(threads):
    torch.manual_seed(0)
    model = hybridzoo.create_model("coatnet_0").eval()
    fast = optimize_for_cpu_inference(model)
    for s in fast.stages[2:]:
        assert isinstance(s, TokenParallelMapStage)
        s.mode = "tokens"
    threads(2)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        out, eager = fast(x), model(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("split_batch", [True, False])
def test_a_batch_runs_the_blocks_whole(threads, variant, split_batch):
    """Batch > 1: the batch split gives each thread its images (or, without it, the blocks run whole on the batch);
    the token split is for one image only."""
    model = _coatnet(variant)
    fast = optimize_for_cpu_inference(model, split_batch=split_batch)
    stages = [s for s in fast.stages if isinstance(s, TokenParallelMapStage)]
    for s in stages:
        s.mode = "tokens"
    calls = _record_qkv_calls(stages[0])
    threads(2)
    img = model.img_size[0]
    x = torch.randn(3, 3, img, img)
    with torch.inference_mode():
        out, eager = fast(x), model(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    tail = len(stages[0]) - stages[0].lead
    rows = [c[0] for c in calls]
    assert rows == [256] * tail * (2 if split_batch else 1)   # whole maps (16 × 16 here), never a share of one


def test_one_intra_op_thread_or_too_few_rows_run_whole(threads):
    model = _coatnet("reduced")   # at 128²: S3 8×8 = 64 tokens, S4 4×4 = 16, fewer than 2 × MIN_ROWS_PER_THREAD
    fast = optimize_for_cpu_inference(model)
    for s in fast.stages[2:]:
        s.mode = "tokens"
    s3, s4 = _record_qkv_calls(fast.stages[2]), _record_qkv_calls(fast.stages[3])
    x = torch.randn(1, 3, 128, 128)
    threads(1)
    with torch.inference_mode():
        eager = model(x)
        torch.testing.assert_close(fast(x), eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    assert [c[0] for c in s3] == [64, 64] and [c[0] for c in s4] == [16]
    threads(2)
    s3.clear(), s4.clear()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    assert sorted(c[0] for c in s3) == [32] * 4 and [c[:1] + c[2:] for c in s4] == [(16, 2)]


def test_whole_by_default_and_auto_mode_times_each_stage_once(threads, monkeypatch):
    timed = []
    monkeypatch.setattr(onednn_tokens, "calibrate", lambda whole, tokens, rounds=3: timed.append(1) or True)
    model = _coatnet("reduced")
    fast = optimize_for_cpu_inference(model)
    assert all(s.mode == "whole" for s in fast.stages[2:])   # slower with both cores free (RESULTS.md, session 8)
    calls = _record_qkv_calls(fast.stages[2])
    threads(2)
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        eager = model(x)
        torch.testing.assert_close(fast(x), eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    assert [c[0] for c in calls] == [256, 256] and not timed
    calls.clear()
    for s in fast.stages[2:]:
        s.mode = "auto"
    with torch.inference_mode():
        outs = [fast(x) for _ in range(3)]
    assert len(timed) == 2   # one per transformer stage, at the first call only
    assert sorted(c[0] for c in calls) == [128] * 12   # the timed choice (the split, here) kept for every call
    for out in outs:
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    fast.stages[2].mode = "sometimes"
    with pytest.raises(ValueError, match="mode must be 'auto', 'tokens' or 'whole'"), torch.inference_mode():
        fast(x)


def test_an_error_in_one_share_reaches_the_caller_without_a_hang(threads, monkeypatch):
    model = _coatnet("reduced")
    fast = optimize_for_cpu_inference(model)
    stage = fast.stages[2]
    stage.mode = "tokens"
    real = onednn_tokens._relative_block_rows

    def failing(blk, x, rows, buf, barrier, bias):
        if rows.start > 0 and blk is stage[2]:
            raise RuntimeError("boom in a worker")
        return real(blk, x, rows, buf, barrier, bias)

    monkeypatch.setattr(onednn_tokens, "_relative_block_rows", failing)
    threads(2)

    def call():
        with torch.inference_mode():
            fast(torch.randn(1, 3, 256, 256))

    err = error_on_watchdog(call, "the other thread hung at the barrier")
    assert isinstance(err, RuntimeError) and "boom in a worker" in str(err)
    assert torch.get_num_threads() == 2


def test_errors_are_named():
    model = _coatnet("reduced")
    fast = optimize_for_cpu_inference(model)
    stage = fast.stages[2]
    # the downsampling first block has no row kernel
    with pytest.raises(ValueError, match="no row-share kernel for TransformerBlock"):
        token_parallel_forward(list(stage), torch.randn(1, 256, 64), 2, 16, 16)
    with pytest.raises(ValueError, match=r"lead must be in \[0, 3\), got 3"):
        TokenParallelMapStage(stage._modules, 3)
    # a stage of only a downsampling block is left alone
    assert TokenParallelMapStage.lead_of(torch.nn.Sequential(stage[0])) is None


def test_a_stage_of_stride_1_blocks_only_splits_every_block(threads):
    model = _coatnet("reduced")
    plain = optimize_for_cpu_inference(model, split_tokens=False)
    blocks = list(plain.stages[2])[1:]
    assert TokenParallelMapStage.lead_of(plain.stages[2]) == 1
    assert TokenParallelMapStage.lead_of(torch.nn.Sequential(*blocks)) == 0
    stage = TokenParallelMapStage({str(i): b for i, b in enumerate(blocks)}, 0)
    stage.mode = "tokens"
    calls = _record_qkv_calls(stage)
    threads(2)
    h = torch.randn(1, 16, 16, 64)
    with torch.inference_mode():
        want = torch.nn.Sequential(*blocks)(h)
        calls.clear()
        got = stage(h)
    assert sorted(c[0] for c in calls) == [128] * 4 and {c[2] for c in calls} == {1}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
