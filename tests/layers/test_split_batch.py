"""Batch splitting in the frozen inference path: one part of the batch per intra-op thread, each on one thread.

The outputs must be those of the whole batch (the same function), the caller's thread setting and autograd
mode must hold, and outputs that are not per-input tensors must fall back to the whole batch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import pytest
import torch
from torch import nn

import hybridzoo
from hybridzoo.layers import onednn
from hybridzoo.layers.onednn import images_per_call, onednn_available, optimize_for_cpu_inference, split_batch_forward
from hybridzoo.registry import get_card
from _helpers import perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")



class Recorder(nn.Module):
    """A linear layer that records, per call, the batch it saw and the thread state it ran under."""

    def __init__(self, out: str = "tensor", width: int = 5):
        super().__init__()
        self.fc = nn.Linear(8, width)
        self.out = out
        self.calls: list[tuple[int, int, int, bool]] = []

    def forward(self, x):
        self.calls.append((x.shape[0], threading.get_ident(), torch.get_num_threads(),
                           torch.is_inference_mode_enabled()))
        y = self.fc(x)
        if self.out == "dict":
            return {"logits": y}
        if self.out == "pooled":   # not one row per input
            return y.sum(0)
        return y, y.mean(-1)


# the transformers this was measured on, then every other model of the oneDNN model tests
MODELS = ["deit_small_patch16_224", "convit_tiny", "convit_small", "cvt_13", "vvt_tiny", "botnet_t3",
          "botnet_bot50", "vitc_1gf", "coatnet_0", "ceit_tiny", "mobile_former_26m"]


@pytest.mark.parametrize("name", MODELS)
def test_split_batch_gives_the_whole_batch_outputs(name, two_threads):
    _check_split_outputs(name)


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "convit_tiny", "cvt_13", "botnet_bot50", "coatnet_0",
                                  "mobile_former_26m"])
def test_sub_batches_give_the_whole_batch_outputs(name, two_threads, monkeypatch):
    # every part of the batch runs one image at a time
    monkeypatch.setattr(onednn, "images_per_call", lambda forward, x: 1)
    _check_split_outputs(name, batch=5)


def _check_split_outputs(name: str, batch: int = 3) -> None:
    if name not in hybridzoo.list_models():
        pytest.skip(f"{name} is not registered in this checkout")
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs).eval()
    perturb(model)
    whole = optimize_for_cpu_inference(model, split_batch=False)
    split = optimize_for_cpu_inference(model)
    x = torch.randn(batch, *(card.test_input_size or card.input_size))
    with torch.inference_mode():
        ref, out, eager = whole(x), split(x), model(x)
    ref, out, eager = (t if isinstance(t, torch.Tensor) else t[0] for t in (ref, out, eager))
    assert split._split_ok, "the split path fell back to the whole batch"
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_each_part_runs_on_its_own_thread_with_one_intra_op_thread(two_threads):
    torch.manual_seed(0)
    plain = Recorder()
    fast = optimize_for_cpu_inference(plain)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        y, m = fast(x)
    probe, *parts = fast.calls
    assert probe[:3] == (1, threading.get_ident(), 1)               # one input's sizes, once per shape
    assert [c[0] for c in parts] == [3, 2]                          # tensor_split: 3 + 2 rows
    assert len({c[1] for c in parts}) == 2                          # two threads
    assert all(c[2] == 1 for c in parts)                            # one intra-op thread each
    assert all(c[3] for c in fast.calls)                            # the caller's inference mode holds
    assert torch.get_num_threads() == 2                              # and the caller's setting is back
    with torch.no_grad():
        torch.testing.assert_close(y, plain.fc(x))
        torch.testing.assert_close(m, plain.fc(x).mean(-1))


@pytest.mark.parametrize("out", ["dict", "pooled"])
def test_outputs_that_are_not_per_input_fall_back_to_the_whole_batch(out, two_threads):
    torch.manual_seed(0)
    fast = optimize_for_cpu_inference(Recorder(out))
    x = torch.randn(4, 8)
    with torch.inference_mode():
        first, second = fast(x), fast(x)
    # the first call found out (the probe, parts of 2, then the whole batch); the second goes straight to the whole
    # batch
    assert [c[0] for c in fast.calls] == [1, 2, 2, 4, 4]
    with torch.inference_mode():
        want = fast.fc(x) if out == "dict" else fast.fc(x).sum(0)
    for got in (first, second):
        torch.testing.assert_close(got["logits"] if out == "dict" else got, want)


def test_no_split_at_batch_one_or_one_thread(two_threads):
    fast = optimize_for_cpu_inference(Recorder())
    with torch.inference_mode():
        fast(torch.randn(1, 8))
        torch.set_num_threads(1)
        fast(torch.randn(4, 8))
    assert [c[0] for c in fast.calls] == [1, 1, 4]    # batch 1; the probe of the 4-row batch, which runs whole
    assert len({c[1] for c in fast.calls}) == 1


# Recorder(width=64): 256 bytes per row of its output; a limit of 600 bytes lets 2 rows through at once
@pytest.fixture
def two_rows_per_call(monkeypatch):
    monkeypatch.setattr(onednn, "SUB_BATCH_BYTES", 600)


def test_a_part_above_the_limit_runs_in_sub_batches(two_threads, two_rows_per_call):
    plain = Recorder(width=64)
    fast = optimize_for_cpu_inference(plain)
    x = torch.randn(7, 8)
    with torch.inference_mode():
        y, m = fast(x)
        fast(x)
    first = fast.calls[:5]
    assert first[0][0] == 1                                          # the probe
    # parts of 4 and 3 rows, each in about equal sub-batches of at most 2 rows, on its own thread
    by_thread: dict[int, list[int]] = {}
    for rows, ident, threads, _ in first[1:]:
        by_thread.setdefault(ident, []).append(rows)
        assert threads == 1
    assert sorted(by_thread.values()) == [[2, 1], [2, 2]]
    assert [c[0] for c in fast.calls[5:]] != [] and all(c[0] <= 2 for c in fast.calls[5:])   # no probe again
    assert len(fast.calls) == 9
    with torch.no_grad():
        torch.testing.assert_close(y, plain.fc(x))
        torch.testing.assert_close(m, plain.fc(x).mean(-1))


def test_one_thread_runs_sub_batches_on_the_calling_thread(two_threads, monkeypatch):
    monkeypatch.setattr(onednn, "SUB_BATCH_BYTES", 800)    # 3 rows of 256 bytes
    plain = Recorder(width=64)
    fast = optimize_for_cpu_inference(plain)
    torch.set_num_threads(1)
    x = torch.randn(7, 8)
    with torch.inference_mode():
        y, _ = fast(x)
    assert [c[0] for c in fast.calls] == [1, 3, 2, 2]    # the probe, then about equal sub-batches (not 3, 3, 1)
    assert {c[1] for c in fast.calls} == {threading.get_ident()}
    with torch.no_grad():
        torch.testing.assert_close(y, plain.fc(x))


def test_an_input_above_the_limit_alone_runs_its_part_whole(two_threads, monkeypatch):
    monkeypatch.setattr(onednn, "SUB_BATCH_BYTES", 100)    # one row's 256 bytes are already above it
    fast = optimize_for_cpu_inference(Recorder(width=64))
    with torch.inference_mode():
        fast(torch.randn(6, 8))
    assert sorted(c[0] for c in fast.calls) == [1, 3, 3]


def test_sub_batches_of_outputs_that_are_not_per_input_fall_back_to_the_whole_batch(two_threads, two_rows_per_call):
    fast = optimize_for_cpu_inference(Recorder("pooled", width=64))
    x = torch.randn(6, 8)
    with torch.inference_mode():
        got = fast(x)
        want = fast.fc(x).sum(0)
    torch.testing.assert_close(got, want)
    assert not fast._split_ok and fast.calls[-1][0] == 6


def test_images_per_call_counts_the_largest_tensor_of_one_input():
    class Wide(nn.Module):
        def forward(self, x):
            return (x.repeat(1, 250) * 2).sum(-1)   # 1,000 floats per row in between, 4,000 bytes
    assert images_per_call(Wide(), torch.randn(9, 4)) == onednn.SUB_BATCH_BYTES // 4000
    assert images_per_call(lambda x: x.new_zeros(9 << 20), torch.randn(3, 4)) is None   # 36 MiB alone


def test_a_failing_part_restores_the_thread_setting(two_threads):
    def forward(x):
        if x.shape[0] == 1:
            raise ValueError("bad part")
        return x
    with pytest.raises(ValueError, match="bad part"):
        split_batch_forward(forward, torch.randn(3, 2))
    assert torch.get_num_threads() == 2
    # more parts than the caller's threads: the caller's setting, not the part count, comes back
    assert split_batch_forward(lambda t: t * 2, torch.ones(4, 2), threads=4).sum() == 16
    assert torch.get_num_threads() == 2



_FORKED: dict = {}   # what the forked child finds in its copy of the parent's memory (the model cannot be pickled)


def _child_forward():
    fast, x = _FORKED["case"]
    torch.set_num_threads(2)
    with torch.inference_mode():
        return fast(x)[0].clone()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_split_batch_in_a_forked_child(two_threads):
    # the parent's worker threads do not survive a fork: the child must start its own, not wait on dead ones
    torch.manual_seed(0)
    fast = optimize_for_cpu_inference(Recorder())
    x = torch.randn(4, 8)
    with torch.inference_mode():
        want = fast(x)[0]            # the parent's pool exists now
    _FORKED["case"] = (fast, x)
    try:
        with mp.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_child_forward).get(timeout=60)
    finally:
        _FORKED.clear()
    torch.testing.assert_close(got, want)


def test_bf16_copy_is_split_and_every_part_runs_under_autocast(two_threads):
    # autocast is per thread: the worker threads take the caller's (run_on_threads), or their part would be fp32
    fast = optimize_for_cpu_inference(Recorder(), dtype=torch.bfloat16)
    seen = []
    fast.fc.register_forward_hook(lambda m, a, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    with torch.inference_mode():
        out = fast(torch.randn(4, 8))
    assert sorted(c[0] for c in fast.calls if c[0] != 1) == [2, 2]   # the probe's one input, then two parts
    assert len({c[1] for c in fast.calls}) == 2
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    assert out[0].dtype is torch.float32 and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("name, side", [("deit_small_patch16_224", 96), ("cvt_13", None)])
def test_the_sub_batch_probe_runs_the_blocks_in_turn_and_times_nothing(name, side, monkeypatch):
    # the probe's one input on one thread could take the token split's single native call: timing it there cost
    # 0.3-1 s of every frozen copy's first call (`hybridzoo train` builds one per epoch), for a choice the batch's
    # parts never use
    from hybridzoo.layers import onednn_tokens

    timed = []
    real = onednn_tokens.calibrate
    monkeypatch.setattr(onednn_tokens, "calibrate", lambda *a, **k: timed.append(1) or real(*a, **k))
    card = get_card(name)
    torch.manual_seed(0)
    # DeiT's reduced variant at 96 px: 37 tokens, enough rows for the split
    fast = optimize_for_cpu_inference(hybridzoo.create_model(name, **{**card.test_kwargs,
                                                                **({"img_size": side} if side else {})}))
    x = torch.randn(4, 3, side, side) if side else torch.randn(4, *card.test_input_size)
    with torch.inference_mode():
        assert images_per_call(super(onednn._SplitBatch, fast).forward, x) is not None
        assert timed == []
        # outside the probe, one image on one thread still times the split
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fast(x[:1])
        finally:
            torch.set_num_threads(before)
    assert timed, "one image on one thread no longer reaches the token split: the probe check above proves nothing"
