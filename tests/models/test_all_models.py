"""The suite every registered model passes, generated from the registry (DESIGN.md, "Tests").

- full size on the `meta` device: parameters equal the official count (or within 1% of the paper's
  rounded figure) and MACs within the card's tolerance of the paper's / the official measurement;
- forward and backward on a reduced build: finite outputs, every parameter receives a gradient;
- training and eval on another device (`meta` standing in for a GPU): no tensor made on the CPU in a forward;
- a bad input raises a ValueError that names the model;
- save → reload gives identical outputs; the same seed builds the same model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import hybridzoo
from hybridzoo.profile import count_params, example_input, measure_model
from hybridzoo.registry import get_card
from _helpers import OneDevice  # tests/conftest.py puts tests/ on sys.path

ALL = hybridzoo.list_models()


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)]


def _run(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


def _reduced(name: str, seed: int = 0):
    card = get_card(name)
    torch.manual_seed(seed)
    model = hybridzoo.create_model(name, **card.test_kwargs)
    size = card.test_input_size or card.input_size
    return model, size


def test_registry_is_not_empty():
    assert len(ALL) > 0


@pytest.mark.parametrize("name", ALL)
def test_full_size_params_and_macs(name):
    card = get_card(name)
    m = measure_model(name)
    if card.params is not None:
        assert m["params"] == card.params, f"{name}: {m['params']:,} params, official {card.params:,}"
    else:
        ref = card.reported["params_m"] * 1e6
        assert abs(m["params"] - ref) <= card.params_rtol * ref, f"{name}: {m['params']:,} vs paper {ref:,.0f}"
    ref_macs = card.macs_g if card.macs_g is not None else card.reported.get("gflops")
    if ref_macs is not None:
        got = m["macs"] / 1e9
        assert abs(got - ref_macs) <= card.flops_rtol * ref_macs, f"{name}: {got:.3f} GMACs vs {ref_macs}"


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    card = get_card(name)
    model, size = _reduced(name)
    model.train()
    x = example_input(model, size, batch_size=2)
    out = _run(model, x)
    tensors = _tensors(out)
    assert tensors, f"{name}: forward returned no tensor"
    for t in tensors:
        assert torch.isfinite(t).all(), f"{name}: non-finite output"
    sum(t.float().sum() for t in tensors if t.is_floating_point()).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and p.grad is None and not n.startswith(card.unused_params or ("\0",))]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad[:10]}"


@pytest.mark.parametrize("name", ALL)
def test_runs_off_the_cpu(name):
    """Training forward + backward and an eval forward with the model and its input on another device: `meta`
    stands in for a GPU (CI has none) and, under `OneDevice`, refuses a tensor a forward made on the CPU without
    `device=` as CUDA would. benchmarks/gpu_check.py runs the real thing on a GPU."""
    model, size = _reduced(name)
    model.to("meta").train()
    x = example_input(model, size, batch_size=2, device="meta")
    with OneDevice():
        tensors = _tensors(_run(model, x))
        sum(t.sum() for t in tensors if t.is_floating_point()).backward()
    assert all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())
    model.eval()
    with torch.no_grad(), OneDevice():
        assert all(t.device.type == "meta" for t in _tensors(_run(model, x))), f"{name}: output left the device"


@pytest.mark.parametrize("name", ALL)
def test_bad_input_is_a_clear_error(name):
    model, size = _reduced(name)
    model.eval()
    if hasattr(model, "example_bad_input"):
        bad = model.example_bad_input(2)
    else:
        bad = torch.randn(2, size[0] + 1, *size[1:])
    with pytest.raises(ValueError, match=name):
        with torch.no_grad():
            _run(model, bad)


@pytest.mark.parametrize("name", ALL)
def test_save_reload_and_seed(name, tmp_path):
    model, size = _reduced(name, seed=0)
    model.eval()
    torch.manual_seed(1)
    x = example_input(model, size, batch_size=2)
    with torch.no_grad():
        ref = _tensors(_run(model, x))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    card = get_card(name)
    torch.manual_seed(123)
    other = hybridzoo.create_model(name, pretrained=str(path), **card.test_kwargs).eval()
    with torch.no_grad():
        again = _tensors(_run(other, x))
    for a, b in zip(ref, again):
        assert torch.equal(a, b), f"{name}: reloaded model differs"
    same_seed, _ = _reduced(name, seed=0)
    same_seed.eval()
    with torch.no_grad():
        third = _tensors(_run(same_seed, x))
    for a, b in zip(ref, third):
        assert torch.equal(a, b), f"{name}: same seed gives a different model"
    assert count_params(same_seed) == count_params(model)
