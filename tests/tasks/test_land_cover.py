"""The land-cover task: metrics on hand-computed confusion matrices, data/model wiring, maps, predict."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import save_file
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score
from torch.utils.data import DataLoader

from hybridzoo.data import land_cover as lc
from hybridzoo.tasks.base import get_task
from hybridzoo.tasks.land_cover import _ArraySource, confusion_matrix, land_cover_metrics, predict_scene

GEO = [(33550, "d", 3, (20.0, 20.0, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, 300000.0, 5000000.0, 0.0), True),
       (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 32619), True)]


def test_metrics_on_a_hand_computed_confusion_matrix():
    cm = np.array([[5, 1, 0],
                   [2, 3, 1],
                   [0, 0, 4]])
    m = land_cover_metrics(cm, ["water", "forested wetland", "bog"])
    # OA = 12/16; recalls 5/6, 3/6, 4/4; p_e = (6·7 + 6·4 + 4·5)/16² = 86/256
    assert m["oa"] == pytest.approx(0.75)
    assert m["aa"] == pytest.approx((5 / 6 + 3 / 6 + 1) / 3)
    assert m["kappa"] == pytest.approx((0.75 - 86 / 256) / (1 - 86 / 256))
    # F1 = 2TP / (2TP + FP + FN): 10/13, 6/10, 8/9
    assert m["f1_water"] == pytest.approx(10 / 13)
    assert m["f1_forested_wetland"] == pytest.approx(0.6)
    assert m["f1_bog"] == pytest.approx(8 / 9)
    # the same numbers as sklearn (what the WetMapFormer notebook uses) on the expanded labels
    t = np.repeat(np.repeat(np.arange(3), 3), cm.ravel())
    p = np.repeat(np.tile(np.arange(3), 3), cm.ravel())
    assert m["aa"] == pytest.approx(balanced_accuracy_score(t, p))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(t, p))
    np.testing.assert_allclose([m["f1_water"], m["f1_forested_wetland"], m["f1_bog"]], f1_score(t, p, average=None))


def test_metrics_edge_cases():
    perfect = land_cover_metrics(np.diag([3, 4, 5]))
    assert perfect["oa"] == perfect["aa"] == perfect["kappa"] == 1.0
    # everything predicted as class 0: kappa 0, AA = 1/K over present classes
    cm = np.array([[6, 0, 0], [3, 0, 0], [0, 0, 0]])
    m = land_cover_metrics(cm)
    assert m["kappa"] == pytest.approx(0.0) and m["aa"] == pytest.approx(0.5)   # class 2 absent: not averaged
    assert m["f1_2"] == 0.0 and m["oa"] == pytest.approx(6 / 9)
    # a 2×2 by hand: OA 0.7, p_e = (0.5·0.6 + 0.5·0.4) = 0.5, kappa 0.4
    assert land_cover_metrics(np.array([[4, 1], [2, 3]]))["kappa"] == pytest.approx(0.4)


def test_confusion_matrix_orientation():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]   # rows: reference, columns: prediction


def _args(task, argv=(), model="cnn2d_landcover"):
    p = argparse.ArgumentParser()
    task.add_arguments(p)
    a = p.parse_args(list(argv))
    a.model, a.data, a.pretrained = model, None, None
    return a


@pytest.mark.parametrize("split", ["random", "block"])
def test_task_trains_evaluates_and_draws_maps(tmp_path, split):
    task = get_task("land-cover")
    assert task.headline_metric == "oa" and task.default_model == "wetmapformer_small"
    args = _args(task, ["--scene-size", "48", "--split", split, "--block-size", "16"])
    data = task.build_data(args)
    info = data.info
    assert info["split"] == split and info["in_chans"] == 16 and info["num_classes"] == 7
    assert info["patch_size"] == 8
    # normalisation statistics come from the training pixels only
    scene = data.train.scene
    c = data.train.coords.numpy()
    np.testing.assert_allclose(info["mean"], scene.image[c[:, 0], c[:, 1]].mean(0), rtol=1e-4, atol=1e-5)
    if split == "block":
        assert info["dropped_buffer_pixels"] > 0
    torch.manual_seed(0)
    model = task.build_model(args, info)
    x, y = next(iter(DataLoader(data.train, batch_size=16, shuffle=True)))
    assert x.shape == (16, 16, 8, 8)
    loss, logs = task.training_step(model, (x, y), args)
    loss.backward()
    model.eval()
    m = task.evaluate(model, DataLoader(data.val, batch_size=64), args)
    assert {"oa", "aa", "kappa", "loss", "f1_water", "f1_forested_wetland", "f1_upland"} <= set(m)
    assert 0.0 <= m["oa"] <= 1.0
    base = task.baselines(data, args)
    counts = np.bincount(data.val.targets.numpy(), minlength=7)
    maj = np.bincount(data.train.targets.numpy(), minlength=7).argmax()
    assert base["val_oa_majority"] == pytest.approx(counts[maj] / counts.sum())
    assert base["val_kappa_majority"] == pytest.approx(0.0)
    assert "val_oa_centroid" in base
    extra = task.on_train_end(tmp_path, model, data, args)
    assert (tmp_path / "class_map.png").stat().st_size > 0
    assert tifffile.imread(tmp_path / "class_map.tif").shape == (48, 48)
    assert extra["predict_pixels_per_second"] > 0
    json.dumps(info)   # the engine stores it in checkpoints and safetensors metadata


def test_the_end_of_training_map_takes_the_faster_cpu_path(tmp_path, monkeypatch):
    """The whole-scene map at the end of `hybridzoo train` runs as `hybridzoo predict` does on the CPU in fp32 (the
    faster of eager and the frozen oneDNN path); `--no-fast-cpu` and `--amp` keep the training model."""
    from hybridzoo.layers import onednn

    if not onednn.onednn_available():
        pytest.skip("no oneDNN in this build")
    task = get_task("land-cover")
    args = _args(task, ["--scene-size", "32"], model="wetmapformer_small")
    data = task.build_data(args)
    torch.manual_seed(0)
    model = task.build_model(args, data.info).train()
    built = []
    real = onednn.fastest_cpu_inference
    monkeypatch.setattr(onednn, "fastest_cpu_inference", lambda m, **kw: built.append(m) or real(m, **kw))
    maps = {}
    for name, extra in (("fast", {}), ("eager", {"fast_cpu": False}), ("amp", {"amp": "bf16"})):
        for k, v in extra.items():
            setattr(args, k, v)
        task.on_train_end(tmp_path / name, model, data, args)
        maps[name] = tifffile.imread(tmp_path / name / "class_map.tif")
        assert model.training   # the training model's mode is left as it was
        for k in extra:
            delattr(args, k)
    assert built == [model]     # once: the default run only
    assert (maps["fast"] == maps["eager"]).mean() > 0.999   # the same function: fp32 rounding may flip a near tie


def test_task_reads_files_and_requires_labels(tmp_path):
    task = get_task("land-cover")
    scene = lc.make_synthetic_scene(32, 32, seed=1)
    np.save(tmp_path / "img.npy", scene.image)
    np.save(tmp_path / "gt.npy", scene.labels * 10)             # arbitrary label values keep their codes
    args = _args(task, ["--label", str(tmp_path / "gt.npy"), "--bands", "0-11", "--class-names", ",".join("abcdefg")])
    args.data = str(tmp_path / "img.npy")
    data = task.build_data(args)
    assert data.info["in_chans"] == 12 and data.info["class_values"] == [10, 20, 30, 40, 50, 60, 70]
    assert data.info["class_names"] == list("abcdefg")
    args.label = None
    with pytest.raises(ValueError, match="--label"):
        task.build_data(args)


def test_whole_scene_prediction_is_tiled_without_changing_results(tmp_path):
    task = get_task("land-cover")
    args = _args(task, ["--scene-size", "32"])
    data = task.build_data(args)
    torch.manual_seed(0)
    model = task.build_model(args, data.info).eval()
    scene = data.train.scene
    src = _ArraySource(scene.image)
    whole, _ = predict_scene(model, src, data.info["mean"], data.info["std"], 8, batch_size=4096, tile_pixels=10 ** 6)
    tiled, stats = predict_scene(model, src, data.info["mean"], data.info["std"], 8, batch_size=50, tile_pixels=100)
    assert np.array_equal(whole, tiled) and stats["pixels"] == 32 * 32
    # and the map at labelled pixels is the model's prediction on the training-time patches
    x, _ = data.val.patches(torch.arange(len(data.val)))
    with torch.no_grad():
        direct = model(x).argmax(1).numpy()
    c = data.val.coords.numpy()
    assert np.array_equal(whole[c[:, 0], c[:, 1]], direct)


def test_predict_command_writes_png_and_geotiff(tmp_path):
    task = get_task("land-cover")
    args = _args(task, ["--scene-size", "32"])
    data = task.build_data(args)
    torch.manual_seed(0)
    model = task.build_model(args, data.info)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"model": "cnn2d_landcover", "task": "land-cover", "data_info": json.dumps(data.info)})
    scene = lc.make_synthetic_scene(20, 24, seed=5)
    tifffile.imwrite(tmp_path / "scene.tif", scene.image, photometric="minisblack", planarconfig="contig",
                     extratags=GEO)
    np.save(tmp_path / "plain.npy", scene.image)
    pargs = _args(task, ["--tile-pixels", "100"])
    pargs.run, pargs.checkpoint, pargs.model, pargs.device = None, str(weights), None, "cpu"
    pargs.json, pargs.output = str(tmp_path / "p.json"), str(tmp_path / "maps")
    pargs.inputs = [str(tmp_path / "scene.tif"), str(tmp_path / "plain.npy")]
    task.predict(pargs)
    out = json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "maps" / "scene_classmap.png").is_file() and (tmp_path / "maps" / "plain_classmap.png").is_file()
    assert "geotiff" in out[0] and "geotiff" not in out[1]      # GeoTIFF only when the input was georeferenced
    with tifffile.TiffFile(out[0]["geotiff"]) as t:
        page = t.pages[0]
        assert page.shape == (20, 24)
        assert page.tags[33922].value == GEO[1][3] and page.tags[33550].value == GEO[0][3]
        values = set(np.unique(page.asarray()).tolist())
    assert values <= set(data.info["class_values"])
    assert sum(out[0]["class_counts"].values()) == 20 * 24
    np.save(tmp_path / "few.npy", scene.image[..., :12])
    pargs.inputs = [str(tmp_path / "few.npy")]
    with pytest.raises(ValueError, match="12 bands"):
        task.predict(pargs)


def test_task_reads_cube_and_labels_from_one_mat_file(tmp_path):
    from scipy.io import savemat

    task = get_task("land-cover")
    scene = lc.make_synthetic_scene(32, 32, seed=1)
    savemat(tmp_path / "Salinas.mat", {"salinas_corrected": scene.image, "salinas_gt": scene.labels.astype(np.uint8),
                                       "rgb": (scene.image[..., [3, 2, 1]] * 255).clip(0, 255).astype(np.uint8)})
    args = _args(task, ["--data-key", "salinas_corrected", "--label-key", "salinas_gt"])
    args.data = str(tmp_path / "Salinas.mat")
    data = task.build_data(args)
    assert data.info["in_chans"] == 16 and data.info["num_classes"] == 7 and data.info["data_key"] == "salinas_corrected"
    args.data_key = None
    with pytest.raises(ValueError, match=r"salinas_corrected \(32×32×16 float32\).*--data-key"):
        task.build_data(args)
