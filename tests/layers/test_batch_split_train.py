"""Training by batch split (`BatchSplitTraining`): the whole batch's loss, gradients and logs, every run the same.

Values only (speed is benchmarks/train_levers.py's job). `threads=` fixes the number of parts, so the split runs
whatever the intra-op thread count of the test process; each test checks the split really ran (`_split_ran`)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridzoo
from hybridzoo.layers.train_fast import (BatchSplitTraining, fast_training_available, optimize_for_cpu_training,
                                         split_training_blocker)

pytestmark = pytest.mark.skipif(not fast_training_available(), reason="no oneDNN in this build")


def _split_ran(out) -> bool:
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.grad_fn is not None and "_JoinParts" in type(out.grad_fn).__name__


def _model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2, **kw}
    if name.startswith("convit"):  # a GPSA block and a self-attention block
        kw["local_up_to_layer"] = 1
    return optimize_for_cpu_training(hybridzoo.create_model(name, **kw), min_weight_numel=1).train()


def _assert_grads_close(a: nn.Module, b: nn.Module) -> None:
    # relative to the model's largest gradient: some gradients are exactly 0 in theory (a bias under a
    # softmax), and both sides hold float noise there
    scale = max(float(p.grad.abs().max()) for p in a.parameters() if p.grad is not None)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is None:   # frozen or unused on the whole batch (ACT's mean shifts, its checkpoint-only conv)
            assert q.grad is None, n
            continue
        assert q.grad is not None, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "convit_tiny"])
@pytest.mark.parametrize("parts", [2, 3])
def test_split_step_has_the_whole_batch_loss_and_gradients(name, parts):
    whole = _model(name)
    split = copy.deepcopy(whole)
    x, t = torch.randn(7, 3, 32, 32), torch.randint(0, 10, (7,))
    ref = F.cross_entropy(whole(x), t, label_smoothing=0.1)
    ref.backward()
    out = BatchSplitTraining(split, threads=parts)(x)
    assert _split_ran(out) and out.shape == (7, 10)
    loss = F.cross_entropy(out, t, label_smoothing=0.1)  # computed on the whole batch: label smoothing as is
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    _assert_grads_close(whole, split)


@pytest.mark.parametrize("name, kw, shape", [
    ("act_tiny_x2", dict(n_feats=8, num_stages=1, n_resblocks=1, mlp_ratio=1, reduction=4), (5, 3, 12, 12)),
    ("wetmapformer_small", dict(img_size=8, in_chans=6, num_classes=4), (7, 6, 8, 8)),
])
def test_split_step_of_the_super_resolution_and_land_cover_models(name, kw, shape):
    """The models the super-resolution and land-cover tasks train by batch split (WetMapFormer with BatchNorm2d):
    the whole batch's loss and gradients."""
    torch.manual_seed(0)
    whole = optimize_for_cpu_training(hybridzoo.create_model(name, **kw), min_weight_numel=1).train()
    split = copy.deepcopy(whole)
    x = torch.randn(shape)
    target = (torch.randn_like(whole(x)) if name.startswith("act") else torch.randint(0, 4, (shape[0],))).detach()
    whole.zero_grad()
    loss = F.l1_loss if name.startswith("act") else F.cross_entropy
    ref = loss(whole(x), target)
    ref.backward()
    out = BatchSplitTraining(split, threads=2)(x)
    assert _split_ran(out)
    got = loss(out, target)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    _assert_grads_close(whole, split)


def test_split_with_mixed_targets_and_accumulated_gradients():
    """Soft (mixup) targets on the whole batch, a second batch accumulated into the same `.grad`."""
    whole = _model("deit_tiny_patch16_224")
    split = copy.deepcopy(whole)
    wrapper = BatchSplitTraining(split, threads=2)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        x, soft = torch.randn(5, 3, 32, 32, generator=g), torch.rand(5, 10, generator=g).softmax(-1)
        (F.cross_entropy(whole(x), soft) / 2).backward()
        out = wrapper(x)
        assert _split_ran(out)
        (F.cross_entropy(out, soft) / 2).backward()
    _assert_grads_close(whole, split)


def test_tuple_outputs_are_split_too():
    """A distilled DeiT returns (class, distillation) logits in training, both per sample."""
    whole = _model("deit_tiny_distilled_patch16_224")
    split = copy.deepcopy(whole)
    x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    a, b = whole(x)
    (F.cross_entropy(a, t) + F.cross_entropy(b, t)).backward()
    out = BatchSplitTraining(split, threads=2)(x)
    assert isinstance(out, tuple) and len(out) == 2 and _split_ran(out)
    (F.cross_entropy(out[0], t) + F.cross_entropy(out[1], t)).backward()
    _assert_grads_close(whole, split)


def _drop_path_grads(seed: int, parts: int = 2) -> list[torch.Tensor]:
    m = _model("deit_tiny_patch16_224", drop_path_rate=0.5)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(seed)
    out = BatchSplitTraining(m, threads=parts)(x)
    assert _split_ran(out)
    out.square().mean().backward()
    return [p.grad.clone() for p in m.parameters()]


def test_drop_path_masks_are_reproducible_per_part():
    """Each part draws its drop-path masks from its own generator, seeded from the global one: the same
    seed gives the same bits (whatever the threads' timing), another seed other masks."""
    first, again, other = _drop_path_grads(0), _drop_path_grads(0), _drop_path_grads(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # the parts' draws do not touch the global stream: one draw of the part seeds per call
    m = _model("deit_tiny_patch16_224", drop_path_rate=0.5)
    torch.manual_seed(3)
    BatchSplitTraining(m, threads=2)(torch.randn(4, 3, 32, 32)).sum().backward()
    after = torch.get_rng_state()
    torch.manual_seed(3)
    torch.randn(4, 3, 32, 32)
    torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64)
    assert torch.equal(after, torch.get_rng_state())


def test_no_split_without_gradient_eval_mode_or_one_sample():
    m = _model("deit_tiny_patch16_224")
    wrapper = BatchSplitTraining(m, threads=2)
    x = torch.randn(3, 3, 32, 32)
    assert not _split_ran(wrapper(x[:1]))
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), m(x))
    m.eval()
    assert not _split_ran(wrapper(x))
    m.train()
    assert _split_ran(wrapper(x))
    assert not _split_ran(BatchSplitTraining(m, threads=1)(x))


@pytest.mark.parametrize("layer, what", [
    (nn.BatchNorm1d(8), "batch statistics"),
    (nn.InstanceNorm1d(8, track_running_stats=True), "running statistics"),
    (nn.Dropout(0.1), "p=0.1"),
    (nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True), "attention dropout 0.2"),
])
def test_models_that_cannot_be_split_are_named(layer, what):
    model = nn.Sequential(nn.Linear(8, 8), layer)
    reason = split_training_blocker(model)
    assert reason is not None and reason.startswith("1 (") and what in reason
    with pytest.raises(ValueError, match="cannot be trained by batch split"):
        BatchSplitTraining(model)
    assert split_training_blocker(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.0), nn.LayerNorm(8))) is None
    ckpt = _model("convit_tiny")
    ckpt.set_grad_checkpointing(True)
    assert "checkpointing" in split_training_blocker(ckpt)


class _Noisy(nn.Module):
    """Draws from the global generator in its forward (what the static check cannot see)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x + 0.0 * torch.rand_like(x))


class _Pooled(nn.Module):
    """An output that is not per sample (a batch mean)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).mean(0)


def test_global_generator_draws_and_batch_outputs_turn_the_split_off(capsys):
    torch.manual_seed(0)
    noisy = _Noisy().train()
    wrapper = BatchSplitTraining(noisy, threads=2)
    x = torch.randn(4, 4)
    out = wrapper(x)
    assert _split_ran(out)  # this step is still right (checked below), then whole batches from now on
    assert "draws random numbers from the global generator" in capsys.readouterr().out
    out.sum().backward()
    ref = copy.deepcopy(noisy)
    ref.zero_grad()
    ref(x).sum().backward()
    torch.testing.assert_close(noisy.lin.weight.grad, ref.lin.weight.grad)
    assert not _split_ran(wrapper(x))
    pooled = _Pooled().train()
    wrapper = BatchSplitTraining(pooled, threads=2)
    out = wrapper(x)
    assert not _split_ran(out) and out.shape == (3,)
    torch.testing.assert_close(out, pooled(x))
