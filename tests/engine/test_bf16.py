"""bf16 on the CPU: autocast training, the bf16 inference path and the native-bf16 check.

bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%), so these tests compare with fp32 to a
stated bf16 tolerance, never exactly: logits within 3% of their largest magnitude (mean within 2%),
gradients with a cosine similarity above 0.99. Every parameter is perturbed first (as in
tests/layers/test_onednn_models.py) so that zero-initialised heads cannot hide a wrong layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybridzoo
from hybridzoo.engine import amp as amp_mod
from hybridzoo.engine.checkpoint import load_checkpoint
from hybridzoo.engine.trainer import train
from hybridzoo.layers import onednn
from hybridzoo.layers.onednn import OneDNNLinear, onednn_available, optimize_for_cpu_inference
from hybridzoo.registry import get_card
from _helpers import perturb  # tests/conftest.py puts tests/ on sys.path

BF16 = torch.bfloat16
MODELS = ["deit_small_patch16_224", "cvt_13", "convit_tiny", "coatnet_0", "mobile_former_26m", "botnet_t3"]


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs)
    perturb(model)
    return model, torch.randn(4, *(card.test_input_size or card.input_size), generator=torch.Generator().manual_seed(1))


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ref.abs().max() > 1e-3, "degenerate reference output; the comparison would prove nothing"
    d = (out - ref).abs()
    assert d.max() <= 0.03 * ref.abs().max(), f"max deviation {d.max():.4g} of logits up to {ref.abs().max():.4g}"
    assert d.mean() <= 0.02 * ref.abs().mean(), f"mean deviation {d.mean():.4g} of mean |logit| {ref.abs().mean():.4g}"


# ---- the bf16 inference path ----------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")


@needs_onednn
@pytest.mark.parametrize("name", MODELS)
def test_bf16_inference_path_is_the_fp32_function_to_bf16_precision(name):
    model, x = _model(name)
    model.eval()
    fast32 = optimize_for_cpu_inference(model)
    fast16 = optimize_for_cpu_inference(model, dtype=BF16)
    with torch.inference_mode():
        ref, out, out32 = _first(model(x)), _first(fast16(x)), _first(fast32(x))
    assert_bf16_close(out, ref)
    # it really ran in bf16: the fp32 oneDNN path agrees with eager far more closely than this one
    assert (out - ref).abs().max() > 10 * (out32 - ref).abs().max()
    linears = [m for m in fast16.modules() if isinstance(m, OneDNNLinear)]
    assert linears and all(m.dtype is BF16 for m in linears)
    convs = [m for m in fast16.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert all(m.weight.dtype is BF16 for m in convs)
    # the original is untouched
    assert all(p.dtype is torch.float32 and p.requires_grad for p in model.parameters())
    # autocast is off again after a call, and after a call that fails
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(Exception):
        with torch.inference_mode():
            fast16(x[:, :1])
    assert not torch.is_autocast_enabled("cpu") and fast16._bf16_autocast == []  # the region was closed


@needs_onednn
@pytest.mark.parametrize("onednn_bf16", [True, False], ids=["onednn", "aten"])
@pytest.mark.parametrize("act", ["none", "gelu", "relu", "swish"])
def test_bf16_onednn_linear_with_fused_activation(act, onednn_bf16, monkeypatch):
    """Both routes: oneDNN's packed bf16 product, and ATen's bf16 product where oneDNN has no bf16 kernels for
    the CPU (AVX2-only machines; forced here by pretending so, so that every machine tests that route)."""
    if onednn_bf16 and not onednn.onednn_bf16_available():
        pytest.skip("oneDNN has no bf16 kernels for this CPU (needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    monkeypatch.setattr(onednn, "onednn_bf16_available", lambda: onednn_bf16)
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    x = 2 * torch.randn(6, 48)
    ref = {"none": lambda t: t, "gelu": F.gelu, "relu": F.relu, "swish": F.silu}[act](lin(x)).detach()
    layer = OneDNNLinear(lin, act, dtype=BF16)
    assert (layer.bf16_weight is None) == onednn_bf16 and (layer.packed_weight is None) != onednn_bf16
    with torch.inference_mode():
        out = layer(x)
        assert out.dtype is BF16
        assert torch.equal(layer(x.to(BF16)), out)  # bf16 inputs are taken as they are
    assert_bf16_close(out.float(), ref)


@needs_onednn
def test_bf16_path_returns_fp32_for_tuple_outputs_and_refuses_other_dtypes():
    model, x = _model("deit_small_distilled_patch16_224")
    fast = optimize_for_cpu_inference(model.train(), dtype=BF16)  # train mode: the two heads come back apart
    fast.train()
    with torch.inference_mode():
        out = fast(x)
    assert isinstance(out, tuple) and all(o.dtype is torch.float32 for o in out)
    with pytest.raises(ValueError, match="float32 or torch.bfloat16, got torch.float16"):
        optimize_for_cpu_inference(model, dtype=torch.float16)


# ---- autocast training --------------------------------------------------------------------------------

# (model, min cosine similarity, max relative error of the gradient). Mobile-Former's reduced build in train
# mode normalises a 64-wide pooled vector with BatchNorm over the 4 samples, which amplifies rounding: its
# logits move by ~4% (2% for the others) and the gradients of its first depthwise convolutions by ~28%.
GRAD_TOL = [("deit_small_patch16_224", 0.99, 0.15), ("cvt_13", 0.99, 0.15), ("coatnet_0", 0.99, 0.15),
            ("botnet_t3", 0.99, 0.15), ("mobile_former_26m", 0.95, 0.35)]


@pytest.mark.parametrize("name, min_cos, max_rel", GRAD_TOL)
def test_bf16_autocast_gradients_match_fp32(name, min_cos, max_rel):
    model, x = _model(name)
    model.train()
    y = torch.arange(x.shape[0]) % 5

    def grads(amp: bool):
        torch.manual_seed(0)  # the same dropout / stochastic-depth draws
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16, enabled=amp):
            loss = F.cross_entropy(_first(model(x)), y)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    (l32, g32), (l16, g16) = grads(False), grads(True)
    assert l16.dtype is torch.float32 and g16.dtype is torch.float32
    assert abs(float(l16 - l32)) <= 0.02 * abs(float(l32)) + 1e-3
    assert g32.norm() > 0
    assert F.cosine_similarity(g16, g32, dim=0) > min_cos
    assert (g16 - g32).norm() <= max_rel * g32.norm()


def test_bf16_training_keeps_fp32_state(make_args, tmp_path):
    """--amp bf16: weights, BatchNorm statistics, EMA and the optimiser's moments stay fp32 and the loss is fp32."""
    args, task = make_args("--model", "cvt_tiny_demo", "--batch-size", 16, "--limit-train-batches", 2,
                           "--limit-val-batches", 1, "--epochs", 1, "--amp", "bf16", "--ema", "--output", tmp_path)
    before = {k: v.clone() for k, v in hybridzoo.create_model("cvt_tiny_demo", num_classes=10).state_dict().items()}
    result = train(args, task)
    state = result.model.state_dict()
    bn = [k for k in state if k.endswith("running_mean")]
    assert bn, "cvt_tiny_demo has BatchNorm layers; the check would prove nothing"
    assert all(v.dtype is torch.float32 for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(state[k], before[k]) for k in bn), "BatchNorm statistics were not updated"
    assert all(v.dtype is torch.float32 for v in result.ema_model.state_dict().values() if v.is_floating_point())
    moments = [t for s in load_checkpoint(tmp_path / "last.ckpt")["optimizer"]["state"].values()
               for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    assert moments and all(t.dtype is torch.float32 for t in moments)
    assert torch.isfinite(torch.tensor(result.summary["val_loss"]))


# ---- the batch split under bf16 -------------------------------------------------------------------------
# Autocast is per thread: the split's worker threads take the caller's (layers.onednn.run_on_threads). Without it
# the second part runs in fp32 (training: its logits come back fp32 and torch.cat promotes the whole output;
# inference: the convolutions' bf16 weights meet an fp32 input).

@needs_onednn
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "coatnet_0"])
def test_bf16_inference_splits_the_batch_and_every_part_runs_bf16(name, two_threads):
    model, x = _model(name)
    model.eval()
    split = optimize_for_cpu_inference(model, dtype=BF16)
    whole = optimize_for_cpu_inference(model, dtype=BF16, split_batch=False)
    fast32 = optimize_for_cpu_inference(model)
    with torch.inference_mode():
        ref, out, one, out32 = _first(model(x)), _first(split(x)), _first(whole(x)), _first(fast32(x))
    assert getattr(split, "_per_call", None), "the batch did not take the split"
    assert_bf16_close(out, ref)
    assert_bf16_close(one, out)
    # the second part (a worker thread) ran in bf16 too: it strays from fp32 as bf16 does
    half = x.shape[0] // 2
    assert (out[half:] - ref[half:]).abs().max() > 10 * (out32[half:] - ref[half:]).abs().max()
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "coatnet_0"])
def test_bf16_training_by_batch_split_is_the_whole_batch_step(name, two_threads):
    """Autocast training through BatchSplitTraining (BatchNorm2d split included: CoAtNet) gives the whole batch's
    bf16 logits, loss and gradients, to bf16 rounding; every part ran in bf16 (the output stays bf16)."""
    from hybridzoo.layers.train_fast import BatchSplitTraining

    model, x = _model(name)
    model.train()
    y = torch.arange(x.shape[0]) % 5

    def step(call):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            out = _first(call(x))
            loss = F.cross_entropy(out, y)
        loss.backward()
        return out, loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_w, loss_w, g_w = step(model)
    stats_w = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.load_state_dict(state)
    out_s, loss_s, g_s = step(BatchSplitTraining(model))
    assert out_s.dtype is BF16 and out_w.dtype is BF16
    torch.testing.assert_close(out_s.float(), out_w.float(), rtol=0.02, atol=0.02 * float(out_w.abs().max()))
    assert abs(float(loss_s - loss_w)) <= 0.01 * abs(float(loss_w))
    assert g_w.norm() > 0 and F.cosine_similarity(g_s, g_w, dim=0) > 0.995
    for k, v in stats_w.items():   # the running statistics: the whole batch's, once
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0.02, atol=1e-3, msg=k)


def test_bf16_trainer_takes_the_batch_split(make_args, tmp_path, two_threads, capsys):
    """`hybridzoo train --amp bf16` on the CPU splits the batch, and trains as --no-batch-split does (bf16 rounding)."""
    res = {}
    for run, extra in (("split", ()), ("whole", ("--no-batch-split",))):
        args, task = make_args("--model", "hz_tiny_bn", "--batch-size", 16, "--limit-train-batches", 3,
                               "--limit-val-batches", 2, "--epochs", 1, "--lr", 1e-3, "--amp", "bf16",
                               "--output", tmp_path / run, *extra)
        res[run] = train(args, task)
        out = capsys.readouterr().out
        assert ("batch split: 2 threads each train their share" in out) == (run == "split"), out
    split, whole = res["split"], res["whole"]
    assert split.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=0.02)
    for (n, a), b in zip(split.model.state_dict().items(), whole.model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.02, msg=n)


# ---- the native-bf16 check and the CLI's warning ----------------------------------------------------

@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(amp_mod, "_warned", False)


@pytest.mark.parametrize("flags, native", [({"avx512f", "avx512_bf16"}, True), ({"avx512f", "amx_bf16"}, True),
                                           ({"avx2", "fma"}, False), (None, None)])
def test_cpu_bf16_support(monkeypatch, flags, native):
    monkeypatch.setattr(amp_mod, "_cpu_flags", lambda: flags)
    s = amp_mod.cpu_bf16_support()
    assert s["native"] is native and s["capability"] == torch.backends.cpu.get_cpu_capability()
    assert s["flags"] == sorted((flags or set()) & {"avx512_bf16", "amx_bf16"})


def test_cli_warns_once_without_native_bf16(monkeypatch, capsys, fresh_warning):
    from hybridzoo.cli import main

    monkeypatch.setattr(amp_mod, "_cpu_flags", lambda: {"avx2", "fma"})
    bench = ["bench", "cvt_tiny_demo", "--amp", "bf16", "--device", "cpu", "--no-train", "--iters", "1",
             "--warmup", "0", "--batch-size", "1"]
    assert main(bench) == 0
    assert main(bench) == 0
    err = capsys.readouterr().err
    assert err.count("--amp bf16 on a CPU without native bf16") == 1
    assert "slower than fp32" in err
    # not for fp32, nor for a GPU device
    monkeypatch.setattr(amp_mod, "_warned", False)
    assert not amp_mod.warn_if_bf16_slow("none", "cpu")
    assert not amp_mod.warn_if_bf16_slow("bf16", torch.device("cuda"))


def test_cli_is_silent_with_native_bf16(monkeypatch, capsys, fresh_warning):
    from hybridzoo.cli import main

    monkeypatch.setattr(amp_mod, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert main(["bench", "cvt_tiny_demo", "--amp", "bf16", "--onednn", "--device", "cpu", "--iters", "1",
                 "--warmup", "0", "--batch-size", "1"]) == 0
    assert "native bf16" not in capsys.readouterr().err


@pytest.mark.parametrize("name", hybridzoo.list_models(task="classification"))
def test_every_classifier_trains_and_infers_in_bf16(name):
    """One autocast bf16 training step (finite fp32 loss and gradients) and the bf16 inference path (fp32 out)."""
    card = get_card(name)
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **card.test_kwargs).train()
    x = torch.randn(2, *(card.test_input_size or card.input_size))
    with torch.autocast("cpu", dtype=BF16):
        loss = F.cross_entropy(_first(model(x)), torch.zeros(2, dtype=torch.long))
    loss.backward()
    assert loss.dtype is torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype is torch.float32 and torch.isfinite(g).all() for g in grads)
    if onednn_available():
        fast = optimize_for_cpu_inference(model.eval(), dtype=BF16)
        with torch.inference_mode():
            out = _first(fast(x))
        assert out.dtype is torch.float32 and torch.isfinite(out).all()
