"""Every recipe in configs/ names a registered model and only options `hybridzoo train` knows."""

from pathlib import Path

import pytest
import yaml

import hybridzoo
from hybridzoo.cli import _read_config, build_parser
from hybridzoo.tasks.base import get_task

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    cfg = _read_config(str(path))  # keys as the long options, '-' or '_'
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    assert cfg["model"] in hybridzoo.list_models()
    task = get_task(cfg.get("task") or hybridzoo.model_card(cfg["model"]).task)
    train = build_parser(task)._subparsers._group_actions[0].choices["train"]
    known = {a.dest for a in train._actions}
    assert not set(cfg) - known, f"{path.name}: unknown options {sorted(set(cfg) - known)}"
