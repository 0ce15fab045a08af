"""Fixtures for the engine tests: the tiny test models and argument namespaces as the CLI builds them."""

from pathlib import Path

import pytest

TINY_MODELS = Path(__file__).resolve().parents[1] / "hz_tiny_models.py"


@pytest.fixture
def tiny():
    """Registers hz_tiny_vit & co. (at test time, so the generic model suite never sees them)."""
    from hybridzoo.cli import load_plugin

    return load_plugin(str(TINY_MODELS))


@pytest.fixture
def make_args(tiny):
    from hybridzoo.cli import build_parser
    from hybridzoo.tasks.base import get_task

    def make(*argv):
        task = get_task("classification")
        args = build_parser(task).parse_args(["train", "--no-progress", *map(str, argv)])
        return args, task

    return make
