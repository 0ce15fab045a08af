"""AdaMCT and SASRec: what makes each the paper's / RecBole's model."""

import pytest
import torch

import hybridzoo
from hybridzoo.models.adamct import AdaMCT
from hybridzoo.models.sasrec import recbole_attention_mask
from hybridzoo.profile import count_params


# Key names and shapes of the official AdaMCT model (juyongjiang/AdaMCT, adamct.py), written out
# independently of our module tree: a RecBole state dict of this layout must load unchanged.
def official_adamct_keys(n_items, D, k, L, r, n_layers=2):
    keys = {"item_embedding.weight": (n_items, D), "position_embedding.weight": (L, D),
            "LayerNorm.weight": (D,), "LayerNorm.bias": (D,)}
    for i in range(n_layers):
        p = f"adamct_encoder.layer.{i}."
        keys.update({p + "linear_en.weight": (D, D), p + "linear_en.bias": (D,),
                     p + "LayerNorm.weight": (D,), p + "LayerNorm.bias": (D,)})
        for name in ("query", "key", "value", "dense"):
            keys.update({p + f"multi_head_attention.{name}.weight": (D, D), p + f"multi_head_attention.{name}.bias": (D,)})
        keys.update({p + "multi_head_attention.LayerNorm.weight": (D,), p + "multi_head_attention.LayerNorm.bias": (D,),
                     p + "local_conv.conv_1_3.weight": (D, D, k), p + "local_conv.conv_1_3.bias": (D,),
                     p + "local_conv.LayerNorm.weight": (D,), p + "local_conv.LayerNorm.bias": (D,)})
        for se in ("global_seatt", "local_seatt"):
            keys.update({p + f"{se}.dense_1.weight": (L // r, L), p + f"{se}.dense_1.bias": (L // r,),
                         p + f"{se}.dense_2.weight": (L, L // r), p + f"{se}.dense_2.bias": (L,)})
        q = p + "adaptive_mixture_units."
        keys.update({q + "linear.weight": (1, D), q + "linear.bias": (1,), q + "linear_out.weight": (D, D),
                     q + "linear_out.bias": (D,), q + "LayerNorm.weight": (D,), q + "LayerNorm.bias": (D,)})
    return keys


@pytest.mark.parametrize("name,n_items,D,k,r,params", [
    ("adamct_beauty", 12102, 16, 5, 2, 210_910),
    ("adamct_toys", 11925, 32, 3, 2, 413_022),
    ("adamct_sports", 18358, 64, 3, 5, 1_258_258),
])
def test_paper_configurations_match_official_layout_and_counts(name, n_items, D, k, r, params):
    with torch.device("meta"):
        model = hybridzoo.create_model(name)
    assert model.num_items == n_items
    shapes = {k_: tuple(v.shape) for k_, v in model.state_dict().items()}
    assert shapes == official_adamct_keys(n_items, D, k, 50, r)
    assert count_params(model) == params


def test_sasrec_recbole_defaults():
    with torch.device("meta"):
        model = hybridzoo.create_model("sasrec")
    assert count_params(model) == 877_824
    assert len(model.trm_encoder.layer) == 2
    assert model.trm_encoder.layer[0].feed_forward.dense_1.out_features == 256


def test_official_state_dict_loads_and_reproduces(tmp_path):
    torch.manual_seed(0)
    kw = dict(num_items=30, hidden_size=8, n_heads=2, kernel_size=3, reduction_ratio=2)
    ref = hybridzoo.create_model("adamct_toys", **kw).eval()
    official = {k: torch.randn(s) for k, s in official_adamct_keys(30, 8, 3, 50, 2).items()}
    path = tmp_path / "adamct.pth"
    torch.save({"state_dict": official, "epoch": 3}, path)  # RecBole keeps weights under state_dict
    model = hybridzoo.create_model("adamct_toys", pretrained=str(path), **kw).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, official[k])
    seq, lengths = model.example_input(4)
    ref.load_state_dict(official)
    assert torch.equal(model(seq, lengths), ref(seq, lengths))


def test_squeeze_excitation_reweights_sequence_positions():
    torch.manual_seed(0)
    model = AdaMCT(num_items=20, max_len=10, hidden_size=8, n_heads=2, reduction_ratio=2)
    se = model.adamct_encoder.layer[0].global_seatt
    assert se.dense_1.in_features == 10 and se.dense_1.out_features == 5  # over N positions, not channels
    x = torch.randn(3, 10, 8)
    y = se(x)
    ratio = y / x
    # one weight per position, shared by all channels, in (0, 1)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), atol=1e-5)
    assert ((ratio > 0) & (ratio < 1)).all()


def test_mixture_gate_is_one_scalar_per_sequence_and_layer():
    torch.manual_seed(0)
    model = AdaMCT(num_items=20, max_len=10, hidden_size=8, n_heads=2).eval()
    seq, lengths = model.example_input(5)
    gates = model.mixture_gates(seq)
    assert gates.shape == (5, 2)
    assert ((gates > 0) & (gates < 1)).all()
    # alpha weights the local branch: with alpha forced to 1 the global branch has no influence
    layer = model.adamct_encoder.layer[0]
    amu = layer.adaptive_mixture_units
    with torch.no_grad():
        amu.linear.weight.zero_()
        amu.linear.bias.fill_(50.0)
    h = torch.randn(2, 10, 8)
    g1, g2, loc = torch.randn(2, 10, 8), torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    assert torch.allclose(amu(h, g1, loc), amu(h, g2, loc), atol=1e-5)


def test_attention_mask_is_causal_and_hides_padding():
    seq = torch.tensor([[5, 6, 7, 0]])
    mask = recbole_attention_mask(seq)[0, 0]
    allowed = mask == 0
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert (mask[~allowed] == -10000.0).all()


def test_sasrec_output_ignores_items_after_the_last_position():
    torch.manual_seed(0)
    model = hybridzoo.create_model("sasrec", num_items=40, max_len=8, hidden_size=16, inner_size=32).eval()
    seq = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0]])
    a = model(seq, torch.tensor([3]))
    b = model(seq, torch.tensor([2]))
    seq2 = seq.clone()
    seq2[0, 2] = 9  # changes only a position after the 2nd
    assert torch.allclose(b, model(seq2, torch.tensor([2])), atol=1e-6)
    assert not torch.allclose(a, b)


def test_input_validation_names_the_model_and_max_len():
    model = hybridzoo.create_model("adamct_beauty", num_items=50, max_len=50)
    with pytest.raises(ValueError, match=r"adamct_beauty: expected item_seq of shape \(B, 50\)"):
        model(torch.ones(2, 20, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        AdaMCT(num_items=10, kernel_size=4)


def test_sasrec_length_groups_are_exact():
    """Encoding groups of similar-length histories cut to their longest member changes no output or gradient."""
    torch.manual_seed(0)
    model = hybridzoo.create_model("sasrec", num_items=50, max_len=12, hidden_size=16, inner_size=32,
                                   hidden_dropout_prob=0.0, attn_dropout_prob=0.0).double()
    seq, lengths = model.example_input(40)
    grouped = model(seq, lengths)
    full = model._encode(seq, lengths)
    torch.testing.assert_close(grouped, full)
    assert grouped.shape[0] >= 2 * model.length_groups  # the grouped path ran
    g = torch.randn_like(full)
    for a, b in zip(torch.autograd.grad(grouped, list(model.parameters()), g, allow_unused=True),
                    torch.autograd.grad(full, list(model.parameters()), g, allow_unused=True)):
        if a is None:  # a position no history reaches (its embedding row) gets no gradient either way
            assert b is None or torch.all(b == 0)
        else:
            torch.testing.assert_close(a, b)


def test_local_conv_is_the_official_conv1d():
    from hybridzoo.models.adamct import LocalConv

    torch.manual_seed(0)
    m = LocalConv(8, 5, "gelu", 1e-12)
    x = torch.randn(3, 11, 8)
    ref = torch.nn.functional.gelu(m.LayerNorm(m.conv_1_3(x.transpose(1, 2)).transpose(1, 2)))
    torch.testing.assert_close(m(x), ref)
