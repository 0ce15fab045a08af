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
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference, split_batch_forward
from hybridzoo.registry import get_card
from _helpers import perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")



class Recorder(nn.Module):
    """A linear layer that records, per call, the batch it saw and the thread state it ran under."""

    def __init__(self, out: str = "tensor"):
        super().__init__()
        self.fc = nn.Linear(8, 5)
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
    if name not in hybridzoo.list_models():
        pytest.skip(f"{name} is not registered in this checkout")
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs).eval()
    perturb(model)
    whole = optimize_for_cpu_inference(model, split_batch=False)
    split = optimize_for_cpu_inference(model)
    x = torch.randn(3, *(card.test_input_size or card.input_size))
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
    assert [c[0] for c in fast.calls] == [3, 2]                     # tensor_split: 3 + 2 rows
    assert len({c[1] for c in fast.calls}) == 2                      # two threads
    assert all(c[2] == 1 for c in fast.calls)                        # one intra-op thread each
    assert all(c[3] for c in fast.calls)                             # the caller's inference mode holds
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
    # the first call found out (parts of 2, then the whole batch); the second goes straight to the whole batch
    assert [c[0] for c in fast.calls] == [2, 2, 4, 4]
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
    assert [c[0] for c in fast.calls] == [1, 4]


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


def test_bf16_copy_is_not_split(two_threads):
    # autocast is thread-local: the bf16 copy's region would not reach worker threads, so it keeps whole batches
    fast = optimize_for_cpu_inference(Recorder(), dtype=torch.bfloat16)
    with torch.inference_mode():
        fast(torch.randn(4, 8))
    assert [c[0] for c in fast.calls] == [4]
