"""The segmentation task: metrics on hand-computed cases, losses, inference, a tiny training loop,
pictures and predict."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from hybridzoo.tasks.base import get_task
from hybridzoo.tasks.segmentation import (
    SegMetrics, class_map, cross_entropy, intersect_and_union, pixel_stats, poly_lr_lambda, segmentation_loss, slide_inference,
    whole_inference,
)
from _helpers import kernels_with_isa  # tests/conftest.py puts tests/ on sys.path


def test_iou_hand_computed_with_ignore():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    label = torch.tensor([[0, 1, 1], [255, 2, 0]])
    inter, union, ap, al = intersect_and_union(pred, label, 3)
    # the pixel labelled 255 (predicted 1) counts nowhere
    assert inter.tolist() == [1, 1, 1] and union.tolist() == [3, 2, 2]
    assert ap.tolist() == [2, 1, 2] and al.tolist() == [2, 2, 1]
    m = SegMetrics(3)
    m.update(pred, label)
    out = m.compute()
    assert out["miou"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert out["acc"] == pytest.approx(60.0)
    assert out["iou_0"] == pytest.approx(100 / 3)


def test_iou_is_pooled_over_the_dataset_not_averaged_per_image():
    m = SegMetrics(2)
    m.update(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long))        # perfect, class 0 absent
    m.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[1, 0], [0, 0]]))          # misses the one fg pixel
    out = m.compute()
    assert out["miou"] == pytest.approx(100 * (3 / 4 + 4 / 5) / 2)     # pooled: 77.5, per-image mean would be 68.75
    assert out["dice"] == pytest.approx(100 * 8 / 9)
    assert out["iou_fg"] == pytest.approx(80.0)
    assert out["dice_img"] == pytest.approx(50.0)                       # smp "micro-imagewise"


def test_class_absent_from_prediction_and_label_is_skipped():
    m = SegMetrics(3)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    out = m.compute()
    assert math.isnan(out["iou_2"])
    assert out["miou"] == pytest.approx(100 * (1 / 2 + 1 / 2) / 2)


def test_loss_adds_weighted_aux_and_ready_made_terms():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0] = 255
    main, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    extra = torch.tensor(0.25)
    loss, logs = segmentation_loss({"logits": main, "aux_logits": aux, "loss_siam": extra}, target)
    ce = lambda x: nn.functional.cross_entropy(  # noqa: E731
        nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False), target,
        ignore_index=255, reduction="sum") / target.numel()
    assert loss.item() == pytest.approx((ce(main) + 0.4 * ce(aux) + 0.25).item(), rel=1e-5)
    assert set(logs) == {"loss_ce", "loss_aux0", "loss_siam"}


class _TwoHeads(nn.Module):
    """Logits and auxiliary logits, with an auxiliary weight of its own (not the default 0.4)."""
    aux_loss_weights = (0.25,)

    def __init__(self):
        super().__init__()
        self.main, self.aux = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"logits": self.main(x), "aux_logits": self.aux(x)}


def test_training_step_reads_the_aux_weights_through_the_trainers_wrappers():
    """The trainer hands training_step its wrapper (DDP, a compiled module, the batch split's); the model's own
    auxiliary weight still applies."""
    from hybridzoo.layers.train_fast import BatchSplitTraining

    torch.manual_seed(0)
    model = _TwoHeads()
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    ce = lambda t: nn.functional.cross_entropy(t, y, ignore_index=255)  # noqa: E731
    want = ce(model.main(x)) + 0.25 * ce(model.aux(x))
    task = get_task("segmentation")
    compiled = nn.Module()
    compiled._orig_mod = model          # what torch.compile's OptimizedModule holds
    compiled.forward = model.forward
    for wrapper in (model, BatchSplitTraining(model, threads=1), compiled):
        loss, _ = task.training_step(wrapper, (x, y), argparse.Namespace())
        assert loss.item() == pytest.approx(want.item(), rel=1e-6), type(wrapper).__name__


def test_slide_inference_equals_whole_for_a_pointwise_model():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1).eval()
    x = torch.randn(1, 3, 37, 50)
    whole = whole_inference(model, x)
    slid = slide_inference(model, x, crop=(16, 24), stride=(10, 13), num_classes=4)
    torch.testing.assert_close(slid, whole)


def test_poly_schedule_with_warmup():
    f = poly_lr_lambda(total_steps=100, warmup_steps=10, power=1.0, warmup_ratio=1e-6)
    assert f(0) == pytest.approx(1e-6, abs=1e-6)
    assert f(10) == pytest.approx(0.9)
    assert f(50) == pytest.approx(0.5)
    assert f(100) == 0.0


def _args(tmp_path, **kw):
    base = dict(model="sctnet_s_seg50", data=None, dataset="auto", num_classes=3, synthetic_size=48, synthetic_train=8,
                synthetic_val=4, crop_size="32", seed=0, lr=2e-3, weight_decay=0.0, inference="whole", output=str(tmp_path),
                pretrained=None, teacher=None, head_lr_mult=10.0, base_scale=None, ratio_range="0.75,1.25",
                test_scale=None, slide_stride=None, no_photometric=False, avg_non_ignore=False, warmup_steps=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _record_legends(monkeypatch):
    """Legend labels of every figure saved from now on (the figures are still written)."""
    import matplotlib.figure

    seen, save = [], matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        seen.append([t.get_text() for lg in fig.legends for t in lg.get_texts()])
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_task_trains_evaluates_and_draws(tmp_path, monkeypatch):
    torch.manual_seed(0)
    task = get_task("segmentation")
    assert task.headline_metric == "miou"
    parser = argparse.ArgumentParser()
    task.add_arguments(parser)
    assert parser.parse_args(["--inference", "slide"]).inference == "slide"
    args = _args(tmp_path, model="sctnet_s_seg50")
    data = task.build_data(args)
    assert data.info["num_classes"] == 3 and len(data.train) == 8
    model = task.build_model(args, data.info)
    model.backbone.apply(lambda m: setattr(m, "drop_prob", 0.0) if hasattr(m, "drop_prob") else None)
    opt = task.build_optimizer(model, args)
    assert [g["lr_mult"] for g in opt.param_groups] == [1.0, 10.0]
    from hybridzoo.engine.optim import CosineWarmupSchedule
    sched = CosineWarmupSchedule(opt, total_steps=30, decay_fn=lambda s: task.lr_factor(s, 30, 10, args))
    loader = DataLoader(data.train, batch_size=4, shuffle=False, collate_fn=data.collate_fn)
    batch = next(iter(loader))
    model.train()
    losses = []
    for _ in range(12):          # overfit one batch: the loss (main + 0.4 aux) must fall
        loss, logs = task.training_step(model, batch, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.set_step(sched.step_count + 1)
        losses.append(loss.item())
    assert "loss_aux0" in logs and losses[-1] < 0.7 * losses[0]
    val_loader = DataLoader(data.val, batch_size=2, collate_fn=data.collate_fn)
    metrics = task.evaluate(model, val_loader, args)
    assert {"miou", "acc", "loss", "iou_background"} <= set(metrics) and 0 <= metrics["miou"] <= 100
    base = task.baselines(data, args)
    assert 0 <= base["val_miou_majority"] <= 100 / 3 + 1e-6   # one class predicted: at most its IoU / K
    legends = _record_legends(monkeypatch)
    task.on_train_end(tmp_path, model, data, args)
    assert (tmp_path / "overlays.png").stat().st_size > 0
    assert legends == [["background", "astronaut", "coffee"]]   # the overlays' colour legend names the classes


def _camvid_folder(root, n=4, size=32):
    """Indexed masks with classes 0..10 and CamVid's void value 11 (a 12th value, not a class)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"f{i}.png")
        Image.fromarray(rng.integers(0, 12, (size, size), dtype=np.uint8)).save(root / "masks" / f"f{i}.png")


def test_ignore_index_trains_where_the_raw_void_value_crashed(tmp_path):
    # today: `IndexError: Target 11 is out of bounds` in the loss with --num-classes 11
    _camvid_folder(tmp_path / "camvid")
    task = get_task("segmentation")
    args = _args(tmp_path, data=str(tmp_path / "camvid"), num_classes=11, ignore_index=11, reduce_zero_label=False)
    data = task.build_data(args)
    assert data.info["num_classes"] == 11
    model = task.build_model(args, data.info)
    batch = next(iter(DataLoader(data.train, batch_size=2, collate_fn=data.collate_fn)))
    assert (batch[1] == 255).any() and batch[1][batch[1] != 255].max() <= 10
    loss, _ = task.training_step(model, batch, args)
    assert torch.isfinite(loss)


def test_void_options_are_refused_where_the_layout_defines_its_own(tmp_path):
    task = get_task("segmentation")
    with pytest.raises(ValueError, match="--ignore-index applies to images/ \\+ masks/ folders"):
        task.build_data(_args(tmp_path, ignore_index=11))


def test_cli_out_of_range_label_is_one_error_line(tmp_path, capsys):
    from hybridzoo.cli import main

    _camvid_folder(tmp_path / "camvid", n=3, size=8)
    code = main(["train", "--task", "segmentation", "--model", "segformer_b0", "--data", str(tmp_path / "camvid"),
                 "--num-classes", "11", "--epochs", "1", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("hybridzoo: error: ") and "label value 11" in err[0] and "--ignore-index 11" in err[0]
    assert "f0.png" in err[0]


def test_legend_lists_every_class_of_a_short_list_and_only_present_ones_of_a_long_one():
    from hybridzoo.data.segmentation import palette
    from hybridzoo.tasks.segmentation import legend_handles, overlay_figure

    pal = palette(3)
    handles = legend_handles(pal, ["sky", "road", "car"])
    assert [h.get_label() for h in handles] == ["sky", "road", "car"]
    assert np.allclose(handles[2].get_facecolor()[:3], pal[2] / 255.0)   # the overlay's own colour
    ade = palette(150)
    names = [f"c{i}" for i in range(150)]
    pred = np.array([[3, 3], [149, 0]])
    fig = overlay_figure([("prediction", np.zeros((2, 2, 3), np.uint8), pred)], ade, names)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["c0", "c3", "c149"]


def test_default_builtin_run_is_sized_for_a_two_core_cpu():
    # today's defaults (256 scenes of 128 px, 96 px crops, 10 epochs) took over 15 minutes; the README
    # has the measured time and result of these
    task = get_task("segmentation")
    parser = argparse.ArgumentParser()
    task.add_arguments(parser)
    args = parser.parse_args([])
    args.model, args.data, args.seed = task.default_model, None, 0
    data = task.build_data(args)
    steps = task.default_epochs * math.ceil(len(data.train) / task.default_batch_size)
    img, mask, _ = data.train[0]
    assert steps <= 80 and img.shape[-2:] == (64, 64) and len(data.val) <= 32
    assert data.info["num_classes"] == 5


@pytest.mark.parametrize("k", [1, 2, 19, 150])
def test_the_class_map_is_the_argmax_over_classes(k):
    """`class_map` stands in for `argmax(1)` (faster on the CPU): the same indices, the first of tied maxima and a
    NaN counted largest included, in either memory layout."""
    g = torch.Generator().manual_seed(k)
    logits = (torch.randn(2, k, 9, 13, generator=g) * 2).round()   # rounded: many ties
    logits[0, k - 1, 0, 0] = float("nan")
    logits[1, 0, 4, 4], logits[1, k - 1, 4, 4] = float("nan"), float("nan")
    for x in (logits, logits.contiguous(memory_format=torch.channels_last)):
        got = class_map(x)
        assert got.dtype == torch.long and got.shape == (2, 9, 13)
        assert torch.equal(got, logits.argmax(1))
    assert int(class_map(logits)[1, 4, 4]) == 0 and int(class_map(logits)[0, 0, 0]) == k - 1


def _pixel_stats_ref(logits, labels, k):
    """The three passes apart, in float64: cross-entropy summed per image, the counts of `class_map`'s classes."""
    ce = F.cross_entropy(logits.double(), labels, ignore_index=255, reduction="none").flatten(1).sum(1)
    n = (labels != 255).flatten(1).sum(1).double()
    rows = []
    for pred, label in zip(class_map(logits), labels):
        inter, _, area_pred, area_label = intersect_and_union(pred, label, k)
        rows.append(torch.stack([inter, area_pred, area_label]))
    return torch.stack(rows), torch.stack([ce, n], 1)


@pytest.fixture(params=["avx512", "avx2", "none"])
def stats_isa(request):
    """`pixel_stats` on the native kernels of each instruction set this CPU has, and ("none") on ATen's ops."""
    from hybridzoo.layers import native
    if not native.load():
        pytest.skip("no native kernels here (no compiler); pixel_stats runs ATen's ops, as under 'none'")
    with kernels_with_isa(native, request.param):
        yield request.param


@pytest.mark.parametrize("k", [1, 2, 19, 150])
def test_pixel_stats_are_the_cross_entropy_and_the_counts_of_the_class_map(stats_isa, k):
    """One pass for evaluation: the summed cross-entropy of the labelled pixels, their number, and per class the
    intersection, predicted and label areas of `class_map` (ties to the first class), in any layout of the logits.
    37 columns: two full vectors of 16 pixels and a partial one."""
    g = torch.Generator().manual_seed(k)
    logits = (torch.randn(2, k, 9, 37, generator=g) * 2).round()   # rounded: many ties
    labels = torch.randint(0, k, (2, 9, 37), generator=g)
    labels[0, 2] = 255
    labels[1, :, 30:] = 255
    padded = torch.randn(2, k, 12, 45, generator=g)
    padded[:, :, :9, :37] = logits
    want_counts, want_loss = _pixel_stats_ref(logits, labels, k)
    for x in (logits, logits.contiguous(memory_format=torch.channels_last), padded[:, :, :9, :37]):
        counts, loss = pixel_stats(x, labels, k)
        assert counts.shape == (2, 3, k) and loss.shape == (2, 2)
        assert torch.equal(counts, want_counts)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6 * k)


@pytest.mark.parametrize("k", [2, 19])
def test_pixel_stats_resize_the_logits_to_the_labels_as_eval_did(stats_isa, k):
    """Logits of another size than their labels (an image resized for the model, its label at the original size)
    are resized first, as `F.interpolate(bilinear)` and then the three passes give it: up and down, in either
    layout, on a slice of a padded batch."""
    g = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (2, 9, 37), generator=g)
    labels[0, 1] = 255
    padded = torch.randn(2, k, 8, 16, generator=g) * 3
    for logits in (padded[:, :, :5, :11], padded[:, :, :5, :11].contiguous(memory_format=torch.channels_last),
                   torch.randn(2, k, 12, 40, generator=g) * 3):
        resized = F.interpolate(logits, size=(9, 37), mode="bilinear", align_corners=False)
        want_counts, want_loss = _pixel_stats_ref(resized, labels, k)
        counts, loss = pixel_stats(logits, labels, k)
        assert torch.equal(counts, want_counts)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5 * k)


@pytest.mark.parametrize("k", [1, 3])
def test_pixel_stats_treat_nan_and_infinite_logits_as_aten_does(stats_isa, k):
    """Per image, one pixel (in the full vector of 16) holds: a NaN (its class map takes the NaN, its loss is NaN),
    +inf (NaN), every logit -inf (NaN), the labelled class at -inf among finite others (+inf), nothing odd."""
    logits = torch.randn(5, k, 1, 20, generator=torch.Generator().manual_seed(k))
    labels = torch.zeros(5, 1, 20, dtype=torch.long)
    logits[0, k - 1, 0, 2] = float("nan")
    logits[1, 0, 0, 2] = float("inf")
    logits[2, :, 0, 2] = float("-inf")
    logits[3, 0, 0, 2] = float("-inf")
    want_counts, want_loss = _pixel_stats_ref(logits, labels, k)
    counts, loss = pixel_stats(logits, labels, k)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert loss[:3, 0].isnan().all() and (loss[3, 0] == float("inf") if k > 1 else loss[3, 0].isnan())
    assert loss[4, 0].isfinite()


def test_pixel_stats_name_a_label_outside_the_classes(stats_isa):
    logits, labels = torch.randn(1, 5, 4, 4), torch.randint(0, 5, (1, 4, 4))
    labels[0, 1, 2] = 7
    with pytest.raises(ValueError, match=r"a pixel has the label \[7\] outside the 5 classes 0\.\.4 and not the ignore"):
        pixel_stats(logits, labels, 5)
    labels[0, 3] = -1
    with pytest.raises(ValueError, match=r"5 pixels have labels \[-1, 7\]"):
        pixel_stats(logits, labels, 5)


class _Logits(nn.Module):
    """A fixed 1×1 convolution to K classes, channels-last output (as the frozen CPU path returns its logits)."""

    def __init__(self, k: int):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)
        torch.manual_seed(k)
        nn.init.normal_(self.conv.weight, std=2.0)

    def forward(self, x):
        return self.conv(x).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("k", [2, 5])
def test_eval_step_gives_the_metrics_of_the_class_map_and_the_cross_entropy(k):
    """The task's eval_step on a padded batch (the second image smaller than the first, its label smaller again, so
    its logits are cut and resized): every metric, the loss and the binary per-image scores included, as the class
    map of those logits and `F.cross_entropy` give them."""
    task = get_task("segmentation")
    model = _Logits(k).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 24, 40, generator=g)
    masks = torch.randint(0, k, (2, 24, 40), generator=g)
    masks[0, :3] = 255
    masks[1, 20:], masks[1, :, 30:] = 255, 255        # padding of the second label
    meta = torch.tensor([[24, 40, 24, 40], [16, 28, 20, 30]])   # image 2: 16 × 28 inside, label 20 × 30
    metric = task.build_metric(argparse.Namespace(), {"num_classes": k})
    task.eval_step(model, (images, masks, meta), metric, argparse.Namespace())
    want = task.build_metric(argparse.Namespace(), {"num_classes": k})
    with torch.no_grad():
        logits = model(images)
        for j, (ih, iw, mh, mw) in enumerate(meta.tolist()):
            lg = F.interpolate(logits[j:j + 1, :, :ih, :iw], size=(mh, mw), mode="bilinear", align_corners=False)
            target = masks[j:j + 1, :mh, :mw]
            want.add_loss(float(F.cross_entropy(lg.double(), target, ignore_index=255, reduction="sum")),
                          int((target != 255).sum()))
            want.update(lg.argmax(1)[0], target[0])
    got, expected = metric.compute(), want.compute()
    assert got.keys() == expected.keys() and {"miou", "acc", "macc", "loss"} <= got.keys()
    assert ("dice_img" in got) == (k == 2)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-6, nan_ok=True), name


def _ce_ref(logits, target, avg_non_ignore, weight):
    """weight × F.cross_entropy (mean over every pixel, or over the labelled ones) in float64, and its gradient."""
    x = logits.detach().double().requires_grad_()
    up = F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False) \
        if x.shape[-2:] != target.shape[-2:] else x
    per = F.cross_entropy(up, target, ignore_index=255, reduction="none")
    loss = weight * (per.sum() / (target != 255).sum() if avg_non_ignore else per.mean())
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("k", [1, 2, 19])
@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_training_cross_entropy_and_its_gradient_are_atens(stats_isa, k, avg_non_ignore):
    """The loss the trainer backpropagates (one pass of the native kernel on the CPU, ATen's ops under 'none'): its
    value and gradient are F.cross_entropy's, in every layout of the logits, resized to the labels first where their
    size differs (F.interpolate's bilinear), with a weight folded in, and with the loss scaled again before backward
    (grad_output ≠ 1)."""
    g = torch.Generator().manual_seed(k)
    target = torch.randint(0, k, (2, 12, 37), generator=g)
    target[0, :2] = 255
    base = torch.randn(2, k, 12, 37, generator=g) * 3
    padded = torch.randn(2, k, 14, 40, generator=g)
    padded[:, :, :12, :37] = base
    small = torch.randn(2, k, 3, 9, generator=g)
    cases = [base, base.contiguous(memory_format=torch.channels_last), padded[:, :, :12, :37],
             # resized to the labels' 12 × 37 first: up (a decode head's smaller map, in either layout), and down
             small, small.contiguous(memory_format=torch.channels_last), torch.randn(2, k, 16, 45, generator=g)]
    for logits in cases:
        for weight, then in ((1.0, 1.0), (0.4, 1.0), (1.0, 3.0)):
            want_loss, want_grad = _ce_ref(logits, target, avg_non_ignore, weight)
            x = logits.detach().clone().requires_grad_()   # (clone keeps a dense tensor's layout)
            loss = cross_entropy(x, target, 255, avg_non_ignore, weight=weight)
            assert loss.dtype == torch.float32 and loss.dim() == 0
            (loss * then).backward()
            torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad.double(), want_grad * then, rtol=1e-4, atol=1e-7)


def test_training_cross_entropy_gradient_at_odd_pixels(stats_isa):
    """A labelled pixel with a NaN logit has a NaN loss and gradient (as ATen's); its neighbours and every ignored
    pixel keep theirs (0 for the ignored); a label outside the classes is named."""
    logits = torch.randn(1, 3, 2, 20, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (1, 2, 20), generator=torch.Generator().manual_seed(1))
    target[0, 1] = 255
    logits[0, 1, 0, 4] = float("nan")
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, 255)
    loss.backward()
    assert loss.isnan() and x.grad[0, :, 0, 4].isnan().all()
    others = torch.ones(2, 20, dtype=torch.bool)
    others[0, 4] = False
    assert x.grad[0][:, others].isfinite().all() and (x.grad[0, :, 1] == 0).all()
    target[0, 0, 3] = 9
    with pytest.raises(ValueError, match=r"a pixel has the label \[9\] outside the 3 classes"):
        cross_entropy(logits.clone().requires_grad_(), target, 255)


def test_no_fast_cpu_keeps_atens_loss_and_stats(monkeypatch):
    """The one-pass kernels are part of the fast CPU path: `--no-fast-cpu` (args.fast_cpu False) trains and
    evaluates on ATen's ops, and the default takes the kernels where they build."""
    from hybridzoo.layers import native
    task = get_task("segmentation")
    model = _Logits(3).train()
    images, masks = torch.randn(2, 3, 8, 20), torch.randint(0, 3, (2, 8, 20))
    meta = torch.tensor([[8, 20, 8, 20]] * 2)
    used = []

    def refuse(name):
        def call(*args, **kwargs):
            used.append(name)
            raise RuntimeError("the kernel was called")
        return call

    monkeypatch.setattr(native, "seg_cross_entropy", refuse("loss"))
    monkeypatch.setattr(native, "seg_eval_stats", refuse("stats"))
    off = argparse.Namespace(fast_cpu=False)
    loss, _ = task.training_step(model, (images, masks), off)
    loss.backward()
    task.eval_step(model.eval(), (images, masks, meta), task.build_metric(off, {"num_classes": 3}), off)
    assert used == []
    if not native.load():
        pytest.skip("no native kernels here: the default path is ATen's too")
    on = argparse.Namespace(fast_cpu=True)
    with pytest.raises(RuntimeError, match="the kernel was called"):
        task.training_step(model.train(), (images, masks), on)
    with pytest.raises(RuntimeError, match="the kernel was called"):
        task.eval_step(model.eval(), (images, masks, meta), task.build_metric(on, {"num_classes": 3}), on)
    assert used == ["loss", "stats"]
