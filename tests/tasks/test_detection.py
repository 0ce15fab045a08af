"""The detection task: COCO mAP by pycocotools on hand-made detections, the models' losses and
post-processing, and the whole user path through the CLI (train, eval, predict, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import hybridzoo
from hybridzoo.cli import main
from hybridzoo.layers.boxes import box_iou
from hybridzoo.registry import get_card
from hybridzoo.tasks.detection import CocoMetric, coco_summary


def _gt_rows(boxes_per_image):
    rows = []
    for i, boxes in enumerate(boxes_per_image):
        for x1, y1, x2, y2, lab in boxes:
            rows.append([i, x1, y1, x2, y2, lab, 0, (x2 - x1) * (y2 - y1)])
    return np.array(rows, np.float64).reshape(-1, 8)


GT = [[(10, 10, 60, 60, 0), (100, 20, 140, 90, 1)], [(5, 5, 45, 55, 1)], [(30, 30, 90, 70, 0)]]


def test_map_perfect_detections_is_100():
    gts = _gt_rows(GT)
    dets = np.array([[r[0], *r[1:5], 0.9, r[5]] for r in gts])
    s = coco_summary(gts, dets, np.arange(3), 2)
    assert s["map"] == pytest.approx(100.0) and s["map50"] == pytest.approx(100.0)
    assert s["map75"] == pytest.approx(100.0) and s["mar100"] == pytest.approx(100.0)
    # every box here is medium (32² ≤ area < 96²): no small or large objects → NaN, not 0 or −1
    assert s["map_medium"] == pytest.approx(100.0) and math.isnan(s["map_small"]) and math.isnan(s["map_large"])


def test_map_shifted_boxes_known_value():
    # every detection shifted right by a third of its width: IoU = (2/3) / (4/3) = 0.5 exactly is
    # ambiguous, so shift by 1/5: IoU = (4/5) / (6/5) = 2/3 ≈ 0.667 → matched at IoU thresholds
    # 0.50, 0.55, 0.60, 0.65 and missed at 0.70 ... 0.95: AP = 4/10 of a perfect score
    gts = _gt_rows(GT)
    dets = []
    for r in gts:
        w = r[3] - r[1]
        dets.append([r[0], r[1] + w / 5, r[2], r[3] + w / 5, r[4], 0.9, r[5]])
    s = coco_summary(gts, np.array(dets), np.arange(3), 2)
    assert s["map"] == pytest.approx(40.0) and s["map50"] == pytest.approx(100.0) and s["map75"] == pytest.approx(0.0)


def test_map_without_detections():
    s = coco_summary(_gt_rows(GT), np.zeros((0, 7)), np.arange(3), 2)
    assert s["map"] == 0.0 and s["mar100"] == 0.0 and s["map_medium"] == 0.0 and math.isnan(s["map_large"])


def test_map_counts_misses_and_false_positives():
    gts = _gt_rows(GT)
    # class 0 perfect; class 1: one of two found, plus a higher-scored false positive in an empty spot
    dets = np.array([[0, 10, 10, 60, 60, 0.9, 0], [2, 30, 30, 90, 70, 0.8, 0],
                     [0, 100, 20, 140, 90, 0.5, 1], [1, 200, 200, 240, 240, 0.95, 1]], np.float64)
    s = coco_summary(gts, dets, np.arange(3), 2)
    # class 1: precision 1/2 at recall 1/2 (the FP ranks first), no recall beyond → 101-point AP = 51/101 · 0.5
    ap1 = 0.5 * 51 / 101
    assert s["map"] == pytest.approx((1.0 + ap1) / 2 * 100, abs=1e-6)
    assert s["mar100"] == pytest.approx((1.0 + 0.5) / 2 * 100)


def test_coco_metric_state_concatenates_batches():
    m = CocoMetric(2)
    for i, boxes in enumerate(GT):
        b = torch.tensor([x[:4] for x in boxes], dtype=torch.float32)
        lab = torch.tensor([x[4] for x in boxes])
        m.update(torch.tensor([i]), [{"boxes": b, "scores": torch.full((len(b),), 0.9), "labels": lab}],
                 [{"boxes": b, "labels": lab, "crowd": torch.zeros(len(b), dtype=torch.bool)}], loss=2.0, n=1)
    st = m.state_dict()
    assert st["gts"].shape == (4, 8) and st["dets"].shape == (4, 7) and st["images"].tolist() == [0, 1, 2]
    out = m.compute()
    assert out["map"] == pytest.approx(100.0) and out["loss"] == pytest.approx(2.0)


def _targets():
    return [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
             "crowd": torch.tensor([False])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "crowd": torch.zeros(0, dtype=torch.bool)}]


@pytest.mark.parametrize("name", ["retinanet_mf_demo", "mf_detr_demo"])
def test_detector_loss_learns_one_box_and_postprocess(name):
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **get_card(name).test_kwargs)
    x = torch.randn(2, 3, 64, 64)
    model.eval()   # batch norm on running statistics, so that training and inference see one network
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, logs = model.loss(model(x), _targets(), image_size=(64, 64))
        assert torch.isfinite(loss) and logs
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        dets = model.postprocess(model(x), (64, 64))
    assert len(dets) == 2
    best = dets[0]["scores"].argmax()
    iou = box_iou(dets[0]["boxes"][best:best + 1], _targets()[0]["boxes"])
    assert int(dets[0]["labels"][best]) == 1 and float(iou) > 0.3


def test_retinanet_on_other_backbones():
    # any features_only model of the zoo: reduced CvT (strides 4/8/16), BoTNet and VVT
    for backbone, kw in (("cvt_13", get_card("cvt_13").test_kwargs), ("botnet_t4", get_card("botnet_t4").test_kwargs), ("vvt_tiny", get_card("vvt_tiny").test_kwargs)):
        model = hybridzoo.create_model("retinanet_mf_demo", backbone=backbone, backbone_kwargs=kw, num_classes=2)
        out = model(torch.randn(1, 3, 64, 64))
        assert out["cls_logits"].shape[:2] == out["box_deltas"].shape[:2] == (1, out["anchors"].shape[0])
        assert model.strides == model.in_strides == [int(i["reduction"]) for i in model.backbone.feature_info[-3:]]


TINY = ["--task", "detection", "--synthetic-train", "8", "--synthetic-val", "4", "--img-size", "64",
        "--batch-size", "4", "--no-progress", "--seed", "1"]


@pytest.mark.slow
def test_cli_train_eval_predict_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--stop-after-epochs", "1", "--output", str(run)]) == 0
    ckpt = run / "last.ckpt"
    assert ckpt.is_file() and not (run / "detections.png").exists()
    assert main(["train", "--resume", str(ckpt), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["epochs"] == 2 and summary["completed"]
    for k in ("val_map", "val_map50", "val_map75", "val_map_small", "val_mar100", "val_map_trivial"):
        assert k in summary
    assert (run / "detections.png").is_file() and (run / "curves.png").is_file()
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    # the run's image size and scenes are taken from its model.safetensors
    assert main(["eval", "--run", str(run), "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["val_map"] == pytest.approx(summary["val_map"], abs=1e-6)
    img = tmp_path / "scene.png"
    Image.fromarray(np.full((50, 90, 3), 120, np.uint8)).save(img)
    preds = tmp_path / "preds"
    assert main(["predict", "--run", str(run), str(img), "--output", str(preds), "--json", str(tmp_path / "p.json")]) == 0
    assert (preds / "scene_boxes.png").is_file()
    with Image.open(preds / "scene_boxes.png") as im:
        assert im.size == (90, 50)
    det = json.loads((preds / "detections.json").read_text())
    assert det[0]["image"] == str(img) and det == json.loads((tmp_path / "p.json").read_text())
    for d in det[0]["detections"]:
        x1, y1, x2, y2 = d["box_xyxy"]
        assert 0 <= x1 <= x2 <= 90 and 0 <= y1 <= y2 <= 50 and d["class"] in ("disc", "rectangle", "triangle")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--task", "detection", "--dataset", "coco", "--no-progress"]) == 2
    assert "needs --data PATH" in capsys.readouterr().err
    assert main(["train", "--task", "detection", "--data", str(tmp_path), "--no-progress"]) == 2
    assert "cannot tell the detection layout" in capsys.readouterr().err
    assert main(["train", "--task", "detection", "--model", "cvt_13", "--no-progress", "--synthetic-train", "4"]) == 2
    assert "is a classification model" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    from hybridzoo.data.detection import read_image

    with pytest.raises(ValueError, match="not a readable image"):
        read_image(notes)


def test_pretrained_backbone_weights(tmp_path):
    """`--pretrained` with classification weights fills the detector's backbone (the head's keys are dropped)."""
    import argparse

    from safetensors.torch import save_file

    from hybridzoo.models.retinanet import load_backbone_weights
    from hybridzoo.tasks.detection import DetectionTask

    torch.manual_seed(3)
    cls = hybridzoo.create_model("mobile_former_52m")
    path = tmp_path / "mf52.safetensors"
    save_file({k: v.contiguous() for k, v in cls.state_dict().items()}, str(path))
    args = argparse.Namespace(model="retinanet_mf_demo", pretrained=str(path))
    det = DetectionTask().build_model(args, {"num_classes": 3})
    own = det.backbone.model.state_dict()
    assert own and all(torch.equal(v, cls.state_dict()[k]) for k, v in own.items())
    # a checkpoint missing a backbone key is an error naming it
    state = {k: v for k, v in cls.state_dict().items() if k != "stem.0.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="stem.0.weight"):
        load_backbone_weights(det.backbone, tmp_path / "bad.safetensors")


def test_pretrained_backbone_from_another_detector(tmp_path):
    """`--pretrained` with a trained RetinaNet's weights fills MF-DETR's backbone (same backbone model);
    the detector's own layers keep their initialisation."""
    import argparse

    from safetensors.torch import save_file

    from hybridzoo.tasks.detection import DetectionTask

    torch.manual_seed(4)
    retina = hybridzoo.create_model("retinanet_mf_demo")
    path = tmp_path / "retina.safetensors"
    save_file({k: v.contiguous() for k, v in retina.state_dict().items()}, str(path))
    torch.manual_seed(5)
    fresh = hybridzoo.create_model("mf_detr_demo")
    torch.manual_seed(5)
    det = DetectionTask().build_model(argparse.Namespace(model="mf_detr_demo", pretrained=str(path)), {"num_classes": 3})
    want = retina.backbone.model.state_dict()
    own = det.backbone.model.state_dict()
    assert own.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in own.items())
    assert not torch.equal(own["stem.0.weight"], fresh.backbone.model.state_dict()["stem.0.weight"])
    assert torch.equal(det.queries, fresh.queries)
