"""benchmarks/rec_batch_split_probe.py on a small catalogue: one round of each side, and the split side really
split (the speed itself is the benchmark's to measure, not a test's)."""

from __future__ import annotations

import json

import pytest
import torch

from hybridzoo.layers import train_fast

from _helpers import benchmark_module  # tests/conftest.py puts tests/ on sys.path

probe = benchmark_module("rec_batch_split_probe")


def test_both_models_run_both_sides_and_write_the_table(tmp_path, threads, capsys):
    out = tmp_path / "rows.json"
    rows = probe.main(["--batch", "8", "--items", "60", "--max-len", "10", "--rounds", "1", "--steps", "1",
                       "--json", str(out)])
    assert [r["model"] for r in rows] == ["adamct_beauty", "sasrec"]
    for r in rows:
        assert r["whole_ms"] > 0 and r["split_ms"] > 0
        assert r["ratio_median"] == pytest.approx(r["whole_ms"] / r["split_ms"])
    assert json.loads(out.read_text())["rows"] == rows
    assert "| sasrec |" in capsys.readouterr().out


def test_a_split_that_falls_back_to_the_whole_batch_is_an_error(threads, monkeypatch):
    """With its dropout left on, the model draws from the global generator on the split's threads, and the wrapper
    goes back to whole batches: the probe must say so, not print a ratio of the whole batch against itself."""
    torch.set_num_threads(2)
    monkeypatch.setattr(probe, "_without_dropout", lambda m: m)
    monkeypatch.setattr(train_fast, "split_training_blocker", lambda m: None)   # let the dropout through
    with pytest.raises(RuntimeError, match="sasrec: the split side did not train by batch split"):
        probe.measure("sasrec", batch=8, items=60, max_len=10, rounds=1, steps=1)
