"""Weights saved at one resolution load into a model built for another (fine-tuning at --img-size):
relative-position tables are resampled on load."""

from __future__ import annotations

import pytest
import torch

import hybridzoo
from hybridzoo.factory import _resample_position_tables
from hybridzoo.registry import get_card


@pytest.mark.parametrize("name, table", [("coatnet_0", "relative_position_bias_table"), ("botnet_t3", "rel_height")])
def test_tables_resampled_for_another_resolution(name, table):
    kw = dict(get_card(name).test_kwargs)
    torch.manual_seed(0)
    src = hybridzoo.create_model(name, **kw).eval()
    kw["img_size"] = 96
    dst = hybridzoo.create_model(name, **kw).eval()
    keys = [k for k, v in dst.state_dict().items() if v.shape != src.state_dict()[k].shape]
    assert keys and any(k.endswith(table) for k in keys), "the two resolutions should have differently sized tables"
    hybridzoo.load_weights(dst, src.state_dict())
    for k, v in dst.state_dict().items():
        if k not in keys:
            assert torch.equal(v, src.state_dict()[k]), k  # everything else loads unchanged
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 96, 96))).all()


def test_resampling_keeps_smooth_tables():
    own = {"a.relative_position_bias_table": torch.zeros(25, 3), "b.rel_width": torch.zeros(7, 4),
           "c.other": torch.zeros(5, 2)}
    ramp = torch.linspace(-1, 1, 13)[:, None].repeat(1, 4)
    state = {"a.relative_position_bias_table": torch.full((81, 3), 0.5), "b.rel_width": ramp, "c.other": torch.ones(3, 2)}
    out = _resample_position_tables(state, own)
    assert torch.allclose(out["a.relative_position_bias_table"], torch.full((25, 3), 0.5))
    assert out["b.rel_width"].shape == (7, 4)
    assert torch.all(out["b.rel_width"][1:, 0] > out["b.rel_width"][:-1, 0])  # still increasing
    assert out["b.rel_width"][0, 0] < -0.6 and out["b.rel_width"][-1, 0] > 0.6
    assert out["c.other"].shape == (3, 2)  # other mismatches are left for the error message
