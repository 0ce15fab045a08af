"""benchmarks/bench_batch_split.py end to end on the smallest setup: one round of each side, the trainer's own
training seconds and losses read back (the speed itself is the benchmark's to measure, not a test's)."""

from __future__ import annotations

import json
import sys

import pytest

from hybridzoo.layers.train_fast import fast_training_available

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

bench_batch_split = benchmark_module("bench_batch_split")

pytestmark = pytest.mark.skipif(not fast_training_available(), reason="no oneDNN: no fast CPU training path")
SMALL = "--model act_tiny_x2 --patch-size 12 --batch-size 4 --limit-val-batches 1"


def _main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_batch_split.py", "--rounds", "1", "--epochs", "2", "--train-batches",
                                      "2", "--threads", "2", *argv])
    bench_batch_split.main()


def test_one_round_of_super_resolution_reads_both_sides(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rows.json"
    _main(monkeypatch, "--setups", f"super-resolution {SMALL}", "--json", str(out))
    row, = json.loads(out.read_text())["rows"]
    assert row["split_s"] > 0 and row["whole_s"] > 0
    assert row["ratio_median"] == pytest.approx(row["whole_s"] / row["split_s"])
    # the split computes the whole batch's step: the same losses to fp32 rounding
    assert row["train_loss"]["split"] == pytest.approx(row["train_loss"]["whole"], rel=1e-4)
    assert f"| `super-resolution {SMALL}` |" in capsys.readouterr().out


def test_a_task_that_does_not_split_is_named(monkeypatch):
    with pytest.raises(RuntimeError, match=r"did not train by batch split \(batch split off: the segmentation task"):
        _main(monkeypatch, "--setups", "segmentation --synthetic-size 32 --synthetic-train 8 --synthetic-val 4 "
                                       "--batch-size 4 --limit-val-batches 1")
