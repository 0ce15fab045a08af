"""Atomic writes, safe loading and random-generator state round trips."""

import random

import numpy as np
import pytest
import torch

from hybridzoo.engine import checkpoint as ckpt_mod
from hybridzoo.engine.checkpoint import CheckpointError, atomic_save, get_rng_state, load_checkpoint, set_rng_state


def _ckpt(value):
    return {"model": {"w": torch.full((3,), float(value))}, "optimizer": {}, "epoch": value, "step": value}


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save(_ckpt(1), path)

    real_save = torch.save

    def crashing_save(obj, f):
        real_save(obj, f)
        f.seek(0)
        f.truncate(17)  # half-written file...
        raise OSError("disk full")  # ...then the crash

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save(_ckpt(2), path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save(_ckpt(1), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.ckpt.*truncated or corrupt"):
        load_checkpoint(path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a hybridzoo training checkpoint.*--pretrained"):
        load_checkpoint(tmp_path / "weights.pt")


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "step": 0, "x": random.Random()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_rng_state_round_trip_through_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's generator
    atomic_save({"rng": get_rng_state()}, tmp_path / "r.ckpt")
    expect = (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1))
    state = torch.load(tmp_path / "r.ckpt", weights_only=True)["rng"]
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1)) == expect
