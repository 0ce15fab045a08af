"""The benchmarks' shared bookkeeping (benchmarks/_common.py): the GEMM peak measured beside every round and the
share of it each round's steps reached. Values only; the benchmarks themselves are not run here."""

from __future__ import annotations


import pytest
import torch

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

_common = benchmark_module("_common")


def test_the_reference_runs_once_at_the_start_of_every_round():
    order = []
    a = _common.Contestant("a", "g", "ours", step=lambda: order.append("a"))
    b = _common.Contestant("b", "g", "timm", step=lambda: order.append("b"))

    def reference():
        order.append("peak")
        return 100.0 * order.count("peak")
    peaks = _common.run_interleaved([a, b], rounds=2, steps_per_round=2, warmup=1, log=lambda s: None,
                                    reference=reference)
    assert peaks == [100.0, 200.0]
    assert order == ["a", "b"] + ["peak", "a", "a", "b", "b"] * 2
    assert _common.run_interleaved([a], rounds=2, log=lambda s: None) == []


def test_each_rounds_share_is_taken_against_that_rounds_peak():
    c = _common.Contestant("m", "g", "ours", step=lambda: None, macs_per_image=10**9)
    c.wall = c.cpu = [0.01, 0.01, 0.02, 0.02, 0.01, 0.03]   # 3 rounds of 2 steps
    row = {"scenario": "infer", "rounds": 3, **_common.summarise(c, 2, 2.0), "round_peak_gflops": [100.0, 200.0, 300.0]}
    _common.add_ratios([row], {})
    # 2 images × 1 GMAC × 2 FLOP per MAC × 2 steps = 8 GFLOP per round, in 0.02 / 0.04 / 0.04 s
    assert row["share_rounds"] == pytest.approx([4.0, 1.0, 2 / 3])
    assert row["share_round_median"] == pytest.approx(1.0)
    assert (row["share_round_min"], row["share_round_max"]) == pytest.approx((2 / 3, 4.0))
    # without a peak per round, or without a MAC count, no per-round share
    for missing in ({"round_peak_gflops": [100.0, 200.0]}, {"macs_per_image": None}):
        other = {**row, **missing}
        other.pop("share_rounds")
        _common.add_ratios([other], {})
        assert "share_rounds" not in other


def test_round_peak_measures_a_product(threads):
    threads(1)
    value = _common.round_peak(calls=1)()
    assert 0.5 < value < 10_000   # GFLOP/s of one core, whatever the CPU
    assert torch.get_num_threads() == 1
