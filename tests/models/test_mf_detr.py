"""MF-DETR's construction: the paper's budget (derived from its abstract), Mobile-Former blocks with the
queries as tokens, the round-robin over scales and the box initialisation."""

import pytest
import torch

import hybridzoo
from hybridzoo.models.mf_detr import DETR_R50, MF_DETR_BUDGET, MFDETR, MFDecoderBlock, _test_kwargs
from hybridzoo.models.mobile_former import MobileFormerBlock
from hybridzoo.profile import measure_model


def test_budget_derived_from_the_abstract():
    # Mobile-Former abstract: 36% fewer parameters and 52% less computation than DETR; DETR-R50 (Carion
    # et al. 2020, Table 1): 41M parameters, 86 GFLOPs (multiply-adds) at 800×1333
    assert DETR_R50 == {"params_m": 41.0, "gflops": 86.0}
    assert MF_DETR_BUDGET == {"params_m": 26.24, "gflops": 41.28}


def test_mf_detr_508m_fits_the_budget():
    # 5%: the abstract's percentages and DETR's figures are rounded (36% ± 0.5 alone is ± 0.8% of the budget)
    m = measure_model("mf_detr_508m")
    assert m["input_size"] == [3, 800, 1333]
    assert m["params"] == pytest.approx(MF_DETR_BUDGET["params_m"] * 1e6, rel=0.05)
    assert m["macs"] / 1e9 == pytest.approx(MF_DETR_BUDGET["gflops"], rel=0.05)
    assert hybridzoo.model_card("mf_detr_508m").reported["params_m"] == MF_DETR_BUDGET["params_m"]


def test_decoder_block_is_a_mobile_former_block():
    torch.manual_seed(0)
    ours = MFDecoderBlock(32, 24, 3, bridge_heads=2, former_heads=4, mlp_ratio=2).eval()
    ref = MobileFormerBlock(32, 32, 1, (3, 3), False, 24, bridge_heads=2, former_heads=4).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, z = torch.randn(2, 32, 6, 5), torch.randn(2, 7, 24)
    with torch.no_grad():
        (xo, zo), (xr, zr) = ours(x, z), ref((x, z))
    torch.testing.assert_close(xo, xr, rtol=0, atol=0)
    torch.testing.assert_close(zo, zr, rtol=0, atol=0)


def test_round_robin_over_scales_coarse_to_fine():
    torch.manual_seed(0)
    model = MFDETR(**{**_test_kwargs(), "dec_blocks": 5, "num_scales": 2})
    assert model.strides == sorted(model.strides, reverse=True) and len(model.strides) == 2
    assert model.block_scale == [0, 1, 0, 1, 0]
    # only a block whose scale is read again later refines its map (the others would get no gradient)
    assert [blk.update_map for blk in model.decoder] == [True, True, True, False, False]
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pred_logits"].shape == (2, 5, 4) and out["aux_boxes"].shape == (4, 2, 5, 4)
    out["pred_logits"].sum().backward()
    assert all(p.grad is not None for p in model.decoder[0].mobile.parameters())   # its map reaches block 2


def test_boxes_start_at_box_init():
    torch.manual_seed(0)
    model = MFDETR(**{**_test_kwargs(), "box_init": (0.25, 0.125)}).eval()
    with torch.no_grad():
        boxes = model(torch.randn(1, 3, 64, 64))["pred_boxes"]
    torch.testing.assert_close(boxes, torch.tensor([0.5, 0.5, 0.25, 0.125]).expand_as(boxes))
