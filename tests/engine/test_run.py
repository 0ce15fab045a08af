"""One way to load a run (`hybridzoo.engine.run`): for every task, through the CLI, a tiny `train`, then
`eval --run` and `predict --run FILE` on the default device — each checked against the weights loaded by
hand (create_model + safetensors + the task's preprocessing), so untrained weights, a default class
count or another preprocessing would fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import small_sr_val_folder
from PIL import Image
from safetensors.torch import load_file, save_file

import hybridzoo
from hybridzoo.cli import load_plugin, main
from hybridzoo.engine.run import load_run, read_run

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "hz_tiny_models.py")


@pytest.fixture(scope="module", autouse=True)
def _tiny_models():
    """hz_tiny_vit / hz_tiny_seg, registered at test time (so the generic model suite never collects them)."""
    load_plugin(TINY)


def _train(out: Path, *argv: str) -> Path:
    assert main(["--plugin", TINY, "train", *argv, "--epochs", "1", "--output", str(out), "--no-progress"]) == 0
    return out


def _eval_json(run: Path, tmp: Path, *extra: str) -> dict[str, float]:
    """`eval --run RUN` alone (and `extra`), the metrics read back from --json."""
    path = tmp / "eval.json"
    assert main(["--plugin", TINY, "eval", "--run", str(run), "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def _assert_same_as_training(run: Path, metrics: dict[str, float]) -> None:
    """The trainer scored the same weights on the same data at the end of the run (val_ema_* for EMA weights)."""
    summary = json.loads((run / "summary.json").read_text())
    prefix = "val_ema_" if read_run(run).weights_kind == "ema" else "val_"
    assert metrics
    for k, v in metrics.items():
        assert v == pytest.approx(summary[prefix + k[len("val_"):]], rel=1e-6, abs=1e-9), k


def _trained(name: str, run: Path, file: str = "model.safetensors", **kwargs) -> torch.nn.Module:
    model = hybridzoo.create_model(name, **kwargs)
    model.load_state_dict(load_file(str(run / file)))
    return model.eval()


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hybridzoo: error:"), err
    for n in needles:
        assert n in err[0]
    return err[0]


# --------------------------------------------------------------------------------------- classification
CLASSES = ("cat", "dog", "owl")


def _image_folder(root: Path, classes=CLASSES, n_train: int = 6, n_val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (40, 40, 3)) + np.array([80 * c, 40, 160 - 70 * c])
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    data = _image_folder(tmp / "data")
    return _train(tmp / "run", "--model", "hz_tiny_vit", "--data", str(data), "--batch-size", "6", "--lr", "0.01",
                  "--ema", "--ema-decay", "0.5")


def test_classification_eval_and_predict_use_the_trained_model(cls_run, tmp_path, capsys):
    from hybridzoo.data.folder import load_image
    from hybridzoo.data.transforms import EvalTransform

    _assert_same_as_training(cls_run, {k: v for k, v in _eval_json(cls_run, tmp_path).items()})
    img = _image(tmp_path / "x.png", 37, 45)
    assert main(["--plugin", TINY, "predict", "--run", str(cls_run), str(img), "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "p.json") in out                     # says where it wrote
    top = json.loads((tmp_path / "p.json").read_text())[0]["top"]
    # by hand: the run's weights (auto: EMA or raw, as the summary scores them), 3 classes, the eval transform
    spec = read_run(cls_run)
    model = _trained("hz_tiny_vit", cls_run, Path(spec.weights).name, num_classes=3)
    x = EvalTransform(32, crop_pct=0.875)(load_image(img))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert [t["class"] for t in top] == [CLASSES[i] for i in probs.argsort(descending=True).tolist()]
    assert [t["prob"] for t in top] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-6)


def test_eval_and_predict_on_the_cpu_run_the_faster_path_unless_told_not_to(cls_run, tmp_path, capsys, monkeypatch):
    """fp32 on the CPU: eval and predict time eager against the frozen oneDNN path on the first calls of each kind of
    input, say which they kept, and score the same; `--no-fast-cpu`, `--amp bf16` and the library default stay
    eager."""
    from hybridzoo.layers.onednn import _FasterForward

    monkeypatch.setattr(_FasterForward, "RACE_CALLS", 1)  # decided on the third call: warm-up, eager, oneDNN
    three_batches = ("--device", "cpu", "--batch-size", "1")   # 6 images at eval's twice 1: three calls, one race
    raced = _eval_json(cls_run, tmp_path, *three_batches)
    err = capsys.readouterr().err
    assert "CPU inference on 2×3×32×32: the " in err and "--no-fast-cpu keeps eager" in err, err
    eager = _eval_json(cls_run, tmp_path, *three_batches, "--no-fast-cpu")
    assert "CPU inference" not in capsys.readouterr().err
    assert raced == pytest.approx(eager, rel=1e-6)
    _eval_json(cls_run, tmp_path, *three_batches, "--amp", "bf16")
    assert "CPU inference" not in capsys.readouterr().err
    img = str(_image(tmp_path / "x.png", 37, 45))
    tops = []
    for extra in ((), ("--no-fast-cpu",)):
        out = tmp_path / f"p{len(tops)}.json"
        assert main(["--plugin", TINY, "predict", "--run", str(cls_run), img, img, img, "--device", "cpu", "--json",
                     str(out), *extra]) == 0
        assert ("CPU inference on 1×3×32×32: the " in capsys.readouterr().err) == (not extra)
        tops.append(json.loads(out.read_text()))
    for a, b in zip(*tops):  # each image answered by the frozen path, eager, the frozen path / eager throughout
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["prob"] for t in a["top"]] == pytest.approx([t["prob"] for t in b["top"]], abs=1e-6)
    assert not hasattr(load_run(cls_run, device="cpu").model, "race_log")
    assert load_run(cls_run, device="cpu", fast_cpu=True).model.race_log == []


def test_weights_choice_follows_the_summary(cls_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cls_run, run)
    summary = json.loads((run / "summary.json").read_text())
    raw, ema = summary["val_top1"], summary["val_ema_top1"]
    assert read_run(run).weights_kind == ("ema" if ema >= raw else "model")
    summary["val_ema_top1"], summary["val_top1"] = 0.0, 1.0          # the summary says the raw weights scored better
    (run / "summary.json").write_text(json.dumps(summary))
    assert read_run(run).weights_kind == "model"
    summary["val_ema_top1"] = 1.0
    (run / "summary.json").write_text(json.dumps(summary))
    loaded = load_run(run)
    assert loaded.weights.endswith("model_ema.safetensors") and loaded.weights_kind == "ema"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), _trained("hz_tiny_vit", run, "model_ema.safetensors", num_classes=3)(x))
        assert torch.equal(load_run(run, weights="model").model(x), _trained("hz_tiny_vit", run, num_classes=3)(x))
    last = load_run(run, weights="last")
    assert last.weights.endswith("last.ckpt") and last.data_info["class_names"] == list(CLASSES)
    assert last.input_size == (3, 32, 32) and last.task_name == "classification" and last.model_name == "hz_tiny_vit"


def test_weights_that_do_not_fit_the_saved_options_are_a_clear_error(cls_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cls_run, run)
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    other = hybridzoo.create_model("hz_tiny_vit", num_classes=5)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "model.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"does not fit hz_tiny_vit as built from the run's saved options "
                                         r"\(num_classes=3.*head.weight checkpoint \(5, 32\) vs model \(3, 32\)"):
        load_run(run, weights="model")
    assert main(["--plugin", TINY, "eval", "--run", str(run), "--weights", "model"]) == 2
    _one_error_line(capsys, "model.safetensors", "num_classes=3")


def test_eval_on_data_with_other_classes_is_refused(cls_run, tmp_path, capsys):
    other = _image_folder(tmp_path / "other", classes=("cat", "dog", "owl", "rat"), n_train=1, n_val=1)
    assert main(["--plugin", TINY, "eval", "--run", str(cls_run), "--data", str(other)]) == 2
    _one_error_line(capsys, "trained on 3 classes ['cat', 'dog', 'owl']",
                    "the data has 4 classes ['cat', 'dog', 'owl', 'rat']")


# --------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    return _train(tmp / "run", "--task", "segmentation", "--model", "hz_tiny_seg", "--num-classes", "3",
                  "--synthetic-size", "32", "--synthetic-train", "8", "--synthetic-val", "4", "--crop-size", "32",
                  "--batch-size", "4", "--lr", "0.01")


def test_segmentation_eval_and_predict_use_the_trained_model(seg_run, tmp_path, capsys):
    from hybridzoo.data.segmentation import SegTransform

    _assert_same_as_training(seg_run, _eval_json(seg_run, tmp_path))
    img = _image(tmp_path / "scene.png", 40, 48)
    capsys.readouterr()
    assert main(["--plugin", TINY, "predict", "--run", str(seg_run), str(img)]) == 0
    out = capsys.readouterr().out
    mask_path, overlay_path = seg_run / "predictions" / "scene_mask.png", seg_run / "predictions" / "scene_overlay.png"
    assert str(mask_path) in out and str(overlay_path) in out   # says where it wrote
    mask = np.asarray(Image.open(mask_path))
    raw = np.asarray(Image.open(img).convert("RGB"))
    x, _, _ = SegTransform(train=False)(raw, np.zeros(raw.shape[:2], np.uint8), np.random.default_rng(0))
    with torch.no_grad():
        logits = _trained("hz_tiny_seg", seg_run, num_classes=3)(x[None])
    assert logits.shape[1] == 3
    assert np.array_equal(mask, logits.argmax(1)[0].numpy().astype(np.uint8))
    assert np.asarray(Image.open(overlay_path)).shape == (40, 48, 3)
    assert (seg_run / "predictions" / "scene_overlay_legend.png").stat().st_size > 0   # with the class legend


# --------------------------------------------------------------------------------------- super-resolution
@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    return _train(tmp / "run", "--task", "super-resolution", "--limit-train-batches", "2", "--batch-size", "4",
                  "--patch-size", "16", "--val-data", str(small_sr_val_folder(tmp / "val")))


def test_super_resolution_eval_and_predict_use_the_trained_model(sr_run, tmp_path, capsys):
    from hybridzoo.data.super_resolution import quantize, to_tensor
    from hybridzoo.tasks.super_resolution import super_resolve

    _assert_same_as_training(sr_run, _eval_json(sr_run, tmp_path))
    img = _image(tmp_path / "small.png", 20, 26)
    capsys.readouterr()
    assert main(["predict", "--run", str(sr_run), str(img), "--output", str(tmp_path / "up")]) == 0
    out_path = tmp_path / "up" / "small_x2.png"
    assert str(out_path) in capsys.readouterr().out
    got = np.asarray(Image.open(out_path))
    assert got.shape == (40, 52, 3)
    model = _trained("act_tiny_x2", sr_run)
    want = quantize(super_resolve(model, to_tensor(np.asarray(Image.open(img)))[None], 2)[0])
    # predict's first call may run the frozen oneDNN copy (`fastest_cpu_inference` times both paths on its first
    # calls), whose sums round differently from eager's (~1e-4 here): a value at a .5 boundary may land one grey
    # level away. Another model's output would differ almost everywhere, and by far more.
    diff = np.abs(got.astype(int) - want.to(torch.uint8).permute(1, 2, 0).numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).sum())


# --------------------------------------------------------------------------------------- recommendation
@pytest.fixture(scope="module")
def rec_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rec")
    rows = ["user,item,timestamp"] + [f"u{u},i{(u + 3 * t) % 25},{1000 + t}" for u in range(40) for t in range(8)]
    (tmp / "log.csv").write_text("\n".join(rows) + "\n")
    return _train(tmp / "run", "--task", "recommendation", "--model", "adamct_beauty", "--data", str(tmp / "log.csv"),
                  "--kcore", "0", "--max-len", "10", "--batch-size", "64", "--num-negatives", "10")


def test_recommendation_eval_and_predict_use_the_trained_model(rec_run, tmp_path, capsys):
    _assert_same_as_training(rec_run, _eval_json(rec_run, tmp_path))
    capsys.readouterr()
    assert main(["predict", "--run", str(rec_run), "--history", "i1", "i4", "i7", "--topk", "5", "--json", "-"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    tokens = json.loads((rec_run / "items.json").read_text())
    assert load_run(rec_run).input_size == (10,)          # what export feeds: a history of the trained length
    model = _trained("adamct_beauty", rec_run, num_items=len(tokens), max_len=10)
    ids = [tokens.index(t) for t in ("i1", "i4", "i7")]
    seq = torch.zeros(1, 10, dtype=torch.long)
    seq[0, :3] = torch.tensor(ids)
    with torch.no_grad():
        scores = model.scores(model(seq, torch.tensor([3])))[0]
    scores[[0, *ids]] = -torch.inf
    want = scores.topk(5)
    assert [t["item"] for t in top] == [tokens[i] for i in want.indices.tolist()]
    assert [t["score"] for t in top] == pytest.approx(want.values.tolist(), abs=1e-5)


# --------------------------------------------------------------------------------------- land cover
GEO = [(33550, "d", 3, (20.0, 20.0, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, 300000.0, 5000000.0, 0.0), True),
       (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 32619), True)]


@pytest.fixture(scope="module")
def lc_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lc")
    return _train(tmp / "run", "--task", "land-cover", "--model", "cnn2d_landcover", "--scene-size", "32",
                  "--batch-size", "64")


def test_land_cover_eval_and_predict_use_the_trained_model(lc_run, tmp_path, capsys):
    import tifffile

    from hybridzoo.data import land_cover as lc
    from hybridzoo.tasks.land_cover import predict_scene

    _assert_same_as_training(lc_run, _eval_json(lc_run, tmp_path))
    scene = lc.make_synthetic_scene(20, 24, seed=5)
    tif = tmp_path / "scene.tif"
    tifffile.imwrite(tif, scene.image, photometric="minisblack", planarconfig="contig", extratags=GEO)
    capsys.readouterr()
    assert main(["predict", "--run", str(lc_run), str(tif)]) == 0
    out_tif = lc_run / "predictions" / "scene_classmap.tif"
    assert str(out_tif) in capsys.readouterr().out
    got = tifffile.imread(out_tif)
    data = json.loads((lc_run / "summary.json").read_text())["data"]   # the run's band statistics and classes
    model = _trained("cnn2d_landcover", lc_run, num_classes=data["num_classes"], in_chans=16)
    pred, _ = predict_scene(model, lc.RasterSource(tif), data["mean"], data["std"], 8)
    assert np.array_equal(got, np.asarray(data["class_values"])[pred])


# --------------------------------------------------------------------------------------- bad input, help
def test_predict_names_a_file_that_is_not_an_image(cls_run, seg_run, sr_run, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    for run in (cls_run, seg_run, sr_run):
        capsys.readouterr()
        assert main(["--plugin", TINY, "predict", "--run", str(run), str(bad)]) == 2
        _one_error_line(capsys, str(bad))
    assert main(["--plugin", TINY, "predict", "--run", str(seg_run), str(tmp_path / "missing.png")]) == 2
    _one_error_line(capsys, "missing.png", "not found")
    assert main(["--plugin", TINY, "predict", "--run", str(seg_run)]) == 2
    _one_error_line(capsys, "at least one image")


def _help(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_eval_and_predict_help_list_only_the_options_they_use(capsys):
    for training_only in ("--epochs", "--lr", "--mixup", "--teacher", "--smoothing", "--img-size", "--resume"):
        assert training_only not in _help(capsys, "eval")
        assert training_only not in _help(capsys, "predict")
    assert "--topk" in _help(capsys, "predict") and "--topk" not in _help(capsys, "eval")
    seg = _help(capsys, "predict", "--task", "segmentation")
    assert "--inference" in seg and "--synthetic-train" not in seg and "--head-lr-mult" not in seg
    rec = _help(capsys, "predict", "--task", "recommendation")
    assert "--history" in rec and "--max-len" not in rec and "--lr-schedule" not in rec
    for text in (_help(capsys, "eval"), _help(capsys, "predict")):
        assert "--run DIR" in text and "--weights" in text and "--device" in text


def test_weights_of_a_training_only_branch_left_empty_are_skipped():
    """SCTNet keeps its SIAM branch (with the teacher) in `siam`, None when built for inference."""
    from torch import nn

    from hybridzoo.engine.run import _drop_empty_slots

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 2)
            self.siam = None

    net = Net()
    trained = {**net.state_dict(), "siam.teacher.weight": torch.zeros(3), "other.weight": torch.zeros(1)}
    # the empty branch's keys go; anything else unexpected stays, so the strict load still names it
    assert set(_drop_empty_slots(net, trained)) == {"body.weight", "body.bias", "other.weight"}


def test_eval_of_foreign_weights_takes_the_classes_from_the_data(cls_run, tmp_path, capsys):
    """An official-style checkpoint (a bare state dict) names no model and carries no data facts."""
    pth = tmp_path / "weights.pth"
    torch.save(load_file(str(cls_run / "model.safetensors")), pth)
    data = json.loads((cls_run / "summary.json").read_text())["args"]["data"]
    out = tmp_path / "m.json"
    assert main(["--plugin", TINY, "eval", "--checkpoint", str(pth), "--model", "hz_tiny_vit", "--data", data,
                 "--json", str(out)]) == 0
    summary = json.loads((cls_run / "summary.json").read_text())
    assert json.loads(out.read_text())["val_top1"] == pytest.approx(summary["val_top1"])
    assert json.loads(out.read_text())["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    capsys.readouterr()
    assert main(["--plugin", TINY, "eval", "--checkpoint", str(pth), "--data", data]) == 2
    _one_error_line(capsys, "does not name its model", "--model")
    img = _image(tmp_path / "x.png", 32, 32)
    assert main(["--plugin", TINY, "predict", "--checkpoint", str(pth), "--model", "hz_tiny_vit", str(img)]) == 2
    _one_error_line(capsys, "weights.pth", "num_classes")
