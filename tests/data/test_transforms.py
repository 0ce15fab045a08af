"""The DeiT augmentations: shapes, target mixing, and that randomness is reproducible from the seed."""

import pytest
import torch

from hybridzoo.data.transforms import (EvalTransform, Mixup, RandomErasing, SoftTargetCrossEntropy, TrainTransform,
                                       cutmix_box, normalize, one_hot, random_resized_crop)


def test_one_hot_smoothing_sums_to_one():
    y = torch.tensor([0, 3, 9])
    t = one_hot(y, 10, smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert t[1, 3] == pytest.approx(0.9 + 0.01) and t[1, 0] == pytest.approx(0.01)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_targets_sum_to_one_and_match_pixels(mixup, cutmix):
    torch.manual_seed(0)
    # each image constant = its label, so the mixed pixels reveal the true mixing weight
    y = torch.arange(4)
    x = y.float().view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()
    m = Mixup(num_classes=4, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0)
    for _ in range(5):
        xm, t = m(x, y)
        assert torch.allclose(t.sum(1), torch.ones(4))
        # weight of the sample's own label equals the fraction of its pixels that survived
        for i in range(4):
            own = t[i, y[i]]
            partner = 3 - i
            if own < 1:
                frac = ((xm[i] - y[partner]) / (y[i] - y[partner])).mean()
                assert frac == pytest.approx(float(own), abs=1e-5)


def test_mixup_disabled_gives_smoothed_labels_and_same_images():
    m = Mixup(num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 4])
    xm, t = m(x, y)
    assert torch.equal(xm, x) and torch.allclose(t, one_hot(y, 5, 0.1))


def test_cutmix_box_area():
    torch.manual_seed(1)
    top, left, h, w = cutmix_box(32, 32, 0.75)
    assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
    assert h * w <= 32 * 32 * 0.25 + 1


def test_random_erasing_touches_one_box_per_sample():
    torch.manual_seed(0)
    x = torch.zeros(6, 3, 24, 24)
    out = RandomErasing(prob=1.0)(x)
    for i in range(6):
        changed = (out[i] != 0).any(0)
        assert changed.any()
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.95  # a filled rectangle (noise is non-zero almost surely)
        assert changed.float().mean() <= 1 / 3 + 0.05
    assert torch.equal(RandomErasing(prob=0.0)(x), x)


def test_random_resized_crop_and_flip_shapes_and_reproducibility():
    img = torch.rand(3, 40, 50)
    tf = TrainTransform(32, scale=(0.08, 1.0), hflip_prob=0.5)
    torch.manual_seed(3)
    a = tf(img)
    torch.manual_seed(3)
    b = tf(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert random_resized_crop(img, (16, 16)).shape == (3, 16, 16)


def test_full_area_crop_is_a_plain_resize():
    img = torch.rand(3, 32, 32)
    assert torch.allclose(TrainTransform(32, scale=(1.0, 1.0), hflip_prob=0.0)(img), normalize(img))


def test_eval_transform_centre_crop():
    img = torch.rand(3, 60, 80)
    out = EvalTransform(32, crop_pct=0.875)(img)
    assert out.shape == (3, 32, 32)


def test_soft_target_cross_entropy_matches_hard_labels():
    logits, y = torch.randn(4, 7), torch.tensor([0, 6, 2, 2])
    loss = SoftTargetCrossEntropy()(logits, one_hot(y, 7))
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
