"""benchmarks/bench_validation.py end to end on the smallest setup: it reads the validation paths and times the
trainer writes (one round; the speed itself is the benchmark's to measure, not a test's)."""

from __future__ import annotations

import json
import sys

import pytest

from hybridzoo.layers.onednn import onednn_available

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

bench_validation = benchmark_module("bench_validation")


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN: training validates eager only")
def test_one_round_on_the_digits_demo_reads_both_paths_and_the_kept_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["bench_validation.py", "--setups", "demo:classification", "--rounds", "1",
                                      "--train-batches", "1", "--threads", "1", "--json", str(out)])
    bench_validation.main()
    row, = json.loads(out.read_text())["rows"]
    assert row["setup"] == "demo:classification" and row["eager_s"] > 0 and row["copy_s"] > 0
    assert row["ratio_median"] == pytest.approx(row["eager_s"] / row["copy_s"])
    assert row["kept"] in (["eager"], ["oneDNN"]) and "epoch_4to1" not in row    # no per-image figure for a demo
    assert "| `demo:classification` |" in capsys.readouterr().out


def test_a_setup_that_is_neither_kind_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="neither folder:MODEL nor demo:TASK"):
        bench_validation.train_command("imagenet:deit", tmp_path, None)
