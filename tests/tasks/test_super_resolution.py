"""The super-resolution task: Y-channel PSNR/SSIM, tiles, self-ensemble, baseline, pictures and predict."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.data.super_resolution import HRImageDataset, bicubic_downsample, bicubic_upsample, save_image, sr_collate
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
    # a batch: one score per image, each its own (non-square, so rows and columns cannot be swapped)
    hr = torch.rand(3, 3, 29, 43) * 255
    sr = (hr + torch.randn_like(hr) * torch.tensor([5.0, 15.0, 40.0])[:, None, None, None]).clamp(0, 255).round()
    refs = [structural_similarity(rgb_to_y(sr)[i, 2:-2, 2:-2].numpy(), rgb_to_y(hr)[i, 2:-2, 2:-2].numpy(),
                                  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
            for i in range(3)]
    torch.testing.assert_close(ssim_y(sr, hr, 2), torch.tensor(refs, dtype=torch.float64), atol=1e-9, rtol=0)


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
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["weight_decay"] == 0 and opt.defaults["lr"] == 1e-4
    assert task.build_optimizer(model, _args(lr=0.0)).defaults["lr"] == 0.0   # --lr 0 is kept, not the default
    assert task.build_optimizer(model, _args()).defaults["lr"] == task.default_lr
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


# -- benchmark folders through `hybridzoo eval`, evaluated whole; the bicubic baseline as published ----

def _write_png(path, a):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _read_png(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()


def _set5(root, scale=2, lr_noise=True):
    """Five images in the EDSR/BasicSR layout (Set5/HR/x.png + Set5/LR_bicubic/X2/xx2.png); the LR files
    are bicubic plus noise, so scores from recomputed LR would differ."""
    rng = np.random.default_rng(5)
    for i, name in enumerate(["baby", "bird", "butterfly", "head", "woman"]):
        hr = rng.integers(0, 256, size=(24 + 6 * i, 30, 3), dtype=np.uint8)
        hr = np.ascontiguousarray(np.cumsum(hr, axis=1) // np.arange(1, 31)[None, :, None]).astype(np.uint8)
        _write_png(root / "HR" / f"{name}.png", hr)
        lr = bicubic_downsample(torch.from_numpy(hr).permute(2, 0, 1).float(), scale)
        if lr_noise:
            lr = (lr + torch.from_numpy(rng.integers(-6, 7, size=tuple(lr.shape)))).clamp(0, 255)
        _write_png(root / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png",
                   lr.permute(1, 2, 0).numpy().astype(np.uint8))
    return sorted((root / "HR").iterdir()), sorted((root / "LR_bicubic" / f"X{scale}").iterdir())


def _metrics_line(out: str) -> dict[str, float]:
    line = [ln for ln in out.splitlines() if ln.startswith("val_")][-1].split()
    return {k: float(v) for k, v in zip(line[::2], line[1::2])}


def test_eval_val_data_benchmark_layout_is_evaluated_whole(tmp_path, capsys):
    from safetensors.torch import save_file

    import hybridzoo
    from hybridzoo.cli import main
    from hybridzoo.tasks.super_resolution import quantize

    hrs, lrs = _set5(tmp_path / "Set5")
    torch.manual_seed(0)
    model = hybridzoo.create_model("act_tiny_x2").eval()
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    common = ["eval", "--model", "act_tiny_x2", "--checkpoint", str(ckpt), "--device", "cpu", "--tile", "0"]
    assert main(common + ["--val-data", str(tmp_path / "Set5")]) == 0
    out = capsys.readouterr().out
    assert "validation: 5 HR/LR pairs, LR read from" in out
    got = _metrics_line(out)
    # by hand: the model on each LR file, rounded, Y-PSNR against its HR with 2 pixels cropped
    psnrs = []
    with torch.no_grad():
        for h, l in zip(hrs, lrs):
            hr, lr = _read_png(h), _read_png(l)
            sr = quantize(model(lr[None]))
            psnrs.append(float(psnr_y(sr, hr[None, :, : 2 * lr.shape[-2], : 2 * lr.shape[-1]], 2)))
    assert got["val_psnr_y"] == pytest.approx(sum(psnrs) / 5, abs=1e-4)
    # a flat folder of five HR images given as --data: all five, LR made by MATLAB bicubic
    assert main(common + ["--data", str(tmp_path / "Set5" / "HR")]) == 0
    assert "validation: 5 HR images, LR by MATLAB bicubic" in capsys.readouterr().out


def test_train_on_builtins_validates_on_val_data(tmp_path):
    from hybridzoo.data.super_resolution import PairedImageDataset

    _set5(tmp_path / "Set5")
    data = get_task("super-resolution").build_data(_args(val_data=str(tmp_path / "Set5")))
    assert isinstance(data.val, PairedImageDataset) and len(data.val) == 5 and data.info["val_images"] == 5
    assert len(data.train) > 5  # the built-in photographs still train


def test_comparison_zooms_on_the_highest_error_region():
    from hybridzoo.tasks.super_resolution import comparison_panels, zoom_window

    err = torch.zeros(60, 80)
    err[30:40, 48:58] = 1.0  # a 10×10 blob of error; elsewhere a weaker spread
    err[5:15, 5:15] = 0.3
    assert zoom_window(err, 12) == (30, 48)  # the only 12-pixel window on the stride-3 grid covering the blob
    torch.manual_seed(0)
    hr = torch.rand(3, 60, 80) * 255
    bic, sr = hr.clone(), hr.clone()
    bic[:, 40:56, 8:24] = 128.0  # bicubic lost the detail here ...
    sr[:, 40:56, 8:24] = hr[:, 40:56, 8:24] * 0.9 + 12  # ... the model recovered most of it
    c = comparison_panels([("bicubic ×2", bic), ("act", sr)], hr, zoom=16)
    assert c["box"] == (40, 8, 16)
    y, x, s = c["box"]
    titles = [t for t, _ in c["crops"]]
    expect = float(psnr_y(sr[None, :, y:y + s, x:x + s], hr[None, :, y:y + s, x:x + s], 0))
    assert titles[1] == f"zoom: act  {expect:.2f} dB" and titles[2] == "zoom: ground truth"
    assert torch.equal(c["crops"][0][1], bic[:, 40:56, 8:24])
    assert c["full"][0][0].startswith("bicubic ×2  ") and c["full"][0][0].endswith(" dB")
    # without ground truth (predict): where the model departs most from bicubic
    assert comparison_panels([("bicubic ×2", bic), ("act", sr)], zoom=16)["box"] == (40, 8, 16)


def test_eval_baseline_bicubic_cli_matches_independent_metrics(tmp_path, capsys):
    """`hybridzoo eval --task super-resolution --baseline bicubic --val-data Set5 --scale 2`: MATLAB bicubic
    ×2 of each LR file, scored by PSNR / SSIM written independently here (numpy; scikit-image's SSIM with
    the MATLAB settings) on Y with 2 pixels cropped."""
    import json

    from skimage.metrics import structural_similarity

    from hybridzoo.cli import main

    hrs, lrs = _set5(tmp_path / "Set5")
    out = tmp_path / "bicubic.json"
    assert main(["eval", "--task", "super-resolution", "--baseline", "bicubic", "--val-data", str(tmp_path / "Set5"),
                 "--scale", "2", "--json", str(out)]) == 0
    assert "validation: 5 HR/LR pairs" in capsys.readouterr().out
    got = json.loads(out.read_text())

    def y(a: np.ndarray) -> np.ndarray:  # BT.601 luma of an H×W×3 uint8-valued array, as MATLAB rgb2ycbcr
        return 16 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255

    psnrs, ssims = [], []
    for h, l in zip(hrs, lrs):
        lr = _read_png(l)
        up = bicubic_upsample(lr, 2).permute(1, 2, 0).numpy().astype(np.float64)
        hr = _read_png(h).permute(1, 2, 0).numpy().astype(np.float64)[: up.shape[0], : up.shape[1]]
        a, b = y(up)[2:-2, 2:-2], y(hr)[2:-2, 2:-2]
        psnrs.append(10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)))
        ssims.append(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=255))
    assert got["val_psnr_y_bicubic"] == pytest.approx(np.mean(psnrs), abs=1e-9)
    assert got["val_ssim_y_bicubic"] == pytest.approx(np.mean(ssims), abs=1e-9)
    # without --baseline, eval still wants weights
    assert main(["eval", "--task", "super-resolution", "--val-data", str(tmp_path / "Set5")]) == 2
