"""`fastest_cpu_inference`: each kind of input runs on whichever of eager and the frozen oneDNN path was faster on
its first call, and answers the same function either way."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from hybridzoo.layers.onednn import OneDNNLinear, fastest_cpu_inference, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")


class Slowed(nn.Module):
    """Two linear layers and a delay per call; the delay is an attribute, so the frozen copy can be given its own."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.delay, self.calls = 0.0, 0

    def forward(self, x, scale: float = 1.0):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.fc2(torch.relu(self.fc1(x))) * scale


def _pair(slow: str):
    torch.manual_seed(0)
    eager = Slowed()
    lines = []
    fast = fastest_cpu_inference(eager, report=lines.append)
    (eager if slow == "eager" else fast).delay = 0.03
    return eager, fast, lines


def _race(fast, eager, rows=(5, 6), **kwargs) -> int:
    """Calls until the race is decided, each answered once by one path and equal to eager; the calls it took."""
    before = len(fast.race_log)
    for i in range(40):
        x = torch.randn(rows[i % len(rows)], 8)
        eager.calls = fast.calls = 0
        with torch.no_grad():
            ref = eager(x, **kwargs)
            eager.calls -= 1
            torch.testing.assert_close(fast(x, **kwargs), ref, rtol=1e-5, atol=1e-6)
        # one path per call (the frozen copy splits a batch into one part per thread: one call or more), the first
        # call the frozen path's, then eager and the frozen path in turn
        assert (eager.calls, fast.calls > 0) == ((1, False) if i % 2 else (0, True)), i
        if len(fast.race_log) > before:
            return i + 1
    raise AssertionError("the race never ended")


@pytest.mark.parametrize("slow, chosen", [("eager", "oneDNN"), ("oneDNN", "eager")])
def test_the_faster_path_answers_each_kind_of_input_from_then_on(slow, chosen):
    eager, fast, lines = _pair(slow)
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert not any(m is eager for m in fast.modules())    # the eager model is kept, not registered in the copy
    # calls of 0.1 ms and 30 ms never add up to RACE_SECONDS each: RACE_CALLS timed calls each, after the warm-up
    assert _race(fast, eager) == 1 + 2 * fast.RACE_CALLS
    assert len(lines) == 1 and f"on 5×8: the {chosen} path" in lines[0] and "median of 5" in lines[0]
    assert fast.race_log == lines
    for _ in range(3):                                     # the same kind (a batch of several): decided
        eager.calls = fast.calls = 0
        with torch.no_grad():
            assert fast(torch.randn(7, 8)).shape == (7, 4)
        assert (eager.calls, fast.calls > 0) == ((1, False) if chosen == "eager" else (0, True))
    assert len(lines) == 1
    _race(fast, eager, rows=(1,))                          # one input is another kind (no batch to split): its race
    _race(fast, eager, scale=2.0)                          # and so are other arguments
    assert len(lines) == 3
    assert all(f"the {chosen} path" in line for line in lines)


def test_long_calls_decide_after_one_timed_call_each():
    torch.manual_seed(0)
    eager = Slowed()
    fast = fastest_cpu_inference(eager)
    fast.RACE_SECONDS = 0.05
    eager.delay, fast.delay = 0.05, 0.06
    assert _race(fast, eager) == 3
    assert "the eager path" in fast.race_log[0]


def test_timings_are_compared_per_input_element():
    """A kind's timed calls may have other sizes: eager on 2 rows against the frozen path on 64 is not a win for
    eager because its calls were shorter."""
    torch.manual_seed(0)
    eager = Slowed()
    fast = fastest_cpu_inference(eager)
    eager.delay = fast.delay = 0.02   # the same time per call: the frozen path does 32× the work in it
    with torch.no_grad():
        for i in range(1 + 2 * fast.RACE_CALLS):
            fast(torch.randn(2 if i % 2 else 64, 8))
    assert "the oneDNN path" in fast.race_log[0]


def test_the_eager_model_is_left_in_eval_mode_and_unchanged():
    torch.manual_seed(0)
    eager = Slowed().train()
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    fast = fastest_cpu_inference(eager)
    assert not eager.training and not fast.training
    assert all(torch.equal(before[k], v) for k, v in eager.state_dict().items())
    assert all(isinstance(p, nn.Parameter) for p in eager.parameters())
    assert fast.race_log == []
