"""The super-resolution task: Y-channel PSNR/SSIM, tiles, self-ensemble, baseline, pictures and predict."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.data.super_resolution import HRImageDataset, bicubic_upsample, save_image, sr_collate
from hybridzoo.tasks.base import TaskData, get_task
from hybridzoo.tasks.super_resolution import (
    psnr_y, rgb_to_y, self_ensemble_forward, ssim_y, super_resolve, tiled_forward,
)


def _args(**kw):
    base = dict(model="act_tiny_x2", data=None, scale=None, patch_size=12, train_repeat=None, val_data=None,
                tile=None, tile_overlap=24, self_ensemble=False, lr=None, epochs=9)
    base.update(kw)
    return argparse.Namespace(**base)


def test_registered():
    task = get_task("super-resolution")
    assert task.headline_metric == "psnr_y" and task.higher_is_better


def test_y_channel_bt601():
    white, black = torch.full((1, 3, 1, 1), 255.0), torch.zeros(1, 3, 1, 1)
    assert rgb_to_y(white).item() == pytest.approx(235.0) and rgb_to_y(black).item() == pytest.approx(16.0)
    red = torch.tensor([255.0, 0, 0]).reshape(1, 3, 1, 1)
    assert rgb_to_y(red).item() == pytest.approx(16 + 65.481)  # RGB order, not BGR


def test_psnr_hand_computed_and_identity():
    hr = torch.rand(2, 3, 20, 20) * 200
    d = 3.0
    # the same offset on R, G and B moves Y by d·219/255
    expected = 10 * math.log10(255 ** 2 / (d * 219 / 255) ** 2)
    got = psnr_y(hr + d, hr, border=2)
    torch.testing.assert_close(got, torch.full((2,), expected, dtype=torch.float64))
    assert torch.isinf(psnr_y(hr, hr, border=2)).all()
    sr = hr.clone()
    sr[..., :2, :] += 50  # error only inside the cropped border
    assert torch.isinf(psnr_y(sr, hr, border=2)).all()
    assert torch.isfinite(psnr_y(sr, hr, border=1)).all()


def test_ssim_hand_computed_identity_and_reference():
    a, b = 100.0, 140.0
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    ya, yb = 16 + a * 219 / 255, 16 + b * 219 / 255
    c1 = (0.01 * 255) ** 2
    assert ssim_y(x, y, 0).item() == pytest.approx((2 * ya * yb + c1) / (ya ** 2 + yb ** 2 + c1))
    img = torch.rand(1, 3, 32, 40) * 255
    assert ssim_y(img, img, 4).item() == pytest.approx(1.0)
    from skimage.metrics import structural_similarity

    noisy = (img + torch.randn_like(img) * 20).clamp(0, 255).round()
    ref = structural_similarity(rgb_to_y(noisy)[0, 3:-3, 3:-3].numpy(), rgb_to_y(img)[0, 3:-3, 3:-3].numpy(),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert ssim_y(noisy, img, 3).item() == pytest.approx(ref, abs=1e-9)


class _Local(nn.Module):
    """A per-pixel model (nearest ×2 upsampling of a 1×1 conv): tiling cannot change it."""

    upscale = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return F.interpolate(self.conv(x), scale_factor=2, mode="nearest")


def test_tiled_forward_matches_whole_and_bounds_batch():
    m = _Local()
    x = torch.rand(2, 3, 37, 50)
    with torch.no_grad():
        whole = m(x)
        m.calls.clear()
        tiled = tiled_forward(m, x, 2, tile=16, overlap=6, tile_batch=3)
    torch.testing.assert_close(tiled, whole)
    assert max(m.calls) <= 3 * 2 and len(m.calls) > 1


def test_self_ensemble_is_the_dihedral_mean():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)  # not flip-equivariant
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        outs = []
        for flip in (False, True):
            for k in range(4):
                t = torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))
                y = torch.rot90(conv(t), -k, (-2, -1))
                outs.append(y.flip(-1) if flip else y)
        torch.testing.assert_close(self_ensemble_forward(conv, x), torch.stack(outs).mean(0))


def test_act_tiled_and_ensembled_shapes():
    import hybridzoo

    torch.manual_seed(0)
    m = hybridzoo.create_model("act_x3", n_feats=8, num_stages=1, n_resblocks=1, num_heads=2, mlp_ratio=1,
                                reduction=4).eval()
    out = super_resolve(m, torch.rand(1, 3, 20, 25) * 255, 3, tile=12, tile_overlap=4, self_ensemble=True)
    assert out.shape == (1, 3, 60, 75) and torch.isfinite(out).all()


class _Bicubic(nn.Module):
    upscale = 2

    def forward(self, x):
        return torch.stack([bicubic_upsample(t, 2) for t in x])


def _small_data():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, size=(30, 36, 3), dtype=np.uint8) for _ in range(2)]
    return TaskData(train=HRImageDataset(imgs, 2, 12, train=True, repeat=2),
                    val=HRImageDataset(imgs, 2, train=False, names=["a", "b"]), collate_fn=sr_collate,
                    info={"scale": 2})


def test_evaluate_and_bicubic_baseline_agree():
    task = get_task("super-resolution")
    data = _small_data()
    loader = torch.utils.data.DataLoader(data.val, batch_size=2, collate_fn=data.collate_fn)
    metrics = task.evaluate(_Bicubic(), loader, _args(tile=0))
    base = task.baselines(data, _args())
    assert metrics["psnr_y"] == pytest.approx(base["psnr_y_bicubic"])
    assert metrics["ssim_y"] == pytest.approx(base["ssim_y_bicubic"])
    assert 10 < base["psnr_y_bicubic"] < 40 and 0 < base["ssim_y_bicubic"] < 1


def test_training_step_optimizer_and_schedule():
    import hybridzoo

    task = get_task("super-resolution")
    model = hybridzoo.create_model("act_tiny_x2", n_feats=8, num_stages=1, n_resblocks=1, mlp_ratio=1, reduction=4)
    data = _small_data()
    lr, hr = sr_collate([data.train[0], data.train[1]])
    loss, logs = task.training_step(model, (lr, hr), _args())
    assert loss.item() == pytest.approx(F.l1_loss(model(lr), hr).item(), rel=1e-5) and "l1" in logs
    opt = task.build_optimizer(model, _args(lr=1e-4))
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["weight_decay"] == 0
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])  # mean shifts stay frozen
    # 9 epochs of 4 steps: halved after epochs 3 and 6, constant within an epoch
    factors = [task.lr_factor(s, 36, 4, _args(epochs=9)) for s in range(36)]
    assert factors == pytest.approx([1.0] * 12 + [0.5] * 12 + [0.25] * 12)


def test_build_data_builtin_and_scale_mismatch():
    task = get_task("super-resolution")
    data = task.build_data(_args())
    assert data.info["scale"] == 2 and len(data.val) >= 3
    lr, hr = data.train[0]
    assert lr.shape == (3, 12, 12) and hr.shape == (3, 24, 24)
    with pytest.raises(ValueError, match="act_x4"):
        task.build_model(_args(model="act_tiny_x2"), {"scale": 4})


def test_pictures_and_predict(tmp_path):
    import hybridzoo

    task = get_task("super-resolution")
    torch.manual_seed(0)
    model = hybridzoo.create_model("act_tiny_x2").eval()
    model.model_name = "act_tiny_x2"
    data = _small_data()
    task.on_train_end(tmp_path, model, data, _args())
    assert (tmp_path / "comparison.png").stat().st_size > 0
    from safetensors.torch import save_file

    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    img = tmp_path / "in.png"
    save_image(img, torch.rand(3, 14, 17) * 255)
    task.predict(argparse.Namespace(model="act_tiny_x2", checkpoint=str(ckpt), inputs=[str(img)], output=str(tmp_path),
                                    tile=None, tile_overlap=24, self_ensemble=False, device="cpu"))
    from PIL import Image

    with Image.open(tmp_path / "in_x2.png") as im:
        assert im.size == (34, 28)
    assert (tmp_path / "in_x2_comparison.png").is_file()
