"""Helpers shared by several test files (tests/conftest.py puts this folder on sys.path)."""

import contextlib
import importlib
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def benchmark_module(name: str):
    """The module `name` of benchmarks/ (a script, not a package), imported with that folder on sys.path for the
    import only, as the scripts import their siblings (`_common`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every weight and BatchNorm statistic off its initial value, so that folding or fusing a term
    that is zero / one at initialisation (a bias, a BatchNorm mean or scale) cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def error_on_watchdog(fn, hung: str, timeout: float = 60):
    """fn() on a daemon thread of its own; fails with `hung` instead of hanging the suite when it has not returned
    after `timeout` seconds; returns what fn raised, or None."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), hung
    return box.get("error")


def small_transformer(name: str, img_size: int, embed_dim: int, depth: int, num_heads: int) -> nn.Module:
    """A reduced DeiT / ViT or ConViT (its last depth − 2 blocks MHSA) in eval mode with perturbed weights, seeded."""
    import hybridzoo

    torch.manual_seed(0)
    kw = dict(img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    if name.startswith("convit"):
        kw["local_up_to_layer"] = 2
    model = hybridzoo.create_model(name, **kw).eval()
    perturb(model)
    return model


def activation(z: torch.Tensor, act: str, algorithm: str) -> torch.Tensor:
    """The activation a frozen product's epilogue applies (`OneDNNLinear.act` / `.algorithm`), in ATen."""
    if act == "gelu":
        return F.gelu(z, approximate="tanh" if algorithm == "tanh" else "none")
    return {"none": lambda t: t, "relu": F.relu, "swish": F.silu}[act](z)


# the native kernels' epilogue activations by test id: (act, algorithm) as the kernels take them
EPILOGUES = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu-tanh": ("gelu", "tanh"), "relu": ("relu", ""),
             "swish": ("swish", "")}


def with_threads(n: int, fn):
    """fn() with n intra-op threads, the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def kernels_with_isa(native, isa: str):
    """The loaded native kernels (`hybridzoo.layers.native`) running with instruction set `isa` ("avx512",
    "avx2", "none": the ATen fallbacks of the ops that have one) for the duration, the CPU's best again after;
    skips the test where the CPU lacks it."""
    import pytest

    best = native.set_isa("best")
    levels = {"avx512": 2, "avx2": 1, "none": 0}
    if levels[isa] > levels[best]:
        pytest.skip(f"this CPU cannot run the {isa} kernels (best: {best}); they run on CPUs that can")
    native.set_isa(isa)
    try:
        yield native
    finally:
        native.set_isa("best")


def small_sr_val_folder(folder, count: int = 3, size: tuple[int, int] = (40, 48)):
    """`count` HR crops (h × w, even sides) of the built-in test photographs as PNGs in `folder`, for
    `--val-data`: the built-in photographs evaluated whole cost seconds per pass at every epoch and at the end
    of a run; what a test of the engine's SR path checks does not need them. Returns the folder."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from hybridzoo.data.super_resolution import builtin_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, names = builtin_images("test")
    h, w = size
    for i in range(count):
        img = images[i % len(images)]
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2 + 7 * i
        crop = np.ascontiguousarray(img[top:top + h, left:left + w])
        Image.fromarray(crop).save(folder / f"{names[i % len(names)]}_{i}.png")
    return folder


class OpNames(TorchDispatchMode):
    """Records the name of every operator dispatched on this thread (`aten.convolution`, `hybridzoo_native.gelu`)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class OneDevice(TorchDispatchMode):
    """Refuses an operator given tensors on two devices, as CUDA's kernels do; the meta device's own kernels check
    only some (an embedding takes CPU indices on meta, not on CUDA). CPU scalars (0-d), indices of advanced
    indexing and copies between devices are allowed, as on CUDA."""

    MIXED_OK = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                torch.ops.aten._index_put_impl_.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self.MIXED_OK:
            devices = {t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.ndim}
            if len(devices) > 1:
                raise RuntimeError(f"{func} was given tensors on {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))
