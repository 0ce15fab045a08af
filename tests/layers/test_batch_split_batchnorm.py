"""Training by batch split with BatchNorm2d: every part normalised with the whole batch's statistics, the running
statistics updated once with the whole batch's values, the whole batch's backward (`BatchSplitTraining`,
`_SplitBatchNormFn`). Values only; `threads=` fixes the number of parts whatever the process's thread count."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridzoo
from hybridzoo.layers.train_fast import (BatchSplitTraining, fast_training_available, optimize_for_cpu_training,
                                         split_training_blocker)

from _helpers import error_on_watchdog  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not fast_training_available(), reason="no oneDNN in this build")

_SMALL = {
    "cvt_13": dict(dims=(16, 32, 48), heads=(1, 2, 3), depths=(1, 1, 2), drop_path_rate=0.0),
    "coatnet_0": dict(dims=(16, 32, 64, 64), depths=(1, 2, 2, 1), stem_width=16, head_hidden_size=64, dim_head=16,
                      img_size=32),
}


def _split_ran(out) -> bool:
    return out.grad_fn is not None and "_JoinParts" in type(out.grad_fn).__name__


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return optimize_for_cpu_training(hybridzoo.create_model(name, num_classes=10, **_SMALL[name]),
                                     min_weight_numel=1).train()


def _assert_grads_close(a: nn.Module, b: nn.Module) -> None:
    # relative to the model's largest gradient: some gradients are exactly 0 in theory, float noise on both sides
    scale = max(float(p.grad.abs().max()) for p in a.parameters() if p.grad is not None)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def _assert_bn_state_equal(a: nn.Module, b: nn.Module) -> None:
    bns = [(n, m) for n, m in a.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    other = dict(b.named_modules())
    for n, m in bns:
        o = other[n]
        torch.testing.assert_close(o.running_mean, m.running_mean, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(o.running_var, m.running_var, rtol=1e-5, atol=1e-6, msg=n)
        assert int(o.num_batches_tracked) == int(m.num_batches_tracked), n


@pytest.mark.parametrize("name", ["cvt_13", "coatnet_0"])
@pytest.mark.parametrize("parts", [2, 3])
def test_split_with_batchnorm_is_the_whole_batch_step(name, parts):
    """Two SGD steps on a batch of 7 (parts of different sizes): outputs, loss, every gradient, the running
    statistics and the parameters after the steps as the whole batch gives them; then eval mode reads the
    running statistics, and the modules are plain nn.BatchNorm2d again."""
    whole = _model(name)
    split = copy.deepcopy(whole)
    wrapper = BatchSplitTraining(split, threads=parts)
    # SGD, not AdamW: AdamW turns the float noise of the gradients that are 0 in theory into full-size steps
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (whole, split)]
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x, t = torch.randn(7, 3, 32, 32, generator=g), torch.randint(0, 10, (7,), generator=g)
        ref = whole(x)
        out = wrapper(x)
        assert _split_ran(out)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        loss_ref, loss = F.cross_entropy(ref, t), F.cross_entropy(out, t)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        loss_ref.backward()
        loss.backward()
        _assert_grads_close(whole, split)
        _assert_bn_state_equal(whole, split)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
    assert all("forward" not in vars(m) for m in split.modules())
    assert split.state_dict().keys() == whole.state_dict().keys()
    whole.eval(), split.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(split(x), whole(x), rtol=1e-4, atol=1e-5)
        # eval mode reads the running statistics: a batch of one gives the same row as inside a batch
        torch.testing.assert_close(split(x[:1]), split(x)[:1], rtol=1e-4, atol=1e-5)


class _ConvBN(nn.Module):
    """conv → BatchNorm2d → conv → BatchNorm2d → pooled linear head; the maps channels-last when asked."""

    def __init__(self, channels_last: bool, **bn):
        super().__init__()
        self.channels_last = channels_last
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16, **bn)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16, **bn)
        self.head = nn.Linear(16, 5)
        self.layouts: list[bool] = []

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv1(x)
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        x = self.bn2(self.conv2(F.gelu(self.bn1(x)) * 3 + 2))   # a mean far from 0 for the second
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("bn", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
                         ids=["default", "cumulative", "no-affine", "no-running-stats"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_batchnorm_variants_and_layouts(bn, channels_last):
    torch.manual_seed(0)
    whole = _ConvBN(channels_last, **bn).train()
    split = copy.deepcopy(whole)
    wrapper = BatchSplitTraining(split, threads=2)
    for step in range(2):
        x = torch.randn(5, 3, 6, 6) * 4 + 1
        ref, out = whole(x), wrapper(x)
        assert _split_ran(out)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        ref.square().sum().backward()
        out.square().sum().backward()
        _assert_grads_close(whole, split)
        if bn.get("track_running_stats", True):
            _assert_bn_state_equal(whole, split)
    assert split.layouts[-1] == channels_last


def test_an_error_in_one_part_reaches_the_caller_without_a_hang():
    """A part that fails (here the second part, in forward and then in backward) breaks the meeting: the other
    part does not wait forever, its broken barrier is not the error raised, and the running statistics are those
    before the failed call."""

    class _FailsInPart(nn.Module):
        def __init__(self, phase: str):
            super().__init__()
            self.phase = phase

        def forward(self, x):
            if self.phase == "forward" and x.shape[0] == 2:   # the second of the parts 3 + 2
                raise RuntimeError("boom in a part")
            return _Boom.apply(x) if self.phase == "backward" else x

    class _Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.part = x.shape[0]
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            if ctx.part == 2:
                raise RuntimeError("boom in a part's backward")
            return g

    for phase in ("forward", "backward"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), _FailsInPart(phase), nn.BatchNorm2d(4), nn.Flatten(),
                              nn.Linear(4 * 16, 3)).train()
        wrapper = BatchSplitTraining(model, threads=2)
        before = model[2].running_mean.clone()

        err = error_on_watchdog(lambda: wrapper(torch.randn(5, 3, 6, 6)).sum().backward(),
                                f"a part hung at the meeting ({phase})")
        assert isinstance(err, RuntimeError) and "boom in a part" in str(err), repr(err)
        if phase == "forward":
            assert torch.equal(model[2].running_mean, before) and int(model[2].num_batches_tracked) == 0
        assert all("forward" not in vars(m) for m in model.modules())


class _ConvThenBN(nn.Module):
    """A convolution and a BatchNorm; the subclasses' forwards are what the tests are about."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


class _Uneven(_ConvThenBN):
    """Runs its BatchNorm a second time in the larger part only: the parts go out of step."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.shape[0] == 3:
            y = self.bn(y)
        return y.flatten(1)


def test_parts_out_of_step_raise_instead_of_deadlocking():
    wrapper = BatchSplitTraining(_Uneven().train(), threads=2)
    err = error_on_watchdog(lambda: wrapper(torch.randn(5, 3, 6, 6)), "the parts deadlocked")
    assert isinstance(err, RuntimeError) and "out of step" in str(err)


def test_batchnorm_outside_the_split_is_untouched():
    """One part (threads=1), no gradient, eval mode: nn.BatchNorm2d's own forward, bit for bit."""
    torch.manual_seed(0)
    model = _ConvBN(True).train()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(BatchSplitTraining(model, threads=1)(x), ref(x))
    with torch.no_grad():
        assert torch.equal(BatchSplitTraining(model, threads=2)(x), ref(x))
    assert torch.equal(model.bn1.running_var, ref.bn1.running_var)


def test_batch_outputs_fall_back_with_one_update_of_the_running_statistics():
    class _PooledBN(_ConvThenBN):
        def forward(self, x):
            return self.bn(self.conv(x)).mean(0)   # not per sample: the wrapper runs the whole batch instead

    torch.manual_seed(0)
    model = _PooledBN().train()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 3, 6, 6)
    out = BatchSplitTraining(model, threads=2)(x)
    assert not _split_ran(out)
    torch.testing.assert_close(out, ref(x))
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var)


@pytest.mark.parametrize("layer, what", [
    (nn.BatchNorm1d(8), "BatchNorm1d"),
    (nn.BatchNorm3d(8), "BatchNorm3d"),
    (nn.SyncBatchNorm(8), "SyncBatchNorm"),
])
def test_other_batchnorms_are_still_refused(layer, what):
    reason = split_training_blocker(nn.Sequential(nn.Identity(), layer))
    assert reason is not None and what in reason and "BatchNorm2d only" in reason
    assert split_training_blocker(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.GroupNorm(2, 8))) is None


@pytest.mark.parametrize("name", ["botnet_t3", "ceit_tiny", "vitc_1gf"])
def test_other_batchnorm2d_families_split_exactly(name):
    """The other classification families with BatchNorm2d that the split now takes (reduced builds, one step)."""
    from hybridzoo.registry import get_card

    card = get_card(name)
    torch.manual_seed(0)
    whole = hybridzoo.create_model(name, **card.test_kwargs).train()
    assert split_training_blocker(whole) is None and any(isinstance(m, nn.BatchNorm2d) for m in whole.modules())
    split = copy.deepcopy(whole)
    x = torch.randn(5, *(card.test_input_size or card.input_size))
    ref, out = whole(x), BatchSplitTraining(split, threads=2)(x)
    assert _split_ran(out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    r = torch.randn_like(ref)   # not the squares: ViTc's head starts at zero
    (ref * r).sum().backward()
    (out * r).sum().backward()
    _assert_grads_close(whole, split)
    _assert_bn_state_equal(whole, split)


def test_float64_split_is_the_whole_batch_to_float64_rounding():
    """In float64 the combination's rounding is far below any formula error: outputs, gradients and running
    statistics agree to 1e-10 (a check of the formulas that fp32 tolerances could blur)."""
    torch.manual_seed(0)
    whole = _ConvBN(True).double().train()
    split = copy.deepcopy(whole)
    x = torch.randn(7, 3, 6, 6, dtype=torch.float64) * 4 + 1
    ref, out = whole(x), BatchSplitTraining(split, threads=3)(x)
    assert _split_ran(out) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    ref.square().sum().backward()
    out.square().sum().backward()
    for (n, p), q in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)
    for (n, b), c in zip(whole.named_buffers(), split.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-12, atol=0, msg=n)
