import pytest
import torch
from torch import nn

from hybridzoo.layers import Attention, DropPath, Mlp, check_image_input, drop_path_rates, resample_abs_pos_embed
from hybridzoo.layers.onednn import OneDNNLinear, onednn_available, optimize_for_cpu_inference


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(-1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_drop_path_keeps_expectation_and_is_identity_in_eval():
    torch.manual_seed(0)
    dp = DropPath(0.3)
    x = torch.ones(20000, 4)
    y = dp.train()(x)
    assert torch.isclose(y.unique(), torch.tensor([0.0, 1 / 0.7])).all()
    assert abs(y.mean().item() - 1.0) < 0.03
    assert torch.equal(dp.eval()(x), x)
    assert drop_path_rates(0.1, 3) == [0.0, 0.05, 0.1]


def test_check_image_input_names_model_and_shape():
    with pytest.raises(ValueError, match=r"mymodel: expected input of shape \(B, 3, H, W\)"):
        check_image_input(torch.randn(1, 4, 8, 8), "mymodel", 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_image_input(torch.randn(1, 3, 20, 32), "mymodel", 3, divisor=16)
    with pytest.raises(ValueError, match="img_size"):
        check_image_input(torch.randn(1, 3, 20, 32), "mymodel", 3, img_size=(32, 32))
    check_image_input(torch.randn(1, 3, 32, 48), "mymodel", 3, divisor=16)


def test_resample_pos_embed_identity_and_shape():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_abs_pos_embed(pe, (4, 4)) is pe
    out = resample_abs_pos_embed(pe, (6, 8))
    assert out.shape == (1, 1 + 48, 8)
    assert torch.equal(out[:, :1], pe[:, :1])


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")
def test_onednn_path_matches_eager_and_leaves_original_trainable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Mlp(32, 64), nn.Linear(32, 5))
    x = torch.randn(3, 10, 16)
    fast = optimize_for_cpu_inference(model)
    assert sum(isinstance(m, OneDNNLinear) for m in fast.modules()) == 4
    assert fast[2].fc1.act == "gelu"
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())
