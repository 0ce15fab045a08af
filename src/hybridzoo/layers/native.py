"""Native CPU kernels for the inference path: compiled once from C++ on first use, cached, optional.

A few memory-bound steps of the oneDNN inference path (`optimize_for_cpu_inference`) take several passes over a
large map in ATen because no ATen kernel does them in one. The kernels here do; they are registered as PyTorch
operators (``torch.ops.hybridzoo_native.*``), so the dispatcher, `TorchDispatchMode` recorders and
`benchmarks/ceiling.py` see them like any ATen call.

They are built with `torch.utils.cpp_extension` the first time a model that uses them is prepared (about 30 s;
a C++ compiler and ninja are needed then) into ``$HYBRIDZOO_CACHE/native/`` (default ``~/.cache/hybridzoo``),
one folder per PyTorch version, Python version and kernel source. Later processes load the compiled library
from there without a compiler. ``HYBRIDZOO_NATIVE=0`` turns them off. Without a compiler, or when the build
fails, the path keeps its ATen code (a warning says why, once); outputs are the same either way (the tests
compare them). Linux only: elsewhere the ATen code runs, without a warning. The loops are compiled for
AVX-512, AVX2 and plain x86-64, and the CPU picks one when the library loads, so a cache shared between
machines stays valid.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["available", "load", "dyrelu_", "build_dir"]

NAMESPACE = "hybridzoo_native"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define HZ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HZ_CLONES
#endif

// rows of one image: x[r, c] <- max(a[c] * x[r, c], b[c] * x[r, c])
HZ_CLONES static void dyrelu_rows(float* __restrict x, const float* __restrict a, const float* __restrict b,
                                  int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict row = x + r * C;
    #pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float v = row[c];
      row[c] = std::max(v * a[c], v * b[c]);
    }
  }
}

// n values of one channel plane: x[i] <- max(a * x[i], b * x[i])
HZ_CLONES static void dyrelu_plane(float* __restrict x, float a, float b, int64_t n) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = std::max(v * a, v * b);
  }
}

// Mobile-Former's dynamic ReLU, in place: x (B, C, H, W) float32, contiguous or channels-last; s1 and s2 (B, C)
// slopes. One read and one write of the map, where ATen needs a product into a temporary and a maximum.
at::Tensor dyrelu_(at::Tensor x, const at::Tensor& s1, const at::Tensor& s2) {
  const bool nhwc = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && (nhwc || x.is_contiguous()),
              "hybridzoo_native::dyrelu_: x must be a 4-d float32 map, contiguous or channels-last, got ",
              x.sizes(), " ", x.scalar_type(), " strides ", x.strides());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  for (const at::Tensor& s : {s1, s2}) {
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == B
                && s.size(1) == C, "hybridzoo_native::dyrelu_: slopes must be contiguous float32 (", B, ", ", C,
                "), got ", s.sizes());
  }
  float* px = x.data_ptr<float>();
  const float* p1 = s1.data_ptr<float>();
  const float* p2 = s2.data_ptr<float>();
  if (nhwc) {
    at::parallel_for(0, B * HW, 256, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // one image's rows at a time: they share the slopes
        const int64_t img = begin / HW, stop = std::min(end, (img + 1) * HW);
        dyrelu_rows(px + begin * C, p1 + img * C, p2 + img * C, stop - begin, C);
        begin = stop;
      }
    });
  } else {
    at::parallel_for(0, B * C * HW, 4096, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // one channel plane at a time: (image, channel) = plane index into s1, s2
        const int64_t plane = begin / HW, stop = std::min(end, (plane + 1) * HW);
        dyrelu_plane(px + begin, p1[plane], p2[plane], stop - begin);
        begin = stop;
      }
    });
  }
  return x;
}

TORCH_LIBRARY(hybridzoo_native, m) {
  m.def("dyrelu_(Tensor(a!) x, Tensor s1, Tensor s2) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(hybridzoo_native, CPU, m) {
  m.impl("dyrelu_", &dyrelu_);
}
"""

_FLAGS = ["-O3", "-fopenmp"]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}   # "ops": the loaded namespace, or "error": why there is none


def _enabled() -> bool:
    return os.environ.get("HYBRIDZOO_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _tag() -> str:
    h = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:12]
    return f"torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-{h}"


def build_dir() -> Path:
    """Where the compiled library lives: $HYBRIDZOO_CACHE/native/<torch>-<python>-<source hash>/."""
    from hybridzoo.hub.download import cache_dir

    return cache_dir() / "native" / _tag()


def _library(folder: Path) -> Path:
    return folder / f"{NAMESPACE}.so"


def _built(folder: Path) -> bool:
    # the marker is written after a build that loaded: a library another process is still linking has none
    return (folder / "built").is_file() and _library(folder).is_file()


# a build takes under two minutes even on a busy machine; a lock file older than this is a killed build's, on
# which torch's file lock would wait forever
STALE_LOCK_S = 600


def _clear_stale_lock(folder: Path) -> bool:
    lock = folder / "lock"
    try:
        stale = time.time() - lock.stat().st_mtime > STALE_LOCK_S
    except FileNotFoundError:
        return False
    if stale:
        warnings.warn(f"removing {lock}, left by a build of the native kernels that did not finish",
                      RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)
    return stale


def _build(folder: Path) -> None:
    """Compile into `folder` (torch's file lock keeps concurrent processes, e.g. under torchrun, to one build;
    the others wait for it and load its library)."""
    from torch.utils.cpp_extension import is_ninja_available, load_inline

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set CXX)")
    if not is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(folder)
    print(f"hybridzoo: compiling native CPU kernels once (about 30 s) into {folder}; HYBRIDZOO_NATIVE=0 skips "
          "them", file=sys.stderr, flush=True)
    load_inline(NAMESPACE, cpp_sources=_SOURCE, extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(folder), is_python_module=False, verbose=False)
    tmp = folder / f"built.{os.getpid()}.tmp"
    tmp.write_text(f"{_tag()}\n")
    os.replace(tmp, folder / "built")


def load() -> bool:
    """Make the kernels available in this process, compiling them on first use; True when they are.

    Cheap after the first call. Never raises for a missing compiler or a failed build: it warns once and the
    callers keep their ATen code."""
    if not _enabled():
        return False
    if "ops" in _STATE or "error" in _STATE:
        return "ops" in _STATE
    with _LOCK:
        if "ops" in _STATE or "error" in _STATE:
            return "ops" in _STATE
        if platform.system() != "Linux":   # built and tested on Linux only; elsewhere nothing to act on, no warning
            _STATE["error"] = f"not built on {platform.system()}"
            return False
        try:
            folder = build_dir()
            if not _built(folder):
                _build(folder)
            if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE), "dyrelu_"):
                torch.ops.load_library(str(_library(folder)))
            _STATE["ops"] = getattr(torch.ops, NAMESPACE)
        except Exception as e:  # a compiler error, a missing tool, an unreadable cache: the ATen code stays
            first = (str(e).strip().splitlines() or [""])[0][:300]   # a build error runs to pages
            _STATE["error"] = f"{type(e).__name__}: {first}"
            warnings.warn(f"hybridzoo's native CPU kernels are unavailable ({_STATE['error']}); the inference "
                          "path keeps its ATen code (same outputs, somewhat slower). HYBRIDZOO_NATIVE=0 silences "
                          "this.", RuntimeWarning, stacklevel=2)
            return False
    return True


def available() -> bool:
    """True when the kernels are loaded in this process (after `load`)."""
    return "ops" in _STATE and _enabled()


def dyrelu_(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """x ← max(s1·x, s2·x) in place, x a float32 map (B, C, H, W), contiguous or channels-last, s1 and s2
    contiguous (B, C)."""
    return _STATE["ops"].dyrelu_(x, s1, s2)
