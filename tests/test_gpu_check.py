"""benchmarks/gpu_check.py runs on a machine with a GPU, which CI lacks: its per-model check is kept honest here by
running it with the CPU in the GPU's place, where the two sides must agree exactly, and by planting the faults it
exists to catch."""

from __future__ import annotations


import torch

import hybridzoo

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

gpu_check = benchmark_module("gpu_check")

CPU = torch.device("cpu")


def test_a_model_agrees_with_itself_on_one_device():
    row = gpu_check.check_model("cvt_tiny_demo", CPU)
    assert row["fails"] == []
    assert row["fp32_forward_rel"] == 0.0 and row["fp32_grad_rel"] == 0.0
    assert 0.0 < row["bf16_forward_rel"] < gpu_check.BF16_FORWARD_TOL  # bf16 really ran, and stayed close


def _second_build(monkeypatch, change):
    """create_model as check_model calls it, the second build (the device's copy) changed by `change`."""
    real = hybridzoo.create_model
    calls = []

    def create(name, **kw):
        model = real(name, **kw)
        calls.append(name)
        if len(calls) == 2:
            change(model)
        return model
    monkeypatch.setattr(hybridzoo, "create_model", create)


def test_a_device_that_computes_differently_fails(monkeypatch):
    def off_by_a_little(model):
        model.head.register_forward_hook(lambda m, i, o: o * 1.001)
    _second_build(monkeypatch, off_by_a_little)
    row = gpu_check.check_model("cvt_tiny_demo", CPU)
    assert any(f.startswith("fp32 forward") for f in row["fails"]), row


def test_a_parameter_left_without_gradient_fails(monkeypatch):
    def detach_the_head(model):
        forward = model.head.forward
        model.head.forward = lambda x: forward(x).detach() + 0 * x.sum()
    _second_build(monkeypatch, detach_the_head)
    row = gpu_check.check_model("cvt_tiny_demo", CPU)
    assert any(f.startswith("no gradient") and "head." in f for f in row["fails"]), row


def test_a_model_that_raises_is_a_failed_row_and_the_rest_still_run(capsys):
    rows = gpu_check.section_models(["no_such_model", "cvt_tiny_demo"], CPU)
    assert [r["model"] for r in rows] == ["no_such_model", "cvt_tiny_demo"]
    assert rows[0]["fails"] and "no_such_model" in rows[0]["fails"][0]
    assert rows[1]["fails"] == []
    assert "FAIL no_such_model" in capsys.readouterr().out
