"""Fine-tuning from published weights: the head is reset for another class count, and starting from
trained weights beats starting from scratch after the same few steps (built-in digits)."""

from __future__ import annotations

import pytest
import torch

from hybridzoo.cli import build_parser
from hybridzoo.engine.checkpoint import save_weights
from hybridzoo.engine.optim import build_optimizer, layer_ids
from hybridzoo.engine.trainer import train
from hybridzoo.factory import read_state_dict
from hybridzoo.hub import published
from hybridzoo.hub.published import PublishedWeight, register_weight
from hybridzoo.tasks.base import get_task


def _args(*argv):
    task = get_task("classification")
    return build_parser(task).parse_args(["train", "--no-progress", *map(str, argv)]), task


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """cvt_tiny_demo trained 1 epoch on digits, then given a 1000-way head (as ImageNet weights have),
    published under a test tag whose file sits in the cache (a manual weight, placed by hand)."""
    root = tmp_path_factory.mktemp("ft")
    args, task = _args("--model", "cvt_tiny_demo", "--epochs", 1, "--output", root / "pre", "--seed", 0)
    train(args, task)
    state = read_state_dict(root / "pre" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    state["head.weight"] = torch.randn(1000, state["head.weight"].shape[1], generator=g) * 0.02
    state["head.bias"] = torch.zeros(1000)
    w = register_weight(PublishedWeight(tag="cvt_tiny_demo.ft_test", source="manual", url="https://example.invalid/x",
                                        layout="ours", dataset="digits (test)", metric={}, resolution=32,
                                        license="MIT", cite="test", num_classes=1000), replace=True)
    cache = root / "cache"
    save_weights(state, cache / "weights" / w.file_name)
    yield cache
    published._WEIGHTS.pop(w.tag, None)


def test_pretrained_beats_scratch_after_the_same_steps(imagenet_like, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDZOO_CACHE", str(imagenet_like))
    common = ("--model", "cvt_tiny_demo", "--epochs", 1, "--limit-train-batches", 4, "--seed", 1, "--lr", 5e-4,
              "--warmup-epochs", 0)
    args, task = _args(*common, "--pretrained", "ft_test", "--output", tmp_path / "ft")
    tuned = train(args, task).summary["val_top1"]
    out = capsys.readouterr().out
    assert "head has 1000 classes and the data 10" in out and "re-initialised" in out
    args, task = _args(*common, "--output", tmp_path / "scratch")
    scratch = train(args, task).summary["val_top1"]
    print(f"val_top1 after 4 steps: from pretrained {tuned:.3f}, from scratch {scratch:.3f}")
    assert tuned > scratch + 0.15, (tuned, scratch)  # measured: 0.681 vs 0.378


def test_layer_decay_scales_lr_by_depth():
    import hybridzoo

    model = hybridzoo.create_model("cvt_tiny_demo")
    ids, n = layer_ids(model)
    assert ids["head.weight"] == n - 1
    assert ids["stages.0.patch_embed.proj.weight"] < ids["stages.1.patch_embed.proj.weight"] < ids["head.weight"]
    opt = build_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    lr_of = {}
    names = {id(p): k for k, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            lr_of[names[id(p)]] = g["lr"]
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    for k, v in lr_of.items():
        assert v == pytest.approx(1e-3 * 0.5 ** (n - 1 - ids[k])), k
    assert min(lr_of.values()) < 1e-3 * 0.5 ** 5  # the stem trains much slower than the head
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    with pytest.raises(ValueError, match="layer-decay"):
        build_optimizer(model, 1e-3, 0.05, layer_decay=1.5)
    plain = build_optimizer(model, 1e-3, 0.05)
    assert all(g["lr"] == 1e-3 for g in plain.param_groups)
