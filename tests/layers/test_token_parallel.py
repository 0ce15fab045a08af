"""Token-parallel blocks in the frozen inference path: one image's token rows shared among the intra-op threads.

The outputs must be those of the blocks run in turn (the same function, to fp32 rounding), the path must really
run on several threads with one intra-op thread each, the caller's thread setting must hold, and an error in one
thread must come back to the caller instead of leaving the others waiting at the barrier.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
import time

import pytest
import torch

import hybridzoo
from hybridzoo.layers import onednn_tokens
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.layers.onednn_tokens import TokenParallelBlocks, calibrate, token_parallel_forward
from hybridzoo.registry import get_card
from _helpers import error_on_watchdog, perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")


def _deit(img: int = 96, **kw):
    card = get_card("deit_small_patch16_224")
    torch.manual_seed(0)
    model = hybridzoo.create_model("deit_small_patch16_224", **{**card.test_kwargs, "img_size": img, **kw}).eval()
    perturb(model)
    return model


@pytest.fixture
def python_shares(monkeypatch):
    """The Python threads' way of running the shares, also where the native kernels would run the blocks
    (tests/layers/test_token_blocks.py tests that way)."""
    monkeypatch.setattr(onednn_tokens, "_native_args", lambda blocks, plan: None)


def _record_qkv_calls(model):
    """(rows, thread, intra-op threads) of every qkv product of the first block."""
    calls = []
    model.blocks[0].attn.qkv.register_forward_hook(
        lambda m, args, out: calls.append((args[0].shape[1], threading.get_ident(), torch.get_num_threads())))
    return calls


@pytest.mark.parametrize("n_threads,img", [(2, 96), (3, 128)])
def test_token_parallel_blocks_give_the_sequential_outputs(threads, n_threads, img):
    model = _deit(img)
    plain = optimize_for_cpu_inference(model, split_tokens=False)
    fast = optimize_for_cpu_inference(model)
    assert isinstance(fast.blocks, TokenParallelBlocks) and not isinstance(plain.blocks, TokenParallelBlocks)
    fast.blocks.mode = "tokens"   # not the timed choice of "auto"
    calls = _record_qkv_calls(fast)
    threads(n_threads)
    x = torch.randn(1, 3, img, img)
    with torch.inference_mode():
        ref, out, eager = plain(x), fast(x), model(x)
        tokens = fast._embed(x)
        feats, feats_ref = fast.blocks(tokens), torch.nn.Sequential(*plain.blocks)(tokens)
    assert torch.get_num_threads() == n_threads
    # one share of the (img/16)² + 1 token rows per thread, each on a thread of its own with one intra-op thread
    N = (img // 16) ** 2 + 1
    assert sorted(c[0] for c in calls[:n_threads]) == sorted(N * (t + 1) // n_threads - N * t // n_threads
                                                               for t in range(n_threads))
    assert len({c[1] for c in calls[:n_threads]}) == n_threads and {c[2] for c in calls} == {1}
    torch.testing.assert_close(feats, feats_ref, rtol=1e-5, atol=1e-5 * float(feats_ref.abs().max()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_token_parallel_runs_only_for_one_image_with_enough_rows_and_threads(threads):
    model = _deit(32)   # 5 tokens: below MIN_ROWS_PER_THREAD per thread
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    calls = _record_qkv_calls(fast)
    threads(2)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert [c[0] for c in calls] == [5] and calls[0][2] == 2   # the whole image, both intra-op threads
    calls.clear()
    big = optimize_for_cpu_inference(_deit(96))
    big.blocks.mode = "tokens"
    calls = _record_qkv_calls(big)
    threads(1)
    with torch.inference_mode():
        big(torch.randn(1, 3, 96, 96))
    assert [c[0] for c in calls] == [37]   # one intra-op thread: nothing to share
    threads(2)
    with torch.inference_mode():
        big(torch.randn(2, 3, 96, 96))    # a batch: the batch split, one image per thread, not the token split
    # (the first call of a shape runs one image on one thread first: the batch split's sizes probe)
    assert [c[0] for c in calls[1:]] == [37, 37, 37] and {c[2] for c in calls[1:]} == {1}


def test_an_error_in_one_thread_reaches_the_caller_without_a_hang(threads, monkeypatch, python_shares):
    fast = optimize_for_cpu_inference(_deit(96, depth=3))   # the last block runs alone (class token only)
    fast.blocks.mode = "tokens"
    real = onednn_tokens._vit_block_rows

    def failing(blk, x, rows, buf, barrier, pos):
        if rows.start > 0 and blk is fast.blocks[1]:
            raise RuntimeError("boom in a worker")
        return real(blk, x, rows, buf, barrier, pos)

    monkeypatch.setattr(onednn_tokens, "_vit_block_rows", failing)
    threads(2)

    def call():
        with torch.inference_mode():
            fast(torch.randn(1, 3, 96, 96))

    err = error_on_watchdog(call, "the other thread hung at the barrier")
    assert isinstance(err, RuntimeError) and "boom in a worker" in str(err)
    assert torch.get_num_threads() == 2


def test_token_parallel_forward_checks_its_input():
    fast = optimize_for_cpu_inference(_deit(96))
    with pytest.raises(ValueError, match="one image"):
        token_parallel_forward(fast.blocks, torch.randn(2, 37, 64), 2)
    with pytest.raises(ValueError, match="threads"):
        token_parallel_forward(fast.blocks, torch.randn(1, 37, 64), 0)


@pytest.mark.parametrize("name", ["convit_tiny", "convit_small"])
def test_convit_gpsa_and_mhsa_blocks_in_token_shares_give_the_sequential_outputs(threads, name):
    card = get_card(name)
    torch.manual_seed(0)
    # 36 patches; two MHSA blocks: the last one computes the class token alone, outside the token shares
    model = hybridzoo.create_model(name, **{**card.test_kwargs, "img_size": 96, "depth": 4}).eval()
    perturb(model)
    plain = optimize_for_cpu_inference(model, split_tokens=False)
    fast = optimize_for_cpu_inference(model)
    assert type(fast.blocks).__name__ == "TokenParallelBlockList"
    fast.blocks.mode = "tokens"   # ConViT runs slices of it: they keep the mode
    gpsa, mhsa = [], []
    fast.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: gpsa.append((a[0].shape[1], torch.get_num_threads())))
    fast.blocks[-2].attn.qkv.register_forward_hook(lambda m, a, o: mhsa.append((a[0].shape[1], torch.get_num_threads())))
    threads(2)
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        ref, out, eager = plain(x), fast(x), model(x)
        out2 = fast(x)   # the positional maps come from the cache now
    # two calls; the class token joins in the MHSA part (37 rows)
    assert sorted(gpsa) == [(18, 1)] * 4 and sorted(mhsa) == [(18, 1)] * 2 + [(19, 1)] * 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("way", ["native", "python"])
def test_callers_on_several_threads_get_their_own_outputs(threads, monkeypatch, way):
    """Each calling thread has its own qkv buffers: two callers at once must not see each other's keys."""
    if way == "python":
        monkeypatch.setattr(onednn_tokens, "_native_args", lambda blocks, plan: None)
    model = _deit(160)
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    xs = [torch.randn(1, 3, 160, 160) for _ in range(2)]
    with torch.inference_mode():
        refs = [model(x) for x in xs]
    outs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def call(i):
        torch.set_num_threads(2)
        start.wait()
        with torch.inference_mode():
            for _ in range(30):
                outs[i].append(fast(xs[i]))

    ts = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join(timeout=120) for t in ts]
    for i in range(2):
        assert len(outs[i]) == 30
        for out in outs[i]:
            torch.testing.assert_close(out, refs[i], rtol=1e-4, atol=1e-4 * float(refs[i].abs().max()))


def test_calibrate_picks_the_faster_way():
    quick, slow = (lambda: None), (lambda: time.sleep(0.005))
    assert calibrate(slow, quick) is True and calibrate(quick, slow) is False


@pytest.mark.parametrize("tokens_faster", [True, False])
def test_auto_mode_times_once_per_shape_and_keeps_the_choice(threads, monkeypatch, tokens_faster):
    timed = []
    monkeypatch.setattr(onednn_tokens, "calibrate", lambda whole, tokens, rounds=3: timed.append(1) or tokens_faster)
    card = get_card("convit_tiny")
    torch.manual_seed(0)
    # two MHSA blocks: the first in token shares, the last (class token only) alone
    model = hybridzoo.create_model("convit_tiny", **{**card.test_kwargs, "img_size": 96, "depth": 4}).eval()
    fast = optimize_for_cpu_inference(model)
    assert fast.blocks.mode == "auto"
    rows = []
    fast.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
    threads(2)
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        outs = [fast(x) for _ in range(3)]
        ref = model(x)
    # one timing for the GPSA slice and one for the MHSA slice, at the first call only (the slices share the choices)
    assert len(timed) == 2
    assert rows == ([18, 18] * 3 if tokens_faster else [36] * 3)
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    fast.blocks.mode = "sometimes"
    with pytest.raises(ValueError, match="mode must be"), torch.inference_mode():
        fast(x)


def test_two_callers_with_three_threads_each_do_not_deadlock(threads, monkeypatch, python_shares):
    """Token splits run one at a time: two callers with 3 threads each share one pool of 2 workers. The pool here
    makes the callers' submissions alternate (A's first share, B's first share, then the second ones), the order
    in which, without the lock, both workers would wait at barriers for shares queued behind them."""
    model = _deit(128)
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "tokens"
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        ref = model(x)

    class Alternating:
        def __init__(self):
            self.pool, self.turn = ThreadPoolExecutor(2), threading.Barrier(2, timeout=2)

        def submit(self, *args):
            future = self.pool.submit(*args)
            try:
                self.turn.wait()   # until the other caller has submitted as many (broken for good after a timeout)
            except threading.BrokenBarrierError:
                pass
            return future

    pool = Alternating()
    monkeypatch.setattr(onednn_tokens, "_pool", lambda workers: pool)
    outs: list[torch.Tensor] = []

    def call():
        torch.set_num_threads(3)
        with torch.inference_mode():
            for _ in range(3):
                outs.append(fast(x))

    ts = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    [t.start() for t in ts]
    [t.join(timeout=60) for t in ts]
    assert not any(t.is_alive() for t in ts), "deadlocked"
    assert len(outs) == 6
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_token_parallel_forward_names_a_block_it_cannot_split():
    with pytest.raises(ValueError, match="no row-share kernel for Linear"):
        token_parallel_forward([torch.nn.Linear(64, 64)], torch.randn(1, 37, 64), 2)


def test_a_slice_takes_the_containers_flags_without_touching_its_blocks():
    """ConViT slices its blocks at every forward. A slice must carry the container's mode, its measured choices and
    its train / eval flag, and leave each block as it was: a block set apart (here one left in training mode)
    keeps its own flag."""
    card = get_card("convit_tiny")
    torch.manual_seed(0)
    model = hybridzoo.create_model("convit_tiny", **{**card.test_kwargs, "img_size": 96, "depth": 4}).eval()
    fast = optimize_for_cpu_inference(model)
    fast.blocks.mode = "whole"
    fast.blocks[1].train()
    part = fast.blocks[:3]
    assert type(part) is type(fast.blocks) and not part.training and part.mode == "whole"
    assert part.__dict__["_choices"] is fast.blocks.__dict__["_choices"]
    assert list(part) == list(fast.blocks)[:3]
    assert fast.blocks[1].training and fast.blocks[1].attn.training
    assert not fast.blocks[0].training and not fast.blocks[2].training
    fast.blocks.train()
    assert fast.blocks[2:].training
