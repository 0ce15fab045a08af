"""Parameters, FLOPs (multiply-adds), latency and throughput of a model.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products,
attention included; element-wise ops, norms and softmax are not counted) and halved, as papers
report them. Full-size models are counted on the `meta` device, so nothing is allocated.
`count_macs` is the one counter behind `hybridzoo info`, `hybridzoo bench` and the README table:
attention runs through SDPA's math backend while counting, because the fused CPU kernel is
invisible to the counter (cvt_13 would read 4.058 instead of 4.566 GMACs).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "forward_profile", "example_input", "measure_model", "benchmark",
           "estimate_memory"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def example_input(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1,
                  device: torch.device | str = "cpu") -> Any:
    """An input the model accepts: the model's own `example_input` if it defines one, else an image batch."""
    if hasattr(model, "example_input"):
        return model.example_input(batch_size, device=device)
    return torch.randn((batch_size, *input_size), device=device)


def _call(model: nn.Module, x: Any):
    return model(*x) if isinstance(x, tuple) else model(x)


class OutputBytes(TorchDispatchMode):
    """The bytes of the tensors the ops run under it allocate (views allocate nothing): their sum (`total`) and
    the largest dense one (`largest`; oneDNN's packed weights, opaque tensors made once per shape, left out)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # a measuring mode never entered under torch.compile: without this torch wraps __torch_dispatch__ in
        # dynamo's disable, whose first call imports torch._dynamo (1.4 s here, on every eval's first batch)
        return False

    def __init__(self):
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    nbytes = t.numel() * t.element_size()
                    self.total += nbytes
                    if t.layout is torch.strided:
                        self.largest = max(self.largest, nbytes)
        return out


@torch.no_grad()
def forward_profile(model: nn.Module, x: Any) -> dict[str, int]:
    """One forward pass on `x`: multiply-accumulates (FLOPs / 2) and the bytes of all tensors its ops produce.

    The byte sum bounds what a training step keeps for backward (every intermediate, none freed). Counted as
    papers count a model: every token of every block, also the last block's rows that `model(x)` skips because
    the head does not read them (`layers.helpers.every_row`).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hybridzoo.layers.helpers import every_row

    with (every_row(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter,
          OutputBytes() as out_bytes):
        _call(model, x)
    return {"macs": counter.get_total_flops() // 2, "activation_bytes": out_bytes.total}


def count_macs(model: nn.Module, x: Any) -> int:
    """Multiply-accumulates of one forward pass on `x` (FLOPs / 2 by FlopCounterMode)."""
    return forward_profile(model, x)["macs"]


def estimate_memory(params: int, activation_bytes_per_sample: int, batch_size: int, train: bool,
                    param_bytes: int = 4) -> int:
    """A rough upper bound in bytes: weights (+ gradients when training) and a batch's activations.

    Inference frees intermediates as it goes, so a quarter of the summed activations is assumed live.
    """
    weights = params * param_bytes * (2 if train else 1)
    acts = activation_bytes_per_sample * batch_size
    return weights + (acts if train else acts // 4)


def measure_model(name: str, input_size: tuple[int, ...] | None = None, **overrides: Any) -> dict[str, Any]:
    """Params and MACs of a registered model at full size, built on the meta device (no memory used)."""
    from hybridzoo.factory import create_model
    from hybridzoo.registry import get_card

    card = get_card(name)
    size = tuple(input_size or card.input_size)
    with torch.device("meta"):
        model = create_model(name, **overrides)
    model.eval()
    x = example_input(model, size, 1, device="meta")
    return {"params": count_params(model), "macs": count_macs(model, x), "input_size": list(size)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 32, device: str = "cpu",
              warmup: int = 3, iters: int = 10, train: bool = False, amp_dtype: torch.dtype | None = None,
              loss_fn: Callable[[Any], torch.Tensor] | None = None, min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per iteration and samples per second, for inference or a training step."""
    dev = torch.device(device)
    model = model.to(dev)
    model.train(train)
    x = example_input(model, input_size, batch_size, device=dev)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6) if train else None

    def step():
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if train:
                out = _call(model, x)
                loss = loss_fn(out) if loss_fn else _default_loss(out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                with torch.inference_mode():
                    _call(model, x)

    for _ in range(warmup):
        step()
    _sync(dev)
    times = []
    t_start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"seconds_per_iter": med, "samples_per_second": batch_size / med, "batch_size": batch_size, "iters": len(times)}


def _default_loss(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return sum(_default_loss(o) for o in out)
    if isinstance(out, dict):
        return sum(_default_loss(o) for o in out.values())
    return out.float().pow(2).mean()
