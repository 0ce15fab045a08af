"""Studies (`hybridzoo study`): the attention-as-convolution construction, CoAtNet layouts, Pareto front."""

import json

import pytest
import torch
from torch import nn

from hybridzoo.studies.attention_conv import QuadraticPositionalAttention, from_conv, gpsa_matches_construction


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_equals_convolution(k, bias):
    torch.manual_seed(k)
    conv = nn.Conv2d(5, 7, k, padding=k // 2, bias=bias)
    x = torch.randn(3, 5, 11, 9)
    layer = from_conv(conv)
    assert layer.num_heads == k * k
    assert (layer(x) - conv(x)).abs().max() < 1e-5
    # the heads attend one pixel each: every attention row is one-hot at its kernel offset
    att = layer.attention(6, 6)
    assert torch.allclose(att.max(-1).values, torch.ones(()), atol=1e-6)


def test_attention_conv_without_padding_and_refusals():
    conv = nn.Conv2d(2, 3, 3, padding=0)
    x = torch.randn(1, 2, 8, 8)
    # without padding the layer keeps the full grid; its interior equals the valid convolution
    y = from_conv(conv)(x)
    assert (y[:, :, 1:-1, 1:-1] - conv(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="stride"):
        from_conv(nn.Conv2d(2, 3, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="odd"):
        from_conv(nn.Conv2d(2, 3, 2))


def test_softer_attention_is_not_the_convolution():
    """The exactness comes from the construction, not from a lenient comparison."""
    conv = nn.Conv2d(3, 3, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    assert (from_conv(conv, alpha=0.5)(x) - conv(x)).abs().max() > 1e-2


@pytest.mark.parametrize("heads", [9, 25])
def test_convit_gpsa_local_init_is_the_construction(heads):
    from hybridzoo.models.convit import GPSA

    gpsa = GPSA(heads * 2, num_heads=heads, locality_strength=1.5)
    gpsa.local_init()
    assert gpsa_matches_construction(gpsa, (5, 7)) < 1e-6
    # a GPSA layer without the local initialisation is not
    other = GPSA(heads * 2, num_heads=heads, locality_strength=1.5)
    assert gpsa_matches_construction(other, (5, 7)) > 1e-2


def test_quadratic_attention_learns():
    from hybridzoo.studies.attention_conv import grid_distance, imitate_conv

    res = imitate_conv(kernel_size=3, channels=2, size=6, steps=40, record_every=20)
    assert res["losses"][-1] < res["losses"][0] / 5
    assert res["centres"].shape == (3, 9, 2)
    mean, worst = grid_distance(res["target"], res["target"])
    assert mean == 0 and worst == 0
    layer = QuadraticPositionalAttention(2, 2, 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layer(torch.randn(2, 3))


def test_coatnet_layouts():
    import hybridzoo

    counts = {}
    for layout in ("C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T"):
        with torch.device("meta"):
            counts[layout] = sum(p.numel() for p in hybridzoo.create_model("coatnet_0", layout=layout).parameters())
    assert counts["C-C-T-T"] == 25_036_820   # the default layout is the registered coatnet_0
    assert len(set(counts.values())) == 4
    small = dict(dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), stem_width=8, head_hidden_size=None, dim_head=8,
                 img_size=64, num_classes=3)
    m = hybridzoo.create_model("coatnet_0", layout="T-C-T-C", **small)
    from hybridzoo.models.coatnet import MBConv, TransformerBlock

    assert [type(s[0]) for s in m.stages] == [TransformerBlock, MBConv, TransformerBlock, MBConv]
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert [f.shape[1] for f in m.forward_intermediates(torch.randn(1, 3, 64, 64))] == [8, 16, 32, 32, 32]
    with pytest.raises(ValueError, match="layout"):
        hybridzoo.create_model("coatnet_0", layout="C-C-X-T", **small)


def test_model_kwargs_option():
    from hybridzoo.tasks.classification import parse_model_kwargs

    assert parse_model_kwargs(["layout=C-C-C-T", "dims=[1, 2]", "head_hidden_size=None", "dim_head=16"]) == {
        "layout": "C-C-C-T", "dims": [1, 2], "head_hidden_size": None, "dim_head": 16}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_model_kwargs(["layout"])


def test_class_token_distillation():
    """A student without a distillation token distils through its class token (DeiT's 'usual distillation')."""
    from hybridzoo.tasks._distillation import DistillationLoss

    teacher = nn.Linear(4, 3)
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 0.5, 1.0)
    x, out, y = torch.randn(5, 4), torch.randn(5, 3), torch.randint(0, 3, (5,))
    expected = 0.5 * nn.functional.cross_entropy(out, y) + 0.5 * nn.functional.cross_entropy(out, teacher(x).argmax(1))
    assert torch.allclose(loss(x, out, y), expected)


def test_pareto_front():
    from hybridzoo.studies.scaling import pareto_front

    pts = [(10, 70), (5, 60), (20, 80), (15, 65), (5, 55), (30, 79)]
    assert sorted(pareto_front(pts)) == [0, 1, 2]


def test_study_cli_writes_table_and_plot(tmp_path):
    from hybridzoo.cli import main

    out = tmp_path / "study"
    assert main(["study", "attention-as-convolution", "--steps", "5", "--output", str(out)]) == 0
    for f in ("results.csv", "results.md", "attention_centres.png", "summary.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["study"] == "attention-as-convolution"
    assert summary["rows"][0]["max abs(attention − conv)"] < 1e-5
