"""Process-group setup for `torchrun` and the few collectives the engine needs.

One process per device. `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
without them everything runs as a single process and every collective here is a no-op::

    hybridzoo train ...                                             # one process
    torchrun --nproc_per_node=2 -m hybridzoo train ...              # two processes, this machine
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 -m hybridzoo train ...

The backend is nccl when training on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "cleanup", "is_distributed", "all_reduce_sum", "all_gather_object",
           "broadcast_object", "broadcast_buffers", "barrier", "ShardSampler"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """'auto' / None → cuda:<local_rank> when available, else cpu."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def setup(device: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not dist.is_initialized():
        _import_group_defaults()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        info.initialized_here = True
    return info


def _import_group_defaults() -> None:
    """Import torch.distributed.nn.functional while no process group exists.

    Its functions take `group=group.WORLD` as a default argument, evaluated at import. Imported after
    init_process_group (DDP does, through torch._dynamo) they hold the world group for the life of the
    process, so destroy_process_group cannot free it: gloo's worker threads outlive `cleanup`, and one
    that drops its last finished collective while the interpreter shuts down aborts the process
    ("terminate called without an active exception"). Imported first, the defaults are None.
    """
    import importlib

    importlib.import_module("torch.distributed.nn.functional")


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the current CUDA device under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; returns `t` (unchanged on a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every buffer (batch-norm statistics, ...) of `module` from process `src` to all."""
    if not is_distributed():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: process r takes samples r, r+W, r+2W, ... — every sample exactly once,
    no padding (unlike DistributedSampler), so metrics summed over processes are exact."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))
