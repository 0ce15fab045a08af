"""benchmarks/ceiling.py: the operator recorder, the replays and the arithmetic of the ceiling. Small modules only;
the script's model runs are benchmarks, not tests."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

ceiling = benchmark_module("ceiling")


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.b(self.a(x).relu_())
        return y.view(-1).add_(1.0)


def _record(module, *x):
    with torch.inference_mode(), ceiling.OpRecorder() as rec:
        module(*x)
    return rec


def test_identical_calls_are_one_entry_with_their_count_and_views_are_only_counted():
    torch.manual_seed(0)
    rec = _record(TwoLinears(), torch.randn(4, 8))
    by_name = {c.name: c for c in rec.calls.values()}
    (product,) = [c for c in rec.calls.values() if c.product]   # aten::linear in inference mode (addmm outside it)
    assert product.count == 2                                   # two layers of the same shapes: one entry
    assert not by_name["aten::relu_"].product and not by_name["aten::add_"].product
    assert "aten::view" not in by_name and rec.views == 1
    names = [c.name for c in rec.order]
    assert names == [product.name, "aten::relu_", product.name, "aten::add_"]


def test_a_call_keeps_its_arguments_as_they_were_before_it_ran():
    x = torch.randn(4, 8)
    rec = _record(lambda t: t.relu_(), x.clone())
    (call,) = rec.calls.values()
    torch.testing.assert_close(call.args[0], x)       # the recorded input, not the relu'd one


def test_replay_times_the_call_and_leaves_what_it_writes_untouched():
    x = torch.randn(64, 8)
    rec = _record(lambda t: t.mul_(2.0), x.clone())
    (call,) = rec.calls.values()
    seconds = ceiling.replay(call, threads=1, min_seconds=0.001, repeats=2)
    assert 0 < seconds < 0.1
    torch.testing.assert_close(call.args[0], x)       # replays ran on a clone


def test_in_order_runs_every_recorded_call():
    torch.manual_seed(0)
    rec = _record(TwoLinears(), torch.randn(4, 8))
    names = [c.name for c in rec.order]
    ran = []
    for c in rec.calls.values():
        c.func = lambda *a, f=c.func, n=c.name, **k: (ran.append(n), f(*a, **k))[1]
    assert ceiling.time_in_order(rec.order, threads=1, reps=1) > 0
    assert ran == names * 2                             # one untimed pass, then the timed one


def test_the_ceiling_takes_each_call_at_its_better_thread_count():
    fast_team = ceiling.Call(torch.ops.aten.mm.default, (), {}, count=3, seconds={1: 1.0, 2: 0.4})
    poor_team = ceiling.Call(torch.ops.aten.add.Tensor, (), {}, count=2, seconds={1: 1.0, 2: 0.8})
    calls = [fast_team, poor_team]
    # mm: min(0.4, 1.0 / 2) = 0.4 three times; add: min(0.8, 0.5) = 0.5 twice
    assert ceiling.ceiling_seconds(calls, 2) == pytest.approx(3 * 0.4 + 2 * 0.5)
    assert ceiling.ceiling_seconds(calls, 2, products_only=True) == pytest.approx(1.2)
    assert ceiling.ceiling_seconds(calls, 1) == pytest.approx(5.0)


@pytest.mark.parametrize("name,product", [("mkldnn::_linear_pointwise", True), ("mkldnn::_convolution_pointwise", True),
                                          ("aten::bmm", True), ("aten::scaled_dot_product_attention", True),
                                          ("aten::_scaled_dot_product_flash_attention_for_cpu", True),
                                          ("aten::add", False), ("aten::native_layer_norm", False),
                                          ("aten::mkldnn_convolution", True), ("aten::convolution_backward", True),
                                          ("hybridzoo::onednn_linear", True), ("aten::mm", True),
                                          ("aten::gelu", False), ("aten::cat", False),
                                          ("aten::upsample_bilinear2d", False), ("aten::_softmax", False)])
def test_products_by_name(name, product):
    assert ceiling.is_product(name) is product


def test_the_target_is_twice_the_best_peer_or_85_percent():
    rows = [
        {"name": "m +oneDNN", "group": "M", "scenario": "latency-bs1", "batch_size": 1, "impl": "ours+onednn",
         "share_round_median": 0.5},
        {"name": "timm m", "group": "M", "scenario": "latency-bs1", "batch_size": 1, "impl": "timm",
         "share_round_median": 0.3},
        {"name": "m", "group": "M", "scenario": "latency-bs1", "batch_size": 1, "impl": "ours", "share_round_median": 0.9},
        {"name": "timm m", "group": "M", "scenario": "inference", "batch_size": 32, "impl": "timm",
         "share_round_median": 0.5},
        {"name": "m +oneDNN", "group": "M", "scenario": "inference", "batch_size": 32, "impl": "ours+onednn",
         "share_of_peak": 0.8},
    ]
    assert ceiling.target_of(rows, "m", 1) == {"peer_share": 0.3, "ours_share": 0.5, "target_share": 0.6}
    assert ceiling.target_of(rows, "m", 32)["target_share"] == 0.85
    assert ceiling.target_of(rows, "other", 1) is None


def test_permuted_and_expanded_arguments_are_kept():
    base = torch.randn(3, 1, 4)
    rec = _record(lambda a, b: a + b, base.permute(2, 0, 1), base.expand(3, 5, 4).permute(2, 0, 1))
    (call,) = rec.calls.values()
    permuted, expanded = call.args
    assert permuted.stride() == base.permute(2, 0, 1).stride()
    torch.testing.assert_close(permuted, base.permute(2, 0, 1))
    torch.testing.assert_close(expanded, base.expand(3, 5, 4).permute(2, 0, 1))


def test_a_saved_run_is_read_against_new_bench_results(tmp_path, monkeypatch, capsys):
    import json
    row = {"model": "m", "batch": 1, "gflop": 1.0, "measured_s": 0.01, "measured_share": 0.5, "in_order_team_s": 0.009,
           "in_order_team_share": 0.55, "in_order_split_s": 0.008, "in_order_split_share": 0.62,
           "in_order_share": 0.62, "ceiling_all_s": 0.006, "ceiling_all_share": 0.8, "ceiling_products_s": 0.005,
           "ceiling_products_share": 0.9, "products_1thread_share": 0.9}
    saved, bench = tmp_path / "ceiling.json", tmp_path / "bench.json"
    saved.write_text(json.dumps({"rows": [row]}))
    peer = {"name": "timm m", "group": "M", "scenario": "latency-bs1", "batch_size": 1, "impl": "timm"}
    ours = {"name": "m +oneDNN", "group": "M", "scenario": "latency-bs1", "batch_size": 1, "impl": "ours+onednn",
            "share_round_median": 0.5}
    for peer_share, in_order in ((0.3, "yes"), (0.35, "**no** (62.0%)")):   # target 60%, then 70%: in order 62%
        bench.write_text(json.dumps({"results": [ours, {**peer, "share_round_median": peer_share}]}))
        monkeypatch.setattr(sys, "argv", ["ceiling.py", "--table-of", str(saved), "--against", str(bench)])
        ceiling.main()
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.endswith(f"| {in_order} | yes |"), last                  # hot: 80%
        assert f"| {2 * peer_share:.1%} |" in last


def test_training_targets_are_1_3_times_the_peer_or_90_percent_near_the_peak():
    def rows(peer_share):
        return [{"name": "m", "group": "M", "scenario": "training", "batch_size": 16, "impl": "ours",
                 "share_round_median": 0.8},
                {"name": "timm m", "group": "M", "scenario": "training", "batch_size": 16, "impl": "timm",
                 "share_round_median": peer_share},
                {"name": "m +oneDNN", "group": "M", "scenario": "inference", "batch_size": 16, "impl": "ours+onednn",
                 "share_round_median": 0.9}]
    assert ceiling.target_of(rows(0.6), "m", 16, train=True)["target_share"] == pytest.approx(0.78)
    assert ceiling.target_of(rows(0.72), "m", 16, train=True)["target_share"] == pytest.approx(0.90)
    assert ceiling.target_of(rows(0.6), "m", 16) is None   # our inference row has no peer in that scenario


def test_a_training_step_records_its_backward_and_its_optimiser():
    torch.manual_seed(0)
    model = TwoLinears()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x = torch.randn(4, 8)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        opt.step()
    rec = ceiling.record(step)
    names = [c.name for c in rec.order]
    products = sum(c.count for c in rec.calls.values() if c.product)
    assert products >= 2 + 3          # two forward products, and at least the backward's three (one input grad is not needed)
    assert "aten::threshold_backward" in names                   # relu's backward ran on the recording thread
    assert names[-1] in ("aten::add_", "aten::mul_")              # the optimiser's update came last


@pytest.mark.parametrize("train", [False, True])
def test_a_whole_measurement_of_a_small_model(train, capsys):
    """The script's glue on the smallest registered model at 64² (a few seconds): one round, a fixed peak, each
    call timed once or a few times (the replay's 10 ms per timing would make hundreds of distinct calls 30 s)."""
    torch.manual_seed(0)
    row = ceiling.measure("mobile_former_26m", 2, threads=2, reps=1, peak=lambda: 100.0, img=64, rounds=1, train=train,
                          call_seconds=1e-4)
    assert row["scenario"] == ("training" if train else "inference")
    assert row["calls"] >= row["distinct_calls"] > 0
    assert 0 < row["ceiling_products_s"] < row["ceiling_all_s"]
    assert row["in_order_s"] == min(row["in_order_team_s"], row["in_order_split_s"])
    assert row["measured_share"] == pytest.approx(row["gflop"] / row["measured_s"] / 100.0)
    macs = ceiling.count_macs_safe(ceiling.create_model("mobile_former_26m").eval(), torch.randn(1, 3, 64, 64))
    assert row["gflop"] == pytest.approx((6 if train else 2) * macs * 2 / 1e9)   # forward ×3 in training, 2 images
    ceiling.print_rows([row], {})
    assert "mobile_former_26m" + (" (training)" if train else "") in capsys.readouterr().out
