"""Keep glibc's malloc from handing large tensor buffers back to the kernel after every step.

glibc serves each allocation above its mmap threshold (128 KiB, raised on the fly up to 32 MiB) with a fresh
`mmap`, and returns it with `munmap` when freed; the top of the heap is trimmed whenever more than the trim
threshold is free. A training step or an inference batch allocates and frees the same large activations every
time, so every step pays the kernel to zero and map those pages again (page faults; `sys` time in `time`).
Allocators built for this (jemalloc, tcmalloc, loaded with LD_PRELOAD) keep freed memory; `tune_glibc_malloc`
gets most of that from glibc itself, in-process, by raising both thresholds with `mallopt` — no environment
variable, no restart. The cost is that memory freed after the peak stays with the process (as with jemalloc).

Threads other than the main one allocate from arenas of their own, made of heaps of at most 64 MiB; a heap that
becomes wholly free is unmapped whatever the trim threshold, so a worker thread whose tensors outgrow one heap
(each thread's share of a batch-split forward) faulted its memory back in at every call: DeiT-S at batch 32 split
over 2 threads, ~30,000 page faults per forward on the second thread and its part 4–6% slower than the first. A
top pad of one heap's size keeps those heaps (glibc frees a heap only while more than the pad would be left).

The CLI calls it once per run (`hybridzoo train/eval/predict/bench`; off with `hybridzoo --malloc default` or
`HYBRIDZOO_MALLOC=default`); library users call it themselves. It does nothing where the C library is not glibc
(macOS, Windows, musl) or where another allocator is preloaded. docs/performance.md has the measured effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_glibc_malloc", "allocator_in_use", "GLIBC_MMAP_THRESHOLD_MAX", "GLIBC_HEAP_MAX"]

# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB * sizeof(long)).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
# The size of a non-main arena's heap on 64-bit (HEAP_MAX_SIZE = 2 * DEFAULT_MMAP_THRESHOLD_MAX).
GLIBC_HEAP_MAX = 2 * GLIBC_MMAP_THRESHOLD_MAX

_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

_applied: dict | None = None


def _glibc():
    """The process's C library if it is glibc (it has gnu_get_libc_version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    libc._hz_version = version().decode()
    return libc


def allocator_in_use() -> str:
    """"jemalloc" / "tcmalloc" / "mimalloc" when LD_PRELOAD names one, "glibc X.Y" (tuned or not), or "system"."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED:
        if name in preload:
            return name
    libc = _glibc()
    if libc is None:
        return "system"
    return f"glibc {libc._hz_version}" + (" (mallopt-tuned)" if _applied else "")


def tune_glibc_malloc(mmap_threshold: int = GLIBC_MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30,
                      top_pad: int = GLIBC_HEAP_MAX) -> dict | None:
    """Raise glibc's mmap and trim thresholds and its top pad for this process; the settings applied, or None
    where skipped.

    `mmap_threshold`: allocations below it come from the heap, whose freed memory is reused without page
    faults (glibc caps it at 32 MiB; larger requests are still mmap'd). `trim_threshold`: free memory at the
    top of the heap is kept up to this many bytes instead of being returned to the kernel. `top_pad`: free
    memory always kept at the top of every heap; at one heap's size (the default) it stops glibc from unmapping
    the wholly free heaps of other threads' arenas, which the trim threshold does not govern. Idempotent.
    """
    global _applied
    if _applied is not None:
        return dict(_applied)
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold),
                        ("top_pad", top_pad)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"tune_glibc_malloc: {name} must be a positive number of bytes, got {value!r}")
    if mmap_threshold > GLIBC_MMAP_THRESHOLD_MAX:
        raise ValueError(f"tune_glibc_malloc: mmap_threshold {mmap_threshold} is above glibc's maximum "
                         f"{GLIBC_MMAP_THRESHOLD_MAX} (32 MiB); glibc would refuse it")
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _PRELOADED):
        return None
    libc = _glibc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    trim, pad = min(trim_threshold, 2**31 - 1), min(top_pad, 2**31 - 1)  # mallopt takes an int
    if (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1 or mallopt(_M_TRIM_THRESHOLD, trim) != 1
            or mallopt(_M_TOP_PAD, pad) != 1):
        return None
    _applied = {"allocator": f"glibc {libc._hz_version}", "mmap_threshold": mmap_threshold, "trim_threshold": trim,
                "top_pad": pad}
    return dict(_applied)
