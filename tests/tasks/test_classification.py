"""The classification task: data sources, metrics, baseline, DeiT distillation, fine-tuning a new head."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hybridzoo
from hybridzoo.tasks.base import get_task

TINY = Path(__file__).resolve().parents[1] / "hz_tiny_models.py"


@pytest.fixture
def task():
    from hybridzoo.cli import load_plugin

    load_plugin(str(TINY))
    return get_task("classification")


def _args(task, *argv):
    from hybridzoo.cli import build_parser
    from hybridzoo.engine.trainer import fill_defaults

    return fill_defaults(build_parser(task).parse_args(["train", *map(str, argv)]), task)


def test_registered_with_cvt_demo_default(task):
    assert task.name == "classification" and task.default_model == "cvt_tiny_demo" and task.headline_metric == "top1"


def test_digits_data_and_metrics(task):
    args = _args(task, "--model", "hz_tiny_vit")
    data = task.build_data(args)
    assert data.info["num_classes"] == 10 and data.info["class_names"][3] == "3" and data.info["img_size"] == 32
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    model = task.build_model(args, data.info).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data.val, range(40)), batch_size=16)
    m = task.evaluate(model, loader, args)
    assert set(m) == {"loss", "top1", "top5"} and 0 <= m["top1"] <= m["top5"] <= 1
    xs, ys = zip(*[data.val[i] for i in range(40)])
    logits = model(torch.stack(xs))
    assert m["top1"] == pytest.approx((logits.argmax(1) == torch.tensor(ys)).float().mean().item())
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, torch.tensor(ys)).item(), rel=1e-5)
    assert task.baselines(data, args)["val_top1_majority"] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("num_classes", [2, 5, 6, 10])
def test_top5_only_with_more_than_five_classes(task, num_classes):
    # with 5 or fewer classes top-5 is 1.0 by construction: it must not be reported
    from hybridzoo.tasks.classification import ClassificationMetric

    g = torch.Generator().manual_seed(num_classes)
    logits, y = torch.randn(50, num_classes, generator=g), torch.randint(0, num_classes, (50,), generator=g)
    for metric in (task.build_metric(argparse.Namespace(), {"num_classes": num_classes}), ClassificationMetric()):
        metric.update(logits[:20], y[:20])
        metric.update(logits[20:], y[20:])
        m = metric.compute()
        assert m["top1"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
        if num_classes <= 5:
            assert set(m) == {"loss", "top1"}
        else:
            assert set(m) == {"loss", "top1", "top5"}
            top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
            assert m["top5"] == pytest.approx(top5) and m["top5"] < 1.0


def _save(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_deit_distillation_loss(task, tmp_path, kind):
    torch.manual_seed(0)
    teacher = hybridzoo.create_model("hz_tiny_vit", num_classes=10)
    _save(teacher, tmp_path / "teacher.safetensors")
    args = _args(task, "--model", "hz_tiny_vit_distilled", "--teacher", "hz_tiny_vit", "--teacher-checkpoint",
                 tmp_path / "teacher.safetensors", "--distillation", kind, "--distillation-alpha", 0.3,
                 "--distillation-tau", 2.0, "--smoothing", 0)
    data = task.build_data(args)
    student = task.build_model(args, data.info).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    loss, _ = task.training_step(student, (x, y), args)
    cls, dist = student(x)
    with torch.no_grad():
        t = teacher.eval()(x)
    if kind == "soft":
        kd = F.kl_div(F.log_softmax(dist / 2, 1), F.log_softmax(t / 2, 1), reduction="sum", log_target=True) * 4 / dist.numel()
    else:
        kd = F.cross_entropy(dist, t.argmax(1))
    assert loss.item() == pytest.approx((0.7 * F.cross_entropy(cls, y) + 0.3 * kd).item(), rel=1e-5)
    loss.backward()
    assert student.head_dist.weight.grad is not None
    assert all(p.grad is None for p in task.teacher.parameters())


def test_distillation_needs_a_teacher_checkpoint(task):
    args = _args(task, "--model", "hz_tiny_vit_distilled", "--teacher", "hz_tiny_vit", "--distillation", "hard")
    with pytest.raises(ValueError, match="--teacher-checkpoint"):
        task.build_model(args, {"num_classes": 10})


def test_mixup_training_step(task):
    args = _args(task, "--model", "hz_tiny_vit", "--mixup", 0.8, "--cutmix", 1.0, "--reprob", 0.25)
    model = task.build_model(args, {"num_classes": 10, "img_size": 32})
    loss, _ = task.training_step(model, (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])), args)
    assert torch.isfinite(loss) and task.mixup is not None and task.erasing is not None


def test_pretrained_with_another_head_is_fine_tuned(task, tmp_path):
    torch.manual_seed(0)
    src = hybridzoo.create_model("hz_tiny_vit", num_classes=10)
    _save(src, tmp_path / "w.safetensors")
    args = _args(task, "--model", "hz_tiny_vit", "--pretrained", tmp_path / "w.safetensors")
    model = task.build_model(args, {"num_classes": 4, "img_size": 32})
    assert model.head.out_features == 4
    assert torch.equal(model.patch_embed.weight, src.patch_embed.weight)


def test_image_folder_and_missing_data(task, tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / split / c / "x.png")
    args = _args(task, "--model", "hz_tiny_vit", "--data", tmp_path, "--img-size", 32)
    data = task.build_data(args)
    assert data.info["class_names"] == ["a", "b", "c"] and data.train[0][0].shape == (3, 32, 32)
    args = _args(task, "--model", "hz_tiny_vit", "--data", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing.*train/<class>"):
        task.build_data(args)


def test_eval_selects_a_supervit_subnetwork(monkeypatch):
    import argparse

    import hybridzoo
    from hybridzoo.tasks.classification import _subnetwork_kwargs

    model = hybridzoo.create_model("supervit_deit_small", embed_dim=48, depth=10, num_heads=2, num_classes=3)
    kw = _subnetwork_kwargs(model, argparse.Namespace(resolution=160, keep_rate=0.7))
    assert kw == {"img_size": 160, "keep_rate": 0.7}
    # through the trainer's wrappers too: a compiled model's forward takes (*args, **kwargs)
    from hybridzoo.layers.train_fast import BatchSplitTraining

    for wrapped in (torch.compile(model), BatchSplitTraining(model)):
        assert _subnetwork_kwargs(wrapped, argparse.Namespace(resolution=160, keep_rate=0.7)) == kw
    other = hybridzoo.create_model("cvt_tiny_demo")
    with pytest.raises(ValueError, match="--keep-rate"):
        _subnetwork_kwargs(other, argparse.Namespace(resolution=None, keep_rate=0.7))
