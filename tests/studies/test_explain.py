"""`hybridzoo explain`: the recorded attention is the layers' own, distributions sum to one, PNGs are written."""

import math

import pytest
import torch

import hybridzoo
from hybridzoo.explain import AttentionRecorder, explain_model, save_explanations, supervit_kept_tokens
from hybridzoo.registry import get_card

FAMILIES = ["deit_tiny_distilled_patch16_224", "vitc_1gf", "cvt_13", "ceit_tiny", "convit_tiny",
            "supervit_deit_small", "mobile_former_26m"]


def _reduced(name):
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **dict(card.test_kwargs or {})).eval()
    return model, torch.randn(2, *(card.test_input_size or card.input_size))


@pytest.mark.parametrize("name", FAMILIES)
def test_recorded_attention_is_the_layers_own(name):
    model, x = _reduced(name)
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(x)
    assert rec.records, name
    for r in rec.records:
        p = r["probs"]
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5), r["name"]   # distributions over keys
        if "values" in r:
            # the recomputed probabilities, applied to the layer's values and projection, give its output
            mod = model.get_submodule(r["name"])
            y = (p @ r["values"].float()).transpose(1, 2).reshape(p.shape[0], p.shape[2], -1)
            # a layer asked for its leading rows only (CvT's last block in model(x): the cls token) returns
            # those; the probabilities are recorded for every query
            y = y[:, :r["output"].shape[1]]
            assert torch.allclose(mod.proj(y), r["output"], atol=1e-4), r["name"]
    assert not model.blocks[0]._forward_hooks if hasattr(model, "blocks") else True   # hooks removed


@pytest.mark.parametrize("name", FAMILIES)
def test_explain_maps(name, tmp_path):
    model, x = _reduced(name)
    info = explain_model(model, x)
    if name != "mobile_former_26m":
        cls = info["cls_attention"]
        assert cls.dim() == 3 and (cls >= 0).all() and (cls.sum((1, 2)) <= 1 + 1e-5).all()
    if "rollout" in info:
        assert info["rollout"].sum() <= 1 + 1e-5 and (info["rollout"] >= 0).all()
    if name == "ceit_tiny":
        assert torch.allclose(info["layer_attention"].sum(-1), torch.ones(()), atol=1e-5)
    if name == "convit_tiny":
        gates = info["gates"]
        assert gates.shape == (model.local_up_to_layer, model.blocks[0].attn.num_heads)
        assert ((gates > 0) & (gates < 1)).all()
        assert torch.allclose(info["positional"].sum((-2, -1)), torch.ones(()), atol=1e-5)
    if name == "mobile_former_26m":
        assert info["bridges"]
        for _, maps in info["bridges"]:
            assert torch.allclose(maps.sum((-2, -1)), torch.ones(()), atol=1e-5)
    files = save_explanations(model, name, x[:1], x[:1], tmp_path, "img")
    assert files and all(f.is_file() and f.stat().st_size > 1000 for f in files)


def test_supervit_kept_tokens_follow_the_keep_rate():
    model, x = _reduced("supervit_deit_small")
    for rate in (1.0, 0.7, 0.5):
        mask, (gh, gw) = supervit_kept_tokens(model, x[:1], rate)
        n = gh * gw
        for _ in model.keep_layers if rate < 1 else ():
            n = min(math.ceil(rate * (n + 1)), n)      # ceil(r·N) of N tokens (class token included) kept
        assert int(mask.sum()) == n, rate


def test_explain_cli(tmp_path):
    from PIL import Image

    from hybridzoo.cli import main

    img = tmp_path / "a.png"
    Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(img)
    out = tmp_path / "ex"
    assert main(["explain", "--model", "convit_tiny", "--img-size", "64", str(img), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"a_attention.png", "a_gates.png", "a_positional.png"}
    assert main(["explain", "--model", "coatnet_0", str(img)]) == 2      # no attention map to draw: one clear error


def test_explain_a_trained_run(tmp_path):
    """`--run DIR` explains the trained model (the run's size and normalisation) through the one run loader."""
    from PIL import Image

    from hybridzoo.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "cvt_tiny_demo", "--epochs", "1", "--limit-train-batches", "2",
                 "--limit-val-batches", "1", "--output", str(run), "--no-progress"]) == 0
    img = tmp_path / "digit.png"
    Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(img)
    out = tmp_path / "ex"
    assert main(["explain", "--run", str(run), str(img), "--output", str(out)]) == 0
    assert (out / "digit_attention.png").stat().st_size > 1000


def test_linear_cka():
    from hybridzoo.explain import linear_cka

    torch.manual_seed(0)
    a = torch.randn(2, 8, 5, 6)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    rotated = torch.einsum("nchw,cd->ndhw", a, q) * 3.0      # an orthogonal map and a scale: the same features
    assert abs(linear_cka(a, rotated) - 1.0) < 1e-9
    assert linear_cka(a, torch.randn(2, 4, 5, 6)) < 0.5


def test_sctnet_teacher_alignment_picture(tmp_path):
    """SCTNet: CKA and cosine maps at the four places SIAM aligns the student with its teacher."""
    from hybridzoo.explain import SIAM_PAIRS, sctnet_alignment

    card = get_card("sctnet_s_seg50")
    teacher = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), decoder_dim=16)
    model = hybridzoo.create_model("sctnet_s_seg50", siam=True, teacher_kwargs=teacher, **card.test_kwargs).eval()
    x = torch.randn(1, *card.test_input_size)
    pairs = sctnet_alignment(model, x)
    assert [p["name"] for p in pairs] == list(SIAM_PAIRS)
    for p in pairs:
        assert 0.0 <= p["cka"] <= 1.0 + 1e-9 and p["cosine"].abs().max() <= 1.0 + 1e-5
    assert pairs[0]["cosine"].shape == (x.shape[-2] // 4, x.shape[-1] // 4)      # the teacher's logits at 1/4
    files = save_explanations(model, "sctnet_s_seg50", x, x, tmp_path, "img")
    assert [f.name for f in files] == ["img_teacher_alignment.png"]
    with pytest.raises(ValueError, match="--teacher"):
        sctnet_alignment(hybridzoo.create_model("sctnet_s_seg50", **card.test_kwargs), x)


def test_explain_cli_sctnet_with_a_random_teacher(tmp_path):
    from PIL import Image

    from hybridzoo.cli import main

    img = tmp_path / "street.png"
    Image.fromarray((torch.rand(64, 96, 3) * 255).byte().numpy()).save(img)
    out = tmp_path / "ex"
    assert main(["explain", "--model", "sctnet_s_seg50", "--img-size", "64", str(img), "--output", str(out)]) == 0
    assert (out / "street_teacher_alignment.png").stat().st_size > 1000
