"""A restricted reader for `torch.save` files that never imports or calls anything it reads.

Official training scripts save more than tensors: DeiT / ConViT `main.py` put the
`argparse.Namespace` under `'args'`, RecBole pickles its `Config` object with protocol 4 (which
`torch.load(weights_only=True)` cannot parse: "Unsupported operand 149", the FRAME opcode), and
timm-0.3's saver (Mobile-Former) stores the run's arguments and more. `load` rebuilds tensors,
storages, containers and plain values; every other global the file names becomes an inert
`Placeholder` subclass that only records its arguments and state. Nothing named by the file is ever
imported or called: `find_class` answers from a fixed table of our own functions and never
consults `sys.modules`, so a malicious `__reduce__` (`os.system`, `builtins.eval`, ...) yields a
placeholder instead of running.

Both formats are read: the zip archive (torch >= 1.6: `<dir>/data.pkl` and `<dir>/data/<key>`) and
the legacy stream (magic number, protocol, system info, pickle, storage keys, raw storages).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import torch

__all__ = ["Placeholder", "load", "UnsafeCheckpointError"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file is not a torch checkpoint this reader understands."""


class Placeholder:
    """An object the file asked for by name (`module.qualname`), rebuilt as inert data."""

    __module_name__ = "?"
    __qual_name__ = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __new__(cls, *args: Any, **kwargs: Any):  # NEWOBJ calls cls.__new__(cls, *args) without __init__
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # list/dict subclasses pickled with APPENDS / SETITEMS
    def append(self, item: Any) -> None:
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("items", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("mapping", {})[key] = value

    @property
    def fields(self) -> dict[str, Any]:
        """The attributes the original object had (its pickled `__dict__`), when it had one."""
        s = self.state
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], dict):  # (dict, slots)
            s = {**(s[0] or {}), **s[1]}
        return dict(s) if isinstance(s, dict) else {}

    def __repr__(self) -> str:
        return f"<placeholder {self.__module_name__}.{self.__qual_name__}>"


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(name.rsplit(".", 1)[-1], (Placeholder,),
                                  {"__module_name__": module, "__qual_name__": name, "__module__": __name__})
    return _PLACEHOLDERS[key]


# --- the only things a file can reach ---------------------------------------------------------------
class _StorageType:
    """Stands for `torch.FloatStorage` & co. in a persistent id: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_DTYPES = {str(d).split(".", 1)[1]: d for d in set(_STORAGE_DTYPES.values())}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise UnsafeCheckpointError("a tensor whose storage is not in the file")
    if len(size) == 0 and storage.numel() == 0:
        return torch.empty((), dtype=storage.dtype)
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: Any, requires_grad: bool = False, *_: Any) -> Any:
    return data  # a state dict needs the values, not nn.Parameter


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    # only our own rebuild functions can arrive here as `func` (anything else is a placeholder class)
    return func(*args) if func in _SAFE_CALLABLES else _placeholder("torch._tensor", "_rebuild_from_type_v2")(
        func, new_type, args, state)


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # protocol 2 spells bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode(encoding)


def _device(spec: Any = "cpu", index: Any = None) -> str:
    return str(spec) if index is None else f"{spec}:{index}"


_SAFE_CALLABLES = {_rebuild_tensor, _rebuild_parameter, _rebuild_from_type}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
}
for _n, _d in _STORAGE_DTYPES.items():
    _ALLOWED[("torch", _n)] = _StorageType(_d)
    _ALLOWED[("torch.storage", _n)] = _StorageType(_d)
for _n, _d in _DTYPES.items():
    _ALLOWED[("torch", _n)] = _d


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, read_storage):
        super().__init__(file, encoding="utf-8")
        self._read_storage = read_storage
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        return _ALLOWED.get((module, name)) or _placeholder(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"storage of unknown type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        flat = self._storages[key]
        if len(pid) > 5 and pid[5] is not None:  # legacy view: (view_key, offset, view_size)
            _, offset, size = pid[5]
            return flat[int(offset):int(offset) + int(size)]
        return flat


def _from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _load_zip(f: BinaryIO) -> Any:
    with zipfile.ZipFile(f) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise UnsafeCheckpointError("a zip file without data.pkl is not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        order = z.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        if order != "little":
            raise UnsafeCheckpointError("big-endian checkpoints are not supported")

        def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafeCheckpointError(f"storage {key!r} missing from the archive")
            return _from_bytes(z.read(name), dtype)

        return _Unpickler(io.BytesIO(z.read(pkl)), read_storage).load()


def _load_legacy(f: BinaryIO) -> Any:
    def plain() -> Any:
        return _Unpickler(f, _no_storage).load()

    if plain() != _LEGACY_MAGIC:
        raise UnsafeCheckpointError("not a torch checkpoint (no zip archive, no legacy magic number)")
    plain()  # protocol version
    plain()  # system info (endianness, type sizes)
    pending: dict[str, tuple[torch.dtype, int]] = {}

    def lazy(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        pending[key] = (dtype, numel)
        return torch.empty(numel, dtype=dtype)  # filled in place once the raw storages are read

    unpickler = _Unpickler(f, lazy)
    result = unpickler.load()
    keys = _Unpickler(f, _no_storage).load()
    for key in keys:
        (n,) = struct.unpack("<q", f.read(8))
        dtype = pending.get(str(key), (torch.uint8, 0))[0]
        size = n * torch.empty(0, dtype=dtype).element_size()
        data = f.read(size)
        if len(data) != size:
            raise UnsafeCheckpointError("truncated legacy checkpoint")
        if str(key) in unpickler._storages:
            unpickler._storages[str(key)].copy_(_from_bytes(data, dtype))
    return result


def _no_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    raise UnsafeCheckpointError("a tensor outside the main pickle")


def load(path: str | os.PathLike | BinaryIO) -> Any:
    """Read a `torch.save` file without executing anything it names (see the module docstring)."""
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as f:
            return load(f)
    f = path
    start = f.tell()
    if zipfile.is_zipfile(f):
        f.seek(start)
        return _load_zip(f)
    f.seek(start)
    return _load_legacy(f)
