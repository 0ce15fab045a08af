"""SuperViT: one supernet over input sizes and token-keeping rates, and its training step."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import hybridzoo
from hybridzoo.models.supervit import keep_tokens, sample_sub_networks, supervit_training_losses

SMALL = dict(patch_size=32, embed_dim=32, depth=4, num_heads=2, keep_layers=(1, 2, 3), num_classes=6)

# official lmbxmu/SuperViT super_deit_s, FlopCounterMode MACs (G): token grid × keep rate
OFFICIAL_MACS = {
    (128, 1.0): 1.438, (128, 0.7): 0.972, (128, 0.5): 0.742,
    (160, 1.0): 2.268, (160, 0.7): 1.515, (160, 0.5): 1.155,
    (192, 1.0): 3.315, (192, 0.7): 2.194, (192, 0.5): 1.668,
    (224, 1.0): 4.599, (224, 0.7): 3.013, (224, 0.5): 2.298,
}


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return hybridzoo.create_model("supervit_deit_small").eval()


def test_params_exact(meta_model):
    assert sum(p.numel() for p in meta_model.parameters()) == 22_170_088


@pytest.mark.parametrize("size,rate", sorted(OFFICIAL_MACS))
def test_macs_of_every_sub_network(meta_model, size, rate):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(torch.randn(1, 3, size, size, device="meta"), keep_rate=rate)
    macs = counter.get_total_flops() / 2e9
    assert macs == pytest.approx(OFFICIAL_MACS[(size, rate)], rel=0.02)


def test_bench_configs_cover_the_twelve_sub_networks(meta_model):
    configs = meta_model.bench_configs()
    assert len(configs) == 12
    pairs = {(c["input_size"], c["forward_kwargs"]["keep_rate"]) for c in configs}
    assert pairs == {((3, s, s), r) for s, r in OFFICIAL_MACS}
    assert all(c["forward_kwargs"]["img_size"] == c["input_size"][-1] for c in configs)
    assert meta_model.eval_configs() == configs


def test_bench_configs_run_on_a_reduced_model():
    model = hybridzoo.create_model("supervit_deit_small", **SMALL).eval()
    with torch.no_grad():
        for cfg in model.bench_configs():
            out = model(torch.randn(1, *cfg["input_size"]), **cfg["forward_kwargs"])
            assert out.shape == (1, 6)


def test_token_counts_follow_official_ceil_rule():
    """DeiT-S geometry at 14×14, keep 0.7: ceil(0.7·N) patches + cls at blocks 3, 6, 9 (N counts the cls)."""
    model = hybridzoo.create_model("supervit_deit_small", embed_dim=24, num_heads=2, num_classes=3).eval()
    counts = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, inp, out: counts.append(out.shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224), keep_rate=0.7)
    assert counts == [197] * 3 + [139] * 3 + [99] * 3 + [71] * 3


def test_keep_tokens_keeps_cls_and_the_most_attended_patches():
    x = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    score = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [0.9, 0.1, 0.8, 0.2, 0.7]])
    kept = keep_tokens(x, score, 0.5)  # ceil(0.5 · 6) = 3 patches + cls
    assert kept[0, :, 0].tolist() == [0.0, 4.0, 2.0, 5.0]
    assert kept[1, :, 0].tolist() == [6.0, 7.0, 9.0, 11.0]


def test_ranking_uses_class_attention_averaged_over_heads():
    torch.manual_seed(0)
    model = hybridzoo.create_model("supervit_deit_small", **SMALL).eval()
    attn = model.blocks[1].attn
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        _, score = attn(x, return_cls_attn=True)
        q, k, _ = attn.qkv(x).reshape(2, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)
        full = (q @ k.transpose(-1, -2) * 16 ** -0.5).softmax(-1)
    torch.testing.assert_close(score, full.mean(1)[:, 0, 1:])


def test_resolution_from_input_or_argument():
    torch.manual_seed(0)
    model = hybridzoo.create_model("supervit_deit_small", **SMALL).eval()
    x = torch.randn(2, 3, 300, 300)
    small = F.interpolate(x, size=(160, 160), mode="bilinear", align_corners=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x, img_size=160), model(small))
        # any other size goes to the default (largest) resolution
        big = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=True)
        torch.testing.assert_close(model(x), model(big))
    model.train()
    model(small, keep_rate=0.5).sum().backward()
    grads = {k: p.grad is not None for k, p in model.pos_embed.items()}
    assert grads == {"128": False, "160": True, "192": False, "224": False}


@pytest.mark.parametrize("kwargs", [dict(keep_rate=0.0), dict(keep_rate=1.5), dict(img_size=100)])
def test_bad_arguments_are_clear_errors(kwargs):
    model = hybridzoo.create_model("supervit_deit_small", **SMALL).eval()
    with pytest.raises(ValueError, match="supervit_deit_small"):
        model(torch.randn(1, 3, 224, 224), **kwargs)
    with pytest.raises(ValueError, match="supervit_deit_small"):
        model(torch.randn(1, 1, 224, 224))


def test_sampled_sub_networks_follow_the_paper():
    model = hybridzoo.create_model("supervit_deit_small", **SMALL)
    rng = random.Random(0)
    seen_small, seen_rates = set(), set()
    for _ in range(60):
        subs = sample_sub_networks(model, rng)
        assert subs[0] == (224, 1.0) and subs[1][0] == 224 and subs[2][1] == 1.0 and subs[3][0] == subs[2][0]
        seen_small.add(subs[2][0])
        seen_rates |= {subs[1][1], subs[3][1]}
    assert seen_small == {128, 160, 192} and seen_rates == {0.5, 0.7}


def test_training_losses_match_the_official_step():
    torch.manual_seed(0)
    model = hybridzoo.create_model("supervit_deit_small", **SMALL).train()
    images, labels = torch.randn(4, 3, 224, 224), torch.tensor([0, 1, 2, 3])
    ce = torch.nn.CrossEntropyLoss()
    subs = [(224, 1.0), (224, 0.5), (160, 1.0), (160, 0.7)]
    total, parts = supervit_training_losses(model, images, labels, ce, sub_networks=subs, return_parts=True)

    kl = torch.nn.KLDivLoss(reduction="batchmean")
    with torch.no_grad():
        t1 = model(images, img_size=224)
        s1 = model(images, keep_rate=0.5, img_size=224)
        t2 = model(images, img_size=160)
        s2 = model(images, keep_rate=0.7, img_size=160)
    expected = [ce(t1, labels), kl(F.log_softmax(s1, 1), F.softmax(t1, 1)),
                ce(t2, labels), kl(F.log_softmax(s2, 1), F.softmax(t2, 1))]
    torch.testing.assert_close(torch.stack(list(parts.values())), torch.stack(expected))
    torch.testing.assert_close(total.detach(), sum(expected))
    assert list(parts) == ["224_1", "224_0.5", "160_1", "160_0.7"]

    # accumulating each sub-network's gradient as it goes (official) equals backward of the sum
    total.backward()
    summed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    acc = supervit_training_losses(model, images, labels, ce, sub_networks=subs, backward=True)
    assert not acc.requires_grad
    torch.testing.assert_close(acc, total.detach())
    for n, p in model.named_parameters():
        if n in summed:
            torch.testing.assert_close(p.grad, summed[n], atol=1e-6, rtol=1e-5)
    assert model.pos_embed["128"].grad is None and model.pos_embed["160"].grad is not None


def test_kl_target_is_detached():
    torch.manual_seed(0)
    model = hybridzoo.create_model("supervit_deit_small", **SMALL).train()
    images = torch.randn(3, 3, 224, 224)
    zero_ce = lambda out, y: out.sum() * 0.0  # isolate the KL term
    loss = supervit_training_losses(model, images, None, zero_ce, sub_networks=[(224, 1.0), (224, 0.5)])
    params = [p for p in model.parameters() if p.requires_grad and p is not model.pos_embed["128"]
              and p is not model.pos_embed["160"] and p is not model.pos_embed["192"]]
    ours = torch.autograd.grad(loss, params)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    teacher = model(images)
    student = F.log_softmax(model(images, keep_rate=0.5), 1)
    detached = torch.autograd.grad(kl(student, F.softmax(teacher.detach(), 1)), params, retain_graph=True)
    attached = torch.autograd.grad(kl(student, F.softmax(teacher, 1)), params)
    for a, b in zip(ours, detached):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(ours, attached))


def test_training_losses_need_pairs():
    model = hybridzoo.create_model("supervit_deit_small", **SMALL)
    with pytest.raises(ValueError, match="pairs"):
        supervit_training_losses(model, torch.randn(1, 3, 224, 224), torch.tensor([0]),
                                 torch.nn.CrossEntropyLoss(), sub_networks=[(224, 1.0)])


def test_loads_official_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = hybridzoo.create_model("supervit_deit_small", **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # lmbxmu's layout: one nn.ParameterList `pos_embed_list`, in img_size_list order
    official = {}
    for k, v in model.state_dict().items():
        if k.startswith("pos_embed."):
            k = "pos_embed_list." + str([128, 160, 192, 224].index(int(k.split(".")[1])))
        official[k] = v.clone()
    path = tmp_path / "super_deit_s.pth"
    torch.save({"model": official}, path)
    loaded = hybridzoo.create_model("supervit_deit_small", pretrained=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for size, rate in [(224, 1.0), (192, 0.7), (128, 0.5)]:
            assert torch.equal(model(x, keep_rate=rate, img_size=size), loaded(x, keep_rate=rate, img_size=size))


def test_initialises_from_a_plain_deit_checkpoint(tmp_path):
    model = hybridzoo.create_model("supervit_deit_small", **SMALL)
    deit = {k: v for k, v in model.state_dict().items() if not k.startswith("pos_embed.")}
    deit["pos_embed"] = model.pos_embed["224"].detach().clone()
    path = tmp_path / "deit.pth"
    torch.save(deit, path)
    loaded = hybridzoo.create_model("supervit_deit_small", pretrained=str(path), **SMALL)
    assert torch.equal(loaded.pos_embed["224"], model.pos_embed["224"])
    assert loaded.pos_embed["128"].shape == (1, 4 * 4 + 1, 32)
    assert torch.equal(loaded.pos_embed["128"][:, 0], model.pos_embed["224"][:, 0])
