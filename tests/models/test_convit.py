"""ConViT: what makes the paper the paper — GPSA, its convolutional (locality) init, cls token late."""

from __future__ import annotations

import copy

import pytest
import torch

import hybridzoo
from hybridzoo.models.convit import GPSA, convert_official, relative_indices

SMALL = dict(embed_dim=36, num_heads=9, depth=3, local_up_to_layer=2, img_size=64, num_classes=7)


def _official_rel_indices(side: int) -> torch.Tensor:
    """The official get_rel_indices construction (square grid), written independently of ours."""
    ind = torch.arange(side).view(1, -1) - torch.arange(side).view(-1, 1)
    indx = ind.repeat(side, side)
    indy = ind.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
    return torch.stack([indx, indy, indx ** 2 + indy ** 2], dim=-1).unsqueeze(0).float()


def test_relative_indices_match_official_layout():
    assert torch.equal(relative_indices((5, 5)), _official_rel_indices(5))
    rel = relative_indices((2, 3))  # non-square: patch 4 is (row 1, col 1), patch 2 is (row 0, col 2)
    assert rel[0, 4, 2].tolist() == [1.0, -1.0, 2.0]


@pytest.mark.parametrize("heads", [4, 9, 16])
def test_locality_init_places_each_head_on_its_own_offset(heads):
    torch.manual_seed(0)
    attn = GPSA(heads * 4, num_heads=heads, locality_strength=1.0)
    attn.local_init()
    assert torch.equal(attn.v.weight, torch.eye(heads * 4))
    side = 15
    rel = relative_indices((side, side))
    pos = attn.positional_attention(rel)[0]  # (heads, N, N)
    q = (side // 2) * side + side // 2  # the centre patch, far from the borders
    k = int(heads ** 0.5)
    c = (k - 1) / 2 if k % 2 == 0 else k // 2
    rows = torch.arange(side * side) // side - side // 2
    cols = torch.arange(side * side) % side - side // 2
    offsets = set()
    for h1 in range(k):
        for h2 in range(k):
            p = pos[h1 + k * h2, q]
            # the head's attention is centred on (row offset h1 − c, column offset h2 − c)
            assert (p * rows).sum().item() == pytest.approx(h1 - c, abs=1e-3)
            assert (p * cols).sum().item() == pytest.approx(h2 - c, abs=1e-3)
            if k % 2:  # integer offsets: a single peak, exactly there
                peak = p.argmax().item()
                assert (rows[peak].item(), cols[peak].item()) == (h1 - c, h2 - c)
            offsets.add((h1 - c, h2 - c))
    assert len(offsets) == k * k


def test_locality_strength_sharpens_positional_attention():
    attn = GPSA(36, num_heads=9, locality_strength=1.0)
    attn.local_init()
    sharp = GPSA(36, num_heads=9, locality_strength=3.0)
    sharp.local_init()
    rel = relative_indices((9, 9))
    assert (sharp.positional_attention(rel).amax(-1) > attn.positional_attention(rel).amax(-1)).all()


def test_gpsa_forward_equals_gated_renormalised_attention():
    torch.manual_seed(0)
    attn = GPSA(36, num_heads=9).eval()
    with torch.no_grad():
        attn.gating_param.copy_(torch.randn(9))
        attn.v.weight.add_(0.1 * torch.randn(36, 36))
    x = torch.randn(2, 16, 36)
    rel = relative_indices((4, 4))
    with torch.no_grad():
        q, k = attn.qk(x).reshape(2, 16, 2, 9, 4).permute(2, 0, 3, 1, 4)
        content = (q @ k.transpose(-1, -2) * 4 ** -0.5).softmax(-1)
        pos = attn.pos_proj(rel).permute(0, 3, 1, 2).softmax(-1)
        g = torch.sigmoid(attn.gating_param).view(1, -1, 1, 1)
        mix = (1 - g) * content + g * pos
        mix = mix / mix.sum(-1, keepdim=True)
        v = attn.v(x).reshape(2, 16, 9, 4).transpose(1, 2)
        ref = attn.proj((mix @ v).transpose(1, 2).reshape(2, 16, 36))
        torch.testing.assert_close(attn(x, rel), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.get_attention(x, rel), mix)


def test_gpsa_training_gradients_equal_the_explicit_mixture():
    """Training mode (no attention dropout) takes SDPA and the batch-folded positional product: its output and
    every gradient (input, projections, pos_proj, gates) are those of the explicit gated mixture."""
    torch.manual_seed(0)
    attn = GPSA(36, num_heads=9).train()
    with torch.no_grad():
        attn.gating_param.copy_(torch.randn(9))
        attn.v.weight.add_(0.1 * torch.randn(36, 36))
    ref_attn = copy.deepcopy(attn)
    x = torch.randn(3, 16, 36, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    rel = relative_indices((4, 4))
    g = torch.randn(3, 16, 36)
    attn(x, rel).backward(g)
    v = ref_attn.v(x_ref).reshape(3, 16, 9, 4).transpose(1, 2)
    ref = ref_attn.proj((ref_attn.get_attention(x_ref, rel) @ v).transpose(1, 2).reshape(3, 16, 36))
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for (n, a), b in zip(attn.named_parameters(), ref_attn.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_gates_start_at_one_and_weight_positional_attention():
    model = hybridzoo.create_model("convit_tiny", **dict(SMALL, embed_dim=32, num_heads=4))
    gpsa = [m for m in model.modules() if isinstance(m, GPSA)]
    assert len(gpsa) == 2
    for m in gpsa:
        assert torch.equal(m.gating_param, torch.ones(4))


def test_full_size_has_ten_gpsa_then_two_mhsa():
    with torch.device("meta"):
        model = hybridzoo.create_model("convit_small")
    kinds = [b.use_gpsa for b in model.blocks]
    assert kinds == [True] * 10 + [False] * 2
    assert model.pos_embed.shape == (1, 196, 432)  # no position for the class token


def test_cls_token_joins_after_the_gpsa_blocks():
    model = hybridzoo.create_model("convit_small", **SMALL).eval()
    seen = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == [16, 16, 17]


@pytest.mark.parametrize("pos_embed", [True, False])
def test_the_token_stream_is_row_major(pos_embed):
    """The blocks get (B, N, C) rows, not the patch map's transposed view: a residual sum keeps the layout of its
    first operand, so a transposed stream would run through every block, each LayerNorm copying it (speed only)."""
    model = hybridzoo.create_model("convit_small", **SMALL, use_pos_embed=pos_embed).train()
    seen = []
    for blk in model.blocks:
        blk.norm1.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].is_contiguous()))
        blk.norm2.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].is_contiguous()))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert seen == [True] * 6


def test_variable_input_size():
    model = hybridzoo.create_model("convit_small", **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 64))
        same = model(torch.randn(2, 3, 64, 64))
    assert out.shape == same.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(2, 3, 60, 64), (2, 1, 64, 64), (3, 64, 64)])
def test_bad_input(shape):
    model = hybridzoo.create_model("convit_small", **SMALL).eval()
    with pytest.raises(ValueError, match="convit_small"):
        model(torch.randn(*shape))


def _official_keys(depth: int, local_up_to_layer: int) -> list[str]:
    """Every parameter name of facebookresearch/convit's VisionTransformer, from its module tree."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias"]
    for i in range(depth):
        p = f"blocks.{i}."
        keys += [p + n for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                                 "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "attn.proj.weight",
                                 "attn.proj.bias")]
        if i < local_up_to_layer:
            keys += [p + n for n in ("attn.qk.weight", "attn.v.weight", "attn.pos_proj.weight",
                                     "attn.pos_proj.bias", "attn.gating_param")]
        else:
            keys += [p + "attn.qkv.weight"]
    return keys


def test_loads_official_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = hybridzoo.create_model("convit_small", **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = model.state_dict()
    official = {k: ours[k].clone() for k in _official_keys(3, 2)}  # KeyError if our names drifted
    assert set(official) == set(ours)
    path = tmp_path / "convit_official.pth"
    torch.save({"model": official, "epoch": 300}, path)  # the official checkpoint wraps weights in "model"
    loaded = hybridzoo.create_model("convit_small", pretrained=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_convert_official_resamples_position_embedding():
    src = hybridzoo.create_model("convit_small", **SMALL)  # 4×4 grid
    dst = hybridzoo.create_model("convit_small", **dict(SMALL, img_size=96))  # 6×6 grid
    state = dict(src.state_dict(), **{"blocks.0.attn.rel_indices": torch.zeros(1, 16, 16, 3)})
    out = convert_official(state, dst)
    assert "blocks.0.attn.rel_indices" not in out
    assert out["pos_embed"].shape == dst.pos_embed.shape
    dst.load_state_dict(out)
    with pytest.raises(ValueError, match="ConViT"):
        convert_official({"foo": torch.zeros(1)}, dst)


