"""The restricted checkpoint reader: official training scripts' files load; nothing they name runs."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from hybridzoo.factory import read_state_dict
from hybridzoo.hub import safe_pickle


class RecBoleConfig:  # stands for recbole.config.Config: an object with a dict of settings
    def __init__(self):
        self.final_config_dict = {"model": "AdaMCT", "learning_rate": 1e-3, "MAX_ITEM_LIST_LENGTH": 50}


class TimmCheckpointSaverArgs(argparse.Namespace):  # timm-0.3's saver stores the run's Namespace + more
    pass


def _state():
    torch.manual_seed(0)
    return {"w": torch.randn(4, 3), "strided": torch.arange(12.0).view(3, 4)[:, 1::2],
            "half": torch.randn(5).half(), "long": torch.arange(3), "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 7), "flag": torch.tensor([True, False])}


def _check(state, loaded):
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_deit_main_py_layout(tmp_path):
    """facebookresearch/deit main.py: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'}."""
    state = _state()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "epoch": 299, "args": argparse.Namespace(model="deit_small_patch16_224", lr=5e-4)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why the restricted reader exists
    obj = safe_pickle.load(path)
    _check(state, obj["model"])
    assert isinstance(obj["args"], safe_pickle.Placeholder)
    assert obj["args"].fields == {"model": "deit_small_patch16_224", "lr": 5e-4}
    assert obj["epoch"] == 299 and obj["optimizer"]["param_groups"][0]["lr"] == 1e-3
    _check(state, read_state_dict(path))  # the factory falls back to it


def test_recbole_protocol_4_config(tmp_path):
    """RecBole: torch.save({'config': Config, 'state_dict': ..., ...}, pickle_protocol=4)."""
    state = _state()
    path = tmp_path / "AdaMCT-Nov-30-2026.pth"
    torch.save({"config": RecBoleConfig(), "epoch": 12, "cur_step": 3, "best_valid_score": 0.41,
                "state_dict": state, "other_parameter": None}, path, pickle_protocol=4)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    obj = safe_pickle.load(path)
    _check(state, obj["state_dict"])
    assert obj["config"].fields["final_config_dict"]["model"] == "AdaMCT"
    assert type(obj["config"]).__qual_name__ == "RecBoleConfig"
    _check(state, read_state_dict(path))


def test_timm_saver_layout_with_ema_and_parameters(tmp_path):
    """timm 0.3 CheckpointSaver: epoch, arch, state_dict, optimizer, args, version, state_dict_ema."""
    state = _state()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 449, "arch": "mobile_former_294m", "state_dict": state, "version": 2,
                "args": TimmCheckpointSaverArgs(model_ema=True, amp=True), "metric": 77.9,
                "state_dict_ema": {k: torch.nn.Parameter(v.float(), requires_grad=False) if v.is_floating_point()
                                   else v for k, v in state.items()}}, path)
    obj = safe_pickle.load(path)
    _check(state, obj["state_dict"])
    assert obj["args"].fields == {"model_ema": True, "amp": True} and obj["metric"] == 77.9
    assert torch.equal(obj["state_dict_ema"]["w"], state["w"])


def test_legacy_non_zip_format(tmp_path):
    state = _state()
    path = tmp_path / "legacy.pth"
    torch.save({"model": state, "args": argparse.Namespace(a=1)}, path, _use_new_zipfile_serialization=False)
    obj = safe_pickle.load(path)
    _check(state, obj["model"])
    assert obj["args"].fields == {"a": 1}


def test_shared_storage_views_stay_views(tmp_path):
    base = torch.arange(10.0)
    path = tmp_path / "views.pth"
    torch.save({"a": base, "b": base[2:5]}, path, pickle_protocol=4)
    obj = safe_pickle.load(path)
    assert torch.equal(obj["b"], base[2:5])
    obj["a"][3] = -1
    assert obj["b"][1] == -1  # one storage, as torch.load gives


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalEvil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (eval, (f"open({str(self.target)!r}, 'w').close()",))


@pytest.mark.parametrize("cls", [_Evil, _EvalEvil])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_reduce_is_not_executed(tmp_path, cls, protocol):
    target = tmp_path / "pwned"
    state = _state()
    path = tmp_path / "evil.pth"
    torch.save({"model": state, "payload": cls(target)}, path, pickle_protocol=protocol)
    obj = safe_pickle.load(path)
    assert not target.exists()
    assert isinstance(obj["payload"], safe_pickle.Placeholder)
    _check(state, read_state_dict(path))
    assert not target.exists()
    # the same payload through the plain pickle module would run: the test's payload is real
    pickle.loads(pickle.dumps(cls(target)))
    assert target.exists()


def test_placeholders_never_resolve_real_objects(tmp_path):
    path = tmp_path / "globals.pth"
    torch.save({"fn": os.getcwd, "cls": argparse.Namespace, "t": torch.ones(2)}, path)
    obj = safe_pickle.load(path)
    assert obj["fn"] is not os.getcwd and issubclass(obj["fn"], safe_pickle.Placeholder)
    assert obj["cls"] is not argparse.Namespace and torch.equal(obj["t"], torch.ones(2))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(pickle.UnpicklingError):
        safe_pickle.load(path)
    with pytest.raises(ValueError, match="not a readable checkpoint.*restricted reader"):
        read_state_dict(path)
