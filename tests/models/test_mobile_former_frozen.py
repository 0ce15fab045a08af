"""Mobile-Former's frozen block on the oneDNN inference path (`optimize_for_cpu_inference`): one image on two
threads — the token side beside the first convolution, then the rest of the block as two halves of the map —
computes the eager block's function; errors on either thread reach the caller."""

from __future__ import annotations

import threading

import pytest
import torch

import hybridzoo
from hybridzoo.layers import native
from hybridzoo.layers.conv import ConvBnAct
from hybridzoo.layers.onednn import onednn_available, optimize_for_cpu_inference
from hybridzoo.models import mobile_former as mf
from hybridzoo.registry import get_card
from _helpers import perturb  # tests/conftest.py puts tests/ on sys.path

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this build")

Frozen = mf._FrozenMobileFormerBlock


def _models(name: str = "mobile_former_294m"):
    torch.manual_seed(0)
    model = hybridzoo.create_model(name, **get_card(name).test_kwargs).eval()
    perturb(model)
    return model, optimize_for_cpu_inference(model)



def _spy_halves(monkeypatch) -> list:
    rows = []
    rest = Frozen._rest_rows

    def spy(self, y, u1, u2, kv, x, r, *args):
        rows.append((y.shape[2], r))
        return rest(self, y, u1, u2, kv, x, r, *args)
    monkeypatch.setattr(Frozen, "_rest_rows", spy)
    return rows


# reduced 294M (four blocks after the stride-2 stem): maps of 16 and 8 rows at 64², odd ones (18, 9) at 72², 12 and
# 6 (below 7 rows: whole) at 48²
@pytest.mark.parametrize("mode", ["halves", "branches", "serial"])
def test_one_image_on_two_threads_matches_eager(mode, two_threads, monkeypatch):
    model, fast = _models()
    monkeypatch.setattr(Frozen, "PARALLEL", mode != "serial")
    monkeypatch.setattr(Frozen, "SPLIT_ROWS", mode == "halves")
    rows = _spy_halves(monkeypatch)
    assert sum(isinstance(m, Frozen) for m in fast.modules()) == 4
    for side in (64, 72, 48, 64):
        x = torch.randn(1, 3, side, side)
        with torch.inference_mode():
            ref, out = model(x), fast(x)
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert torch.get_num_threads() == 2   # the caller's threads are restored
    if mode == "halves":
        # each split map once per half: rows [0, ⌈H/2⌉) and [⌈H/2⌉, H); maps below 7 rows stay whole
        heights = {h for h, _ in rows}
        assert heights == {16, 8, 18, 9, 12}
        for h in heights:
            assert {r for hh, r in rows if hh == h} == {(0, (h + 1) // 2), ((h + 1) // 2, h)}
    else:
        assert rows == []


def test_batches_and_grouped_variants_keep_the_serial_block(two_threads, monkeypatch):
    # a batch of two (split per image by the batch split, one thread each) and the grouped 26M (channel shuffle:
    # no halves) give the eager outputs too
    rows = _spy_halves(monkeypatch)
    model, fast = _models("mobile_former_26m")
    for x in (torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 64)):
        with torch.inference_mode():
            ref, out = model(x), fast(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    model, fast = _models()
    with torch.inference_mode():
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4 * float(model(x).abs().max()))
    assert rows == []


def _run_in_thread(fn):
    """fn() on a thread of its own; fails instead of hanging the suite when a wait never ends."""
    box = {}

    def target():
        torch.set_num_threads(2)
        try:
            with torch.inference_mode():
                box["out"] = fn()
        except BaseException as e:   # noqa: BLE001 (handed to the test)
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the two-thread block hung"
    return box


@pytest.mark.parametrize("where", ["tokens", "first", "lower half", "upper half"])
def test_an_error_on_either_thread_reaches_the_caller(where, monkeypatch):
    monkeypatch.setattr(Frozen, "PARALLEL", True)
    monkeypatch.setattr(Frozen, "SPLIT_ROWS", True)
    model, fast = _models()
    x = torch.randn(1, 3, 64, 64)
    name = {"tokens": "tokens", "first": "_first"}.get(where, "_rest_rows")
    orig = getattr(Frozen, name)

    def broken(self, *args):
        if name != "_rest_rows" or (args[5][0] == 0) == (where == "upper half"):
            raise RuntimeError(f"boom in {where}")
        return orig(self, *args)
    monkeypatch.setattr(Frozen, name, broken)
    box = _run_in_thread(lambda: fast(x))
    assert isinstance(box.get("error"), RuntimeError) and f"boom in {where}" in str(box["error"])
    monkeypatch.setattr(Frozen, name, orig)
    box = _run_in_thread(lambda: (fast(x), torch.get_num_threads()))
    with torch.inference_mode():
        ref = model(x)
    assert "error" not in box, box.get("error")
    assert box["out"][1] == 2
    torch.testing.assert_close(box["out"][0], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("parallel", [True, False])
def test_a_call_under_no_grad_after_one_under_inference_mode(parallel, two_threads, monkeypatch):
    # the dynamic ReLU's per-thread scratch buffer made under inference_mode cannot be written outside it
    monkeypatch.setattr(Frozen, "PARALLEL", parallel)
    model, fast = _models()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fast(x)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# -- depthwise convolutions with a channel multiplier as m plain depthwise ones (session 8) --------------------------

def _multipliers(fast) -> list:
    return [m for m in fast.modules() if isinstance(m, mf._MultiplierDepthwise)]


@pytest.mark.parametrize("route", ["parts", "grouped", "native"])
@pytest.mark.parametrize("strided", [False, True])
def test_multiplier_depthwise_blocks_match_eager(strided, route, monkeypatch):
    # reduced 294M: the lite block's dw (8 → 16) and both downsampling blocks' dw2 (×2) always; their stride-2 dw1
    # (8 → 24, 16 → 48) only when the channel floor is lowered, or, for 16 → 48, where the native kernel takes it
    # in one call. Batch 1, an odd batch and three input sizes; every map through the m depthwise convolutions,
    # or every map through the grouped one and the reordering copy, or (16 input channels) the native kernel.
    if strided:
        monkeypatch.setattr(Frozen, "MULTIPLIER_MIN_CHANNELS_STRIDED", 0)
    monkeypatch.setattr(mf._MultiplierDepthwise, "PARTS_MIN_ELEMENTS", 0 if route == "parts" else 1 << 62)
    native_route = route == "native" and native.load() and native.attention_supported()
    if route == "native" and not native_route:
        pytest.skip("the native kernels are not built for this CPU")
    monkeypatch.setattr(mf._MultiplierDepthwise, "NATIVE", native_route)
    model, fast = _models()
    parts = _multipliers(fast)
    split = [(8, 16), (16, 32), (24, 48)]
    if native_route:
        split.insert(2, (16, 48))
    if strided:
        split = [(8, 16), (8, 24), (16, 32), (16, 48), (24, 48)]
    assert [(m.in_channels, m.out_channels) for m in parts] == split
    assert {m.taps is not None for m in parts if m.in_channels == 16} == {native_route}
    for batch, side in ((1, 64), (3, 72), (1, 48), (3, 64)):
        x = torch.randn(batch, 3, side, side)
        with torch.inference_mode():
            ref, out = model(x), fast(x)
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_multiplier_depthwise_off_and_grouped_variants(monkeypatch):
    # SPLIT_MULTIPLIER off: the grouped convolutions stay; the grouped 26M (channel shuffle) never splits them
    monkeypatch.setattr(Frozen, "SPLIT_MULTIPLIER", False)
    model, fast = _models()
    assert _multipliers(fast) == []
    monkeypatch.setattr(Frozen, "SPLIT_MULTIPLIER", True)
    model, fast = _models("mobile_former_26m")
    assert _multipliers(fast) == []
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("stride", [1, 2])
def test_multiplier_depthwise_is_the_grouped_convolution_in_its_channel_order(stride, monkeypatch):
    # the module alone: output channel j·C + g is the grouped convolution's g·m + j (BatchNorm and ReLU6 folded),
    # by either route: m depthwise convolutions on large maps (here: above a lowered floor), the grouped one and a
    # reordering copy on small ones
    torch.manual_seed(0)
    seq = ConvBnAct(5, 15, 3, stride, groups=5, act_layer=torch.nn.ReLU6).eval()
    perturb(seq)
    frozen = mf._MultiplierDepthwise(seq, None)
    order = mf._multiplier_order(5, 3)
    assert order[:6].tolist() == [0, 3, 6, 9, 12, 1]
    x = torch.randn(2, 5, 13, 11).contiguous(memory_format=torch.channels_last)
    calls = []
    for part in frozen.parts:
        part.register_forward_hook(lambda *args: calls.append("part"))
    frozen.grouped.register_forward_hook(lambda *args: calls.append("grouped"))
    rows = (13 + 1) // stride if stride == 2 else 13
    cols = (11 + 1) // stride if stride == 2 else 11
    with torch.inference_mode():
        ref = seq(x)
        monkeypatch.setattr(frozen, "PARTS_MIN_ELEMENTS", 2 * rows * cols * 5)        # exactly at the floor: parts
        by_parts = frozen(x)
        monkeypatch.setattr(frozen, "PARTS_MIN_ELEMENTS", 2 * rows * cols * 5 + 1)    # one below: grouped
        by_grouped = frozen(x)
    assert calls == ["part"] * 3 + ["grouped"]
    torch.testing.assert_close(by_parts, ref[:, order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_grouped, ref[:, order], rtol=1e-5, atol=1e-5)
    assert by_grouped.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stride", [1, 2])
def test_multiplier_depthwise_runs_as_one_native_call(stride):
    # 16 input channels and an activation the native kernel has: one call of it, no part and no grouped
    # convolution, the output in the same j·C + g order
    if not (native.load() and native.attention_supported()):
        pytest.skip("the native kernels are not built for this CPU")
    torch.manual_seed(0)
    seq = ConvBnAct(16, 48, 3, stride, groups=16, act_layer=torch.nn.ReLU).eval()
    perturb(seq)
    frozen = mf._MultiplierDepthwise(seq, None)
    assert frozen.taps is not None and tuple(frozen.taps.shape) == (9, 48)
    calls = []
    for part in [*frozen.parts, frozen.grouped]:
        part.register_forward_hook(lambda *args: calls.append("oneDNN"))
    x = torch.randn(2, 16, 13, 11)
    with torch.inference_mode():
        ref, out = seq(x), frozen(x)
    assert calls == [] and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref[:, mf._multiplier_order(16, 3)], rtol=1e-5, atol=1e-5)
    # ReLU6 (no epilogue in the kernel) keeps the oneDNN routes
    assert mf._MultiplierDepthwise(ConvBnAct(16, 48, 3, stride, groups=16, act_layer=torch.nn.ReLU6).eval(),
                                   None).taps is None


def test_multiplier_depthwise_names_an_activation_without_a_post_op():
    seq = ConvBnAct(4, 8, 3, 1, groups=4, act_layer=torch.nn.Softsign).eval()
    with pytest.raises(ValueError, match="Softsign"):
        mf._MultiplierDepthwise(seq, None)


# -- Former→Mobile as two batched products with block-diagonal keys and values (session 8) ---------------------------

@pytest.mark.parametrize("batch,heads,size", [(1, 2, (16, 16)), (3, 2, (7, 9)), (2, 4, (5, 5)), (1, 1, (12, 3))])
def test_former_to_mobile_products_match_eager_bridge(batch, heads, size):
    torch.manual_seed(0)
    C, T, D = 24, 6, 32
    blk = mf.MobileFormerBlock(C, C, 1, (2, 2), False, D, bridge_heads=heads).eval()
    perturb(blk)
    frozen = Frozen(blk, None)
    x = torch.randn(batch, C, *size).contiguous(memory_format=torch.channels_last)
    z = torch.randn(batch, T, D)
    kv = torch.cat([blk.former_mobile.k(z), blk.former_mobile.v(z)], dim=-1)
    with torch.inference_mode():
        ref = blk.former_mobile(x, z)                 # the eager bridge: x + attention
        out = frozen._former_to_mobile_products(x, kv)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_former_to_mobile_takes_the_products_on_large_maps_only(monkeypatch):
    model, fast = _models()
    calls = []
    orig = Frozen._former_to_mobile_products

    def spy(self, x, kv):
        calls.append(x.shape[0] * x.shape[2] * x.shape[3])
        return orig(self, x, kv)
    monkeypatch.setattr(Frozen, "_former_to_mobile_products", spy)
    x = torch.randn(1, 3, 64, 64)   # maps of 16² and 8² pixels after the blocks
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert calls == [256, 256]       # the 8×8 maps (64 pixels) stay on SDPA
    monkeypatch.setattr(Frozen, "F2M_BLOCK_DIAGONAL", False)
    calls.clear()
    with torch.inference_mode():
        fast(x)
    assert calls == []


# -- the frozen dynamic ReLU one image at a time with one intra-op thread (session 8) --------------------------------

@pytest.mark.parametrize("channels_last", [True, False])
def test_dynamic_relu_one_image_at_a_time_is_the_eager_activation(channels_last, monkeypatch):
    monkeypatch.setenv("HYBRIDZOO_NATIVE", "0")   # the ATen passes (tests/layers/test_native.py: the kernel)
    torch.manual_seed(0)
    act = mf.DynamicReLU(12, 16).eval()
    perturb(act)
    x = torch.randn(3, 12, 9, 7)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    token = torch.randn(3, 16)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            ref = act(x, token)
            frozen = optimize_for_cpu_inference(torch.nn.ModuleDict({"a": act}))["a"]
            assert isinstance(frozen, mf._FrozenDynamicReLU)
            calls = []
            monkeypatch.setattr(mf, "_scratch", lambda like, f=mf._scratch: calls.append(like.shape[0]) or f(like))
            per_image = frozen(x.clone(), token)
            monkeypatch.setattr(mf._FrozenDynamicReLU, "PER_IMAGE", False)
            whole = frozen(x.clone(), token)
    finally:
        torch.set_num_threads(before)
    assert calls == [1, 3]   # one image's scratch buffer, then the whole batch's
    torch.testing.assert_close(per_image, whole, rtol=0, atol=0)
    torch.testing.assert_close(per_image, ref, rtol=1e-5, atol=1e-6)
