"""benchmarks/seg_loss_probe.py on small maps: both ways run on the same logits (the same weights in training) and
must agree (the speed itself is the benchmark's to measure, not a test's)."""

from __future__ import annotations

import json

import pytest
import torch

import hybridzoo.tasks.segmentation as seg

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

probe = benchmark_module("seg_loss_probe")


def test_the_probe_times_both_ways_and_writes_the_row(tmp_path, threads, capsys):
    out = tmp_path / "row.json"
    row = probe.main(["--classes", "5", "--size", "64", "128", "--images", "2", "--rounds", "2", "--threads", "1",
                      "--json", str(out)])
    assert row["one_pass_ms"] > 0 and row["apart_ms"] > 0 and row["step_one_pass_ms"] > 0
    assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    assert json.loads(out.read_text())["rows"] == [row]
    assert "| loss, class map, counts |" in capsys.readouterr().out


def test_apart_is_the_old_three_passes_and_a_disagreement_stops_the_probe(threads, monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 4, 8, 20, generator=g), torch.randint(0, 4, (2, 8, 20), generator=g)
    labels[0, 0] = seg.IGNORE_INDEX
    counts, loss = probe.apart(logits, labels, 4)
    want_counts, want_loss = seg.pixel_stats(logits, labels, 4)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)

    def off_by_one(lg, lb, k, ignore_index=seg.IGNORE_INDEX):
        c, l = probe.apart(lg, lb, k, ignore_index)
        return c + torch.eye(3, k, dtype=c.dtype), l

    monkeypatch.setattr(seg, "pixel_stats", off_by_one)
    with pytest.raises(RuntimeError, match="one pass and apart disagree"):
        probe.measure("sctnet_s_seg50", 3, (64, 128), images=1, rounds=1)


def test_the_training_probe_times_both_losses_on_the_same_weights(tmp_path, threads, monkeypatch, capsys):
    row = probe.main(["--train", "--classes", "4", "--size", "32", "64", "--images", "2", "--rounds", "1",
                      "--threads", "1"])
    assert row["train_one_pass_ms"] > 0 and row["train_apart_ms"] > 0
    assert "| forward, loss, backward, AdamW |" in capsys.readouterr().out
    # the "apart" side must really leave the kernels: a loss that differs there stops the probe
    real = seg.cross_entropy

    def off_without_kernels(logits, *a, **kw):
        loss = real(logits, *a, **kw)
        return loss if kw.get("native", True) else loss * 1.01

    monkeypatch.setattr(seg, "cross_entropy", off_without_kernels)
    with pytest.raises(RuntimeError, match="the first losses differ"):
        probe.measure_train("sctnet_s_seg50", 4, (32, 64), batch=2, rounds=1)
