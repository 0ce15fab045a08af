"""Native CPU kernels for the inference path: compiled once from C++ on first use, cached, optional.

Two steps of the oneDNN inference path (`optimize_for_cpu_inference`) that ATen does poorly:

- `dyrelu_`: Mobile-Former's dynamic ReLU, max(s1·x, s2·x) with per-image slopes, in one pass over the map (ATen
  needs a product into a temporary and a maximum: three passes);
- `tiny_linear`: a product of a few rows (Mobile-Former's 6 tokens at batch 1, its slope MLPs) on the calling
  thread, where MKL's and oneDNN's fixed costs per call are most of their time.

They are registered as PyTorch operators (``torch.ops.hybridzoo_native.*``), so the dispatcher,
`TorchDispatchMode` recorders and `benchmarks/ceiling.py` see them like any ATen call.

They are built with `torch.utils.cpp_extension` the first time a model that uses them is prepared (about 30 s;
a C++ compiler and ninja are needed then) into ``$HYBRIDZOO_CACHE/native/`` (default ``~/.cache/hybridzoo``),
one folder per PyTorch version, Python version and kernel source. Later processes load the compiled library
from there without a compiler. ``HYBRIDZOO_NATIVE=0`` turns them off. Without a compiler, or when the build
fails, the path keeps its ATen code (a warning says why, once). Outputs are the same either way, the dynamic
ReLU's bit for bit, the products' to fp32 rounding (the tests compare them). Linux only: elsewhere the ATen code
runs, without a warning. The loops are compiled for AVX-512, AVX2 and plain x86-64, and the CPU picks one when
the library loads, so a cache shared between machines stays valid.
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

__all__ = ["available", "load", "dyrelu_", "tiny_linear", "build_dir"]

NAMESPACE = "hybridzoo_native"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

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

// y[MR rows, 16·NV columns from n0] = x·wt + b, the accumulators in registers (AVX-512: 6 × 4 vectors of 16)
typedef float hz_v16 __attribute__((vector_size(64)));

template <int MR, int NV>
HZ_CLONES static void tiny_tile(const float* __restrict x, int64_t K, const float* __restrict wt, int64_t N,
                                const float* __restrict b, float* __restrict y, int64_t n0) {
  hz_v16 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    hz_v16 bv;
    std::memcpy(&bv, b + n0 + 16 * v, sizeof bv);
    for (int m = 0; m < MR; ++m) acc[m][v] = bv;
  }
  for (int64_t k = 0; k < K; ++k) {
    hz_v16 w[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&w[v], wt + k * N + n0 + 16 * v, sizeof w[v]);
    for (int m = 0; m < MR; ++m) {
      const float xv = x[m * K + k];
      for (int v = 0; v < NV; ++v) acc[m][v] += xv * w[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) std::memcpy(y + m * N + n0 + 16 * v, &acc[m][v], sizeof acc[m][v]);
}

template <int MR>
static void tiny_rows(const float* x, int64_t K, const float* wt, int64_t N, const float* b, float* y) {
  int64_t n0 = 0;
  for (; n0 + 64 <= N; n0 += 64) tiny_tile<MR, 4>(x, K, wt, N, b, y, n0);
  for (; n0 < N; n0 += 16) tiny_tile<MR, 1>(x, K, wt, N, b, y, n0);
}

// A product with a handful of rows (Mobile-Former's 6 tokens, one class token): y = x·wt + b, wt (K, N) the
// transposed weight, N a multiple of 16. On the calling thread: at this size MKL's and oneDNN's fixed costs per
// call are most of theirs, and a second thread only adds its start.
at::Tensor tiny_linear(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& b) {
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == at::kFloat && wt.is_contiguous() && wt.size(1) % 16 == 0,
              "hybridzoo_native::tiny_linear: wt must be a contiguous float32 (K, N) with N a multiple of 16, got ",
              wt.sizes());
  const int64_t K = wt.size(0), N = wt.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "hybridzoo_native::tiny_linear: x must be contiguous float32 with last dimension ", K, ", got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.scalar_type() == at::kFloat && b.is_contiguous(),
              "hybridzoo_native::tiny_linear: b must be a contiguous float32 (", N, "), got ", b.sizes());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t M = K ? x.numel() / K : 0;
  const float* px = x.data_ptr<float>();
  const float* pw = wt.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  float* py = y.data_ptr<float>();
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) tiny_rows<6>(px + m * K, K, pw, N, pb, py + m * N);
  for (; m + 2 <= M; m += 2) tiny_rows<2>(px + m * K, K, pw, N, pb, py + m * N);
  for (; m < M; ++m) tiny_rows<1>(px + m * K, K, pw, N, pb, py + m * N);
  return y;
}

TORCH_LIBRARY(hybridzoo_native, m) {
  m.def("dyrelu_(Tensor(a!) x, Tensor s1, Tensor s2) -> Tensor(a!)");
  m.def("tiny_linear(Tensor x, Tensor wt, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybridzoo_native, CPU, m) {
  m.impl("dyrelu_", &dyrelu_);
  m.impl("tiny_linear", &tiny_linear);
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
            if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE), "tiny_linear"):
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


def tiny_linear(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x·wt + b for a product of a few rows, on the calling thread; wt is the transposed weight (K, N), N a
    multiple of 16, x contiguous (..., K)."""
    return _STATE["ops"].tiny_linear(x, wt, b)


def dyrelu_(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """x ← max(s1·x, s2·x) in place, x a float32 map (B, C, H, W), contiguous or channels-last, s1 and s2
    contiguous (B, C)."""
    return _STATE["ops"].dyrelu_(x, s1, s2)
