"""Training checkpoints: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors and plain Python values only (so the safe loader accepts it):
model, optimizer, schedule, grad scaler, EMA, the random-number-generator states of every process
(torch, CUDA, numpy, Python — converted to tensors), epoch, step, the metrics history and the
command-line arguments. `atomic_write` writes next to the target, fsyncs, then `os.replace`s it, so
a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["CheckpointError", "DiskFullError", "atomic_write", "atomic_save", "load_checkpoint", "save_weights",
           "get_rng_state", "set_rng_state", "plain_args", "read_run"]

CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or not a hybridzoo training checkpoint."""


class DiskFullError(OSError):
    """No space (or quota) left while writing a file; the previous file is kept and the partial one removed."""


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    # torch.save reports a failed write as "RuntimeError: ... unexpected pos N vs M", the errno lost;
    # so besides ENOSPC anywhere in the chain, a failed write on a full file system counts too
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, Exception) and not isinstance(exc, OSError):
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call `write(file)` on a temporary file in the target's folder, fsync it, then rename it over `path`.

    On any failure the temporary file is removed and `path` is left as it was; a full disk is a
    `DiskFullError` saying so. Temp files of killed processes are removed by `engine.rundir`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if _out_of_space(e, path.parent):
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            err = DiskFullError(f"no space left on {os.fspath(path.parent)!r} while writing {path.name} "
                                f"({kept}; the partial file was removed). Free some space, or choose another "
                                "--output")
            err.errno = errno.ENOSPC
            raise err from e
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, atomically. Tensors are cloned so tied weights are stored once per key."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {os.fspath(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable checkpoint (truncated or corrupt? it is "
                              f"loaded with weights_only=True, so only tensors and plain values are accepted): {e}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{os.fspath(path)!r} is not a hybridzoo training checkpoint (expected keys "
                              f"{', '.join(CHECKPOINT_KEYS)}); to start from weights only, use --pretrained")
    return ckpt


def get_rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (what weights_only loading accepts)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def plain_args(args: argparse.Namespace | dict) -> dict[str, Any]:
    """The arguments as plain values (paths to strings, anything exotic dropped)."""
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
    out = {}
    for k, v in items:
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
    return out


def read_run(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """{model, task, data_info, weights} of a run folder or an engine-written file.

    Kept for existing callers; `hybridzoo.engine.run` (read_run / load_run) is the one way to load a run.
    """
    from hybridzoo.engine.run import read_run as _read

    return _read(run, checkpoint).as_dict()
