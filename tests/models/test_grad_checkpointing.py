"""`set_grad_checkpointing()` really checkpoints, in every model family that offers it.

Counting the calls of `torch.utils.checkpoint.checkpoint` during a forward and backward of a reduced
build is what makes this test able to fail: an output comparison alone passes when checkpointing is
silently never enabled. The gradients must also equal those of the plain forward.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.utils.checkpoint

import hybridzoo
import hybridzoo.models
from hybridzoo.profile import example_input
from hybridzoo.registry import get_card


def _families() -> dict[str, str]:
    """One registered model (the first by name) per model module whose models offer `set_grad_checkpointing`
    (built on the meta device to find out: no memory, no time)."""
    out: dict[str, str] = {}
    for name in sorted(hybridzoo.list_models()):
        card = get_card(name)
        if card.module in out:
            continue
        with torch.device("meta"):
            model = hybridzoo.create_model(name, **card.test_kwargs)
        if hasattr(model, "set_grad_checkpointing"):
            out[card.module] = name
    return out


FAMILIES = _families()


def test_the_families_are_found():
    # the model families of the suite whose README promises set_grad_checkpointing()
    names = {m.rsplit(".", 1)[-1] for m in FAMILIES}
    assert {"cvt", "vit", "convit", "ceit", "vitc", "vvt", "supervit", "botnet", "coatnet", "mobile_former"} <= names


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)]


@pytest.fixture
def count_checkpoints(monkeypatch):
    """Wraps `checkpoint` wherever hybridzoo reaches it (the torch module and names imported from it)."""
    original = torch.utils.checkpoint.checkpoint
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("hybridzoo") and getattr(mod, "checkpoint", None) is original:
            monkeypatch.setattr(mod, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("name", sorted(FAMILIES.values()))
def test_grad_checkpointing_checkpoints_and_keeps_gradients(name, count_checkpoints):
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs).train()
    x = example_input(model, card.test_input_size or card.input_size, batch_size=2)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        count_checkpoints.clear()
        torch.manual_seed(1)   # the same dropout / drop-path draws in both passes
        out = model(*x) if isinstance(x, tuple) else model(x)
        sum(t.float().sum() for t in _tensors(out) if t.is_floating_point()).backward()
        if enable:
            assert len(count_checkpoints) > 0, f"{name}: set_grad_checkpointing(True) checkpointed nothing"
        else:
            assert not count_checkpoints, f"{name}: checkpointing while disabled"
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {n}: {m}")
