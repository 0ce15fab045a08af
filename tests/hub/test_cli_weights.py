"""`hybridzoo weights`, `eval --pretrained` (the publisher's figure beside ours), `predict --pretrained`
(ImageNet class names), and the table's own consistency."""

from __future__ import annotations

import json

import pytest
import torch

import hybridzoo
from hybridzoo.cli import main
from hybridzoo.engine.checkpoint import save_weights
from hybridzoo.hub import published
from hybridzoo.hub.published import (
    PublishedWeight,
    imagenet_classes,
    published_weights,
    register_weight,
)
from hybridzoo.registry import get_card, list_models


@pytest.fixture
def placed(tmp_path, monkeypatch):
    """Register manual test tags and place their files in a fresh cache, as a user would by hand."""
    monkeypatch.setenv("HYBRIDZOO_CACHE", str(tmp_path / "cache"))
    tags = []

    def place(suffix, state, **kw):
        fields = dict(source="manual", url="https://example.invalid/w", layout="ours", dataset="digits (test)",
                      metric={}, resolution=32, license="MIT", cite="test")
        fields.update(kw)
        w = register_weight(PublishedWeight(tag=f"cvt_tiny_demo.{suffix}", **fields), replace=True)
        tags.append(w.tag)
        if state is not None:
            save_weights(state, tmp_path / "cache" / "weights" / w.file_name)
        return w

    yield place
    for t in tags:
        published._WEIGHTS.pop(t, None)


def test_weights_lists_every_tag_with_source_metric_and_cache_state(placed, capsys):
    placed("cached_one", hybridzoo.create_model("cvt_tiny_demo").state_dict(), metric={"top1": 12.5})
    placed("missing_one", None)
    assert main(["weights", "cvt_tiny_demo"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("cvt_tiny_demo.")}
    assert set(rows) == {"cvt_tiny_demo.cached_one", "cvt_tiny_demo.missing_one"}
    assert rows["cvt_tiny_demo.cached_one"].rstrip().endswith("yes") and "top1 12.5" in rows["cvt_tiny_demo.cached_one"]
    assert rows["cvt_tiny_demo.missing_one"].rstrip().endswith("no") and "manual" in rows["cvt_tiny_demo.missing_one"]
    assert main(["weights", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {d["tag"] for d in listed} == {w.tag for w in published_weights()}
    assert any(d["tag"] == "deit_small_patch16_224.fb_in1k" and d["metric"] == {"top1": 79.9} for d in listed)


def test_eval_prints_the_publishers_figure_beside_ours(placed, capsys):
    torch.manual_seed(0)
    placed("eval_test", hybridzoo.create_model("cvt_tiny_demo").state_dict(), metric={"top1": 97.5}, num_classes=10)
    assert main(["eval", "--model", "cvt_tiny_demo", "--pretrained", "eval_test", "--limit-val-batches", "2",
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("cvt_tiny_demo.eval_test"))
    measured = float(next(l for l in out.splitlines() if l.startswith("val_")).split("val_top1 ")[1].split()[0])
    assert "publisher 97.5" in line and f"measured {measured * 100:.2f}" in line


def test_predict_with_imagenet_weights_prints_imagenet_names(placed, tmp_path, capsys):
    from PIL import Image

    state = hybridzoo.create_model("cvt_tiny_demo").state_dict()
    state["head.weight"] = torch.zeros(1000, state["head.weight"].shape[1])
    state["head.bias"] = torch.zeros(1000)
    state["head.bias"][1] = 10.0  # every image is a goldfish
    placed("in1k_test", state, dataset="ImageNet-1k (test)", num_classes=1000, resolution=32)
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(img)
    assert main(["predict", "--model", "cvt_tiny_demo", "--pretrained", "in1k_test", str(img)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split(None, 1)[1] == "goldfish"


def test_pretrained_errors_are_one_cli_line(placed, capsys, tmp_path):
    from PIL import Image

    placed("absent", None)
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["predict", "--model", "cvt_tiny_demo", "--pretrained", "absent", str(img)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridzoo: error: cvt_tiny_demo.absent:") and "https://example.invalid/w" in err
    assert main(["eval", "--model", "cvt_tiny_demo", "--pretrained", "nope"]) == 2
    assert "unknown weights tag 'nope'" in capsys.readouterr().err


def test_imagenet_class_names_ship_with_the_package():
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"


def test_the_table_is_consistent():
    known = set(list_models())
    families = {}
    for w in published_weights():
        assert w.model in known, w.tag
        assert w.cite and w.license and w.layout and w.dataset, w.tag
        assert w.source != "hf" or (w.hf_repo and w.hf_file), w.tag
        assert w.url is None or w.url.startswith("https://"), w.tag
        if w.hash_prefix:
            assert w.hash_prefix in w.url, w.tag  # torch-hub style: the prefix is in the file name
        families.setdefault(get_card(w.model).paper, []).append(w.tag)
        top1 = w.metric.get("top1")
        card = get_card(w.model).reported.get("top1")
        if top1 is not None and card is not None and w.dataset == "ImageNet-1k":
            assert abs(top1 - card) < 1.0, (w.tag, top1, card)  # the publisher's figure, near the paper's
    for paper in ("DeiT", "CvT", "ConViT", "Mobile-Former", "SegFormer", "SCTNet", "ACT"):
        assert any(p.startswith(paper) for p in families), paper
    assert len({w.file_name for w in published_weights() if w.source != "hf"}) == \
        sum(1 for w in published_weights() if w.source != "hf")  # no two cache entries collide


def test_info_lists_the_cards_published_weights(capsys):
    assert main(["info", "deit_small_patch16_224", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "weights deit_small_patch16_224.fb_in1k: url https://dl.fbaipublicfiles.com/deit/" in out
    assert main(["info", "deit_small_patch16_224", "--no-measure", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [w["tag"] for w in info["weights"]] == ["deit_small_patch16_224.fb_in1k"]
    assert info["weights"][0]["hash_prefix"] == "cd65a155"
