"""Native CPU kernels for the inference and training paths: compiled once from C++ on first use, cached, optional.

Steps of the oneDNN inference path (`optimize_for_cpu_inference`) and of the fp32 CPU training path
(`optimize_for_cpu_training`, attention only) that ATen does poorly:

- `dyrelu_`: Mobile-Former's dynamic ReLU, max(s1·x, s2·x) with per-image slopes, in one pass over the map (ATen
  needs a product into a temporary and a maximum: three passes);
- `tiny_linear`: a product of a few rows (Mobile-Former's 6 tokens at batch 1, its slope MLPs) on the calling
  thread, where MKL's and oneDNN's fixed costs per call are most of their time;
- `attention`: (softmax(scale·q·kᵀ [+ A]) [+ P])·v for head dims of 16-64 (DeiT / ViT, ConViT's MHSA and GPSA with
  its positional map P after the softmax, CvT, CoAtNet with its relative bias A before it), a tile of query rows at
  a time with the scores kept in cache, where ATen's SDPA and `bmm` run such small products well below the GEMM
  peak; its output comes tokens first (B, n, heads·d), the layout the output projection reads, so the transpose
  and copy after SDPA go too. `attend` adds the backward for training (`attention_lse` keeps each row's
  log-sum-exp, `attention_backward` recomputes the probabilities from it a tile of rows at a time);
- `pack_panels` / `rows_linear`: fp32 products on a weight packed in panels of 64 output columns, the rows in
  blocks over the threads, the activation in the epilogue; faster than oneDNN's packed product at every size we
  measured, most at batch 1 (`OneDNNLinear`, 1×1 convolutions); `scale_panels` scales a packed weight's inputs
  (a per-image channel gate on the product's input); `patch_embed` (a convolution whose kernel is its
  stride) gathers the patches into rows for it; `depthwise3x3`: depthwise 3×3 convolutions, channels-last;
  `winograd3x3`: dense 3×3 stride-1 convolutions by Winograd's F(2×2, 3×3) or F(4×4, 3×3), 16 or 36 products
  over the channels on that product kernel (2.25x or 4x fewer multiplies), the weight transformed once by
  `winograd_weight`; `gather_conv`: any other dense convolution (image stems, strided ones) as a product of its
  patches gathered a block of output pixels at a time, the weight packed by `gather_weight`;
- `weight_grad`: a training step's weight gradient dW = dyᵀ·x with both operands read as they lie (no transposed
  copies; `FastLinear` on AVX-512 CPUs); `winograd_weight_grad`: a dense 3×3 stride-1 convolution's weight gradient
  by the same tiles as `winograd3x3`, one product over the tiles per position of the transform
  (`train_fast.FastConv3x3`);
- `token_blocks`: one image's pre-norm transformer blocks in one call, the token rows shared by an OpenMP team
  that meets once per block (`layers.onednn_tokens`); `conv_token_blocks`: the same for CvT's blocks, whose
  convolutional projections make the team meet twice per block.
- `former_tokens`: Mobile-Former's token side of one block (Mobile→Former, the Former, the dynamic ReLUs' slope
  MLPs, Former→Mobile's keys and values) in one call instead of ~25 operators on 6 tokens, each step shared by the
  team at batch 1.

These last five are written once on 16-float vectors and compiled twice, for AVX-512 and for AVX2 with FMA, each
with a register blocking of its own (32 registers of 16 floats, or 16 of 8); the CPU's best runs (`isa`), and
`set_isa("avx2")` lowers it, so that an AVX-512 machine tests the AVX2 kernels too. Without either (other CPUs),
`attention_supported()` is False and ATen's code runs.

They are registered as PyTorch operators (``torch.ops.hybridzoo_native.*``), so the dispatcher,
`TorchDispatchMode` recorders and `benchmarks/ceiling.py` see them like any ATen call.

They are built with `torch.utils.cpp_extension` the first time a model that uses them is prepared (about 30 s on
two cores, three translation units in parallel; a C++ compiler and ninja are needed then) into
``$HYBRIDZOO_CACHE/native/`` (default ``~/.cache/hybridzoo``), one folder per PyTorch version, Python version and
kernel source. Later processes load the compiled library from there without a compiler. ``HYBRIDZOO_NATIVE=0``
turns them off. Without a compiler, or when the build fails, the path keeps its ATen code (a warning says why,
once). Outputs are the same either way, the dynamic ReLU's bit for bit, the products' and attention's to fp32
rounding (the tests compare them). Linux only: elsewhere the ATen code runs, without a warning. The dynamic
ReLU's and the small products' loops are compiled for AVX-512, AVX2 and plain x86-64, the others for AVX-512 and
AVX2, and the CPU picks at run time, so a cache shared between machines stays valid.
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
from torch.autograd.function import once_differentiable

__all__ = ["available", "load", "dyrelu_", "dyrelu", "dyrelu_backward", "tiny_linear", "former_tokens", "attention",
           "attend", "attention_applies", "attention_ready", "attention_supported", "pack_panels", "scale_panels", "rows_linear", "rows_linear_add_",
           "depthwise3x3", "depthwise3x3_pooled", "winograd_weight", "winograd3x3", "winograd_weight_grad", "patch_embed", "gather_weight",
           "gather_conv", "token_blocks", "conv_token_blocks", "seg_eval_stats", "seg_cross_entropy", "isa", "set_isa",
           "set_column_split_rows", "weight_grad", "ATTENTION_HEAD_DIMS", "build_dir"]

NAMESPACE = "hybridzoo_native"

# The C++ source, composed below into three translation units (_SOURCES): the kernels (attention forward and
# backward, panel and tiny products, LayerNorm, depthwise), written once on a 16-float vector type `vec` and compiled
# twice, for AVX-512 (`vec` one register) and for AVX2 with FMA (`vec` a pair of 8-float registers), each a unit and a
# namespace of its own with its register blocking (HzTiles<VR>) and without PyTorch's headers; and the operators
# (PyTorch's headers, the instruction-set switch, the dynamic ReLU), which call the kernels of the set in use.
_TORCH_PRELUDE = r"""#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/addmm.h>
#include <omp.h>
#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>
"""

# what every translation unit shares: the standard headers the kernels use, the x86 switch, the register blocking
_COMMON = r"""#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define HZ_X86 1
#define HZ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define HZ_HAS_AVX512 __builtin_cpu_supports("avx512f")
#define HZ_HAS_AVX2 (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
#else
#define HZ_X86 0
#define HZ_CLONES
#define HZ_HAS_AVX512 false
#define HZ_HAS_AVX2 false
#endif

// the register blocking of each kernel for a vector file of VR registers (32 on AVX-512, 16 on AVX2); a 16-float
// vector takes one AVX-512 register or two AVX2 ones. CH: at most this many vectors of 16 per row in a register
// tile of values or gradients (the head dim is then done in chunks of that many).
template <int VR>
struct HzTiles {
  static constexpr bool wide = VR >= 32;
  template <int DV> static constexpr int attn_rows() { return wide ? (DV <= 3 ? 8 : 6) : 6; }
  template <int DV> static constexpr int attn_cols() { return wide ? (DV <= 3 ? 3 : 4) : 1; }
  static constexpr int chunk = wide ? 4 : 1;
  static constexpr int panel_vectors = wide ? 4 : 1;   // vectors of 16 output columns per product tile (6 rows)
};

#define HZ_INLINE static inline __attribute__((always_inline))

// TILE(T, i) over the query rows [begin, end): tiles of R rows, then 4 (when R is 8), 2 and 1. A macro, not a
// function taking a lambda: a lambda is a function of its own, compiled for plain x86-64 outside the kernels' target.
#define HZ_ROW_TILES(TILE, begin, end)          \
  do {                                          \
    int64_t i_ = (begin);                       \
    for (; i_ + R <= (end); i_ += R) TILE(R, i_); \
    if (R == 8 && i_ + 4 <= (end)) {            \
      TILE(4, i_);                              \
      i_ += 4;                                  \
    }                                           \
    for (; i_ + 2 <= (end); i_ += 2) TILE(2, i_); \
    if (i_ < (end)) TILE(1, i_);                \
  } while (0)

// the activations panel_linear applies to its outputs (oneDNN's post-ops of OneDNNLinear)
enum PanelAct { ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SWISH };

// Mobile-Former's token side of one block (former_tokens): the sizes, and every product's weight as (K, N) with N
// padded by zero columns to a multiple of 16, in strips of 16 columns each K × 16 contiguous (`few_rows`), its bias
// padded alike; the attention scales folded into the query products
struct HzFormerTokens {
  int64_t T, D, C, P;              // tokens, token width; the block input's channels and pixels
  int64_t m2f_heads, heads;        // Mobile→Former's heads (over the map's channels), the Former's
  int64_t hidden, reduced;         // the Former's FFN width; one slope MLP's hidden width (two side by side)
  int64_t slopes1, slopes2, kv;    // the two slope MLPs' outputs; Former→Mobile's k|v outputs
  float eps[3];                    // Mobile→Former's LayerNorm, the Former's two
  const float *qa_w, *qa_b;        // Mobile→Former's q (scaled) | α/3, D → 2C
  const float *proj_w, *proj_b, *norm_w, *norm_b;
  const float *q_w, *q_b, *o_w, *o_b, *norm1_w, *norm1_b;    // the Former's attention (q scaled), proj, norm1
  const float *fc1_w, *fc1_b, *fc2_w, *fc2_b, *norm2_w, *norm2_b;
  const float *s_w, *s_b, *s1_w, *s1_b, *s2_w, *s2_b;          // the slope MLPs: both fc1 (ReLU), then each fc2 (/3)
  const float *kv_w, *kv_b;                                    // Former→Mobile's k | v
};

static inline int64_t hz_pad16(int64_t n) { return (n + 15) / 16 * 16; }

// pack_panels / panel_rows: from this K on, a panel is stored as strips of 16 columns, each K × 16 contiguous, not as
// K rows of its width: the AVX2 tile of 16 columns then reads its weights front to back instead of 64 bytes every 256.
// On Zen 3, one thread, 49-785 rows with K 384-3,072: 1.15-1.35x the row layout and 1.0-1.27x MKL; below K = 256
// (CvT's K = 64 products, 0.8x) the rows stay (benchmarks/RESULTS.md, session 17)
constexpr int64_t PANEL_STRIP_K = 256;

// floats of scratch former_tokens needs for one image shared by `parts` threads
static inline int64_t hz_former_scratch(const HzFormerTokens& p, int64_t parts) {
  const int64_t Pp = hz_pad16(p.P);
  return p.C * Pp + p.T * hz_pad16(2 * p.C) + p.T * p.C + 5 * p.T * p.D + p.T * p.hidden + hz_pad16(2 * p.reduced)
         + parts * (p.T * Pp + p.T * p.T);
}
"""

# the operators' unit: the instruction set in use, the dynamic ReLU (compiled by target_clones)
_OPS_PRELUDE = r"""
// the instruction set the kernels run with: 2 AVX-512, 1 AVX2 with FMA, 0 none (the CPU's best at load;
// set_isa may lower it, so that a machine with AVX-512 tests the AVX2 kernels too)
static std::atomic<int> hz_level{HZ_HAS_AVX512 ? 2 : HZ_HAS_AVX2 ? 1 : 0};
static inline bool hz_wide() { return hz_level.load(std::memory_order_relaxed) == 2; }
static void check_isa(const char* op) {
  TORCH_CHECK(hz_level.load(std::memory_order_relaxed) > 0, "hybridzoo_native::", op,
              " needs a CPU with AVX-512 or AVX2 with FMA (see attention_supported)");
}


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

// the same out of place, y <- max(a·x, b·x): the training forward, which keeps x for its backward
HZ_CLONES static void dyrelu_rows_to(const float* __restrict x, float* __restrict y, const float* __restrict a,
                                     const float* __restrict b, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    #pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float v = x[r * C + c];
      y[r * C + c] = std::max(v * a[c], v * b[c]);
    }
  }
}

HZ_CLONES static void dyrelu_plane_to(const float* __restrict x, float* __restrict y, float a, float b, int64_t n) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = std::max(x[i] * a, x[i] * b);
}

// The backward of y = max(a·x, b·x) as autograd takes it through torch.maximum: the branch that is larger gets
// the gradient, each half of it where they are equal (x = 0 among others). w = 1, 1/2 or 0:
// dx = g·(a·w + b·(1 − w)), da += g·x·w, db += g·x·(1 − w).
HZ_INLINE float dyrelu_weight(float p, float q) { return p > q ? 1.0f : (p == q ? 0.5f : 0.0f); }

// rows of one image, channels last: da and db (C) accumulate over the rows
HZ_CLONES static void dyrelu_back_rows(const float* __restrict x, const float* __restrict g, float* __restrict dx,
                                       const float* __restrict a, const float* __restrict b, int64_t rows, int64_t C,
                                       float* __restrict da, float* __restrict db) {
  for (int64_t r = 0; r < rows; ++r) {
    #pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float v = x[r * C + c], gr = g[r * C + c];
      const float w = dyrelu_weight(v * a[c], v * b[c]), gv = gr * v;
      dx[r * C + c] = gr * (a[c] * w + b[c] * (1.0f - w));
      da[c] += gv * w;
      db[c] += gv * (1.0f - w);
    }
  }
}

// one channel plane of n values: its two slope gradients
HZ_CLONES static void dyrelu_back_plane(const float* __restrict x, const float* __restrict g, float* __restrict dx,
                                        float a, float b, int64_t n, float* da, float* db) {
  float sa = 0.0f, sb = 0.0f;
  #pragma omp simd reduction(+ : sa, sb)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i], w = dyrelu_weight(v * a, v * b), gv = g[i] * v;
    dx[i] = g[i] * (a * w + b * (1.0f - w));
    sa += gv * w;
    sb += gv * (1.0f - w);
  }
  *da = sa;
  *db = sb;
}

// x (called `name`) a 4-d float32 map, contiguous or channels-last; returned: true for channels-last and not also
// contiguous (a map both layouts describe, 1×1 or of one channel, is read as contiguous)
static bool check_map(const char* op, const char* name, const at::Tensor& x) {
  const bool nhwc = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && (nhwc || x.is_contiguous()),
              "hybridzoo_native::", op, ": ", name, " must be a 4-d float32 map, contiguous or channels-last, got ",
              x.sizes(), " ", x.scalar_type(), " strides ", x.strides());
  return nhwc && !x.is_contiguous();
}

// t (called `name`) float32 of the map x's shape and layout (`nhwc` from check_map); strides may differ along
// dimensions of size 1
static void check_like_map(const char* op, const char* name, const at::Tensor& t, const char* x_name,
                           const at::Tensor& x, bool nhwc) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == at::kFloat
              && (nhwc ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous()),
              "hybridzoo_native::", op, ": ", name, " must be float32 of ", x_name, "'s shape ", x.sizes(), ", ",
              nhwc ? "channels-last" : "contiguous", " as ", x_name, ", got ", t.sizes(), " ", t.scalar_type(),
              " strides ", t.strides());
}

// x a 4-d float32 map, contiguous or channels-last (returned: true for channels-last); slopes (B, C)
static bool check_dyrelu(const char* op, const at::Tensor& x, const at::Tensor& s1, const at::Tensor& s2) {
  const bool nhwc = check_map(op, "x", x);
  const int64_t B = x.size(0), C = x.size(1);
  for (const at::Tensor& s : {s1, s2}) {
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == B
                && s.size(1) == C, "hybridzoo_native::", op, ": slopes must be contiguous float32 (", B, ", ", C,
                "), got ", s.sizes());
  }
  return nhwc;
}

// y = max(s1·x, s2·x), a new map in x's layout (the training forward)
at::Tensor dyrelu(const at::Tensor& x, const at::Tensor& s1, const at::Tensor& s2) {
  const bool nhwc = check_dyrelu("dyrelu", x, s1, s2);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor y = at::empty_like(x);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const float* p1 = s1.data_ptr<float>();
  const float* p2 = s2.data_ptr<float>();
  if (nhwc) {
    at::parallel_for(0, B * HW, 256, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t img = begin / HW, stop = std::min(end, (img + 1) * HW);
        dyrelu_rows_to(px + begin * C, py + begin * C, p1 + img * C, p2 + img * C, stop - begin, C);
        begin = stop;
      }
    });
  } else {
    at::parallel_for(0, B * C * HW, 4096, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t plane = begin / HW, stop = std::min(end, (plane + 1) * HW);
        dyrelu_plane_to(px + begin, py + begin, p1[plane], p2[plane], stop - begin);
        begin = stop;
      }
    });
  }
  return y;
}

// (dx, ds1, ds2) of y = max(s1·x, s2·x) given dy (x's shape and layout): one read of x and dy, one write of dx
std::tuple<at::Tensor, at::Tensor, at::Tensor> dyrelu_backward(const at::Tensor& x, const at::Tensor& grad,
                                                               const at::Tensor& s1, const at::Tensor& s2) {
  const bool nhwc = check_dyrelu("dyrelu_backward", x, s1, s2);
  check_like_map("dyrelu_backward", "grad", grad, "x", x, nhwc);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor dx = at::empty_like(x);
  at::Tensor d1 = at::zeros({B, C}, s1.options()), d2 = at::zeros({B, C}, s1.options());
  const float* px = x.data_ptr<float>();
  const float* pg = grad.data_ptr<float>();
  float* pdx = dx.data_ptr<float>();
  const float* p1 = s1.data_ptr<float>();
  const float* p2 = s2.data_ptr<float>();
  float* pd1 = d1.data_ptr<float>();
  float* pd2 = d2.data_ptr<float>();
  if (nhwc) {   // a whole image per work item: its C sums are that item's alone
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t img = begin; img < end; ++img) {
        const int64_t o = img * HW * C;
        dyrelu_back_rows(px + o, pg + o, pdx + o, p1 + img * C, p2 + img * C, HW, C, pd1 + img * C, pd2 + img * C);
      }
    });
  } else {
    at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)), [&](int64_t begin,
                                                                                          int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t o = plane * HW;
        dyrelu_back_plane(px + o, pg + o, pdx + o, p1[plane], p2[plane], HW, pd1 + plane, pd2 + plane);
      }
    });
  }
  return {dx, d1, d2};
}

// Mobile-Former's dynamic ReLU, in place: x (B, C, H, W) float32, contiguous or channels-last; s1 and s2 (B, C)
// slopes. One read and one write of the map, where ATen needs a product into a temporary and a maximum.
at::Tensor dyrelu_(at::Tensor x, const at::Tensor& s1, const at::Tensor& s2) {
  const bool nhwc = check_dyrelu("dyrelu_", x, s1, s2);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
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

// ---- Per-channel dot products of two maps (a squeeze-excitation gate's gradient) ------------------------------------
// Rows are summed in float in blocks of HZ_DOT_BLOCK, the blocks in double: a map of a million pixels (a
// segmentation crop) sums with the error of one block's, not of a million terms in float.
static constexpr int64_t HZ_DOT_BLOCK = 256;

// acc[c] = Σ_r a[r, c] · b[r, c] over `rows` rows of C (one image's channels-last pixels)
HZ_CLONES static void dot_rows(const float* __restrict a, const float* __restrict b, int64_t rows, int64_t C,
                               float* __restrict acc) {
  for (int64_t c = 0; c < C; ++c) acc[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    #pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += a[r * C + c] * b[r * C + c];
  }
}

// Σ_i a[i] · b[i] over n values
HZ_CLONES static float dot_values(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.0f;
  #pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out (B, C) float32: Σ over each channel's pixels of a · b, for two 4-d float32 maps of one shape, both contiguous
// or both channels-last: one read of each, where ATen's (a * b).sum((2, 3)) writes and reads the product too
at::Tensor channel_dot(const at::Tensor& a, const at::Tensor& b) {
  const bool nhwc = check_map("channel_dot", "a", a);
  check_like_map("channel_dot", "b", b, "a", a, nhwc);
  const int64_t B = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  at::Tensor out = at::empty({B, C}, a.options());
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  float* po = out.data_ptr<float>();
  if (nhwc) {   // a whole image per work item
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> part(C);
      std::vector<double> total(C);
      for (int64_t img = begin; img < end; ++img) {
        std::fill(total.begin(), total.end(), 0.0);
        for (int64_t r0 = 0; r0 < HW; r0 += HZ_DOT_BLOCK) {
          const int64_t o = (img * HW + r0) * C;
          dot_rows(pa + o, pb + o, std::min(HZ_DOT_BLOCK, HW - r0), C, part.data());
          for (int64_t c = 0; c < C; ++c) total[c] += part[c];
        }
        for (int64_t c = 0; c < C; ++c) po[img * C + c] = static_cast<float>(total[c]);
      }
    });
  } else {
    at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)), [&](int64_t begin,
                                                                                          int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        double total = 0.0;
        for (int64_t i = 0; i < HW; i += 4 * HZ_DOT_BLOCK)
          total += dot_values(pa + plane * HW + i, pb + plane * HW + i, std::min(4 * HZ_DOT_BLOCK, HW - i));
        po[plane] = static_cast<float>(total);
      }
    });
  }
  return out;
}

"""

# AVX-512: the vector type and the lane operations the kernels use
_WIDE = r"""
// AVX-512: a vector of 16 floats is one of the 32 registers
typedef float vec __attribute__((vector_size(64)));
typedef int32_t ivec __attribute__((vector_size(64)));
constexpr int VR = 32;

HZ_INLINE vec hz_load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HZ_INLINE void hz_store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
HZ_INLINE vec hz_select(ivec m, vec a, vec b) { return m ? a : b; }
HZ_INLINE float hz_first(vec v) { return v[0]; }
HZ_INLINE ivec hz_bits(vec v) { return (ivec)v; }
HZ_INLINE vec hz_from_bits(ivec i) { return (vec)i; }
HZ_INLINE ivec hz_lanes() { return ivec{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
HZ_INLINE vec hz_to_float(ivec i) { return __builtin_convertvector(i, vec); }

// every lane <- the maximum (the sum) of the 16 lanes: a butterfly over lanes 8, 4, 2 and 1 apart
HZ_INLINE vec hz_lane_swap(vec v, int k) {
  const ivec p8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const ivec p4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  const ivec p2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const ivec p1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  return __builtin_shuffle(v, k == 8 ? p8 : k == 4 ? p4 : k == 2 ? p2 : p1);
}
HZ_INLINE vec hz_all_max(vec v) {
  for (int k = 8; k >= 1; k /= 2) {
    const vec w = hz_lane_swap(v, k);
    v = v > w ? v : w;
  }
  return v;
}
HZ_INLINE vec hz_all_sum(vec v) {
  for (int k = 8; k >= 1; k /= 2) v += hz_lane_swap(v, k);
  return v;
}
"""

# AVX2 with FMA: the same, on a pair of 8-float vectors
_NARROW = r"""
// AVX2: a vector of 16 floats is two of the 16 registers of 8. GCC lowers a 64-byte vector type for AVX2 through
// the stack, so the pair is spelled out: each operation is two of 8 floats, and the pairs stay in registers.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
struct vec {
  v8 lo, hi;
};
struct ivec {
  i8 lo, hi;
};
constexpr int VR = 16;

#define HZ_PAIR_OP(OP)                                                                  \
  HZ_INLINE vec operator OP(vec a, vec b) { return {a.lo OP b.lo, a.hi OP b.hi}; }     \
  HZ_INLINE vec operator OP(vec a, float b) { return {a.lo OP b, a.hi OP b}; }         \
  HZ_INLINE vec operator OP(float a, vec b) { return {a OP b.lo, a OP b.hi}; }         \
  HZ_INLINE vec& operator OP##=(vec& a, vec b) { return a = a OP b; }
HZ_PAIR_OP(+)
HZ_PAIR_OP(-)
HZ_PAIR_OP(*)
HZ_PAIR_OP(/)
#undef HZ_PAIR_OP
HZ_INLINE vec operator-(vec a) { return {-a.lo, -a.hi}; }
HZ_INLINE ivec operator<(vec a, vec b) { return {a.lo < b.lo, a.hi < b.hi}; }
HZ_INLINE ivec operator>(vec a, vec b) { return {a.lo > b.lo, a.hi > b.hi}; }
HZ_INLINE ivec operator<(vec a, float b) { return {a.lo < b, a.hi < b}; }
HZ_INLINE ivec operator+(ivec a, int32_t b) { return {a.lo + b, a.hi + b}; }
HZ_INLINE ivec operator-(ivec a, ivec b) { return {a.lo - b.lo, a.hi - b.hi}; }
HZ_INLINE ivec operator<<(ivec a, int b) { return {a.lo << b, a.hi << b}; }
HZ_INLINE ivec operator>=(ivec a, int32_t b) { return {a.lo >= b, a.hi >= b}; }
HZ_INLINE ivec operator>>(ivec a, int b) { return {a.lo >> b, a.hi >> b}; }
HZ_INLINE ivec operator&(ivec a, int32_t b) { return {a.lo & b, a.hi & b}; }
HZ_INLINE ivec operator|(ivec a, int32_t b) { return {a.lo | b, a.hi | b}; }
HZ_INLINE vec hz_to_float(ivec i) { return {__builtin_convertvector(i.lo, v8), __builtin_convertvector(i.hi, v8)}; }

HZ_INLINE vec hz_load(const float* p) {
  vec v;
  std::memcpy(&v.lo, p, sizeof v.lo);
  std::memcpy(&v.hi, p + 8, sizeof v.hi);
  return v;
}
HZ_INLINE void hz_store(float* p, vec v) {
  std::memcpy(p, &v.lo, sizeof v.lo);
  std::memcpy(p + 8, &v.hi, sizeof v.hi);
}
HZ_INLINE vec hz_select(ivec m, vec a, vec b) { return {m.lo ? a.lo : b.lo, m.hi ? a.hi : b.hi}; }
HZ_INLINE float hz_first(vec v) { return v.lo[0]; }
HZ_INLINE ivec hz_bits(vec v) { return {(i8)v.lo, (i8)v.hi}; }
HZ_INLINE vec hz_from_bits(ivec i) { return {(v8)i.lo, (v8)i.hi}; }
HZ_INLINE ivec hz_lanes() { return {i8{0, 1, 2, 3, 4, 5, 6, 7}, i8{8, 9, 10, 11, 12, 13, 14, 15}}; }

// every lane <- the maximum (the sum) of the 16: the two halves combined, then a butterfly over lanes 4, 2, 1 apart
HZ_INLINE v8 hz_lane_swap8(v8 v, int k) {
  const i8 p4 = {4, 5, 6, 7, 0, 1, 2, 3}, p2 = {2, 3, 0, 1, 6, 7, 4, 5}, p1 = {1, 0, 3, 2, 5, 4, 7, 6};
  return __builtin_shuffle(v, k == 4 ? p4 : k == 2 ? p2 : p1);
}
HZ_INLINE vec hz_all_max(vec v) {
  v8 m = v.lo > v.hi ? v.lo : v.hi;
  for (int k = 4; k >= 1; k /= 2) {
    const v8 w = hz_lane_swap8(m, k);
    m = m > w ? m : w;
  }
  return {m, m};
}
HZ_INLINE vec hz_all_sum(vec v) {
  v8 s = v.lo + v.hi;
  for (int k = 4; k >= 1; k /= 2) s += hz_lane_swap8(s, k);
  return {s, s};
}
"""

_KERNELS = r"""
// ---- attention: softmax(scale · q kᵀ [+ pos]) · v, one query-row tile at a time ----------------------------
// Per head, kᵀ is packed once (scale folded in, zero columns up to a multiple of 16); then for R query rows at a
// time the scores (R × N, in a scratch row block that stays in L1/L2), their softmax and the product with v run
// back to back, the accumulators in registers. The rows never leave the cache between the three steps, and no
// N × N map is written: 1.2-1.45x ATen's SDPA and bmm at the models' sizes (N = 50-800 keys, d = 48 / 64), and
// the backward below 1.2-1.3x SDPA's forward and backward (benchmarks/RESULTS.md, session 12).

HZ_INLINE vec hz_splat(float x) { return vec{} + x; }
HZ_INLINE vec hz_max(vec a, vec b) { return hz_select(a > b, a, b); }
HZ_INLINE vec hz_abs(vec x) { return hz_select(x < 0.0f, -x, x); }

// e^x for x <= 0 (scores less their row maximum) within about 2 ulp: x = n·ln2 + r, e^r by its degree-6 Taylor
// polynomial (|r| <= ln2/2), 2^n put in the exponent bits. Below -87.3 it gives e^-87.3 (~1e-38), which is
// nothing next to a row sum of at least 1.
HZ_INLINE vec hz_exp(vec x) {
  const vec lo = hz_splat(-87.3f);
  x = hz_max(x, lo);
  const vec magic = hz_splat(12582912.0f);   // 1.5 · 2^23: adding it rounds to an integer in the low bits
  const vec t = x * 1.44269504088896341f + magic;
  const vec n = t - magic;
  const ivec ni = hz_bits(t) - hz_bits(magic);
  const vec r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;   // ln2 in two parts
  vec p = hz_splat(1.0f / 720) * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * hz_from_bits((ni + 127) << 23);
}


// s[R rows, columns j0 .. j0 + 16·NV) = q[R rows, d] · kt[d, ...]; rmax[r] takes the lane-wise maximum of its row
template <int R, int NV>
HZ_INLINE void scores_tile(const float* q, int64_t sq, const float* kt,
                           int64_t Np, int64_t d, int64_t N, int64_t j0,
                           float* s, vec* rmax) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = vec{};
  for (int64_t c = 0; c < d; ++c) {
    vec w[NV];
    for (int u = 0; u < NV; ++u) w[u] = hz_load(kt + c * Np + j0 + 16 * u);
    for (int r = 0; r < R; ++r) {
      const float qv = q[r * sq + c];
      for (int u = 0; u < NV; ++u) acc[r][u] += qv * w[u];
    }
  }
  if (j0 + 16 * NV > N) {   // the padding columns (zero keys) take no part in the softmax: -inf
    const ivec lane = hz_lanes();
    for (int u = 0; u < NV; ++u) {
      const ivec pad = lane + (int32_t)(j0 + 16 * u) >= (int32_t)N;
      for (int r = 0; r < R; ++r) acc[r][u] = hz_select(pad, hz_splat(-INFINITY), acc[r][u]);
    }
  }
  for (int r = 0; r < R; ++r) {
    vec m = rmax[r];
    for (int u = 0; u < NV; ++u) {
      hz_store(s + r * Np + j0 + 16 * u, acc[r][u]);
      m = hz_max(m, acc[r][u]);
    }
    rmax[r] = m;
  }
}

// o[R rows, 16·DV] = scale[r] · (a[R rows, N] · v[N, 16·DV]) (ADD: o +=), CH vectors of 16 columns at a time
template <int R, int DV, int CH, bool ADD = false>
HZ_INLINE void values_tile(const float* a, int64_t Np, const float* v,
                           int64_t sv, int64_t N, const vec* scale,
                           float* o, int64_t so) {
  constexpr int U = DV < CH ? DV : CH;
  for (int u0 = 0; u0 < DV; u0 += U) {
    vec acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = vec{};
    for (int64_t j = 0; j < N; ++j) {
      vec w[U];
      for (int u = 0; u < U; ++u) w[u] = hz_load(v + j * sv + 16 * (u0 + u));
      for (int r = 0; r < R; ++r) {
        const float av = a[r * Np + j];
        for (int u = 0; u < U; ++u) acc[r][u] += av * w[u];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) {
        float* dst = o + r * so + 16 * (u0 + u);
        hz_store(dst, ADD ? hz_load(dst) + acc[r][u] * scale[r] : acc[r][u] * scale[r]);
      }
  }
}

// R query rows of one head: scores (plus the bias rows, row stride sb, before the softmax), softmax (plus the
// positional rows pos, row stride sp, after it), the product with v
template <int R, int NV, int DV, int CH>
HZ_INLINE void attend_rows(const float* q, int64_t sq, const float* kt,
                           const float* v, int64_t sv, const float* pos,
                           int64_t sp, const float* bias, int64_t sb, int64_t N, int64_t Np, float* s,
                           float* o, int64_t so, float* lse) {
  vec rmax[R], scale[R];
  for (int r = 0; r < R; ++r) rmax[r] = hz_splat(-INFINITY);
  int64_t j0 = 0;
  for (; j0 + 16 * NV <= Np; j0 += 16 * NV) scores_tile<R, NV>(q, sq, kt, Np, 16 * DV, N, j0, s, rmax);
  for (; j0 < Np; j0 += 16) scores_tile<R, 1>(q, sq, kt, Np, 16 * DV, N, j0, s, rmax);
  if (bias) {   // s += bias over the N keys (the padding columns stay -inf), the row maxima taken again
    const int64_t full = N / 16 * 16;
    for (int r = 0; r < R; ++r) {
      float* row = s + r * Np;
      const float* brow = bias + r * sb;
      vec m = hz_splat(-INFINITY);
      int64_t j = 0;
      for (; j < full; j += 16) {
        const vec t = hz_load(row + j) + hz_load(brow + j);
        hz_store(row + j, t);
        m = hz_max(m, t);
      }
      float tail = -INFINITY;
      for (; j < N; ++j) tail = std::max(tail, row[j] += brow[j]);
      rmax[r] = hz_max(m, hz_splat(tail));
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row = s + r * Np;
    const vec m = hz_all_max(rmax[r]);
    vec sum = vec{};
    for (int64_t j = 0; j < Np; j += 16) {
      const vec e = hz_exp(hz_load(row + j) - m);
      hz_store(row + j, e);
      sum += e;
    }
    const vec total = hz_all_sum(sum);
    scale[r] = hz_splat(1.0f) / total;
    if (lse) lse[r] = hz_first(m) + std::log(hz_first(total));   // for the backward pass: P = exp(S - lse)
  }
  if (pos) {   // a = e / sum + pos: the positional rows are added after the division, so it moves into a
    const int64_t full = N / 16 * 16;
    for (int r = 0; r < R; ++r) {
      float* row = s + r * Np;
      const float* prow = pos + r * sp;
      int64_t j = 0;
      for (; j < full; j += 16) hz_store(row + j, hz_load(row + j) * scale[r] + hz_load(prow + j));
      for (const float inv = hz_first(scale[r]); j < N; ++j) row[j] = row[j] * inv + prow[j];
      scale[r] = hz_splat(1.0f);
    }
  }
  values_tile<R, DV, CH>(s, Np, v, sv, N, scale, o, so);
}

// dst (d × Np) <- scale · srcᵀ for src's N rows (row stride ss), zero columns from N to Np
HZ_INLINE void pack_transposed(const float* src, int64_t ss, int64_t N,
                               int64_t Np, int64_t d, float scale, float* dst) {
  for (int64_t j = 0; j < N; ++j)
    for (int64_t c = 0; c < d; ++c) dst[c * Np + j] = src[j * ss + c] * scale;
  for (int64_t c = 0; c < d; ++c)
    for (int64_t j = N; j < Np; ++j) dst[c * Np + j] = 0.0f;
}


// query rows [i0, i1) of one head, head dim 16·DV; kt (16·DV × Np) and s (8 × Np) are scratch. AVX-512: R × max(NV,
// DV) accumulators, 24 of the 32 registers; AVX2: 6 rows × 16 columns, 12 of the 16 (each vector of 16 is two).
template <int DV>
void attend_head(HZ_ARGS_attend_head) {
  constexpr int64_t d = 16 * DV;
  constexpr int R = HzTiles<VR>::template attn_rows<DV>();
  constexpr int NV = HzTiles<VR>::template attn_cols<DV>();
  constexpr int CH = HzTiles<VR>::chunk;
  const int64_t Np = (N + 15) / 16 * 16;
  pack_transposed(k, sk, N, Np, d, scale, kt);
#define HZ_ROWS(T, i) attend_rows<T, NV, DV, CH>(q + (i) * sq, sq, kt, v, sv, pos ? pos + (i) * sp : nullptr, sp, \
                                                 bias ? bias + (i) * sb : nullptr, sb, N, Np, s, o + (i) * so, so, \
                                                 lse ? lse + (i) : nullptr)
  HZ_ROW_TILES(HZ_ROWS, i0, i1);
#undef HZ_ROWS
}

// acc[j, 16·DV] += Σ_r a[r, j] · x[r, 16·DV] for j < N: the R rows of x held in registers (CH vectors of 16
// columns at a time), one pass over acc per chunk
template <int R, int DV, int CH>
HZ_INLINE void outer_tile(const float* a, int64_t Np, const float* x, int64_t sx,
                          int64_t N, float* acc) {
  constexpr int U = DV < CH ? DV : CH;
  for (int u0 = 0; u0 < DV; u0 += U) {
    vec xr[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) xr[r][u] = hz_load(x + r * sx + 16 * (u0 + u));
    for (int64_t j = 0; j < N; ++j) {
      float* row = acc + j * 16 * DV + 16 * u0;
      vec t[U];
      for (int u = 0; u < U; ++u) t[u] = hz_load(row + 16 * u);
      for (int r = 0; r < R; ++r) {
        const float av = a[r * Np + j];
        for (int u = 0; u < U; ++u) t[u] += av * xr[r][u];
      }
      for (int u = 0; u < U; ++u) hz_store(row + 16 * u, t[u]);
    }
  }
}

// the bias row's values at the keys [j, j + 16), zero past N (its padding keys are not in memory)
HZ_INLINE vec hz_bias_at(const float* row, int64_t j, int64_t N) {
  if (j + 16 <= N) return hz_load(row + j);
  alignas(64) float t[16] = {};
  for (int64_t c = j; c < N; ++c) t[c - j] = row[c];
  return hz_load(t);
}

// R query rows of one head against the keys [jb, je) (je <= Np, both multiples of 16), backward: P = exp(S - lse)
// recomputed, dP = dO vᵀ, dS = P ∘ (dP - D), dq += scale · dS k, dv += Pᵀ dO, dk += dSᵀ q (dk, dv the key block's
// accumulators, row stride 16·DV; the scale applied to dk once, by the caller). With a bias (its R rows, row stride
// sb), S holds it as the forward's did, and dS is its gradient: added into dbias's R rows (row stride sdb), so that
// the images of a batch that share one bias sum into it.
template <int R, int NV, int DV, int CH>
HZ_INLINE void attend_rows_back(
    const float* q, int64_t sq, const float* k, int64_t sk, const float* kt, const float* vt, const float* dout,
    int64_t sdo, const float* lse, const float* D, int64_t N, int64_t Np, int64_t jb, int64_t je, float scale,
    float* p, float* ds, float* dq, int64_t sdq, float* dk, float* dv, const float* bias, int64_t sb, float* dbias,
    int64_t sdb) {
  vec ignored[R];
  for (int r = 0; r < R; ++r) ignored[r] = vec{};
  int64_t j0 = jb;
  for (; j0 + 16 * NV <= je; j0 += 16 * NV) {
    scores_tile<R, NV>(q, sq, kt, Np, 16 * DV, N, j0, p, ignored);
    scores_tile<R, NV>(dout, sdo, vt, Np, 16 * DV, N, j0, ds, ignored);
  }
  for (; j0 < je; j0 += 16) {
    scores_tile<R, 1>(q, sq, kt, Np, 16 * DV, N, j0, p, ignored);
    scores_tile<R, 1>(dout, sdo, vt, Np, 16 * DV, N, j0, ds, ignored);
  }
  vec unit[R];
  for (int r = 0; r < R; ++r) {
    float* prow = p + r * Np;
    float* drow = ds + r * Np;
    const vec l = hz_splat(lse[r]), dr = hz_splat(D[r]);
    if (bias) {
      const float* brow = bias + r * sb;
      float* grow = dbias + r * sdb;
      for (int64_t j = jb; j < je; j += 16) {
        const vec e = hz_exp(hz_load(prow + j) + hz_bias_at(brow, j, N) - l);
        hz_store(prow + j, e);
        const vec g = e * (hz_load(drow + j) - dr);
        hz_store(drow + j, g);
        if (j + 16 <= N) {
          hz_store(grow + j, hz_load(grow + j) + g);
        } else {
          for (int64_t c = j; c < N; ++c) grow[c] += drow[c];
        }
      }
    } else {
      for (int64_t j = jb; j < je; j += 16) {   // (the padding columns are never read: the products stop at N)
        const vec e = hz_exp(hz_load(prow + j) - l);
        hz_store(prow + j, e);
        hz_store(drow + j, e * (hz_load(drow + j) - dr));
      }
    }
    unit[r] = hz_splat(scale);
  }
  const int64_t jn = std::min(je, N) - jb;
  values_tile<R, DV, CH, true>(ds + jb, Np, k + jb * sk, sk, jn, unit, dq, sdq);
  outer_tile<R, DV, CH>(p + jb, Np, dout, sdo, jn, dv + jb * 16 * DV);
  outer_tile<R, DV, CH>(ds + jb, Np, q, sq, jn, dk + jb * 16 * DV);
}

// the backward of attend_head for all n query rows of one head (register blocking as there). The keys go in blocks
// of at most ~384: the blocks' dk and dv accumulators (N × d each, updated by every tile of query rows) then stay
// in L2; whole, they left it above ~500 keys at d 64, where each tile's pass over them cost more than its
// arithmetic (CvT-13's first stage, 3,136 queries against 784 keys: the backward 1.17x faster in blocks on AVX2,
// benchmarks/RESULTS.md, session 15). bias (n × N, row stride sb) or null: the forward's; dbias (row stride sdb):
// where its gradient is added.
template <int DV>
void attend_head_back(HZ_ARGS_attend_head_back) {
  constexpr int64_t d = 16 * DV;
  constexpr int R = HzTiles<VR>::template attn_rows<DV>();
  constexpr int NV = HzTiles<VR>::template attn_cols<DV>();
  constexpr int CH = HzTiles<VR>::chunk;
  const int64_t Np = (N + 15) / 16 * 16;
  float* kt = scratch;             // d × Np: scale · kᵀ
  float* vt = kt + d * Np;         // d × Np: vᵀ
  float* p = vt + d * Np;          // 8 × Np
  float* ds = p + 8 * Np;          // 8 × Np
  float* acck = ds + 8 * Np;       // N × d
  float* accv = acck + N * d;      // N × d
  float* D = accv + N * d;         // n: rowsum(dO ∘ O)
  pack_transposed(k, sk, N, Np, d, scale, kt);
  pack_transposed(v, sv, N, Np, d, 1.0f, vt);
  std::memset(acck, 0, sizeof(float) * 2 * N * d);
  for (int64_t i = 0; i < n; ++i) {
    vec t = vec{};
    for (int u = 0; u < DV; ++u) {
      t += hz_load(o + i * so + 16 * u) * hz_load(dout + i * so + 16 * u);
      hz_store(dq + i * sdq + 16 * u, vec{});
    }
    D[i] = hz_first(hz_all_sum(t));
  }
  // key blocks of a multiple of the scores tile's 16·NV columns, as even as that allows
  const int64_t blocks = (N + 383) / 384, step = 16 * NV;
  const int64_t width = ((Np + blocks - 1) / blocks + step - 1) / step * step;
  for (int64_t jb = 0; jb < Np; jb += width) {
    const int64_t je = std::min(jb + width, Np);
#define HZ_BACK(T, i) attend_rows_back<T, NV, DV, CH>(q + (i) * sq, sq, k, sk, kt, vt, dout + (i) * so, so, \
                                                      lse + (i), D + (i), N, Np, jb, je, scale, p, ds,         \
                                                      dq + (i) * sdq, sdq, acck, accv,                         \
                                                      bias ? bias + (i) * sb : nullptr, sb,                    \
                                                      dbias ? dbias + (i) * sdb : nullptr, sdb)
    HZ_ROW_TILES(HZ_BACK, 0, n);
#undef HZ_BACK
  }
  for (int64_t j = 0; j < N; ++j)
    for (int u = 0; u < DV; ++u) {
      hz_store(dk + j * sdk + 16 * u, hz_load(acck + j * d + 16 * u) * scale);
      hz_store(dv + j * sdv + 16 * u, hz_load(accv + j * d + 16 * u));
    }
}

// GELU(x) = x/2 · (1 + erf(x/√2)), erf(z) on [-4, 4] by a rational function, z times an even polynomial of degree 12
// over one of degree 8 (the float32 coefficients of the fast erf in XLA and Eigen; absolute error below 5e-7,
// 1.3e-6 on GELU up to |x| = 10). No exp: 1.6-1.9x the speed of Abramowitz and Stegun's 7.1.26 with its e^(-z²) (AVX2,
// one thread; benchmarks/RESULTS.md, session 16). Outside [-4, 4] erf is ±1 in float32, and the rational at the
// clamped ±4 is exactly ±1: GELU is exactly x above and 0 below; NaN stays NaN.
HZ_INLINE vec hz_erf(vec z) {
  const vec lo = hz_splat(-4.0f), hi = hz_splat(4.0f);
  z = hz_select(z < lo, lo, z);
  z = hz_select(hi < z, hi, z);
  const vec z2 = z * z;
  vec p = z2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * z2 - 2.10102402082508e-06f;
  p = p * z2 - 5.69250639462346e-05f;
  p = p * z2 - 7.34990630326855e-04f;
  p = p * z2 - 2.95459980854025e-03f;
  p = p * z2 - 1.60960333262415e-02f;
  vec q = z2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = q * z2 - 1.68282697438203e-03f;
  q = q * z2 - 7.37332916720468e-03f;
  q = q * z2 - 1.42647390514189e-02f;
  return (p * z) / q;
}

HZ_INLINE vec hz_gelu(vec x) { return 0.5f * x * (1.0f + hz_erf(x * 0.70710678118654752f)); }

// GELU'(x) = Φ(x) + x·φ(x), φ(x) = e^(−x²/2)/√(2π), as ATen's gelu_backward forms it; φ is 0 where x²/2 passes 87
// (hz_exp's floor), so that x·φ stays 0 for the largest |x| instead of x·1e-38
HZ_INLINE vec hz_gelu_slope(vec x) {
  const vec t = -0.5f * x * x;
  const vec e = hz_select(t < -87.0f, hz_splat(0.0f), hz_exp(t));
  return 0.5f * (1.0f + hz_erf(x * 0.70710678118654752f)) + x * (e * 0.3989422804014327f);
}

// σ(z) = 1 / (1 + e^(−z)) for z ≥ 0 and e^z / (1 + e^z) below (hz_exp takes z ≤ 0); 0 below -87, where σ leaves
// float32's normal range (hz_exp's floor would give 1e-38 there, and x·σ(x) of x = -1e30 -1e-8, not -0)
HZ_INLINE vec hz_sigmoid(vec z) {
  const vec e = hz_exp(-hz_abs(z));
  return hz_select(z < -87.0f, hz_splat(0.0f), hz_select(z < 0.0f, e, hz_splat(1.0f)) / (1.0f + e));
}

// ---- GELU for training: y = GELU(x), or (g given) y = g · GELU'(x); n a multiple of 16 ------------------------------
// ATen's exact GELU takes ~2.2 ns a value forward and ~3.4 backward on one Zen 3 thread (its erf and exp per lane);
// these take about half that (benchmarks/RESULTS.md, session 17). `quick`: QuickGELU x·σ(1.702x) (CvT), and its
// derivative s + 1.702·x·s·(1 − s) with s = σ(1.702x), one pass each way where ATen's formula takes three
// forward and two back (the multiply by 1.702 written out, then read again)
void gelu_values(HZ_ARGS_gelu_values) {
  if (quick) {
    for (int64_t i = 0; i < n; i += 16) {
      const vec v = hz_load(x + i), s = hz_sigmoid(1.702f * v);
      hz_store(y + i, g ? hz_load(g + i) * (s + 1.702f * v * s * (1.0f - s)) : v * s);
    }
    return;
  }
  if (g) {
    for (int64_t i = 0; i < n; i += 16) hz_store(y + i, hz_load(g + i) * hz_gelu_slope(hz_load(x + i)));
  } else {
    for (int64_t i = 0; i < n; i += 16) hz_store(y + i, hz_gelu(hz_load(x + i)));
  }
}

// tanh(u) = sign(u) · (1 − e^(−2|u|)) / (1 + e^(−2|u|))
HZ_INLINE vec hz_tanh(vec u) {
  const vec a = hz_abs(u);
  const vec e = hz_exp(-2.0f * a);
  const vec t = (1.0f - e) / (1.0f + e);
  return hz_select(u < 0.0f, -t, t);
}

// x · σ(x)
HZ_INLINE vec hz_swish(vec x) { return x * hz_sigmoid(x); }

template <int ACT>
HZ_INLINE vec hz_act(vec y) {
  if (ACT == ACT_GELU) return hz_gelu(y);
  if (ACT == ACT_GELU_TANH) return 0.5f * y * (1.0f + hz_tanh(0.7978845608028654f * (y + 0.044715f * y * y * y)));
  if (ACT == ACT_RELU) return hz_max(y, hz_splat(0.0f));
  if (ACT == ACT_SWISH) return hz_swish(y);
  return y;
}

// c[MR rows, 16·NV columns] = act(a[MR rows, K] · b + bias [+ res]), b the panel's K × 16·NV columns (row stride
// ldb); the residual added before the activation, as oneDNN's sum post-op does. One chunk of a longer sum: `first`
// starts from the bias (else from c, the chunks before), `last` adds the residual and applies the activation (else
// c keeps the partial sum). c may be res itself (each value is read before it is written), in one chunk only.
// sv: how far apart the tile's vectors of 16 columns lie in b (16: side by side in a panel; 16·K: one strip of K × 16
// each, as former_tokens packs its weights so that a cold weight streams in order).
template <int MR, int NV, int ACT>
HZ_INLINE void panel_tile(const float* a, int64_t lda, const float* b, int64_t ldb,
                          int64_t K, const float* bias, const float* res,
                          int64_t ldr, float* c, int64_t ldc, bool first = true, bool last = true, int64_t sv = 16) {
  vec acc[MR][NV];
  if (first) {
    for (int v = 0; v < NV; ++v) {
      const vec bv = bias ? hz_load(bias + 16 * v) : hz_splat(0.0f);
      for (int m = 0; m < MR; ++m) acc[m][v] = bv;
    }
  } else {
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = hz_load(c + m * ldc + 16 * v);
  }
  // k in runs of 16, each begun by prefetches for the next tile (the MR rows below): a line of each of its rows of
  // a, and (the first MR runs, in the last chunk) one row of its output lines, for writing. Without them each tile
  // began waiting on its rows and ended on the write misses of its stores: on AVX-512 the products of K = 384 ran
  // 6-9% slower, K = 1,152 and 1,536 2-4% (one thread, cold caches, Zen 4; benchmarks/RESULTS.md, session 26).
  // Past the last tile they name memory that is never read.
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    for (int m = 0; m < MR; ++m) __builtin_prefetch(a + (MR + m) * lda + k0, 0, 3);
    if (last && k0 < 16 * MR)
      for (int v = 0; v < NV; ++v) __builtin_prefetch(c + (MR + k0 / 16) * ldc + 16 * v, 1, 3);
    const int64_t k1 = std::min(K, k0 + 16);
    for (int64_t k = k0; k < k1; ++k) {
      vec w[NV];
      for (int v = 0; v < NV; ++v) w[v] = hz_load(b + k * ldb + sv * v);
      for (int m = 0; m < MR; ++m) {
        const float x = a[m * lda + k];
        for (int v = 0; v < NV; ++v) acc[m][v] += x * w[v];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      if (!last) {
        hz_store(c + m * ldc + 16 * v, acc[m][v]);
        continue;
      }
      const vec y = res ? acc[m][v] + hz_load(res + m * ldr + 16 * v) : acc[m][v];
      hz_store(c + m * ldc + 16 * v, hz_act<ACT>(y));
    }
}

// vectors of 16 columns per tile of MR rows: AVX-512 the whole panel (24 accumulators of 32 registers at 6 rows);
// AVX2 16 columns at 6 rows (12 of 16), and the tails wider, so that their sums are independent chains enough to
// hide the FMA's latency (a 1-row tile of 16 columns is two chains: as slow as a whole 6-row tile)
template <int MR, int NV>
static constexpr int panel_tile_vectors() {
  return HzTiles<VR>::wide ? NV : MR == 1 ? NV : (MR == 2 && NV % 2 == 0) ? 2 : 1;
}

// a panel of more than PANEL_K_WHOLE rows (384 KB at 64 columns) goes in chunks of at most PANEL_K_CHUNK rows (128 KB),
// each of which stays in L2 while every tile of rows reads it: whole, K = 3,072 ran at 0.83x of that on Zen 3
// (CoAtNet-0's last stage; benchmarks/RESULTS.md, session 15); K = 768 and 1,536 gained nothing from chunks
constexpr int64_t PANEL_K_WHOLE = 1536, PANEL_K_CHUNK = 512;

// the M rows of a against one panel of 16·NV columns, 6 rows at a time, the panel's K rows in chunks
template <int NV, int ACT>
static void panel_rows(const float* a, int64_t lda, int64_t M, const float* b, int64_t K, const float* bias,
                       const float* res, int64_t ldr, float* c, int64_t ldc) {
  // (a residual read in place of the output, c == res, is summed in one chunk: a partial sum would overwrite it)
  const int64_t chunks = res == c || K <= PANEL_K_WHOLE ? 1 : (K + PANEL_K_CHUNK - 1) / PANEL_K_CHUNK;
  const int64_t kc = (K + chunks - 1) / chunks;
  const bool strips = K >= PANEL_STRIP_K;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kn = std::min(kc, K - k0);
    const bool first = k0 == 0, last = k0 + kn == K;
#define HZ_PANEL_TILE(MR)                                                                                      \
  do {                                                                                                         \
    constexpr int TV = panel_tile_vectors<MR, NV>();                                                           \
    for (int v0 = 0; v0 < NV; v0 += TV)                                                                        \
      panel_tile<MR, TV, ACT>(a + m * lda + k0, lda,                                                           \
                              strips ? b + 16 * K * v0 + 16 * k0 : b + k0 * 16 * NV + 16 * v0,                 \
                              strips ? 16 : 16 * NV, kn, bias ? bias + 16 * v0 : nullptr,                      \
                              res ? res + m * ldr + 16 * v0 : nullptr, ldr, c + m * ldc + 16 * v0, ldc, first, \
                              last, strips ? 16 * K : 16);                                                     \
  } while (0)
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) HZ_PANEL_TILE(6);
    switch (M - m) {
      case 5: HZ_PANEL_TILE(5); break;
      case 4: HZ_PANEL_TILE(4); break;
      case 3: HZ_PANEL_TILE(3); break;
      case 2: HZ_PANEL_TILE(2); break;
      case 1: HZ_PANEL_TILE(1); break;
      default: break;
    }
#undef HZ_PANEL_TILE
  }
}

// y (MR rows, N) = x · wt + b for a handful of rows, wt (K, N) the transposed weight read in place (row stride N)
template <int MR>
void tiny_rows(HZ_ARGS_tiny_rows) {
  constexpr int TV = HzTiles<VR>::panel_vectors;
  int64_t n0 = 0;
  for (; n0 + 16 * TV <= N; n0 += 16 * TV)
    panel_tile<MR, TV, ACT_NONE>(x, K, wt + n0, N, K, b + n0, nullptr, 0, y + n0, N);
  for (; n0 < N; n0 += 16) panel_tile<MR, 1, ACT_NONE>(x, K, wt + n0, N, K, b + n0, nullptr, 0, y + n0, N);
}

// ---- weight gradient: c (O, I) = gᵀ · x for g (T, O) and x (T, I), both read as they lie -----------------------
// A training step's dW = dyᵀ·x with no transposed copy of either (torch's took 1-5 ms a layer, as long as a fifth of
// the product). A tile of MR rows of c (MR columns of g, broadcast one token at a time) against 16·NV of its
// columns (vectors of x's row); g's next rows prefetched by hand: a row stride past 4 KB (1,152 or 1,536 outputs)
// defeats the hardware prefetcher, and without it those shapes ran at 0.75x of the narrow ones on Zen 4. The tokens
// go in chunks of GRAD_CHUNK, c's columns in groups of GRAD_GROUP: a chunk of the group's x (96 KB) stays in L2 and a
// tile's run of g (8 KB) in L1 while the group's panels read it, so g streams from memory once per group, not once
// per panel of 64 columns (from cold caches, as in a step: 1.05-1.2x on DeiT-S's shapes, session 25).
constexpr int64_t GRAD_PREFETCH = 32, GRAD_CHUNK = 128, GRAD_GROUP = 192;

template <int MR, int NV>
HZ_INLINE void grad_tile(const float* g, int64_t ldg, const float* x, int64_t ldx, int64_t T, float* c, int64_t ldc,
                         bool first) {
  vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = first ? hz_splat(0.0f) : hz_load(c + m * ldc + 16 * v);
  // t in runs of 16, the first MR of them begun by a prefetch of one row of the output lines of the tile below, for
  // writing, as in panel_tile (1-3% on DeiT-S's shapes)
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    if (t0 < 16 * MR)
      for (int v = 0; v < NV; ++v) __builtin_prefetch(c + (MR + t0 / 16) * ldc + 16 * v, 1, 3);
    const int64_t t1 = std::min(T, t0 + 16);
    for (int64_t t = t0; t < t1; ++t) {
      __builtin_prefetch(g + std::min(t + GRAD_PREFETCH, T - 1) * ldg, 0, 3);
      vec w[NV];
      for (int v = 0; v < NV; ++v) w[v] = hz_load(x + t * ldx + 16 * v);
      for (int m = 0; m < MR; ++m) {
        const float a = g[t * ldg + m];
        for (int v = 0; v < NV; ++v) acc[m][v] += a * w[v];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) hz_store(c + m * ldc + 16 * v, acc[m][v]);
}

// MR rows of c, its columns [n0, n1) (in 16s) in panels of 64, over the T tokens of the chunk g and x start at
template <int MR>
HZ_INLINE void grad_rows(const float* g, int64_t ldg, const float* x, int64_t ldx, int64_t T, float* c, int64_t ldc,
                         bool first, int64_t n0, int64_t n1) {
#define HZ_GRAD_PANEL(NV)                                                                                    \
  do {                                                                                                       \
    constexpr int TV = panel_tile_vectors<MR, NV>();                                                         \
    for (int v0 = 0; v0 < NV; v0 += TV)                                                                      \
      grad_tile<MR, TV>(g, ldg, x + n + 16 * v0, ldx, T, c + n + 16 * v0, ldc, first);                       \
  } while (0)
  for (int64_t n = n0; n < n1; n += 64) {
    switch (std::min<int64_t>(64, n1 - n) / 16) {
      case 4: HZ_GRAD_PANEL(4); break;
      case 3: HZ_GRAD_PANEL(3); break;
      case 2: HZ_GRAD_PANEL(2); break;
      default: HZ_GRAD_PANEL(1); break;
    }
  }
#undef HZ_GRAD_PANEL
}

// c (O, ldc) columns [i0, i1) of gᵀ·x, i0 and i1 multiples of 16; `accumulate`: c += gᵀ·x
static void weight_grad_into(const float* g, int64_t ldg, int64_t O, const float* x, int64_t ldx, int64_t T,
                             float* c, int64_t ldc, int64_t i0, int64_t i1, bool accumulate) {
  for (int64_t n0 = i0; n0 < i1; n0 += GRAD_GROUP) {
    const int64_t n1 = std::min(i1, n0 + GRAD_GROUP);
    for (int64_t t0 = 0; t0 < T; t0 += GRAD_CHUNK) {
      const int64_t tn = std::min(GRAD_CHUNK, T - t0);
      const bool first = t0 == 0 && !accumulate;
      const float* gt = g + t0 * ldg;
      const float* xt = x + t0 * ldx;
      int64_t o = 0;
      for (; o + 6 <= O; o += 6) grad_rows<6>(gt + o, ldg, xt, ldx, tn, c + o * ldc, ldc, first, n0, n1);
      switch (O - o) {
        case 5: grad_rows<5>(gt + o, ldg, xt, ldx, tn, c + o * ldc, ldc, first, n0, n1); break;
        case 4: grad_rows<4>(gt + o, ldg, xt, ldx, tn, c + o * ldc, ldc, first, n0, n1); break;
        case 3: grad_rows<3>(gt + o, ldg, xt, ldx, tn, c + o * ldc, ldc, first, n0, n1); break;
        case 2: grad_rows<2>(gt + o, ldg, xt, ldx, tn, c + o * ldc, ldc, first, n0, n1); break;
        case 1: grad_rows<1>(gt + o, ldg, xt, ldx, tn, c + o * ldc, ldc, first, n0, n1); break;
        default: break;
      }
    }
  }
}

void weight_grad(HZ_ARGS_weight_grad) { weight_grad_into(g, ldg, O, x, ldx, T, c, ldc, i0, i1, false); }

template <int ACT>
static void panel_linear_act(const float* a, int64_t lda, int64_t M, const float* panels, int64_t K, int64_t N,
                             const float* bias, const float* res, int64_t ldr, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nb = std::min<int64_t>(64, N - n0);
    const float* bp = panels + n0 * K;
    const float* b0 = bias ? bias + n0 : nullptr;
    const float* r0 = res ? res + n0 : nullptr;
    switch (nb / 16) {
      case 4: panel_rows<4, ACT>(a, lda, M, bp, K, b0, r0, ldr, c + n0, ldc); break;
      case 3: panel_rows<3, ACT>(a, lda, M, bp, K, b0, r0, ldr, c + n0, ldc); break;
      case 2: panel_rows<2, ACT>(a, lda, M, bp, K, b0, r0, ldr, c + n0, ldc); break;
      default: panel_rows<1, ACT>(a, lda, M, bp, K, b0, r0, ldr, c + n0, ldc); break;
    }
  }
}

// c (M, N; row stride ldc) = act(a (M, K; row stride lda) · Wᵀ + bias [+ res, row stride ldr]), W packed by
// pack_panels
void panel_linear(HZ_ARGS_panel_linear) {
  switch (act) {
    case ACT_GELU: panel_linear_act<ACT_GELU>(a, lda, M, panels, K, N, bias, res, ldr, c, ldc); break;
    case ACT_GELU_TANH: panel_linear_act<ACT_GELU_TANH>(a, lda, M, panels, K, N, bias, res, ldr, c, ldc); break;
    case ACT_RELU: panel_linear_act<ACT_RELU>(a, lda, M, panels, K, N, bias, res, ldr, c, ldc); break;
    case ACT_SWISH: panel_linear_act<ACT_SWISH>(a, lda, M, panels, K, N, bias, res, ldr, c, ldc); break;
    default: panel_linear_act<ACT_NONE>(a, lda, M, panels, K, N, bias, res, ldr, c, ldc); break;
  }
}


// ---- 3×3 convolutions, stride 1, padding 1, by Winograd's minimal filtering ------------------------------------
// F(T×T, 3×3) (Lavin and Gray, 2016): each T×T block of outputs (a tile) is computed from the (T+2)×(T+2) inputs
// around it. Per input channel V = Bᵀ·d·B; for each of the (T+2)² positions e of the transform one product over the
// channels, M_e (tiles × Cout) = V_e (tiles × Cin) · U_e, U = G·g·Gᵀ from the weight (`winograd_weight`, once); then
// Y = Aᵀ·M·A. Per output and pair of channels that is (T+2)²/T² multiplies instead of 9: 2.25x fewer for T = 2,
// 4x for T = 4, for the additions of the two transforms. The tiles t0..t1 (numbered over the batch, row-major over
// each image's ⌈H/T⌉ × ⌈W/T⌉ grid) go in one pass: their V and M in `scratch` ((T+2)²·n·(Cin + Cout) floats).
//   T = 2: Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]   Aᵀ = [1 1 1 0; 0 1 −1 −1]
//   T = 4: Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0; 0 2 −1 −2 1 0; 0 4 0 −5 0 1]
//          Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0; 0 1 −1 8 −8 1]

// r = Bᵀ·d for one column of T + 2 inputs (d and r T + 2 apart by `s`)
template <int T>
HZ_INLINE void winograd_in(const vec* d, int s, vec* r) {
  if constexpr (T == 2) {
    r[0] = d[0] - d[2 * s];
    r[s] = d[s] + d[2 * s];
    r[2 * s] = d[2 * s] - d[s];
    r[3 * s] = d[s] - d[3 * s];
  } else {
    const vec a = d[4 * s] - 4.0f * d[2 * s], b = d[3 * s] - 4.0f * d[s];
    const vec c = d[4 * s] - d[2 * s], e = 2.0f * (d[3 * s] - d[s]);
    r[0] = 4.0f * d[0] - 5.0f * d[2 * s] + d[4 * s];
    r[s] = a + b;
    r[2 * s] = a - b;
    r[3 * s] = c + e;
    r[4 * s] = c - e;
    r[5 * s] = 4.0f * d[s] - 5.0f * d[3 * s] + d[5 * s];
  }
}

// o = Aᵀ·m for one column of T + 2 values (m and o T + 2 apart by `s`)
template <int T>
HZ_INLINE void winograd_out_column(const vec* m, int s, vec* o) {
  if constexpr (T == 2) {
    o[0] = m[0] + m[s] + m[2 * s];
    o[s] = m[s] - m[2 * s] - m[3 * s];
  } else {
    const vec a = m[s] + m[2 * s], b = m[s] - m[2 * s], c = m[3 * s] + m[4 * s], e = m[3 * s] - m[4 * s];
    o[0] = m[0] + a + c;
    o[s] = b + 2.0f * e;
    o[2 * s] = a + 4.0f * c;
    o[3 * s] = b + 8.0f * e + m[5 * s];
  }
}

template <int T, int ACT>
static void winograd_out(const float* mm, int64_t n, int64_t H, int64_t W, int64_t Cout, const float* bias,
                         int64_t t0, float* y) {
  constexpr int D = T + 2;
  const int64_t TW = (W + T - 1) / T, per_image = (H + T - 1) / T * TW;
  for (int64_t t = t0; t < t0 + n; ++t) {
    const int64_t b = t / per_image, h0 = t % per_image / TW * T, w0 = t % TW * T;
    // the tile's outputs inside the map (a side that is not a multiple of T cuts the last tiles)
    const int rows = static_cast<int>(std::min<int64_t>(T, H - h0));
    const int cols = static_cast<int>(std::min<int64_t>(T, W - w0));
    float* yt = y + ((b * H + h0) * W + w0) * Cout;
    const float* mt = mm + (t - t0) * Cout;
    for (int64_t c = 0; c < Cout; c += 16) {
      vec m[D * D], z[T * D], o[T * T];
      for (int e = 0; e < D * D; ++e) m[e] = hz_load(mt + e * n * Cout + c);
      for (int j = 0; j < D; ++j) winograd_out_column<T>(m + j, D, z + j);   // Aᵀ·M: T rows of D
      for (int i = 0; i < T; ++i) winograd_out_column<T>(z + i * D, 1, o + i * T);   // ·A
      const vec bv = bias ? hz_load(bias + c) : hz_splat(0.0f);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) hz_store(yt + (i * W + j) * Cout + c, hz_act<ACT>(o[i * T + j] + bv));
    }
  }
}

// V = Bᵀ·d·B of the tiles t0..t1 of x: V_e of tile t at v + (e·n + t − t0)·Cin, n = t1 − t0
template <int T>
static void winograd_in_tiles(const float* x, int64_t H, int64_t W, int64_t Cin, int64_t t0, int64_t t1, float* v) {
  constexpr int D = T + 2;
  const int64_t n = t1 - t0, TW = (W + T - 1) / T, per_image = (H + T - 1) / T * TW;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / per_image, h0 = t % per_image / TW * T - 1, w0 = t % TW * T - 1;
    const float* xb = x + b * H * W * Cin;
    bool inside[D][D];   // the inputs within the map (the rest is the zero padding)
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) inside[i][j] = h0 + i >= 0 && h0 + i < H && w0 + j >= 0 && w0 + j < W;
    float* vt = v + (t - t0) * Cin;
    for (int64_t c = 0; c < Cin; c += 16) {
      vec d[D * D], r[D * D];
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j)
          d[i * D + j] = inside[i][j] ? hz_load(xb + ((h0 + i) * W + w0 + j) * Cin + c) : hz_splat(0.0f);
      for (int j = 0; j < D; ++j) winograd_in<T>(d + j, D, r + j);   // Bᵀ·d, by columns
      for (int i = 0; i < D; ++i) winograd_in<T>(r + i * D, 1, d + i * D);   // ·B, by rows
      for (int e = 0; e < D * D; ++e) hz_store(vt + e * n * Cin + c, d[e]);
    }
  }
}

template <int T>
static void winograd_pass(const float* x, int64_t H, int64_t W, int64_t Cin, const float* u, int64_t Cout,
                          const float* bias, int act, int64_t t0, int64_t t1, float* scratch, float* y) {
  constexpr int D = T + 2;
  const int64_t n = t1 - t0;
  float* v = scratch;                     // D² × n × Cin
  float* mm = scratch + D * D * n * Cin;  // D² × n × Cout
  winograd_in_tiles<T>(x, H, W, Cin, t0, t1, v);
  for (int e = 0; e < D * D; ++e)
    panel_linear_act<ACT_NONE>(v + e * n * Cin, Cin, n, u + e * Cin * Cout, Cin, Cout, nullptr, nullptr, 0,
                               mm + e * n * Cout, Cout);
  switch (act) {
    case ACT_GELU: winograd_out<T, ACT_GELU>(mm, n, H, W, Cout, bias, t0, y); break;
    case ACT_GELU_TANH: winograd_out<T, ACT_GELU_TANH>(mm, n, H, W, Cout, bias, t0, y); break;
    case ACT_RELU: winograd_out<T, ACT_RELU>(mm, n, H, W, Cout, bias, t0, y); break;
    case ACT_SWISH: winograd_out<T, ACT_SWISH>(mm, n, H, W, Cout, bias, t0, y); break;
    default: winograd_out<T, ACT_NONE>(mm, n, H, W, Cout, bias, t0, y); break;
  }
}

void winograd_tiles(HZ_ARGS_winograd_tiles) {
  if (tile == 4)
    winograd_pass<4>(x, H, W, Cin, u, Cout, bias, act, t0, t1, scratch, y);
  else
    winograd_pass<2>(x, H, W, Cin, u, Cout, bias, act, t0, t1, scratch, y);
}

// The weight gradient by the same tiles. The forward is y = Aᵀ·[U ⊙ V]·A per tile with U = G·g·Gᵀ, so
// ∂L/∂U = (A·dY·Aᵀ) ⊙ V, summed over the tiles, and ∂L/∂g = Gᵀ·(∂L/∂U)·G: per position e of the transform one
// product over the tiles, M_e (Cout × Cin) += Ãᵀ_e · V_e with Ã = A·dY·Aᵀ, (T+2)² products of 1/T² as many rows as
// the direct gradient's 9 (2.25x fewer multiplies for T = 2). Gᵀ·M·G, 16 values to 9 per pair of channels, is the
// caller's (`native.winograd_weight_grad`).

// r = A·z for T values (the adjoint of winograd_out_column: D values; z `si` apart, r `so` apart)
template <int T>
HZ_INLINE void winograd_grad_column(const vec* z, int si, vec* r, int so) {
  if constexpr (T == 2) {   // A = [1 0; 1 1; 1 −1; 0 −1]
    r[0] = z[0];
    r[so] = z[0] + z[si];
    r[2 * so] = z[0] - z[si];
    r[3 * so] = hz_splat(0.0f) - z[si];
  } else {   // A = Aᵀᵀ of F(4×4, 3×3)'s output transform
    const vec a = z[0] + z[2 * si], b = z[si] + z[3 * si], c = 4.0f * z[2 * si], e = 8.0f * z[3 * si];
    const vec p = z[0] + c, q = 2.0f * z[si] + e;
    r[0] = z[0];
    r[so] = a + b;
    r[2 * so] = a - b;
    r[3 * so] = p + q;
    r[4 * so] = p - q;
    r[5 * so] = z[3 * si];
  }
}

template <int T>
static void winograd_grad_pass(const float* x, const float* dy, int64_t H, int64_t W, int64_t Cin, int64_t Cout,
                               int64_t t0, int64_t t1, float* scratch, float* m) {
  constexpr int D = T + 2;
  const int64_t n = t1 - t0, TW = (W + T - 1) / T, per_image = (H + T - 1) / T * TW;
  float* v = scratch;                     // D² × n × Cin
  float* g = scratch + D * D * n * Cin;   // D² × n × Cout: Ã_e of tile t at g + (e·n + t − t0)·Cout
  winograd_in_tiles<T>(x, H, W, Cin, t0, t1, v);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / per_image, h0 = t % per_image / TW * T, w0 = t % TW * T;
    // the tile's outputs inside the map; the cut-off rest has no gradient (zeros)
    const int rows = static_cast<int>(std::min<int64_t>(T, H - h0));
    const int cols = static_cast<int>(std::min<int64_t>(T, W - w0));
    const float* dyt = dy + ((b * H + h0) * W + w0) * Cout;
    float* gt = g + (t - t0) * Cout;
    for (int64_t c = 0; c < Cout; c += 16) {
      vec o[T * T], z[T * D], r[D * D];
      for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j)
          o[i * T + j] = i < rows && j < cols ? hz_load(dyt + (i * W + j) * Cout + c) : hz_splat(0.0f);
      for (int i = 0; i < T; ++i) winograd_grad_column<T>(o + i * T, 1, z + i * D, 1);   // dY·Aᵀ, by rows
      for (int j = 0; j < D; ++j) winograd_grad_column<T>(z + j, D, r + j, D);            // A·, by columns
      for (int e = 0; e < D * D; ++e) hz_store(gt + e * n * Cout + c, r[e]);
    }
  }
  for (int e = 0; e < D * D; ++e)
    weight_grad_into(g + e * n * Cout, Cout, Cout, v + e * n * Cin, Cin, n, m + e * Cout * Cin, Cin, 0, Cin, true);
}

void winograd_grad_tiles(HZ_ARGS_winograd_grad_tiles) {
  if (tile == 4)
    winograd_grad_pass<4>(x, dy, H, W, Cin, Cout, t0, t1, scratch, m);
  else
    winograd_grad_pass<2>(x, dy, H, W, Cin, Cout, t0, t1, scratch, m);
}


// y = LayerNorm(x) over rows of C values (C a multiple of 16; w, b optional): ATen's LayerNorm costs ~16 µs a call
// on a thread's 98 rows of 192, mostly outside the arithmetic, 20 calls per thread in a ConViT-Ti forward
void layer_norm_rows(HZ_ARGS_layer_norm_rows) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    vec sum = hz_splat(0.0f);
    for (int64_t c = 0; c < C; c += 16) sum += hz_load(xr + c);
    const float mean = hz_first(hz_all_sum(sum)) / static_cast<float>(C);
    vec sq = hz_splat(0.0f);
    for (int64_t c = 0; c < C; c += 16) {
      const vec t = hz_load(xr + c) - mean;
      sq += t * t;
    }
    const float rstd = 1.0f / std::sqrt(hz_first(hz_all_sum(sq)) / static_cast<float>(C) + static_cast<float>(eps));
    for (int64_t c = 0; c < C; c += 16) {
      vec t = (hz_load(xr + c) - mean) * rstd;
      if (w) t *= hz_load(w + c);
      if (b) t += hz_load(b + c);
      hz_store(yr + c, t);
    }
  }
}

// ---- depthwise 3×3 convolution, channels-last --------------------------------------------------------------------
// The outputs by blocks of WB pixels of a row and 16 channels: the 9 taps (zero padding of 1, stride S) accumulated
// in registers from the bias, a kernel row's three taps loaded once for the block and each input pixel once and given
// to every output of the block it reaches (S·(WB−1)+3 input pixels a kernel row), the activation applied, stored;
// blocks inside the map skip the bounds tests, and the channels are the inner loop, so the rows are read in order.
// One pixel at a time, 9 input and 9 tap loads fed 9 products and the loads bound it: the blocks run 1.2-1.8x as
// fast (Zen 3, one thread; benchmarks/RESULTS.md, session 21). At batch 1 oneDNN spends ~90 µs a call on CvT-13's
// 14×14×384 maps (29 calls a forward), of which the arithmetic is a few µs. With a channel multiplier (C = m · Cin
// outputs), output channel c reads input channel c mod Cin: the m groups of Cin outputs side by side.
// WB output pixels (ho, wo0..wo0+WB−1) of the 16 channels from c (input channels from ci), their sum added to total
template <int ACT, int S, int WB, bool EDGE>
HZ_INLINE void depthwise_block(const float* x, int64_t H, int64_t W, int64_t Cin, int64_t C, const float* w9,
                               const float* bias, int64_t ho, int64_t wo0, int64_t ci, int64_t c, float* out,
                               vec& total) {
  constexpr int NI = S * (WB - 1) + 3;
  vec acc[WB];
  const vec b = bias ? hz_load(bias + c) : hz_splat(0.0f);
  for (int j = 0; j < WB; ++j) acc[j] = b;
  for (int64_t kh = 0; kh < 3; ++kh) {
    const int64_t hi = ho * S - 1 + kh;
    if (hi < 0 || hi >= H) continue;
    const float* xr = x + hi * W * Cin + ci;
    const vec w0 = hz_load(w9 + kh * 3 * C + c), w1 = hz_load(w9 + (kh * 3 + 1) * C + c),
              w2 = hz_load(w9 + (kh * 3 + 2) * C + c);
    const int64_t first = wo0 * S - 1;
#pragma GCC unroll 16
    for (int i = 0; i < NI; ++i) {   // input pixel first + i reaches output j through tap i − S·j
      const int64_t wi = first + i;
      const vec v = !EDGE || (wi >= 0 && wi < W) ? hz_load(xr + wi * Cin) : hz_splat(0.0f);
      if (i % S == 0 && i / S < WB) acc[i / S] += v * w0;
      if (i >= 1 && (i - 1) % S == 0 && (i - 1) / S < WB) acc[(i - 1) / S] += v * w1;
      if (i >= 2 && (i - 2) % S == 0 && (i - 2) / S < WB) acc[(i - 2) / S] += v * w2;
    }
  }
  for (int j = 0; j < WB; ++j) {
    const vec y = hz_act<ACT>(acc[j]);
    hz_store(out + j * C + c, y);
    total += y;
  }
}

// the WB output pixels (ho, wo..wo+WB−1), all C channels, into out; sum, where given: their C sums, added to
template <int ACT, int S, int WB, bool EDGE>
HZ_INLINE void depthwise_pixels_of_block(const float* x, int64_t H, int64_t W, int64_t Cin, int64_t C,
                                         const float* w9, const float* bias, int64_t ho, int64_t wo, float* out,
                                         float* sum) {
  for (int64_t c = 0; c < C; c += 16) {
    const int64_t ci = Cin == C ? c : c % Cin;   // the input channels these 16 outputs read
    vec total = hz_splat(0.0f);
    depthwise_block<ACT, S, WB, EDGE>(x, H, W, Cin, C, w9, bias, ho, wo, ci, c, out, total);
    if (sum) hz_store(sum + c, hz_load(sum + c) + total);
  }
}

// outputs (ho, w0..w1−1), all C channels, into y (w1 − w0 pixels of C); sum, where given: their C sums, added to
template <int ACT, int S>
HZ_INLINE void depthwise_run(const float* x, int64_t H, int64_t W, int64_t Cin, int64_t C, const float* w9,
                             const float* bias, int64_t ho, int64_t w0, int64_t w1, float* y, float* sum) {
  constexpr int WB = 4;
  int64_t wo = w0;
  for (; wo + WB <= w1; wo += WB) {   // a block whose inputs all lie inside the map skips the bounds tests
    if (wo == 0 || (wo + WB - 1) * S + 1 >= W)
      depthwise_pixels_of_block<ACT, S, WB, true>(x, H, W, Cin, C, w9, bias, ho, wo, y + (wo - w0) * C, sum);
    else
      depthwise_pixels_of_block<ACT, S, WB, false>(x, H, W, Cin, C, w9, bias, ho, wo, y + (wo - w0) * C, sum);
  }
  for (; wo < w1; ++wo)
    depthwise_pixels_of_block<ACT, S, 1, true>(x, H, W, Cin, C, w9, bias, ho, wo, y + (wo - w0) * C, sum);
}

template <int ACT>
// one output row, all its channels (sum, where given: the row's C output sums, added to)
void depthwise_row(HZ_ARGS_depthwise_row) {
  if (stride == 1)
    depthwise_run<ACT, 1>(x, H, W, Cin, C, w9, bias, ho, 0, Wo, y, sum);
  else
    depthwise_run<ACT, 2>(x, H, W, Cin, C, w9, bias, ho, 0, Wo, y, sum);
}

// output pixels [p0, p1) of the map (row-major over Ho × Wo), no activation, into y (p1 − p0 rows of C): a thread's
// share of a token map whose rows need not start at a map row (conv_token_blocks)
void depthwise_pixels(HZ_ARGS_depthwise_pixels) {
  const int64_t Wo = (W - 1) / stride + 1;
  for (int64_t p = p0; p < p1;) {   // the share's runs within one output row
    const int64_t ho = p / Wo, wo = p % Wo, end = std::min(Wo, wo + (p1 - p));
    if (stride == 1)
      depthwise_run<ACT_NONE, 1>(x, H, W, C, C, w9, bias, ho, wo, end, y + (p - p0) * C, nullptr);
    else
      depthwise_run<ACT_NONE, 2>(x, H, W, C, C, w9, bias, ho, wo, end, y + (p - p0) * C, nullptr);
    p += end - wo;
  }
}

// ---- Mobile-Former's token side: one call per image for what is otherwise ~25 small operators -------------------
// y (M rows, row stride ldy) = act(x (M rows, row stride ldx) · W + b [+ res, row stride ldr]) for this part's share
// of the N columns (N a multiple of 16, split in strips of 16 between `parts`); W (K, N) in strips of 16 columns,
// each K × 16 contiguous: every strip is read front to back (a cold weight streams in order; a row-major (K, N) one
// would be walked with a stride of N floats, across pages)
template <int ACT>
static void few_rows(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K, int64_t N, const float* b,
                     const float* res, int64_t ldr, float* y, int64_t ldy, int64_t part, int64_t parts) {
  const int64_t v0 = N / 16 * part / parts, v1 = N / 16 * (part + 1) / parts;
  int64_t m = 0;
#define HZ_STRIPS(MR)                                                                                           \
  do {                                                                                                          \
    constexpr int V = panel_tile_vectors<MR, 4>();                                                              \
    const float* xm = x + m * ldx;                                                                              \
    const float* rm = res ? res + m * ldr : nullptr;                                                            \
    int64_t j = v0;                                                                                             \
    for (; j + V <= v1; j += V)                                                                                 \
      panel_tile<MR, V, ACT>(xm, ldx, w + j * 16 * K, 16, K, b ? b + 16 * j : nullptr, rm ? rm + 16 * j : nullptr, \
                             ldr, y + m * ldy + 16 * j, ldy, true, true, 16 * K);                               \
    for (; j < v1; ++j)                                                                                         \
      panel_tile<MR, 1, ACT>(xm, ldx, w + j * 16 * K, 16, K, b ? b + 16 * j : nullptr, rm ? rm + 16 * j : nullptr, \
                             ldr, y + m * ldy + 16 * j, ldy);                                                   \
  } while (0)
  for (; m + 6 <= M; m += 6) HZ_STRIPS(6);
  for (; m + 2 <= M; m += 2) HZ_STRIPS(2);
  if (m < M) HZ_STRIPS(1);
#undef HZ_STRIPS
}

// Mobile→Former's attention for R tokens of one head: the queries q (R rows, row stride sq; scale folded in) against
// the head's c channels of the map, xt (c rows of Pp pixels, zero past P), which are both the keys and the values;
// s a scratch of R × Pp scores; o (R rows, row stride so) <- softmax(q · xt) · xtᵀ
template <int R>
HZ_INLINE void m2f_rows(const float* q, int64_t sq, const float* xt, int64_t Pp, int64_t c, int64_t P, float* s,
                        float* o, int64_t so) {
  constexpr int NV = HzTiles<VR>::wide ? 4 : 1;
  vec rmax[R];
  for (int r = 0; r < R; ++r) rmax[r] = hz_splat(-INFINITY);
  int64_t j0 = 0;
  for (; j0 + 16 * NV <= Pp; j0 += 16 * NV) scores_tile<R, NV>(q, sq, xt, Pp, c, P, j0, s, rmax);
  for (; j0 < Pp; j0 += 16) scores_tile<R, 1>(q, sq, xt, Pp, c, P, j0, s, rmax);
  float inv[R];
  for (int r = 0; r < R; ++r) {   // e^(s − max) in place (the padding's -inf gives ~0), and 1 / its sum
    const vec m = hz_all_max(rmax[r]);
    vec sum = hz_splat(0.0f);
    for (int64_t j = 0; j < Pp; j += 16) {
      const vec e = hz_exp(hz_load(s + r * Pp + j) - m);
      hz_store(s + r * Pp + j, e);
      sum += e;
    }
    inv[r] = 1.0f / hz_first(hz_all_sum(sum));
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = hz_splat(0.0f);
    for (int64_t j = 0; j < Pp; j += 16) {
      const vec w = hz_load(xt + ch * Pp + j);
      for (int r = 0; r < R; ++r) acc[r] += hz_load(s + r * Pp + j) * w;
    }
    for (int r = 0; r < R; ++r) o[r * so + ch] = hz_first(hz_all_sum(acc[r])) * inv[r];
  }
}

// Mobile-Former's token side of one block for one image (the frozen block's `tokens`): x the block input, channel ch
// of pixel p at x[ch·sc + p·sp] (contiguous or channels-last), z (T, D) the tokens. Writes z after Mobile→Former and
// the Former (zout, T × D), the two dynamic ReLUs' slope MLP outputs (u1, u2) and Former→Mobile's k | v (kv, T rows
// of pad16(p.kv)). `parts` threads of one OpenMP team may share the work, each calling this with its `part` and the
// same scratch (hz_former_scratch(p, parts) floats): products by columns, attention by heads, LayerNorms by rows,
// the team meeting at a barrier after each step. Called with parts = 1 outside such a team (no barrier is met).
void former_tokens(HZ_ARGS_former_tokens) {
  const int64_t T = p.T, D = p.D, C = p.C, P = p.P, Pp = hz_pad16(P), lqa = hz_pad16(2 * C);
  float* xt = scratch;         // the map channel-major, C × Pp
  float* qa = xt + C * Pp;     // q | α/3, T × lqa
  float* att = qa + T * lqa;   // Mobile→Former's attention, gated, T × C
  float* t1 = att + T * C;     // T × D each: pre-norm sums, z after Mobile→Former, the Former's q, its attention, z
  float* z1 = t1 + T * D;      // after its attention
  float* fq = z1 + T * D;
  float* fo = fq + T * D;
  float* z2 = fo + T * D;
  float* hid = z2 + T * D;     // the FFN's hidden rows, T × hidden
  float* sh = hid + T * p.hidden;   // the slope MLPs' hidden row
  float* s = sh + hz_pad16(2 * p.reduced) + part * (T * Pp + T * T);   // this part's scores: T × Pp, then T × T
  float* ss = s + T * Pp;
  auto meet = [parts] {
    if (parts > 1) {
#pragma omp barrier
    }
  };
  const int64_t r0 = T * part / parts, r1 = T * (part + 1) / parts;   // this part's token rows (LayerNorms)
  {   // x → xt, 16 pixels at a time (a block that stays in L1), this part's channels; the padding zero
    const int64_t c0 = C * part / parts, c1 = C * (part + 1) / parts;
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      const int64_t p1 = std::min(P, p0 + 16);
      for (int64_t ch = c0; ch < c1; ++ch)
        for (int64_t q = p0; q < p1; ++q) xt[ch * Pp + q] = x[ch * sc + q * sp];
    }
    for (int64_t ch = c0; ch < c1; ++ch)
      for (int64_t q = P; q < Pp; ++q) xt[ch * Pp + q] = 0.0f;
  }
  few_rows<ACT_NONE>(z, D, T, p.qa_w, D, lqa, p.qa_b, nullptr, 0, qa, lqa, part, parts);
  meet();
  // Mobile→Former: the tokens query the map, keys = values = its channels, a head per part in turn; the gate
  // 2·hsigmoid(α) = clamp(α/3 + 1, 0, 2) on the head's channels
  const int64_t c = C / p.m2f_heads;
  for (int64_t h = part; h < p.m2f_heads; h += parts) {
    const float* xh = xt + h * c * Pp;
    int64_t t = 0;
    for (; t + 6 <= T; t += 6) m2f_rows<6>(qa + t * lqa + h * c, lqa, xh, Pp, c, P, s, att + t * C + h * c, C);
    for (; t + 2 <= T; t += 2) m2f_rows<2>(qa + t * lqa + h * c, lqa, xh, Pp, c, P, s, att + t * C + h * c, C);
    if (t < T) m2f_rows<1>(qa + t * lqa + h * c, lqa, xh, Pp, c, P, s, att + t * C + h * c, C);
    for (int64_t u = 0; u < T; ++u)
      for (int64_t ch = h * c; ch < (h + 1) * c; ++ch)
        att[u * C + ch] *= std::min(std::max(qa[u * lqa + C + ch] + 1.0f, 0.0f), 2.0f);
  }
  meet();
  few_rows<ACT_NONE>(att, C, T, p.proj_w, C, D, p.proj_b, z, D, t1, D, part, parts);
  meet();
  layer_norm_rows(t1 + r0 * D, r1 - r0, D, p.norm_w, p.norm_b, p.eps[0], z1 + r0 * D);
  meet();
  // the Former: queries projected, keys = values = the tokens themselves, post-norm; a head per part in turn
  few_rows<ACT_NONE>(z1, D, T, p.q_w, D, D, p.q_b, nullptr, 0, fq, D, part, parts);
  meet();
  const int64_t d = D / p.heads;
  for (int64_t h = part; h < p.heads; h += parts)
    for (int64_t t = 0; t < T; ++t) {
      float* sr = ss + t * T;
      float m = -INFINITY;
      for (int64_t u = 0; u < T; ++u) {
        float acc = 0.0f;
        for (int64_t k = 0; k < d; ++k) acc += fq[t * D + h * d + k] * z1[u * D + h * d + k];
        sr[u] = acc;
        m = std::max(m, acc);
      }
      float sum = 0.0f;
      for (int64_t u = 0; u < T; ++u) sum += (sr[u] = std::exp(sr[u] - m));
      const float inv = 1.0f / sum;
      float* out = fo + t * D + h * d;
      for (int64_t k = 0; k < d; ++k) out[k] = 0.0f;
      for (int64_t u = 0; u < T; ++u) {
        const float w = sr[u] * inv;
        for (int64_t k = 0; k < d; ++k) out[k] += w * z1[u * D + h * d + k];
      }
    }
  meet();
  few_rows<ACT_NONE>(fo, D, T, p.o_w, D, D, p.o_b, z1, D, t1, D, part, parts);
  meet();
  layer_norm_rows(t1 + r0 * D, r1 - r0, D, p.norm1_w, p.norm1_b, p.eps[1], z2 + r0 * D);
  meet();
  few_rows<ACT_GELU>(z2, D, T, p.fc1_w, D, p.hidden, p.fc1_b, nullptr, 0, hid, p.hidden, part, parts);
  meet();
  few_rows<ACT_NONE>(hid, p.hidden, T, p.fc2_w, p.hidden, D, p.fc2_b, z2, D, t1, D, part, parts);
  meet();
  layer_norm_rows(t1 + r0 * D, r1 - r0, D, p.norm2_w, p.norm2_b, p.eps[2], zout + r0 * D);
  meet();
  // the dynamic ReLUs' slope MLPs on the first token; Former→Mobile's keys and values
  const int64_t ls = hz_pad16(2 * p.reduced);
  few_rows<ACT_RELU>(zout, D, 1, p.s_w, D, ls, p.s_b, nullptr, 0, sh, ls, part, parts);
  few_rows<ACT_NONE>(zout, D, T, p.kv_w, D, hz_pad16(p.kv), p.kv_b, nullptr, 0, kv, hz_pad16(p.kv), part, parts);
  meet();
  few_rows<ACT_NONE>(sh, ls, 1, p.s1_w, p.reduced, hz_pad16(p.slopes1), p.s1_b, nullptr, 0, u1, 0, part, parts);
  few_rows<ACT_NONE>(sh + p.reduced, ls, 1, p.s2_w, p.reduced, hz_pad16(p.slopes2), p.s2_b, nullptr, 0, u2, 0, part,
                     parts);
}

// ---- segmentation: cross-entropy with its gradient or the intersect/union counts, one pass over the logits ----
// ln x for finite x > 0 (a row's sum of e^(v − max), at least 1) within ~1 ulp: x = 2^e · m with m in [√½, √2),
// ln m = 2·atanh(u), u = (m − 1)/(m + 1), |u| ≤ 0.172, by its series to u⁹ (the next term is below 1e-9)
HZ_INLINE vec hz_log(vec x) {
  const ivec b = hz_bits(x);
  vec m = hz_from_bits((b & 0x7fffff) | 0x3f800000);
  vec e = hz_to_float((b >> 23) + (-127));
  const ivec big = m > hz_splat(1.41421356f);
  m = hz_select(big, m * 0.5f, m);
  e = e + hz_select(big, hz_splat(1.0f), hz_splat(0.0f));
  const vec u = (m - 1.0f) / (m + 1.0f), u2 = u * u;
  vec p = u2 * (1.0f / 9) + 1.0f / 7;
  p = p * u2 + 1.0f / 5;
  p = p * u2 + 1.0f / 3;
  p = p * u2 + 1.0f;
  return e * 0.693147180559945309f + 2.0f * u * p;
}

// One pixel whose logits are not all finite, as ATen gives it: the class map's first NaN (else the first maximum);
// cross-entropy NaN where the maximum is not finite (NaN, +inf, or every logit -inf), else log-sum-exp − v[t]; and
// with gl the gradient of scale · CE, scale · (softmax − one-hot of t), at gl[k · gs] (NaN where the loss is).
static void seg_pixel_exact(const float* p, int64_t sk, int64_t K, int64_t label, int64_t* pred, double* ce,
                            float* gl, int64_t gs, float scale) {
  int64_t best = 0;
  float m = p[0];
  for (int64_t k = 1; k < K; ++k) {
    const float v = p[k * sk];
    if (std::isnan(m)) break;
    if (std::isnan(v) || v > m) {
      m = v;
      best = k;
    }
  }
  *pred = best;
  if (!std::isfinite(m)) {
    *ce = std::nan("");
    if (gl) for (int64_t k = 0; k < K; ++k) gl[k * gs] = std::nanf("");
    return;
  }
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += std::exp(static_cast<double>(p[k * sk]) - m);
  *ce = m + std::log(sum) - static_cast<double>(p[label * sk]);
  if (gl) {
    for (int64_t k = 0; k < K; ++k) {
      const double q = std::exp(static_cast<double>(p[k * sk]) - m) / sum;
      gl[k * gs] = static_cast<float>(scale * (q - (k == label ? 1.0 : 0.0)));
    }
  }
}

// n pixels in a row: class k of pixel i at x[i·sp + k·sk], its label at t[i·st]. For each pixel labelled in [0, K),
// its cross-entropy is added to *ce and the pixel to *labelled; a label neither `ignore` nor in [0, K) adds to *bad.
// With counts (evaluation), the class map (the first maximum, as `class_map`) and the counts of
// `intersect_and_union`: counts[label] += (class == label), counts[K + class] and counts[2K + label] += 1. With g
// (training), the gradient of scale · Σ CE: g[i·gp + k·gk] = scale · (softmax_k − [k = label]) for a labelled pixel,
// 0 for the others. 16 pixels at a time; where sp ≠ 1 (gp ≠ 1), or in the last partial 16, the logits (the gradient)
// go through scratch (48·K floats: the logits, their exponentials, the gradient).
void seg_pixels(HZ_ARGS_seg_pixels) {
  float* xs = scratch;
  float* es = scratch + 16 * K;
  float* gs16 = scratch + 32 * K;
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - i0);
    const float* p = x + i0 * sp;
    int64_t s = sk;
    if (sp != 1 || w < 16) {
      for (int64_t l = 0; l < 16; ++l) {
        const float* src = x + (i0 + std::min(l, w - 1)) * sp;   // a partial 16 repeats its last pixel
        for (int64_t k = 0; k < K; ++k) xs[k * 16 + l] = src[k * sk];
      }
      p = xs;
      s = 16;
    }
    vec m = hz_load(p), cls = hz_splat(0.0f), finite = m * 0.0f;   // 0 where finite, NaN where not
    for (int64_t k = 1; k < K; ++k) {
      const vec v = hz_load(p + k * s);
      finite += v * 0.0f;
      const ivec gt = v > m;
      m = hz_select(gt, v, m);
      if (counts) cls = hz_select(gt, hz_splat(static_cast<float>(k)), cls);
    }
    vec sum = hz_splat(0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const vec e = hz_exp(hz_load(p + k * s) - m);
      sum += e;
      if (g) hz_store(es + k * 16, e);
    }
    // the gradient's 16 pixels: in place where they lie in a row, else staged in gs16 and scattered at the end
    const bool direct = g && gp == 1 && w == 16;
    float* gd = direct ? g + i0 * gp : gs16;
    const int64_t gst = direct ? gk : 16;
    if (g) {
      const vec inv = hz_splat(scale) / sum;
      for (int64_t k = 0; k < K; ++k) hz_store(gd + k * gst, hz_load(es + k * 16) * inv);
    }
    float lse[16], cl[16], fin[16];
    hz_store(lse, m + hz_log(sum));
    hz_store(cl, cls);
    hz_store(fin, finite);
    for (int64_t l = 0; l < w; ++l) {
      const int64_t label = t[(i0 + l) * st];
      const bool in = label >= 0 && label < K;
      if (!in || label == ignore) {
        if (label != ignore) ++*bad;
        if (g) for (int64_t k = 0; k < K; ++k) gd[k * gst + l] = 0.0f;
        continue;
      }
      int64_t c;
      double loss;
      if (fin[l] == 0.0f) {
        c = static_cast<int64_t>(cl[l]);
        loss = static_cast<double>(lse[l]) - static_cast<double>(p[label * s + l]);
        if (g) gd[label * gst + l] -= scale;
      } else {
        seg_pixel_exact(p + l, s, K, label, &c, &loss, g ? gd + l : nullptr, gst, scale);
      }
      *ce += loss;
      ++*labelled;
      if (counts) {
        counts[label] += c == label;
        ++counts[K + c];
        ++counts[2 * K + label];
      }
    }
    if (g && !direct) {
      for (int64_t l = 0; l < w; ++l)
        for (int64_t k = 0; k < K; ++k) g[(i0 + l) * gp + k * gk] = gs16[k * 16 + l];
    }
  }
}
"""

_OPS = r"""
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
  if (hz_level.load(std::memory_order_relaxed) == 0) {   // a CPU without AVX2: ATen's product
    at::Tensor rows = y.view({M, N});
    at::addmm_out(rows, b, x.reshape({M, K}), wt);
    return y;
  }
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

// GELU (exact, erf; or with `quick` QuickGELU) of x, or with grad its gradient grad · GELU'(x): float32,
// contiguous, one shape; the values in chunks over the intra-op threads, the last n mod 16 through a padded copy
at::Tensor gelu(const at::Tensor& x, const c10::optional<at::Tensor>& grad, bool quick) {
  check_isa("gelu");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(),
              "hybridzoo_native::gelu: x must be contiguous float32, got ", x.scalar_type(), " strides ", x.strides());
  const bool back = grad.has_value();
  if (back) {
    TORCH_CHECK(grad->sizes() == x.sizes() && grad->scalar_type() == at::kFloat && grad->is_contiguous(),
                "hybridzoo_native::gelu: grad must be contiguous float32 of x's shape ", x.sizes(), ", got ",
                grad->sizes(), " ", grad->scalar_type(), " strides ", grad->strides());
  }
  at::Tensor y = at::empty_like(x);
  const float* px = x.data_ptr<float>();
  const float* pg = back ? grad->data_ptr<float>() : nullptr;
  float* py = y.data_ptr<float>();
  const int64_t n = x.numel(), body = n / 16 * 16;
  at::parallel_for(0, body / 16, 4096, [&](int64_t begin, int64_t end) {
    gelu_values(px + 16 * begin, pg ? pg + 16 * begin : nullptr, py + 16 * begin, 16 * (end - begin), quick);
  });
  if (body < n) {
    float tx[16] = {}, tg[16] = {}, ty[16];
    std::copy(px + body, px + n, tx);
    if (pg) std::copy(pg + body, pg + n, tg);
    gelu_values(tx, pg ? tg : nullptr, ty, 16, quick);
    std::copy(ty, ty + (n - body), py + body);
  }
  return y;
}

// dW = gᵀ·x for g (..., O) and x (..., I), float32, contiguous, the same leading shape, I a multiple of 16: a new
// (O, I) tensor, its columns and rows over the intra-op threads (below)
at::Tensor weight_grad_op(const at::Tensor& g, const at::Tensor& x) {
  check_isa("weight_grad");
  TORCH_CHECK(g.dim() >= 1 && x.dim() == g.dim() && g.sizes().slice(0, g.dim() - 1) == x.sizes().slice(0, x.dim() - 1)
              && g.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && g.is_contiguous()
              && x.is_contiguous() && x.size(-1) % 16 == 0 && x.size(-1) > 0 && g.size(-1) > 0,
              "hybridzoo_native::weight_grad: g (..., O) and x (..., I) must be contiguous float32 with the same "
              "leading shape and I a positive multiple of 16, got ", g.sizes(), " ", g.scalar_type(), " and ",
              x.sizes(), " ", x.scalar_type());
  const int64_t O = g.size(-1), I = x.size(-1), T = g.numel() / O;
  at::Tensor c = at::empty({O, I}, g.options());
  const float* pg = g.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  if (T == 0) return c.zero_();
  // the threads split c's columns while each keeps two or more panels of 64, and its rows beyond that: with fewer
  // panels (I ≤ 128) a column split left one thread idle (I = 64) or each one a single panel, paying its stream of g
  // for half the work (1.5-1.66x at 2 threads on BoT50's and CoAtNet-0's narrow layers; benchmarks/RESULTS.md,
  // session 38)
  const int64_t panels = (I + 63) / 64, threads = at::get_num_threads();
  const int64_t cparts = std::max<int64_t>(1, std::min(threads, panels / 2));
  const int64_t rparts = std::max<int64_t>(1, std::min(threads / cparts, (O + 5) / 6));
  const int64_t rows = (O + rparts - 1) / rparts, rstep = (rows + 5) / 6 * 6;
  at::parallel_for(0, cparts * rparts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t cp = w % cparts, rp = w / cparts;
      const int64_t p0 = panels * cp / cparts, p1 = panels * (cp + 1) / cparts;
      const int64_t o0 = std::min(O, rp * rstep), o1 = std::min(O, o0 + rstep);
      if (o1 > o0) weight_grad(pg + o0, O, o1 - o0, px, I, T, pc + o0 * I, I, p0 * 64, std::min(I, p1 * 64));
    }
  });
  return c;
}

static void check_heads(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_isa(op);
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "hybridzoo_native::", op, ": q, k and v must be 4-d float32 (B, heads, tokens, head_dim) with unit "
                "stride along head_dim, got ", t->sizes(), " ", t->scalar_type(), " strides ", t->strides());
  }
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3), N = k.size(2);
  TORCH_CHECK(d == 16 || d == 32 || d == 48 || d == 64,
              "hybridzoo_native::", op, ": head_dim must be 16, 32, 48 or 64, got ", d);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.sizes() == k.sizes() && N > 0,
              "hybridzoo_native::", op, ": k and v must be (", B, ", ", H, ", N, ", d, ") alike, N > 0, got ",
              k.sizes(), " and ", v.sizes());
}

// out (B, n, H·d) and, when lse is defined, lse (B, H, n) <- the row log-sum-exps of the scores
static void attention_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* pp,
                           int64_t sp0, int64_t sp, double scale, at::Tensor& out, float* plse,
                           const at::Tensor* bias = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), N = k.size(2);
  const float* pq = q.data_ptr<float>();
  const float* pk = k.data_ptr<float>();
  const float* pv = v.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t Np = (N + 15) / 16 * 16;
  // work items: (image, head, block of query rows); rows are split only when there are too few heads to keep
  // every thread busy (batch 1, CvT's one-head stage), in blocks large enough that packing kᵀ stays a small share
  const int64_t threads = at::get_num_threads();
  int64_t blocks = 1;
  if (B * H < 4 * threads) blocks = std::max<int64_t>(1, std::min((4 * threads + B * H - 1) / (B * H), n / 48));
  const int64_t block_rows = (n + blocks - 1) / blocks;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(d * Np), s(8 * Np);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, b = bh / H, h = bh % H;
      const int64_t i0 = item % blocks * block_rows, i1 = std::min(n, i0 + block_rows);
      if (i0 >= i1) continue;
      const float* qh = pq + b * q.stride(0) + h * q.stride(1);
      const float* kh = pk + b * k.stride(0) + h * k.stride(1);
      const float* vh = pv + b * v.stride(0) + h * v.stride(1);
      const float* ph = pp ? pp + h * sp0 : nullptr;
      // the bias (1 or B, H, n, N): this image's (or the shared) rows of this head
      const float* bh_ = bias ? bias->data_ptr<float>() + (bias->size(0) == 1 ? 0 : b * bias->stride(0))
                                    + h * bias->stride(1) : nullptr;
      const int64_t sb = bias ? bias->stride(2) : 0;
      float* oh = po + b * n * H * d + h * d;
      float* lh = plse ? plse + bh * n : nullptr;
      const float sc = static_cast<float>(scale);
#define HZ_HEAD(DV) attend_head<DV>(qh, q.stride(2), kh, k.stride(2), vh, v.stride(2), ph, sp, bh_, sb, oh, H * d, \
                                    i0, i1, N, sc, kt.data(), s.data(), lh)
      switch (d) {
        case 16: HZ_HEAD(1); break;
        case 32: HZ_HEAD(2); break;
        case 48: HZ_HEAD(3); break;
        default: HZ_HEAD(4); break;
      }
#undef HZ_HEAD
    }
  });
}

// a bias added to the scores before the softmax: (1 or B, H, n, N) float32, unit stride along N
static void check_bias_rows(const char* op, const at::Tensor& bias, int64_t B, int64_t H, int64_t n, int64_t N) {
  TORCH_CHECK(bias.dim() == 4 && (bias.size(0) == 1 || bias.size(0) == B) && bias.size(1) == H
              && bias.size(2) == n && bias.size(3) == N && bias.scalar_type() == at::kFloat && bias.stride(3) == 1,
              "hybridzoo_native::", op, ": bias must be float32 (1 or ", B, ", ", H, ", ", n, ", ", N, ") with "
              "unit stride along its last dimension, got ", bias.sizes(), " ", bias.scalar_type(), " strides ",
              bias.strides());
}

// softmax(scale · q kᵀ [+ bias]) · v, or (softmax(scale · q kᵀ [+ bias]) + pos) · v, heads first in and tokens first
// out: q (B, H, n, d), k and v (B, H, N, d), each with unit stride along d (views of a qkv product do); pos (H, n,
// N) or none; bias (1 or B, H, n, N), added to the scores before the softmax as SDPA's float attn_mask (CoAtNet's
// relative positions), or none; out (B, n, H·d), the layout the output projection reads. d is 16, 32, 48 or 64.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& pos, double scale, const c10::optional<at::Tensor>& bias) {
  check_heads("attention", q, k, v);
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), N = k.size(2);
  const bool has_pos = pos.has_value() && pos->defined();
  if (has_pos) {
    TORCH_CHECK(pos->dim() == 3 && pos->size(0) == H && pos->size(1) == n && pos->size(2) == N
                && pos->scalar_type() == at::kFloat && pos->stride(2) == 1,
                "hybridzoo_native::attention: pos must be float32 (", H, ", ", n, ", ", N, ") with unit stride "
                "along its last dimension, got ", pos->sizes(), " strides ", pos->strides());
  }
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_bias_rows("attention", *bias, B, H, n, N);
  at::Tensor out = at::empty({B, n, H * d}, q.options());
  if (out.numel() == 0) return out;
  attention_into(q, k, v, has_pos ? pos->data_ptr<float>() : nullptr, has_pos ? pos->stride(0) : 0,
                 has_pos ? pos->stride(1) : 0, scale, out, nullptr, has_bias ? &*bias : nullptr);
  return out;
}

// the training forward: the output as `attention` gives it, and the row log-sum-exps (B, H, n) the backward needs
// (of the scores with the bias, where one is given)
std::tuple<at::Tensor, at::Tensor> attention_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, const c10::optional<at::Tensor>& bias) {
  check_heads("attention_lse", q, k, v);
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_bias_rows("attention_lse", *bias, B, H, n, k.size(2));
  at::Tensor out = at::empty({B, n, H * d}, q.options());
  at::Tensor lse = at::empty({B, H, n}, q.options());
  if (out.numel() > 0)
    attention_into(q, k, v, nullptr, 0, 0, scale, out, lse.data_ptr<float>(), has_bias ? &*bias : nullptr);
  return {out, lse};
}


// the gradients of `attention_lse`'s output with respect to q, k and v, given dout (B, n, H·d) and that call's out
// and lse, written into dq, dk, dv: (B, heads, tokens, d) float32 with unit stride along d, any other strides (the
// caller's layout: side by side in one buffer for a packed qkv product). With that call's bias, its gradient too,
// written into dbias (the bias's shape, contiguous).
static void attention_backward_into(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                                    at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                    const at::Tensor* bias = nullptr, at::Tensor* dbias = nullptr) {
  check_heads(op, q, k, v);
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), N = k.size(2);
  for (const at::Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == n && t->size(2) == H * d
                && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "hybridzoo_native::", op, ": dout and out must be contiguous float32 (", B, ", ", n, ", ", H * d,
                "), got ", t->sizes());
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == n && lse.is_contiguous()
              && lse.scalar_type() == at::kFloat,
              "hybridzoo_native::", op, ": lse must be contiguous float32 (", B, ", ", H, ", ", n, "), got ",
              lse.sizes());
  for (const at::Tensor* t : {&dq, &dk, &dv}) {
    const at::Tensor& like = t == &dq ? q : k;
    TORCH_CHECK(t->sizes() == like.sizes() && t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "hybridzoo_native::", op, ": dq, dk and dv must be float32 of q's, k's and v's shapes with unit stride "
                "along head_dim, got ", t->sizes(), " strides ", t->strides());
  }
  TORCH_CHECK((bias == nullptr) == (dbias == nullptr), "hybridzoo_native::", op, ": bias and dbias come together");
  if (bias) {
    check_bias_rows(op, *bias, B, H, n, N);
    TORCH_CHECK(dbias->sizes() == bias->sizes() && dbias->scalar_type() == at::kFloat && dbias->is_contiguous(),
                "hybridzoo_native::", op, ": dbias must be contiguous float32 of the bias's shape ", bias->sizes(),
                ", got ", dbias->sizes(), " ", dbias->scalar_type(), " strides ", dbias->strides());
    dbias->zero_();   // the images that share one bias add into it
  }
  if (B * H * n == 0) return;
  const float* pq = q.data_ptr<float>();
  const float* pk = k.data_ptr<float>();
  const float* pv = v.data_ptr<float>();
  const float* po = out.data_ptr<float>();
  const float* pdo = dout.data_ptr<float>();
  const float* pl = lse.data_ptr<float>();
  float* pdq = dq.data_ptr<float>();
  float* pdk = dk.data_ptr<float>();
  float* pdv = dv.data_ptr<float>();
  const int64_t Np = (N + 15) / 16 * 16;
  const float sc = static_cast<float>(scale);
  // the bias's rows of (image, head), and where their gradient goes; a bias the batch shares (CoAtNet's relative
  // positions) takes the gradients of all its images, so the threads then split the heads, each taking every image
  // of its heads in turn: no two threads add into the same rows
  const float* pb = bias ? bias->data_ptr<float>() : nullptr;
  float* pdb = dbias ? dbias->data_ptr<float>() : nullptr;
  const bool shared = bias && bias->size(0) == 1 && B > 1;
  const int64_t sbb = bias && bias->size(0) > 1 ? bias->stride(0) : 0, sbh = bias ? bias->stride(1) : 0;
  const int64_t sb = bias ? bias->stride(2) : 0, sdbb = bias && bias->size(0) > 1 ? H * n * N : 0;
  const int64_t images = shared ? B : 1;   // per work item
  at::parallel_for(0, B * H / images, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * d * Np + 16 * Np + 2 * N * d + n);
    for (int64_t t = begin * images; t < end * images; ++t) {
      const int64_t b = shared ? t % B : t / H, h = shared ? t / B : t % H, bh = b * H + h;
      const float* bias_h = pb ? pb + b * sbb + h * sbh : nullptr;
      float* dbias_h = pdb ? pdb + b * sdbb + h * n * N : nullptr;
      const float* qh = pq + b * q.stride(0) + h * q.stride(1);
      const float* kh = pk + b * k.stride(0) + h * k.stride(1);
      const float* vh = pv + b * v.stride(0) + h * v.stride(1);
      const int64_t row = b * n * H * d + h * d;
#define HZ_HEAD(DV) attend_head_back<DV>(qh, q.stride(2), kh, k.stride(2), vh, v.stride(2), po + row, pdo + row, \
                                         H * d, pl + bh * n, pdq + b * dq.stride(0) + h * dq.stride(1),          \
                                         dq.stride(2), pdk + b * dk.stride(0) + h * dk.stride(1), dk.stride(2),  \
                                         pdv + b * dv.stride(0) + h * dv.stride(1), dv.stride(2), n, N, sc,      \
                                         scratch.data(), bias_h, sb, dbias_h, N)
      switch (d) {
        case 16: HZ_HEAD(1); break;
        case 32: HZ_HEAD(2); break;
        case 48: HZ_HEAD(3); break;
        default: HZ_HEAD(4); break;
      }
#undef HZ_HEAD
    }
  });
}

// the same, returned heads first (B, H, ·, d) as views of tokens-first buffers (B, ·, H, d)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  check_heads("attention_backward", q, k, v);
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), N = k.size(2);
  at::Tensor dq = at::empty({B, n, H, d}, q.options()).transpose(1, 2);   // tokens first, as out
  at::Tensor dk = at::empty({B, N, H, d}, q.options()).transpose(1, 2);
  at::Tensor dv = at::empty({B, N, H, d}, q.options()).transpose(1, 2);
  attention_backward_into("attention_backward", dout, q, k, v, out, lse, scale, dq, dk, dv);
  return {dq, dk, dv};
}

// the same into the caller's dq, dk, dv; with the forward's bias, its gradient into dbias
void attention_backward_(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, double scale, at::Tensor dq, at::Tensor dk,
                         at::Tensor dv, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& dbias) {
  const bool has_bias = bias.has_value() && bias->defined(), has_dbias = dbias.has_value() && dbias->defined();
  at::Tensor grad = has_dbias ? *dbias : at::Tensor();
  attention_backward_into("attention_backward_", dout, q, k, v, out, lse, scale, dq, dk, dv,
                          has_bias ? &*bias : nullptr, has_dbias ? &grad : nullptr);
}


// ---- Products on a weight packed in panels -----------------------------------------------------------------------
// A product's weight W (N, K) is packed into panels of 64 output columns, each K × 64 contiguous (the last panel
// narrower: N is a multiple of 16), as K rows of the panel's width or, from K = PANEL_STRIP_K on, as strips of 16
// columns each K × 16 contiguous. The product of M rows runs panel by panel, 6 rows at a time against 4 vectors of
// 16 columns (24 accumulators), the panel streaming through L2 once per row tile. On one thread at the sizes of a
// batch-1 block (98-197 rows, K and N 192-1536) this runs at 96-113 GFLOP/s on the EPYC against oneDNN's 77-106 with
// its packed weights (benchmarks/RESULTS.md, session 13): oneDNN's blocking loses most at half an image's rows with
// the weights not yet in cache, which is what each thread has here.
// where pack_panels puts W's weight (n0 + j, k) of the panel of nb columns that starts at output n0
static inline int64_t panel_offset(int64_t n0, int64_t nb, int64_t K, int64_t k, int64_t j) {
  return n0 * K + (K >= PANEL_STRIP_K ? (j / 16) * 16 * K + k * 16 + j % 16 : k * nb + j);
}

#if HZ_X86
#include <xmmintrin.h>
#endif

// d (K × width, row stride width) <- w's `width` rows (each K long, row stride K) transposed, in blocks of 4 × 4
// through SSE registers (every x86-64 CPU has SSE): a quarter to a half of the scalar loop's time, 0.5-0.7x from
// cold caches (DeiT-S's weights, Zen 4; benchmarks/RESULTS.md, session 26)
static void pack_rows_transposed(const float* w, int64_t K, int64_t width, float* d) {
  int64_t k0 = 0;
#if HZ_X86
  for (; k0 + 4 <= K; k0 += 4)
    for (int64_t j = 0; j < width; j += 4) {
      __m128 r0 = _mm_loadu_ps(w + j * K + k0), r1 = _mm_loadu_ps(w + (j + 1) * K + k0);
      __m128 r2 = _mm_loadu_ps(w + (j + 2) * K + k0), r3 = _mm_loadu_ps(w + (j + 3) * K + k0);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(d + k0 * width + j, r0);
      _mm_storeu_ps(d + (k0 + 1) * width + j, r1);
      _mm_storeu_ps(d + (k0 + 2) * width + j, r2);
      _mm_storeu_ps(d + (k0 + 3) * width + j, r3);
    }
#endif
  for (; k0 < K; ++k0)
    for (int64_t j = 0; j < width; ++j) d[k0 * width + j] = w[j * K + k0];
}

// A transposed contiguous weight (w = vᵀ, v (K, N) contiguous: a training step's input gradient, dy·W, takes the
// panels of Wᵀ) is read as it lies, v's rows in order, each cut into the panels' runs: no transposed copy first
// (0.5 ms for 384 × 1536 against 5.8 with one), and none of a panel's K runs, 6 KB apart, read one after the other
// (the prefetchers lose such a stream: 0.8x the speed from cold caches). Otherwise w's rows are transposed a
// strip (or panel) of them at a time.
at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(0) % 16 == 0 && w.size(0) > 0,
              "hybridzoo_native::pack_panels: w must be a float32 (N, K) weight with N a positive multiple of 16, "
              "got ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1);
  const bool transposed = K > 1 && w.stride(0) == 1 && w.stride(1) == N;
  const at::Tensor src = transposed ? w : w.contiguous();
  at::Tensor out = at::empty({N * K}, w.options());
  const float* ps = src.data_ptr<float>();
  float* pd = out.data_ptr<float>();
  const bool strips = K >= PANEL_STRIP_K;
  if (transposed) {
    for (int64_t k = 0; k < K; ++k) {
      const float* row = ps + k * N;
      for (int64_t n0 = 0; n0 < N; n0 += 64) {
        const int64_t nb = std::min<int64_t>(64, N - n0), width = strips ? 16 : nb;   // a strip's run, or the panel's
        for (int64_t j = 0; j < nb; j += width)
          std::memcpy(pd + panel_offset(n0, nb, K, k, j), row + n0 + j, width * sizeof(float));
      }
    }
    return out;
  }
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nb = std::min<int64_t>(64, N - n0);
    // a strip's 16 columns (K × 16) or, without strips, the panel's nb (K × nb): `width` rows of w from c0
    const int64_t width = strips ? 16 : nb;
    for (int64_t c0 = n0; c0 < n0 + nb; c0 += width)
      pack_rows_transposed(ps + c0 * K, K, width, pd + panel_offset(n0, nb, K, 0, c0 - n0));
  }
  return out;
}


// OneDNNLinear's post-op names (act, algorithm) as panel_linear's activations; op names the caller in the error
static int panel_act(const char* op, const std::string& act, const std::string& algorithm) {
  if (act == "gelu") return algorithm == "tanh" ? ACT_GELU_TANH : ACT_GELU;
  if (act == "relu") return ACT_RELU;
  if (act == "swish") return ACT_SWISH;
  TORCH_CHECK(act == "none", "hybridzoo_native::", op, ": act must be none, gelu, relu or swish, got ", act);
  return ACT_NONE;
}

static const float* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// a bias, when there is one, must be contiguous float32 (N)
static void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->numel() == N
                                                        && bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "hybridzoo_native::", op, ": bias must be contiguous float32 (", N, "), got ", bias->sizes());
}

// rows per block of a product split over the threads: at most 192 (the panels are read once per block), and a
// number of blocks that is a multiple of the threads, so that at::parallel_for gives each thread as many rows
static int64_t row_block(int64_t rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks = threads * ((rows + threads * 192 - 1) / (threads * 192));
  return std::max<int64_t>(1, (rows + blocks - 1) / blocks);
}

// A product of few rows against a wide weight splits its output columns over the threads (each a run of whole
// panels, all the rows) instead of its rows. Split by rows, every thread streams the whole weight through its
// caches: at a 7×7 map's 49 rows (CoAtNet-0's and BoT50's last stages, 1-9 MB a weight, out of the L3 by the next
// forward) that is twice the traffic from memory for a product that then waits on it. Below column_split_rows rows
// (`set_column_split_rows`; 0: never), with as many panels per thread or at least two.
static std::atomic<int64_t> column_split_rows{64};
static bool split_columns(int64_t rows, int64_t N) {
  const int64_t threads = at::get_num_threads();
  const int64_t panels = (N + 63) / 64;   // at least two a thread, or as many each
  return threads > 1 && rows < column_split_rows.load() && (panels >= 2 * threads || panels % threads == 0);
}

// out (rows, N) = act(a (rows, K) · Wᵀ + b [+ res]) with the weight's panels split over the threads (split_columns)
static void panel_linear_by_columns(const float* a, int64_t K, int64_t rows, const float* pp, int64_t N,
                                    const float* pb, const float* pr, float* po, int kind) {
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * 64, n1 = std::min(N, end * 64);
    panel_linear(a, K, rows, pp + n0 * K, K, n1 - n0, pb ? pb + n0 : nullptr, pr ? pr + n0 : nullptr, N, po + n0, N,
                 kind);
  });
}

// N, the outputs of a weight (N, K) packed by pack_panels, after checking it and the bias (N) if there is one
static int64_t check_panels(const char* op, const at::Tensor& panels, int64_t K,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(panels.dim() == 1 && panels.scalar_type() == at::kFloat && panels.is_contiguous() && K > 0
              && panels.numel() > 0 && panels.numel() % K == 0 && panels.numel() / K % 16 == 0,
              "hybridzoo_native::", op, ": panels must be a weight of (N, ", K, ") packed by pack_panels, N a "
              "multiple of 16, got ", panels.sizes());
  const int64_t N = panels.numel() / K;
  check_bias(op, bias, N);
  return N;
}

// y = act(x · Wᵀ + b [+ res]) over the rows of x (..., K), W packed by pack_panels, in blocks of rows over the
// threads; into `out` (res's own storage for rows_linear_add_, else a new tensor)
static at::Tensor rows_linear_impl(const char* op, const at::Tensor& x, const at::Tensor& panels,
                                   const c10::optional<at::Tensor>& bias, const std::string& act,
                                   const std::string& algorithm, const at::Tensor* res, bool into_res) {
  check_isa(op);
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.size(-1) > 0,
              "hybridzoo_native::", op, ": x must be float32 (..., K), got ", x.sizes(), " ", x.scalar_type());
  const int64_t K = x.size(-1);
  const int64_t N = check_panels(op, panels, K, bias);
  const int kind = panel_act(op, act, algorithm);
  const at::Tensor a = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  if (res) {
    TORCH_CHECK(res->sizes() == c10::IntArrayRef(shape) && res->scalar_type() == at::kFloat && res->is_contiguous(),
                "hybridzoo_native::", op, ": the residual must be contiguous float32 of the output's shape ",
                c10::IntArrayRef(shape), ", got ", res->sizes(), " ", res->scalar_type(), " strides ",
                res->strides());
  }
  at::Tensor out = into_res ? *res : at::empty(shape, x.options());
  const int64_t rows = a.numel() / K;
  if (rows == 0) return out;
  const float* pa = a.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  const float* pb = data_or_null(bias);
  const float* pr = res ? res->data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  if (split_columns(rows, N)) {
    panel_linear_by_columns(pa, K, rows, pp, N, pb, pr, po, kind);
    return out;
  }
  const int64_t block = row_block(rows);
  at::parallel_for(0, (rows + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * block, n = std::min(block, rows - r0);
      panel_linear(pa + r0 * K, K, n, pp, K, N, pb, pr ? pr + r0 * N : nullptr, N, po + r0 * N, N, kind);
    }
  });
  return out;
}

at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias,
                       const std::string& act, const std::string& algorithm,
                       const c10::optional<at::Tensor>& residual) {
  const bool has_res = residual.has_value() && residual->defined();
  return rows_linear_impl("rows_linear", x, panels, bias, act, algorithm, has_res ? &*residual : nullptr, false);
}

// res <- act(x · Wᵀ + b + res), in place (a residual 1×1 convolution whose shortcut buffer the caller owns)
at::Tensor rows_linear_add_(at::Tensor res, const at::Tensor& x, const at::Tensor& panels,
                            const c10::optional<at::Tensor>& bias, const std::string& act,
                            const std::string& algorithm) {
  return rows_linear_impl("rows_linear_add_", x, panels, bias, act, algorithm, &res, true);
}

// the panels of W·diag(s) from those of W (N, K) packed by pack_panels: input k's weights scaled by s[k]. A per-image channel gate on a product's input (CoAtNet's
// squeeze-excitation before its projection) then costs N · K multiplies instead of a pass over the input's rows.
at::Tensor scale_panels(const at::Tensor& panels, const at::Tensor& s) {
  TORCH_CHECK(s.dim() == 1 && s.numel() > 0 && s.scalar_type() == at::kFloat && s.is_contiguous(),
              "hybridzoo_native::scale_panels: s must be a contiguous float32 vector of the K inputs, got ",
              s.sizes(), " ", s.scalar_type());
  const int64_t K = s.numel();
  const int64_t N = check_panels("scale_panels", panels, K, c10::nullopt);
  at::Tensor out = at::empty_like(panels);
  const float* pp = panels.data_ptr<float>();
  const float* ps = s.data_ptr<float>();
  float* po = out.data_ptr<float>();
  // in either layout the 16 columns j0..j0+15 of input row k lie side by side: one run of 16 per (panel, k, j0); the
  // groups of 16 columns over the threads (CoAtNet-0's 768 × 192 at batch 1: 0.17 ms a call on one thread)
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g / 4 * 64, nb = std::min<int64_t>(64, N - n0), j0 = g * 16 - n0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t at = panel_offset(n0, nb, K, k, j0);
        const float sk = ps[k];
        for (int64_t j = 0; j < 16; ++j) po[at + j] = pp[at + j] * sk;
      }
    }
  });
  return out;
}


// y = act(depthwise 3×3 convolution of x, padding 1, stride 1 or 2, + bias): x (B, Cin, H, W) channels-last, Cin a
// multiple of 16; with a channel multiplier m, C = m · Cin outputs in m groups of Cin, output channel j·Cin + g
// reading input channel g (the grouped convolution's channel g·m + j; the caller orders weights and readers so);
// w9 (9, C) the taps of each output channel, row kh·3 + kw; y (B, C, Ho, Wo) channels-last. With `mean`, also each
// image's channel means of y (B, C): summed per output row as the row is stored, then over the rows, instead of a
// second pass over y (a squeeze-excitation's pooling: 0.19-0.32 ms a call at CoAtNet-0's S0 and S1, Zen 3)
static at::Tensor depthwise_impl(const char* op, const at::Tensor& x, const at::Tensor& w9,
                                 const c10::optional<at::Tensor>& bias, int64_t stride, const std::string& act,
                                 const std::string& algorithm, int64_t multiplier, at::Tensor* mean) {
  check_isa(op);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast)
              && x.size(1) % 16 == 0 && x.size(1) > 0,
              "hybridzoo_native::", op, ": x must be a channels-last float32 (B, C, H, W) map with C a multiple "
              "of 16, got ", x.sizes(), " ", x.scalar_type(), " strides ", x.strides());
  TORCH_CHECK(multiplier >= 1, "hybridzoo_native::", op, ": multiplier must be at least 1, got ", multiplier);
  const int64_t B = x.size(0), Cin = x.size(1), C = Cin * multiplier, H = x.size(2), W = x.size(3);
  TORCH_CHECK(w9.dim() == 2 && w9.size(0) == 9 && w9.size(1) == C && w9.scalar_type() == at::kFloat
              && w9.is_contiguous(), "hybridzoo_native::", op, ": w9 must be contiguous float32 (9, ", C,
              "), got ", w9.sizes());
  check_bias(op, bias, C);
  TORCH_CHECK(stride == 1 || stride == 2, "hybridzoo_native::", op, ": stride must be 1 or 2, got ", stride);
  const int kind = panel_act(op, act, algorithm);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  at::Tensor y = at::empty({B, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor rows;   // each output row's channel sums
  if (mean) {
    *mean = at::empty({B, C}, x.options());
    rows = at::zeros({B * Ho, C}, x.options());
  }
  if (y.numel() == 0) {
    if (mean) std::fill_n(mean->data_ptr<float>(), mean->numel(), NAN);   // the mean of no values, as ATen's
    return y;
  }
  const float* px = x.data_ptr<float>();
  const float* pw = w9.data_ptr<float>();
  const float* pb = data_or_null(bias);
  float* py = y.data_ptr<float>();
  float* sums = mean ? rows.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Wo * C * 9));
  at::parallel_for(0, B * Ho, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, ho = r % Ho;
      const float* xb = px + b * H * W * Cin;
      float* yr = py + r * Wo * C;
#define HZ_DW(A) depthwise_row<A>(xb, H, W, Cin, C, pw, pb, stride, ho, Wo, yr, sums ? sums + r * C : nullptr)
      switch (kind) {
        case ACT_GELU: HZ_DW(ACT_GELU); break;
        case ACT_GELU_TANH: HZ_DW(ACT_GELU_TANH); break;
        case ACT_RELU: HZ_DW(ACT_RELU); break;
        case ACT_SWISH: HZ_DW(ACT_SWISH); break;
        default: HZ_DW(ACT_NONE); break;
      }
#undef HZ_DW
    }
  });
  if (mean) {
    float* pm = mean->data_ptr<float>();
    const float scale = 1.0f / static_cast<float>(Ho * Wo);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        double t = 0.0;
        for (int64_t ho = 0; ho < Ho; ++ho) t += sums[(b * Ho + ho) * C + c];
        pm[b * C + c] = static_cast<float>(t) * scale;
      }
  }
  return y;
}

at::Tensor depthwise3x3(const at::Tensor& x, const at::Tensor& w9, const c10::optional<at::Tensor>& bias,
                        int64_t stride, const std::string& act, const std::string& algorithm, int64_t multiplier) {
  return depthwise_impl("depthwise3x3", x, w9, bias, stride, act, algorithm, multiplier, nullptr);
}

// depthwise3x3's y and the channel means of each image of it, (B, C)
std::tuple<at::Tensor, at::Tensor> depthwise3x3_pooled(const at::Tensor& x, const at::Tensor& w9,
                                                       const c10::optional<at::Tensor>& bias, int64_t stride,
                                                       const std::string& act, const std::string& algorithm,
                                                       int64_t multiplier) {
  at::Tensor mean;
  at::Tensor y = depthwise_impl("depthwise3x3_pooled", x, w9, bias, stride, act, algorithm, multiplier, &mean);
  return {y, mean};
}


// y = act(3×3 convolution of x, stride 1, padding 1, + bias) by Winograd's F(T×T, 3×3) (winograd_tiles): x
// (B, Cin, H, W) channels-last, Cin a multiple of 16; u ((T+2)², Cout, Cin) from winograd_weight (16 positions:
// T = 2, 36: T = 4), Cout a multiple of 16; y (B, Cout, H, W) channels-last. Each thread takes an even share of the
// tiles, in passes of at most `chunk` tiles whose transforms ((T+2)²·chunk·(Cin + Cout) floats) take about 1 MB
// (passes of 1/4 to 4x that measured level at BoT50's shapes, Zen 3)
at::Tensor winograd3x3(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias,
                       const std::string& act, const std::string& algorithm) {
  check_isa("winograd3x3");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast)
              && x.size(1) % 16 == 0 && x.size(1) > 0,
              "hybridzoo_native::winograd3x3: x must be a channels-last float32 (B, C, H, W) map with C a multiple "
              "of 16, got ", x.sizes(), " ", x.scalar_type(), " strides ", x.strides());
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(u.dim() == 3 && (u.size(0) == 16 || u.size(0) == 36) && u.size(2) == Cin && u.size(1) % 16 == 0
              && u.size(1) > 0 && u.scalar_type() == at::kFloat && u.is_contiguous(),
              "hybridzoo_native::winograd3x3: u must be a contiguous float32 (16 or 36, Cout, ", Cin, ") from "
              "winograd_weight, Cout a multiple of 16, got ", u.sizes(), " ", u.scalar_type());
  const int64_t Cout = u.size(1), D2 = u.size(0), T = D2 == 36 ? 4 : 2;
  check_bias("winograd3x3", bias, Cout);
  const int kind = panel_act("winograd3x3", act, algorithm);
  at::Tensor y = at::empty({B, Cout, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const int64_t tiles = B * ((H + T - 1) / T) * ((W + T - 1) / T);
  const int64_t chunk = std::max<int64_t>(6, std::min<int64_t>(96, 16 * 16384 / D2 / (Cin + Cout)));
  const float* px = x.data_ptr<float>();
  const float* pu = u.data_ptr<float>();
  const float* pb = data_or_null(bias);
  float* py = y.data_ptr<float>();
  at::parallel_for(0, tiles, 6, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scratch(new float[D2 * std::min(chunk, end - begin) * (Cin + Cout)]);
    for (int64_t t = begin; t < end; t += chunk)
      winograd_tiles(px, H, W, Cin, pu, Cout, pb, kind, T, t, std::min(t + chunk, end), scratch.get(), py);
  });
  return y;
}

// M ((T+2)², Cout, Cin) of the weight gradient of y = 3×3 convolution of x, stride 1, padding 1, by Winograd's
// F(T×T, 3×3) (winograd_grad_tiles): x (B, Cin, H, W) and dy (B, Cout, H, W) channels-last float32, Cin a multiple
// of 16, Cout of 16; dW = Gᵀ·M·G per pair of channels. The tiles are split between the threads, each summing into
// its own M (the first thread's the output), added in thread order at the end.
at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& dy, int64_t tile) {
  check_isa("winograd_weight_grad");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast)
              && x.size(1) % 16 == 0 && x.size(1) > 0,
              "hybridzoo_native::winograd_weight_grad: x must be a channels-last float32 (B, C, H, W) map with C a "
              "multiple of 16, got ", x.sizes(), " ", x.scalar_type(), " strides ", x.strides());
  TORCH_CHECK(dy.dim() == 4 && dy.scalar_type() == at::kFloat && dy.is_contiguous(at::MemoryFormat::ChannelsLast)
              && dy.size(0) == x.size(0) && dy.size(2) == x.size(2) && dy.size(3) == x.size(3) && dy.size(1) % 16 == 0
              && dy.size(1) > 0,
              "hybridzoo_native::winograd_weight_grad: dy must be a channels-last float32 (B, Cout, H, W) map of x's "
              "batch and size with Cout a multiple of 16, got ", dy.sizes(), " ", dy.scalar_type(), " strides ",
              dy.strides(), " for x ", x.sizes());
  TORCH_CHECK(tile == 2 || tile == 4, "hybridzoo_native::winograd_weight_grad: tile must be 2 or 4, got ", tile);
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = dy.size(1);
  const int64_t D2 = (tile + 2) * (tile + 2);
  const int64_t tiles = B * ((H + tile - 1) / tile) * ((W + tile - 1) / tile);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  at::Tensor m = at::zeros({parts, D2, Cout, Cin}, x.options());
  if (tiles == 0) return m[0];
  const int64_t chunk = std::max<int64_t>(6, std::min<int64_t>(96, 16 * 16384 / D2 / (Cin + Cout)));
  const float* px = x.data_ptr<float>();
  const float* pdy = dy.data_ptr<float>();
  float* pm = m.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t t0 = tiles * part / parts, t1 = tiles * (part + 1) / parts;
      std::unique_ptr<float[]> scratch(new float[D2 * std::min(chunk, t1 - t0) * (Cin + Cout)]);
      for (int64_t t = t0; t < t1; t += chunk)
        winograd_grad_tiles(px, pdy, H, W, Cin, Cout, tile, t, std::min(t + chunk, t1), scratch.get(),
                            pm + part * D2 * Cout * Cin);
    }
  });
  return parts == 1 ? m[0] : m.sum(0);
}


// A dense convolution as a product of gathered patches (im2col a block of rows at a time): each output pixel's
// inputs under the kernel, zeros where it hangs over the padding, gathered into a scratch row of K = C·kh·kw floats
// and multiplied by the weight's panels, the epilogue (bias, activation) as rows_linear's. From an NCHW map a row
// is ordered (channel, kernel row, kernel column), a weight (N, C, kh, kw) flattened as it lies; from a channels-last
// map (kernel row, kernel column, channel), the weight permuted to (N, kh, kw, C) (`native.gather_weight`). Either
// way the row reads the map in runs of kw values or of kw·C. For the convolutions oneDNN runs far from the panel
// kernel's rate at batch 1: an image stem (3 channels: oneDNN's channels-last copy of the image, then a product of
// K = 27 or 147) and the strided convolutions of a ResNet stage.
struct HzGatherConv {
  const float* x;
  int64_t C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo;
  bool channels_last;
};

// one row's kh·kw inputs of each channel from an NCHW map, the kernel wholly on the map: loops with the kernel's
// width known (KW > 0: an image stem's 3 or 7) rather than a call per run of 3 or 7 values, which made the stems'
// gathering 8x their product
template <int KW>
static void gather_planes(const float* x, int64_t C, int64_t HW, int64_t W, int64_t kh, int64_t kw, float* dst) {
  const int64_t width = KW > 0 ? KW : kw;
  for (int64_t c = 0; c < C; ++c, x += HW)
    for (int64_t u = 0; u < kh; ++u, dst += width)
      for (int64_t v = 0; v < width; ++v) dst[v] = x[u * W + v];
}

static void gather_rows(const HzGatherConv& g, int64_t r0, int64_t n, float* a) {
  const int64_t K = g.C * g.kh * g.kw, run = g.channels_last ? g.C : 1;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = r0 + r, b = p / (g.Ho * g.Wo), i = p / g.Wo % g.Ho, j = p % g.Wo;
    const int64_t h0 = i * g.sh - g.ph, w0 = j * g.sw - g.pw;
    float* dst = a + r * K;
    if (!g.channels_last && h0 >= 0 && h0 + g.kh <= g.H && w0 >= 0 && w0 + g.kw <= g.W) {
      const float* x = g.x + b * g.C * g.H * g.W + h0 * g.W + w0;
      switch (g.kw) {
        case 3: gather_planes<3>(x, g.C, g.H * g.W, g.W, g.kh, g.kw, dst); break;
        case 7: gather_planes<7>(x, g.C, g.H * g.W, g.W, g.kh, g.kw, dst); break;
        default: gather_planes<0>(x, g.C, g.H * g.W, g.W, g.kh, g.kw, dst); break;
      }
      continue;
    }
    // the kernel's columns v0..v1-1 lie on the map
    const int64_t v0 = std::min(g.kw, std::max<int64_t>(0, -w0)), v1 = std::max(v0, std::min(g.kw, g.W - w0));
    const int64_t planes = g.channels_last ? 1 : g.C;   // NCHW: one pass per channel
    for (int64_t c = 0; c < planes; ++c) {
      const float* plane = g.channels_last ? g.x + b * g.H * g.W * g.C : g.x + (b * g.C + c) * g.H * g.W;
      for (int64_t u = 0; u < g.kh; ++u, dst += g.kw * run) {
        const int64_t h = h0 + u;
        if (h < 0 || h >= g.H || v1 == v0) {
          std::fill_n(dst, g.kw * run, 0.0f);
          continue;
        }
        std::fill_n(dst, v0 * run, 0.0f);
        std::memcpy(dst + v0 * run, plane + (h * g.W + w0 + v0) * run, (v1 - v0) * run * sizeof(float));
        std::fill_n(dst + v1 * run, (g.kw - v1) * run, 0.0f);
      }
    }
  }
}

// y (B, N, Ho, Wo) channels-last = act(convolution of x (B, C, H, W) + bias): NCHW or channels-last as `channels_last`
// says (x copied into that layout if it is not), panels the weight flattened in that order and packed by pack_panels
static at::Tensor gather_conv_impl(const char* op, const at::Tensor& x, const at::Tensor& panels,
                                   const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw, int64_t sh,
                                   int64_t sw, int64_t ph, int64_t pw, bool channels_last, int kind) {
  check_isa(op);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "hybridzoo_native::", op, ": x must be a float32 "
              "batch of images (B, C, H, W), got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0, "hybridzoo_native::", op, ": the kernel ",
              kh, "×", kw, " and stride ", sh, "×", sw, " must be positive and the padding ", ph, "×", pw,
              " not negative");
  TORCH_CHECK(x.size(2) + 2 * ph >= kh && x.size(3) + 2 * pw >= kw, "hybridzoo_native::", op, ": patches of ", kh,
              "×", kw, " do not fit images of ", x.size(2), "×", x.size(3), " padded by ", ph, "×", pw);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1, K = C * kh * kw;
  const int64_t N = check_panels(op, panels, K, bias);
  const at::Tensor img = x.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({B, N, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t rows = B * Ho * Wo;
  if (rows == 0) return out;
  const HzGatherConv g{img.data_ptr<float>(), C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, channels_last};
  const float* pb = data_or_null(bias);
  const float* pp = panels.data_ptr<float>();
  float* po = out.data_ptr<float>();
  if (split_columns(rows, N)) {
    // few rows against a wide weight (a strided 1×1 convolution at 7×7): the rows gathered once, the product split
    // by the weight's panels as rows_linear's
    std::unique_ptr<float[]> a(new float[rows * K]);
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      gather_rows(g, begin, end - begin, a.get() + begin * K);
    });
    panel_linear_by_columns(a.get(), K, rows, pp, N, pb, nullptr, po, kind);
    return out;
  }
  const int64_t block = row_block(rows);
  at::parallel_for(0, (rows + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> a(new float[block * K]);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * block, n = std::min(block, rows - r0);
      gather_rows(g, r0, n, a.get());
      panel_linear(a.get(), K, n, pp, K, N, pb, nullptr, 0, po + r0 * N, N, kind);
    }
  });
  return out;
}

at::Tensor gather_conv(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding, bool channels_last,
                       const std::string& act, const std::string& algorithm) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, "hybridzoo_native::gather_conv: the "
              "kernel, stride and padding must be pairs, got ", kernel, ", ", stride, ", ", padding);
  const int kind = panel_act("gather_conv", act, algorithm);
  return gather_conv_impl("gather_conv", x, panels, bias, kernel[0], kernel[1], stride[0], stride[1], padding[0],
                          padding[1], channels_last, kind);
}

// A convolution whose kernel is its stride (a ViT's patch embedding), from an NCHW image: the output tokens first,
// (B, Hp·Wp, N), the layout the blocks read (the channels-last map's memory). One pass over the image instead of
// oneDNN's channels-last copy and convolution.
at::Tensor patch_embed(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias,
                       int64_t ph, int64_t pw) {
  const at::Tensor y = gather_conv_impl("patch_embed", x, panels, bias, ph, pw, ph, pw, 0, 0, false, ACT_NONE);
  return y.permute({0, 2, 3, 1}).reshape({y.size(0), y.size(2) * y.size(3), y.size(1)});
}

// A team's first error: a thread whose step throws keeps meeting the others at every barrier (its later steps
// skipped), so none waits forever; the error is raised after the team has finished (rethrow)
struct TeamError {
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex lock;
  template <class F>
  void step(bool skip, F&& work) {
    if (skip || failed.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
      std::lock_guard<std::mutex> hold(lock);
      if (!error) error = std::current_exception();
      failed.store(true);
    }
  }
  void rethrow() const {
    if (error) std::rethrow_exception(error);
  }
};

// the rows a thread of a token team carries past block i's keys and values (its share [r0, r0 + n)): in a prefix
// call's last block the leading `prefix` rows alone, all in the first thread's share; else its share
static inline int64_t carried_rows(int64_t prefix, bool last, int64_t r0, int64_t n) {
  return prefix && last ? (r0 == 0 ? prefix : 0) : n;
}

// a block's H heads over C channels: a head dim the attention kernel has
static void check_block_heads(const char* op, int64_t block, int64_t H, int64_t C) {
  TORCH_CHECK(H > 0 && C % H == 0 && (C / H == 16 || C / H == 32 || C / H == 48 || C / H == 64),
              "hybridzoo_native::", op, ": block ", block, ": ", H, " heads for ", C, " channels (head_dim must be 16, "
              "32, 48 or 64)");
}

// ---- Transformer blocks on one image, the token rows shared between the threads (batch 1) ----------------------
// the parameters of one pre-norm block, in the order of token_blocks' `params` (BLOCK_PARAMS per block)
constexpr int64_t BLOCK_PARAMS = 12;
enum { LN1_W, LN1_B, QKV_W, QKV_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC1_W, FC1_B, FC2_W, FC2_B };

// x + attn(norm1(x)), then + mlp(norm2(·)), for every block in turn, on one image's tokens x (1, N, C). Each of the
// team's threads takes a contiguous share of the N rows through every block on its own; the threads meet once per
// block, after writing their rows of q, k, v into a buffer shared for that block, since attention reads every row's
// k and v. Two buffers alternate: a thread writing block i+1's rows into block i−1's buffer has passed block i's
// barrier, which the others reach only after their attention of block i−1, that buffer's last read.
// params: BLOCK_PARAMS per block (LayerNorm weights and biases; the products' weights packed by pack_panels and their
// biases, optional); heads and scales (attention's), acts and algorithms (fc1's activation) one per block; eps two
// per block; pos: a block's positional map (heads, N, N) added after the softmax (ConViT's frozen GPSA), or none.
// bias: a block's relative-position bias (1, heads, N, N) added to the scores before the softmax (CoAtNet's), or
// none. prefix > 0: the last block computes its first `prefix` rows alone past the keys and values (the class and
// distillation tokens a classifier reads) and the result is those rows, (1, prefix, C); 0: every row, (1, N, C).
at::Tensor token_blocks(const at::Tensor& x, const std::vector<c10::optional<at::Tensor>>& params,
                        c10::IntArrayRef heads, c10::ArrayRef<double> scales, c10::ArrayRef<double> eps,
                        const std::vector<std::string>& acts, const std::vector<std::string>& algorithms,
                        const std::vector<c10::optional<at::Tensor>>& pos,
                        const std::vector<c10::optional<at::Tensor>>& bias, int64_t prefix) {
  check_isa("token_blocks");
  const int64_t L = static_cast<int64_t>(heads.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(params.size()) == BLOCK_PARAMS * L
              && static_cast<int64_t>(scales.size()) == L && static_cast<int64_t>(eps.size()) == 2 * L
              && static_cast<int64_t>(acts.size()) == L && static_cast<int64_t>(algorithms.size()) == L
              && static_cast<int64_t>(pos.size()) == L && static_cast<int64_t>(bias.size()) == L,
              "hybridzoo_native::token_blocks: for ", L, " blocks expected ", BLOCK_PARAMS * L, " params, ", L,
              " scales, ", 2 * L, " eps, ", L, " acts, algorithms, pos and bias, got ", params.size(), ", ",
              scales.size(), ", ", eps.size(), ", ", acts.size(), ", ", algorithms.size(), ", ", pos.size(), " and ",
              bias.size());
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) > 0,
              "hybridzoo_native::token_blocks: x must be one image's tokens, contiguous float32 (1, N, C), got ",
              x.sizes(), " ", x.scalar_type());
  const int64_t N = x.size(1), C = x.size(2);
  int64_t hidden_max = 0;
  std::vector<int> kinds(L);   // fc1's activations
  for (int64_t i = 0; i < L; ++i) {
    const c10::optional<at::Tensor>* P = params.data() + BLOCK_PARAMS * i;
    const int64_t H = heads[i];
    check_block_heads("token_blocks", i, H, C);
    kinds[i] = panel_act("token_blocks", acts[i], algorithms[i]);
    const int64_t hidden = P[FC1_B].has_value() && P[FC1_B]->defined() ? P[FC1_B]->numel()
                           : (P[FC1_W].has_value() && P[FC1_W]->defined() ? P[FC1_W]->numel() / C : 0);
    hidden_max = std::max(hidden_max, hidden);
    // (entry, rows N of its weight or length of its vector, columns K of its weight; 0 for a vector)
    const std::tuple<int, int64_t, int64_t> shapes[] = {
        {LN1_W, C, 0}, {LN1_B, C, 0}, {QKV_W, 3 * C, C}, {QKV_B, 3 * C, 0}, {PROJ_W, C, C}, {PROJ_B, C, 0},
        {LN2_W, C, 0}, {LN2_B, C, 0}, {FC1_W, hidden, C}, {FC1_B, hidden, 0}, {FC2_W, C, hidden}, {FC2_B, C, 0}};
    for (const auto& [j, rows, cols] : shapes) {
      const c10::optional<at::Tensor>& p = P[j];
      const bool given = p.has_value() && p->defined();
      const bool weight = cols > 0;
      TORCH_CHECK(given || !weight, "hybridzoo_native::token_blocks: block ", i, ": parameter ", j,
                  " (a product's packed weight) is missing");
      TORCH_CHECK(!given || (p->scalar_type() == at::kFloat && p->is_contiguous() && p->dim() == 1
                             && p->numel() == rows * (weight ? cols : 1) && rows % 16 == 0),
                  "hybridzoo_native::token_blocks: block ", i, ": parameter ", j, " must be contiguous float32 "
                  "with ", rows * (weight ? cols : 1), " values (", weight ? "a weight packed by pack_panels" :
                  "a vector", ", its length a multiple of 16), got ", p->sizes(), " ", p->scalar_type());
    }
    if (pos[i].has_value() && pos[i]->defined()) {
      TORCH_CHECK(pos[i]->dim() == 3 && pos[i]->size(0) == H && pos[i]->size(1) == N && pos[i]->size(2) == N
                  && pos[i]->scalar_type() == at::kFloat && pos[i]->stride(2) == 1,
                  "hybridzoo_native::token_blocks: block ", i, ": pos must be float32 (", H, ", ", N, ", ", N,
                  ") with unit stride along its last dimension, got ", pos[i]->sizes());
    }
    if (bias[i].has_value() && bias[i]->defined()) {
      TORCH_CHECK(bias[i]->dim() == 4 && bias[i]->size(0) == 1 && bias[i]->size(1) == H && bias[i]->size(2) == N
                  && bias[i]->size(3) == N && bias[i]->scalar_type() == at::kFloat && bias[i]->stride(3) == 1,
                  "hybridzoo_native::token_blocks: block ", i, ": bias must be float32 (1, ", H, ", ", N, ", ", N,
                  ") with unit stride along its last dimension, got ", bias[i]->sizes(), " ",
                  bias[i]->scalar_type());
    }
  }
  TORCH_CHECK(hidden_max > 0, "hybridzoo_native::token_blocks: fc1 has no outputs");
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  TORCH_CHECK(prefix >= 0 && prefix <= N / want, "hybridzoo_native::token_blocks: prefix must be 0 (every row) or "
              "a number of leading rows within the first thread's share (at most ", N / want, " of ", N, " rows on ",
              want, " threads), got ", prefix);
  at::Tensor out = at::empty({1, prefix ? prefix : N, C}, x.options());
  at::Tensor bufs[2] = {at::empty({1, N, 3 * C}, x.options()), at::empty({1, N, 3 * C}, x.options())};
  const bool inference = c10::InferenceMode::is_enabled();
  TeamError team_error;
#pragma omp parallel num_threads(want)
  {
    // the caller's thread is in inference mode; the team's other threads need it set
    c10::InferenceMode mode(inference);
    at::NoGradGuard no_grad;
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t r0 = N * t / team, n = N * (t + 1) / team - r0;
    auto step = [&](auto&& work) { team_error.step(n == 0, work); };
    // this thread's rows: h (n, C) the block's input, mid after the attention half, normed a LayerNorm's output,
    // hid the MLP's hidden rows
    at::Tensor h, mid, normed, hid;
    step([&] {
      h = x.narrow(1, r0, n).reshape({n, C}).clone();
      mid = at::empty({n, C}, x.options());
      normed = at::empty({n, C}, x.options());
      hid = at::empty({n, hidden_max}, x.options());
    });
    for (int64_t i = 0; i < L; ++i) {
      const c10::optional<at::Tensor>* P = params.data() + BLOCK_PARAMS * i;
      const int64_t H = heads[i], d = C / H;
      at::Tensor& buf = bufs[i % 2];
      step([&] {
        layer_norm_rows(h.data_ptr<float>(), n, C, data_or_null(P[LN1_W]), data_or_null(P[LN1_B]), eps[2 * i],
                        normed.data_ptr<float>());
        panel_linear(normed.data_ptr<float>(), C, n, P[QKV_W]->data_ptr<float>(), C, 3 * C, data_or_null(P[QKV_B]),
                     nullptr, 0, buf.data_ptr<float>() + r0 * 3 * C, 3 * C, ACT_NONE);
      });
#pragma omp barrier
      const int64_t m = carried_rows(prefix, i == L - 1, r0, n);
      step([&] {
        if (m == 0) return;
        const at::Tensor all = buf.view({1, N, 3, H, d});
        const at::Tensor q = all.narrow(1, r0, m).select(2, 0).permute({0, 2, 1, 3});
        const at::Tensor k = all.select(2, 1).permute({0, 2, 1, 3}), v = all.select(2, 2).permute({0, 2, 1, 3});
        c10::optional<at::Tensor> p;
        if (pos[i].has_value() && pos[i]->defined()) p = pos[i]->narrow(1, r0, m);
        c10::optional<at::Tensor> b;
        if (bias[i].has_value() && bias[i]->defined()) b = bias[i]->narrow(2, r0, m);
        const at::Tensor o = attention(q, k, v, p, scales[i], b);   // (1, m, C)
        panel_linear(o.data_ptr<float>(), C, m, P[PROJ_W]->data_ptr<float>(), C, C, data_or_null(P[PROJ_B]),
                     h.data_ptr<float>(), C, mid.data_ptr<float>(), C, ACT_NONE);
        layer_norm_rows(mid.data_ptr<float>(), m, C, data_or_null(P[LN2_W]), data_or_null(P[LN2_B]),
                        eps[2 * i + 1], normed.data_ptr<float>());
        const int64_t hidden = P[FC1_W]->numel() / C;
        at::Tensor z = hid.narrow(1, 0, hidden);
        panel_linear(normed.data_ptr<float>(), C, m, P[FC1_W]->data_ptr<float>(), C, hidden, data_or_null(P[FC1_B]),
                     nullptr, 0, z.data_ptr<float>(), hidden_max, kinds[i]);
        panel_linear(z.data_ptr<float>(), hidden_max, m, P[FC2_W]->data_ptr<float>(), hidden, C,
                     data_or_null(P[FC2_B]), mid.data_ptr<float>(), C, h.data_ptr<float>(), C, ACT_NONE);
      });
    }
    step([&] {
      const int64_t m = carried_rows(prefix, true, r0, n);
      if (m > 0) out.narrow(1, prefix ? 0 : r0, m).copy_(h.narrow(0, 0, m).view({1, m, C}));
    });
  }
  team_error.rethrow();
  return out;
}

// ---- CvT's blocks on one image, the token rows shared between the threads (batch 1) ---------------------------------
// the parameters of one CvT block, in the order of conv_token_blocks' `params` (CVT_PARAMS per block): norm1, the
// depthwise 3×3 taps (9, C) and biases (BatchNorm folded) of the q, k and v projections, the q, k, v and output
// products (packed by pack_panels) and their biases, norm2, fc1, fc2
constexpr int64_t CVT_PARAMS = 22;
enum { CV_LN1_W, CV_LN1_B, CV_DQ_W, CV_DQ_B, CV_DK_W, CV_DK_B, CV_DV_W, CV_DV_B, CV_Q_W, CV_Q_B, CV_K_W, CV_K_B,
       CV_V_W, CV_V_B, CV_PROJ_W, CV_PROJ_B, CV_LN2_W, CV_LN2_B, CV_FC1_W, CV_FC1_B, CV_FC2_W, CV_FC2_B };

// CvT's blocks (x + ConvAttention(norm1(x)), then + mlp(norm2(·))) in turn on one image's tokens x (1, N, C): N = cls
// + H·W, the cls token (cls = 1) first, then the H × W map row-major. As token_blocks, each thread of the team takes
// a contiguous share of the N rows through every block on its own; but the convolutional projections read each
// pixel's neighbours, so the threads meet twice per block: after norm1, whose rows go into a buffer shared by the
// team (the depthwise convolutions read it), and after the k and v products, whose rows (a share of the Nk = cls +
// Hk·Wk key rows each) go into shared buffers that attention reads whole. One buffer of each suffices: a thread
// writing block i+1's norm1 rows has passed block i's second barrier, after every read of block i's norm1 rows, and
// it writes block i+1's keys only past block i+1's first barrier, which the others reach after their attention of
// block i. The cls token bypasses the convolutions (its row of q, k, v is its norm1 row), as in the paper.
// strides: the q projection's and the k / v projections'; heads, scales, acts, algorithms one per block, eps two.
// prefix 1 (with a cls token): the last block computes the cls token's row alone past its keys and values (what a
// classifier reads; the other rows' query, attention, output projection and MLP are dead work) and the result is
// that row, (1, 1, C); 0: every row, (1, N, C).
at::Tensor conv_token_blocks(const at::Tensor& x, const std::vector<c10::optional<at::Tensor>>& params,
                             c10::IntArrayRef size, int64_t cls, c10::IntArrayRef strides, c10::IntArrayRef heads,
                             c10::ArrayRef<double> scales, c10::ArrayRef<double> eps,
                             const std::vector<std::string>& acts, const std::vector<std::string>& algorithms,
                             int64_t prefix) {
  check_isa("conv_token_blocks");
  const int64_t L = static_cast<int64_t>(heads.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(params.size()) == CVT_PARAMS * L
              && static_cast<int64_t>(scales.size()) == L && static_cast<int64_t>(eps.size()) == 2 * L
              && static_cast<int64_t>(acts.size()) == L && static_cast<int64_t>(algorithms.size()) == L,
              "hybridzoo_native::conv_token_blocks: for ", L, " blocks expected ", CVT_PARAMS * L, " params, ", L,
              " scales, ", 2 * L, " eps, ", L, " acts and algorithms, got ", params.size(), ", ", scales.size(), ", ",
              eps.size(), ", ", acts.size(), " and ", algorithms.size());
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0 && (cls == 0 || cls == 1) && strides.size() == 2
              && (strides[0] == 1 || strides[0] == 2) && (strides[1] == 1 || strides[1] == 2),
              "hybridzoo_native::conv_token_blocks: size must be the map's (H, W), cls 0 or 1 and strides (q, kv) "
              "each 1 or 2, got size ", size, ", cls ", cls, ", strides ", strides);
  const int64_t Hm = size[0], Wm = size[1], sq = strides[0], skv = strides[1];
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous()
              && x.size(1) == cls + Hm * Wm && x.size(2) % 16 == 0 && x.size(2) > 0,
              "hybridzoo_native::conv_token_blocks: x must be one image's tokens, contiguous float32 (1, ",
              cls + Hm * Wm, ", C) with C a multiple of 16 for a ", Hm, "×", Wm, " map and ", cls, " cls token, got ",
              x.sizes(), " ", x.scalar_type());
  const int64_t N = x.size(1), C = x.size(2);
  TORCH_CHECK(sq == 1, "hybridzoo_native::conv_token_blocks: the q projection's stride must be 1 (one query per "
              "token), got ", sq);
  TORCH_CHECK(prefix == 0 || (prefix == 1 && cls == 1), "hybridzoo_native::conv_token_blocks: prefix must be 0 "
              "(every row) or 1 with a cls token (its row alone in the last block), got prefix ", prefix, " with cls ",
              cls);
  const int64_t Nk = cls + ((Hm - 1) / skv + 1) * ((Wm - 1) / skv + 1);
  int64_t hidden_max = 0;
  std::vector<int> kinds(L);   // fc1's activations
  for (int64_t i = 0; i < L; ++i) {
    const c10::optional<at::Tensor>* P = params.data() + CVT_PARAMS * i;
    check_block_heads("conv_token_blocks", i, heads[i], C);
    kinds[i] = panel_act("conv_token_blocks", acts[i], algorithms[i]);
    const int64_t hidden = P[CV_FC1_W].has_value() && P[CV_FC1_W]->defined() ? P[CV_FC1_W]->numel() / C : 0;
    hidden_max = std::max(hidden_max, hidden);
    // (entry, values it must hold; required: a weight)
    const std::tuple<int, int64_t, bool> shapes[] = {
        {CV_LN1_W, C, false}, {CV_LN1_B, C, false}, {CV_DQ_W, 9 * C, true}, {CV_DQ_B, C, false},
        {CV_DK_W, 9 * C, true}, {CV_DK_B, C, false}, {CV_DV_W, 9 * C, true}, {CV_DV_B, C, false},
        {CV_Q_W, C * C, true}, {CV_Q_B, C, false}, {CV_K_W, C * C, true}, {CV_K_B, C, false},
        {CV_V_W, C * C, true}, {CV_V_B, C, false}, {CV_PROJ_W, C * C, true}, {CV_PROJ_B, C, false},
        {CV_LN2_W, C, false}, {CV_LN2_B, C, false}, {CV_FC1_W, hidden * C, true}, {CV_FC1_B, hidden, false},
        {CV_FC2_W, C * hidden, true}, {CV_FC2_B, C, false}};
    for (const auto& [j, values, weight] : shapes) {
      const c10::optional<at::Tensor>& p = P[j];
      const bool given = p.has_value() && p->defined();
      TORCH_CHECK(given || !weight, "hybridzoo_native::conv_token_blocks: block ", i, ": parameter ", j,
                  " (a weight) is missing");
      TORCH_CHECK(!given || (p->scalar_type() == at::kFloat && p->is_contiguous() && p->numel() == values
                             && values > 0 && values % 16 == 0),
                  "hybridzoo_native::conv_token_blocks: block ", i, ": parameter ", j, " must be contiguous float32 "
                  "with ", values, " values (a positive multiple of 16), got ", p->sizes(), " ", p->scalar_type());
    }
  }
  at::Tensor out = at::empty({1, prefix ? prefix : N, C}, x.options());
  // shared by the team: norm1's rows (read by the convolutions) and the key and value rows (read by attention)
  at::Tensor normed = at::empty({N, C}, x.options());
  at::Tensor keys = at::empty({1, Nk, C}, x.options()), values = at::empty({1, Nk, C}, x.options());
  const bool inference = c10::InferenceMode::is_enabled();
  TeamError team_error;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
#pragma omp parallel num_threads(want)
  {
    c10::InferenceMode mode(inference);
    at::NoGradGuard no_grad;
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t r0 = N * t / team, n = N * (t + 1) / team - r0;            // this thread's token rows
    const int64_t k0 = Nk * t / team, nk = Nk * (t + 1) / team - k0;        // and its key / value rows
    auto step = [&](auto&& work) { team_error.step(n == 0, work); };
    // rows of a projection's input for token rows [a, a + m) of a map seen with stride s: the cls row (its norm1
    // row) if the range starts at 0, then the convolution's output pixels; into y (m rows of C)
    auto project_rows = [&](int64_t a, int64_t m, const float* w9, const float* b, int64_t s, float* y) {
      const float* all = normed.data_ptr<float>();
      int64_t row = a;
      if (cls && row == 0 && m > 0) {
        std::memcpy(y, all, C * sizeof(float));
        ++row;
      }
      if (a + m > row)
        depthwise_pixels(all + cls * C, Hm, Wm, C, w9, b, s, row - cls, a + m - cls, y + (row - a) * C);
    };
    at::Tensor h, mid, local, q, conv, hid;
    step([&] {
      h = x.narrow(1, r0, n).reshape({n, C}).clone();
      mid = at::empty({n, C}, x.options());
      local = at::empty({std::max(n, nk), C}, x.options());
      q = at::empty({1, n, C}, x.options());
      hid = at::empty({n, hidden_max}, x.options());
    });
    for (int64_t i = 0; i < L; ++i) {
      const c10::optional<at::Tensor>* P = params.data() + CVT_PARAMS * i;
      const int64_t H = heads[i], d = C / H;
      const int64_t m = carried_rows(prefix, i == L - 1, r0, n);
      step([&] {
        layer_norm_rows(h.data_ptr<float>(), n, C, data_or_null(P[CV_LN1_W]), data_or_null(P[CV_LN1_B]),
                        eps[2 * i], normed.data_ptr<float>() + r0 * C);
      });
#pragma omp barrier
      step([&] {
        float* lp = local.data_ptr<float>();
        if (m > 0) {
          project_rows(r0, m, P[CV_DQ_W]->data_ptr<float>(), data_or_null(P[CV_DQ_B]), sq, lp);
          panel_linear(lp, C, m, P[CV_Q_W]->data_ptr<float>(), C, C, data_or_null(P[CV_Q_B]), nullptr, 0,
                       q.data_ptr<float>(), C, ACT_NONE);
        }
        if (nk > 0) {
          project_rows(k0, nk, P[CV_DK_W]->data_ptr<float>(), data_or_null(P[CV_DK_B]), skv, lp);
          panel_linear(lp, C, nk, P[CV_K_W]->data_ptr<float>(), C, C, data_or_null(P[CV_K_B]), nullptr, 0,
                       keys.data_ptr<float>() + k0 * C, C, ACT_NONE);
          project_rows(k0, nk, P[CV_DV_W]->data_ptr<float>(), data_or_null(P[CV_DV_B]), skv, lp);
          panel_linear(lp, C, nk, P[CV_V_W]->data_ptr<float>(), C, C, data_or_null(P[CV_V_B]), nullptr, 0,
                       values.data_ptr<float>() + k0 * C, C, ACT_NONE);
        }
      });
#pragma omp barrier
      step([&] {
        if (m == 0) return;
        const at::Tensor o = attention(q.narrow(1, 0, m).view({1, m, H, d}).permute({0, 2, 1, 3}),
                                       keys.view({1, Nk, H, d}).permute({0, 2, 1, 3}),
                                       values.view({1, Nk, H, d}).permute({0, 2, 1, 3}), c10::nullopt, scales[i],
                                       c10::nullopt);   // (1, n, C)
        panel_linear(o.data_ptr<float>(), C, m, P[CV_PROJ_W]->data_ptr<float>(), C, C, data_or_null(P[CV_PROJ_B]),
                     h.data_ptr<float>(), C, mid.data_ptr<float>(), C, ACT_NONE);
        layer_norm_rows(mid.data_ptr<float>(), m, C, data_or_null(P[CV_LN2_W]), data_or_null(P[CV_LN2_B]),
                        eps[2 * i + 1], local.data_ptr<float>());
        const int64_t hidden = P[CV_FC1_W]->numel() / C;
        panel_linear(local.data_ptr<float>(), C, m, P[CV_FC1_W]->data_ptr<float>(), C, hidden,
                     data_or_null(P[CV_FC1_B]), nullptr, 0, hid.data_ptr<float>(), hidden_max, kinds[i]);
        panel_linear(hid.data_ptr<float>(), hidden_max, m, P[CV_FC2_W]->data_ptr<float>(), hidden, C,
                     data_or_null(P[CV_FC2_B]), mid.data_ptr<float>(), C, h.data_ptr<float>(), C, ACT_NONE);
      });
    }
    step([&] {
      const int64_t m = carried_rows(prefix, true, r0, n);
      if (m > 0) out.narrow(1, prefix ? 0 : r0, m).copy_(h.narrow(0, 0, m).view({1, m, C}));
    });
  }
  team_error.rethrow();
  return out;
}

// Mobile-Former's token side of one block (its frozen block's `tokens`) in one call: Mobile→Former, the Former, both
// dynamic ReLUs' slope MLPs and Former→Mobile's keys and values; ~25 operators otherwise, each costing tens of µs
// of dispatch on 6 tokens. x the block input (B, C, H, W), contiguous or channels-last; z (B, T, D) contiguous.
// params: HzFormerTokens' weights and biases in its order (26), each weight (K, N) with N padded to a multiple of
// 16 by zero columns, in strips of 16 columns (N / 16 × K × 16), scales folded in; sizes: Mobile→Former's heads, the Former's, the slope MLPs'
// hidden width, their outputs (two) and k|v's outputs; eps: the three LayerNorms'. Returns (z, u1, u2, kv).
// (named apart from the kernel entry point it calls, former_tokens)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> former_tokens_op(
    const at::Tensor& x, const at::Tensor& z, const std::vector<at::Tensor>& params, c10::IntArrayRef sizes,
    c10::ArrayRef<double> eps) {
  check_isa("former_tokens");
  const bool nchw = x.dim() == 4 && x.is_contiguous();
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat
              && (nchw || x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "hybridzoo_native::former_tokens: x must be a float32 map (B, C, H, W), contiguous or channels-last, "
              "got ", x.sizes(), " ", x.scalar_type(), " strides ", x.strides());
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  TORCH_CHECK(z.dim() == 3 && z.size(0) == B && z.scalar_type() == at::kFloat && z.is_contiguous() && z.size(1) > 0
              && z.size(2) % 16 == 0 && z.size(2) > 0,
              "hybridzoo_native::former_tokens: z must be contiguous float32 tokens (", B, ", T, D), D a multiple "
              "of 16, got ", z.sizes(), " ", z.scalar_type());
  TORCH_CHECK(params.size() == 26 && sizes.size() == 6 && eps.size() == 3,
              "hybridzoo_native::former_tokens: expected 26 params, 6 sizes and 3 eps, got ", params.size(), ", ",
              sizes.size(), " and ", eps.size());
  HzFormerTokens p{};
  p.T = z.size(1), p.D = z.size(2), p.C = C, p.P = P;
  p.m2f_heads = sizes[0], p.heads = sizes[1], p.reduced = sizes[2], p.slopes1 = sizes[3], p.slopes2 = sizes[4];
  p.kv = sizes[5];
  p.hidden = params[13].numel();
  const int64_t D = p.D, hidden = p.hidden, r = p.reduced;
  TORCH_CHECK(C > 0 && p.m2f_heads > 0 && C % p.m2f_heads == 0 && p.heads > 0 && D % p.heads == 0 && r > 0
              && hidden % 16 == 0 && hidden > 0 && p.slopes1 > 0 && p.slopes2 > 0 && p.kv > 0,
              "hybridzoo_native::former_tokens: inconsistent sizes: ", C, " channels for ", p.m2f_heads, " heads, ",
              D, " token dims for ", p.heads, " heads, FFN width ", hidden, " (a multiple of 16), sizes ", sizes);
  // (K, N) of each weight, N of each vector (K = 0), in HzFormerTokens' order
  const std::pair<int64_t, int64_t> shapes[26] = {
      {D, hz_pad16(2 * C)}, {0, hz_pad16(2 * C)}, {C, D}, {0, D}, {0, D}, {0, D},
      {D, D}, {0, D}, {D, D}, {0, D}, {0, D}, {0, D},
      {D, hidden}, {0, hidden}, {hidden, D}, {0, D}, {0, D}, {0, D},
      {D, hz_pad16(2 * r)}, {0, hz_pad16(2 * r)}, {r, hz_pad16(p.slopes1)}, {0, hz_pad16(p.slopes1)},
      {r, hz_pad16(p.slopes2)}, {0, hz_pad16(p.slopes2)}, {D, hz_pad16(p.kv)}, {0, hz_pad16(p.kv)}};
  const float* ptr[26];
  for (int i = 0; i < 26; ++i) {
    const int64_t want = std::max<int64_t>(shapes[i].first, 1) * shapes[i].second;
    TORCH_CHECK(params[i].scalar_type() == at::kFloat && params[i].is_contiguous() && params[i].numel() == want,
                "hybridzoo_native::former_tokens: param ", i, " must be contiguous float32 with ", want, " values (",
                shapes[i].first ? "a weight (K, N padded to 16) in strips of 16 columns" : "a vector", "), got ",
                params[i].sizes(), " ", params[i].scalar_type());
    ptr[i] = params[i].data_ptr<float>();
  }
  const float** fields[26] = {&p.qa_w, &p.qa_b, &p.proj_w, &p.proj_b, &p.norm_w, &p.norm_b, &p.q_w, &p.q_b,
                              &p.o_w, &p.o_b, &p.norm1_w, &p.norm1_b, &p.fc1_w, &p.fc1_b, &p.fc2_w, &p.fc2_b,
                              &p.norm2_w, &p.norm2_b, &p.s_w, &p.s_b, &p.s1_w, &p.s1_b, &p.s2_w, &p.s2_b,
                              &p.kv_w, &p.kv_b};
  for (int i = 0; i < 26; ++i) *fields[i] = ptr[i];
  for (int i = 0; i < 3; ++i) p.eps[i] = static_cast<float>(eps[i]);
  at::Tensor zout = at::empty({B, p.T, D}, z.options());
  at::Tensor u1 = at::empty({B, hz_pad16(p.slopes1)}, z.options());
  at::Tensor u2 = at::empty({B, hz_pad16(p.slopes2)}, z.options());
  at::Tensor kv = at::empty({B, p.T, hz_pad16(p.kv)}, z.options());
  const int64_t sc = nchw ? P : 1, sp = nchw ? 1 : C;
  const float* px = x.data_ptr<float>();
  const float* pz = z.data_ptr<float>();
  float* po = zout.data_ptr<float>();
  float* p1 = u1.data_ptr<float>();
  float* p2 = u2.data_ptr<float>();
  float* pkv = kv.data_ptr<float>();
  if (B == 1) {   // one image: the intra-op team shares each step (a few hundred µs of small, memory-bound steps)
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.T));
    std::vector<float> scratch(hz_former_scratch(p, want));
#pragma omp parallel num_threads(want)
    former_tokens(p, px, sc, sp, pz, po, p1, p2, pkv, scratch.data(), omp_get_thread_num(), omp_get_num_threads());
  } else {        // a batch: an image per thread
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(hz_former_scratch(p, 1));
      for (int64_t b = begin; b < end; ++b)
        former_tokens(p, px + b * x.stride(0), sc, sp, pz + b * p.T * D, po + b * p.T * D, p1 + b * u1.size(1),
                      p2 + b * u2.size(1), pkv + b * kv.size(1) * kv.size(2), scratch.data(), 0, 1);
    });
  }
  return {zout, u1.narrow(1, 0, p.slopes1), u2.narrow(1, 0, p.slopes2), kv.narrow(2, 0, p.kv)};
}

bool attention_supported() { return hz_level.load() > 0; }

// the instruction set the kernels run with: "avx512", "avx2" or "none"
std::string isa() {
  const int level = hz_level.load();
  return level == 2 ? "avx512" : level == 1 ? "avx2" : "none";
}

// run the kernels with a narrower instruction set than the CPU's best ("avx2" on an AVX-512 machine, "none"), or
// back with the best ("best"); tests use it to cover the AVX2 kernels on AVX-512 machines
std::string set_isa(const std::string& name) {
  const int best = HZ_HAS_AVX512 ? 2 : HZ_HAS_AVX2 ? 1 : 0;
  const int want = name == "avx512" ? 2 : name == "avx2" ? 1 : name == "none" ? 0 : name == "best" ? best : -1;
  TORCH_CHECK(want >= 0, "hybridzoo_native::set_isa: expected avx512, avx2, none or best, got ", name);
  TORCH_CHECK(want <= best, "hybridzoo_native::set_isa: this CPU cannot run the ", name, " kernels (best: ",
              best == 2 ? "avx512" : best == 1 ? "avx2" : "none", ")");
  hz_level.store(want);
  return isa();
}

// products of fewer rows than `rows` split their panels over the threads (rows_linear); 0: none; returns the
// value before (for tests and interleaved A/B runs)
int64_t set_column_split_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "hybridzoo_native::set_column_split_rows: rows must be 0 or more, got ", rows);
  return column_split_rows.exchange(rows);
}

// Bilinear resizing as F.interpolate(align_corners=False) takes it, for one output row of logits resized inside the
// pass (seg_pass): the output coordinate's source is max(0, (i + ½)·in/out − ½) in float, its floor the first tap,
// the next (or the same, at the last) the second, the fraction the second's weight.
static void bilinear_taps(int64_t in, int64_t out, int64_t* i0, int64_t* i1, float* frac) {
  const float step = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    const float src = std::max(step * (static_cast<float>(i) + 0.5f) - 0.5f, 0.0f);
    const int64_t j = static_cast<int64_t>(src);
    i0[i] = j;
    i1[i] = j + (j < in - 1 ? 1 : 0);
    frac[i] = std::min(std::max(src - static_cast<float>(j), 0.0f), 1.0f);
  }
}

// r[k, j] = (1 − ly)·a[k, j] + ly·c[k, j] (K × w, rows a and c of the input: class stride sk, column stride sw), then
// out[k, x] = (1 − lx[x])·r[k, x0[x]] + lx[x]·r[k, x1[x]] (K × W)
HZ_CLONES static void resize_row(const float* a, const float* c, int64_t sk, int64_t sw, int64_t K, int64_t w,
                                 float ly, const int64_t* x0, const int64_t* x1, const float* lx, int64_t W,
                                 float* __restrict r, float* __restrict out) {
  for (int64_t k = 0; k < K; ++k) {
    const float* ak = a + k * sk;
    const float* ck = c + k * sk;
    float* rk = r + k * w;
    for (int64_t j = 0; j < w; ++j) rk[j] = (1.0f - ly) * ak[j * sw] + ly * ck[j * sw];
    float* ok = out + k * W;
    #pragma omp simd
    for (int64_t x = 0; x < W; ++x) ok[x] = (1.0f - lx[x]) * rk[x0[x]] + lx[x] * rk[x1[x]];
  }
}

// resize_row's transpose: the gradient g (K × W) of an output row back onto rows a and c of the input's gradient
// (K × w each, class stride sk), through r's gradient dr (K × w, overwritten)
HZ_CLONES static void resize_row_back(const float* __restrict g, int64_t K, int64_t W, const int64_t* x0,
                                      const int64_t* x1, const float* lx, int64_t w, float ly, float* __restrict dr,
                                      float* da, float* dc, int64_t sk) {
  for (int64_t k = 0; k < K; ++k) {
    float* drk = dr + k * w;
    std::fill(drk, drk + w, 0.0f);
    const float* gk = g + k * W;
    for (int64_t x = 0; x < W; ++x) {
      drk[x0[x]] += (1.0f - lx[x]) * gk[x];
      drk[x1[x]] += lx[x] * gk[x];
    }
    float* dak = da + k * sk;
    float* dck = dc + k * sk;
    for (int64_t j = 0; j < w; ++j) dak[j] += (1.0f - ly) * drk[j];
    for (int64_t j = 0; j < w; ++j) dck[j] += ly * drk[j];
  }
}

// One pass of seg_pixels over logits (B, K, h, w) float32 and labels (B, H, W) int64, both with any strides (a
// slice of a padded batch, channels-last logits), the rows (b, y) of the labels shared among the intra-op threads,
// each adding to sums of its own (added up at the end). Logits of another size than the labels are resized to them
// on the way, a row at a time (bilinear, as F.interpolate(align_corners=False)), never whole. Returns loss (B, 3)
// float64: per image the summed cross-entropy of the pixels labelled in [0, K), their number, and the number of
// labels neither `ignore` nor in [0, K); and with `counts` (B, 3, K) int64 filled (the class map of the resized
// logits where they are resized), with `grad` the gradient as seg_pixels says, made here: in the logits' layout
// (empty_like), contiguous where they are resized.
static at::Tensor seg_pass(const char* op, const at::Tensor& logits, const at::Tensor& labels, int64_t ignore,
                           double scale, at::Tensor* counts, at::Tensor* grad) {
  check_isa(op);
  TORCH_CHECK(logits.dim() == 4 && logits.scalar_type() == at::kFloat && logits.size(1) > 0 && logits.size(2) > 0
              && logits.size(3) > 0, "hybridzoo_native::", op, ": logits must be float32 (B, K, H, W) with K, H, "
              "W >= 1, got ", logits.sizes(), " ", logits.scalar_type());
  const int64_t B = logits.size(0), K = logits.size(1), h = logits.size(2), w = logits.size(3);
  TORCH_CHECK(labels.dim() == 3 && labels.scalar_type() == at::kLong && labels.size(0) == B,
              "hybridzoo_native::", op, ": labels must be int64 (", B, ", H, W), the logits' batch, got ",
              labels.sizes(), " ", labels.scalar_type());
  const int64_t H = labels.size(1), W = labels.size(2);
  const bool resized = H != h || W != w;
  if (grad) *grad = resized ? at::empty(logits.sizes(), logits.options()) : at::empty_like(logits);
  const int64_t slots = 3 * K + 2;   // per image and thread: the counts, then labelled and bad
  const int64_t teams = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> sums(teams * B * slots, 0);
  std::vector<double> ce(teams * B, 0.0);
  const float* px = logits.data_ptr<float>();
  const int64_t* pt = labels.data_ptr<int64_t>();
  float* pg = grad ? grad->data_ptr<float>() : nullptr;
  const int64_t lb = logits.stride(0), lk = logits.stride(1), lh = logits.stride(2), lw = logits.stride(3);
  const int64_t tb = labels.stride(0), th = labels.stride(1), tw = labels.stride(2);
  const int64_t gb = grad ? grad->stride(0) : 0, gk = grad ? grad->stride(1) : 0, gh = grad ? grad->stride(2) : 0,
                gw = grad ? grad->stride(3) : 0;
  const float fscale = static_cast<float>(scale);
  // resized: the taps of every output column and row, and per thread a gradient of the logits of its own
  std::vector<int64_t> x0(resized ? W : 0), x1(resized ? W : 0), y0(resized ? H : 0), y1(resized ? H : 0);
  std::vector<float> lx(resized ? W : 0), ly(resized ? H : 0);
  if (resized) {
    bilinear_taps(w, W, x0.data(), x1.data(), lx.data());
    bilinear_taps(h, H, y0.data(), y1.data(), ly.data());
  }
  const int64_t plane = K * h * w;
  std::vector<float> own(resized && grad ? teams * B * plane : 0, 0.0f);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t team = std::min<int64_t>(at::get_thread_num(), teams - 1);
    std::vector<float> scratch(48 * K);
    // resized: the input rows' blend r (K × w), the output row e (K × W) and its gradient ge (K × W)
    std::vector<float> r(resized ? K * w : 0), e(resized ? K * W : 0), ge(resized && grad ? K * W : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      int64_t* c = sums.data() + (team * B + b) * slots;
      double* loss = ce.data() + team * B + b;
      const int64_t* t = pt + b * tb + y * th;
      if (!resized) {
        seg_pixels(px + b * lb + y * lh, lw, lk, K, t, tw, W, ignore, fscale, pg ? pg + b * gb + y * gh : nullptr,
                   gw, gk, scratch.data(), counts ? c : nullptr, loss, c + 3 * K, c + 3 * K + 1);
        continue;
      }
      resize_row(px + b * lb + y0[y] * lh, px + b * lb + y1[y] * lh, lk, lw, K, w, ly[y], x0.data(), x1.data(),
                 lx.data(), W, r.data(), e.data());
      seg_pixels(e.data(), 1, W, K, t, tw, W, ignore, fscale, grad ? ge.data() : nullptr, 1, W, scratch.data(),
                 counts ? c : nullptr, loss, c + 3 * K, c + 3 * K + 1);
      if (grad) {
        float* d = own.data() + (team * B + b) * plane;
        resize_row_back(ge.data(), K, W, x0.data(), x1.data(), lx.data(), w, ly[y], r.data(), d + y0[y] * w,
                        d + y1[y] * w, h * w);
      }
    }
  });
  if (resized && grad) {   // the threads' gradients added up (each saw its own rows)
    for (int64_t team = 0; team < teams; ++team) {
      const float* d = own.data() + team * B * plane;
      for (int64_t i = 0; i < B * plane; ++i) pg[i] = team ? pg[i] + d[i] : d[i];
    }
  }
  at::Tensor loss = at::zeros({B, 3}, labels.options().dtype(at::kDouble));
  double* ol = loss.data_ptr<double>();
  if (counts) *counts = at::zeros({B, 3, K}, labels.options());
  int64_t* oc = counts ? counts->data_ptr<int64_t>() : nullptr;
  for (int64_t team = 0; team < teams; ++team) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* c = sums.data() + (team * B + b) * slots;
      if (oc) for (int64_t j = 0; j < 3 * K; ++j) oc[b * 3 * K + j] += c[j];
      ol[3 * b] += ce[team * B + b];
      ol[3 * b + 1] += static_cast<double>(c[3 * K]);
      ol[3 * b + 2] += static_cast<double>(c[3 * K + 1]);
    }
  }
  return loss;
}

// Segmentation evaluation in one pass over the logits (`tasks.segmentation.pixel_stats`): counts (B, 3, K) int64, per
// class the intersection, predicted area and label area of `intersect_and_union` over the labelled pixels, and loss
// (B, 3) float64 (seg_pass); logits of another size than the labels resized to them on the way.
std::tuple<at::Tensor, at::Tensor> seg_eval_stats(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore) {
  at::Tensor counts;
  at::Tensor loss = seg_pass("seg_eval_stats", logits, labels, ignore, 0.0, &counts, nullptr);
  return {counts, loss};
}

// Training's pixel cross-entropy in one pass (`tasks.segmentation.cross_entropy` on the CPU): loss (B, 3) float64
// (seg_pass) and, with `grad`, the gradient of scale · Σ CE with respect to the logits: in their layout (empty_like)
// scale · (softmax − one-hot) at the labelled pixels, 0 elsewhere; where they are resized to the labels on the way,
// that gradient taken back through the resizing (contiguous); else an empty tensor.
std::tuple<at::Tensor, at::Tensor> seg_cross_entropy(const at::Tensor& logits, const at::Tensor& labels,
                                                     int64_t ignore, double scale, bool grad) {
  at::Tensor g = at::empty({0}, logits.options());
  at::Tensor loss = seg_pass("seg_cross_entropy", logits, labels, ignore, scale, nullptr, grad ? &g : nullptr);
  return {loss, g};
}

TORCH_LIBRARY(hybridzoo_native, m) {
  m.def("dyrelu_(Tensor(a!) x, Tensor s1, Tensor s2) -> Tensor(a!)");
  m.def("dyrelu(Tensor x, Tensor s1, Tensor s2) -> Tensor");
  m.def("dyrelu_backward(Tensor x, Tensor grad, Tensor s1, Tensor s2) -> (Tensor, Tensor, Tensor)");
  m.def("channel_dot(Tensor a, Tensor b) -> Tensor");
  m.def("tiny_linear(Tensor x, Tensor wt, Tensor b) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? pos, float scale, Tensor? bias=None) -> Tensor");
  m.def("attention_lse(Tensor q, Tensor k, Tensor v, float scale, Tensor? bias=None) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("attention_backward_(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor? bias=None, Tensor(d!)? dbias=None) -> ()");
  m.def("attention_supported() -> bool", &attention_supported);
  m.def("isa() -> str", &isa);
  m.def("set_isa(str name) -> str", &set_isa);
  m.def("set_column_split_rows(int rows) -> int", &set_column_split_rows);
  m.def("gelu(Tensor x, Tensor? grad=None, bool quick=False) -> Tensor");
  m.def("weight_grad(Tensor g, Tensor x) -> Tensor");
  m.def("pack_panels(Tensor w) -> Tensor");
  m.def("scale_panels(Tensor panels, Tensor s) -> Tensor");
  m.def("rows_linear(Tensor x, Tensor panels, Tensor? bias, str act, str algorithm, Tensor? residual=None) -> Tensor");
  m.def("rows_linear_add_(Tensor(a!) residual, Tensor x, Tensor panels, Tensor? bias, str act, str algorithm) "
        "-> Tensor(a!)");
  m.def("patch_embed(Tensor x, Tensor panels, Tensor? bias, int ph, int pw) -> Tensor");
  m.def("gather_conv(Tensor x, Tensor panels, Tensor? bias, int[] kernel, int[] stride, int[] padding, "
        "bool channels_last, str act, str algorithm) -> Tensor");
  m.def("winograd3x3(Tensor x, Tensor u, Tensor? bias, str act, str algorithm) -> Tensor");
  m.def("winograd_weight_grad(Tensor x, Tensor dy, int tile) -> Tensor");
  m.def("depthwise3x3(Tensor x, Tensor w9, Tensor? bias, int stride, str act, str algorithm, int multiplier=1) "
        "-> Tensor");
  m.def("depthwise3x3_pooled(Tensor x, Tensor w9, Tensor? bias, int stride, str act, str algorithm, "
        "int multiplier=1) -> (Tensor, Tensor)");
  m.def("token_blocks(Tensor x, Tensor?[] params, int[] heads, float[] scales, float[] eps, str[] acts, "
        "str[] algorithms, Tensor?[] pos, Tensor?[] bias, int prefix=0) -> Tensor");
  m.def("conv_token_blocks(Tensor x, Tensor?[] params, int[] size, int cls, int[] strides, int[] heads, "
        "float[] scales, float[] eps, str[] acts, str[] algorithms, int prefix=0) -> Tensor");
  m.def("former_tokens(Tensor x, Tensor z, Tensor[] params, int[] sizes, float[] eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("seg_eval_stats(Tensor logits, Tensor labels, int ignore) -> (Tensor, Tensor)");
  m.def("seg_cross_entropy(Tensor logits, Tensor labels, int ignore, float scale, bool grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hybridzoo_native, CPU, m) {
  m.impl("dyrelu_", &dyrelu_);
  m.impl("dyrelu", &dyrelu);
  m.impl("dyrelu_backward", &dyrelu_backward);
  m.impl("channel_dot", &channel_dot);
  m.impl("tiny_linear", &tiny_linear);
  m.impl("attention", &attention);
  m.impl("attention_lse", &attention_lse);
  m.impl("attention_backward", &attention_backward);
  m.impl("attention_backward_", &attention_backward_);
  m.impl("gelu", &gelu);
  m.impl("weight_grad", &weight_grad_op);
  m.impl("pack_panels", &pack_panels);
  m.impl("scale_panels", &scale_panels);
  m.impl("rows_linear", &rows_linear);
  m.impl("rows_linear_add_", &rows_linear_add_);
  m.impl("patch_embed", &patch_embed);
  m.impl("gather_conv", &gather_conv);
  m.impl("depthwise3x3", &depthwise3x3);
  m.impl("depthwise3x3_pooled", &depthwise3x3_pooled);
  m.impl("winograd3x3", &winograd3x3);
  m.impl("winograd_weight_grad", &winograd_weight_grad);
  m.impl("token_blocks", &token_blocks);
  m.impl("conv_token_blocks", &conv_token_blocks);
  m.impl("former_tokens", &former_tokens_op);
  m.impl("seg_eval_stats", &seg_eval_stats);
  m.impl("seg_cross_entropy", &seg_cross_entropy);
}
"""


# The kernels' entry points, which the operators call in the namespace of the instruction set in use: (template
# parameter, its values, name, parameter list). The list is written once, here: every unit gets it as a macro,
# HZ_ARGS_<name>, for the kernel's definition; each set's unit instantiates the templates; the operators' unit
# declares them and dispatches to the set in use.
_ENTRIES = (
    ("int DV", (1, 2, 3, 4), "attend_head",
     "const float* q, int64_t sq, const float* k, int64_t sk, const float* v, int64_t sv, const float* pos, "
     "int64_t sp, const float* bias, int64_t sb, float* o, int64_t so, int64_t i0, int64_t i1, int64_t N, "
     "float scale, float* kt, float* s, float* lse"),
    ("int DV", (1, 2, 3, 4), "attend_head_back",
     "const float* q, int64_t sq, const float* k, int64_t sk, const float* v, int64_t sv, const float* o, "
     "const float* dout, int64_t so, const float* lse, float* dq, int64_t sdq, float* dk, int64_t sdk, float* dv, "
     "int64_t sdv, int64_t n, int64_t N, float scale, float* scratch, const float* bias, int64_t sb, float* dbias, "
     "int64_t sdb"),
    (None, (), "panel_linear",
     "const float* a, int64_t lda, int64_t M, const float* panels, int64_t K, int64_t N, const float* bias, "
     "const float* res, int64_t ldr, float* c, int64_t ldc, int act"),
    (None, (), "gelu_values", "const float* x, const float* g, float* y, int64_t n, bool quick"),
    (None, (), "weight_grad",
     "const float* g, int64_t ldg, int64_t O, const float* x, int64_t ldx, int64_t T, float* c, int64_t ldc, "
     "int64_t i0, int64_t i1"),
    (None, (), "winograd_tiles",
     "const float* x, int64_t H, int64_t W, int64_t Cin, const float* u, int64_t Cout, const float* bias, int act, "
     "int64_t tile, int64_t t0, int64_t t1, float* scratch, float* y"),
    (None, (), "winograd_grad_tiles",
     "const float* x, const float* dy, int64_t H, int64_t W, int64_t Cin, int64_t Cout, int64_t tile, int64_t t0, "
     "int64_t t1, float* scratch, float* m"),
    (None, (), "layer_norm_rows",
     "const float* x, int64_t n, int64_t C, const float* w, const float* b, double eps, float* y"),
    ("int ACT", ("ACT_NONE", "ACT_GELU", "ACT_GELU_TANH", "ACT_RELU", "ACT_SWISH"), "depthwise_row",
     "const float* x, int64_t H, int64_t W, int64_t Cin, int64_t C, const float* w9, const float* bias, "
     "int64_t stride, int64_t ho, int64_t Wo, float* y, float* sum"),
    (None, (), "depthwise_pixels",
     "const float* x, int64_t H, int64_t W, int64_t C, const float* w9, const float* bias, int64_t stride, "
     "int64_t p0, int64_t p1, float* y"),
    ("int MR", (6, 2, 1), "tiny_rows",
     "const float* x, int64_t K, const float* wt, int64_t N, const float* b, float* y"),
    (None, (), "former_tokens",
     "const HzFormerTokens& p, const float* x, int64_t sc, int64_t sp, const float* z, float* zout, float* u1, "
     "float* u2, float* kv, float* scratch, int64_t part, int64_t parts"),
    (None, (), "seg_pixels",
     "const float* x, int64_t sp, int64_t sk, int64_t K, const int64_t* t, int64_t st, int64_t n, int64_t ignore, "
     "float scale, float* g, int64_t gp, int64_t gk, float* scratch, int64_t* counts, double* ce, int64_t* labelled, "
     "int64_t* bad"),
)


def _argument_macros() -> str:
    return "".join(f"#define HZ_ARGS_{name} {args}\n" for _, _, name, args in _ENTRIES)


def _instances() -> str:
    """Explicit instantiations of the templated entry points (in the namespace of one instruction set)."""
    return "".join(f"template void {name}<{v}>(HZ_ARGS_{name});\n"
                   for param, values, name, _ in _ENTRIES for v in values)


def _declarations(namespace: str) -> str:
    lines = [(f"template <{param}> " if param else "") + f"void {name}(HZ_ARGS_{name});"
             for param, _, name, _ in _ENTRIES]
    return f"namespace {namespace} {{\n" + "\n".join(lines) + f"\n}}  // namespace {namespace}\n"


def _dispatchers() -> str:
    """Each entry point in the global namespace, calling the kernels of the instruction set in use (hz_level)."""
    out = "// ---- the kernels with the instruction set in use (hz_level) " + "-" * 52 + "\n"
    for param, _, name, args in _ENTRIES:
        names = ", ".join(a.split()[-1] for a in args.split(", "))
        call = f"{name}<{param.split()[1]}>({names})" if param else f"{name}({names})"
        out += ((f"template <{param}>\n" if param else "") + f"static void {name}(HZ_ARGS_{name}) {{\n"
                f"  if (hz_wide())\n    wide::{call};\n  else\n    narrow::{call};\n}}\n\n")
    return out


def _isa_unit(target: str, namespace: str, vectors: str, what: str) -> str:
    """The kernels compiled for `target` (GCC's target pragma, x86-64 only) in namespace `namespace`: a translation
    unit of its own, without PyTorch's headers, so that the units compile in parallel."""
    return (f"// ---- the kernels for {what} {'-' * (100 - len(what))}\n{_COMMON}{_argument_macros()}"
            f'#if HZ_X86\n#pragma GCC push_options\n#pragma GCC target("{target}")\n#endif\n'
            f"namespace {namespace} {{\n{vectors}{_KERNELS}{_instances()}}}  // namespace {namespace}\n"
            "#if HZ_X86\n#pragma GCC pop_options\n#endif\n")


# file name → source: three units that ninja compiles in parallel (one alone took ~45 s on a Zen 3 core)
_SOURCES = {
    "kernels_avx512.cpp": _isa_unit("avx512f", "wide", _WIDE, "AVX-512"),
    "kernels_avx2.cpp": _isa_unit("avx2,fma", "narrow", _NARROW, "AVX2 with FMA"),
    "ops.cpp": (_TORCH_PRELUDE + _COMMON + _argument_macros() + _OPS_PRELUDE + _declarations("wide")
                + _declarations("narrow") + _dispatchers() + _OPS),
}

_FLAGS = ["-O3", "-fopenmp"]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}   # "ops": the loaded namespace, or "error": why there is none


def _enabled() -> bool:
    return os.environ.get("HYBRIDZOO_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _tag() -> str:
    text = "".join(f"{name}\n{source}" for name, source in sorted(_SOURCES.items()))
    h = hashlib.sha256((text + " ".join(_FLAGS)).encode()).hexdigest()[:12]
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
    from torch.utils.cpp_extension import is_ninja_available
    from torch.utils.cpp_extension import load as load_sources

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set CXX)")
    if not is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(folder)
    print(f"hybridzoo: compiling native CPU kernels once (about 30 s on two cores) into {folder}; HYBRIDZOO_NATIVE=0 skips "
          "them", file=sys.stderr, flush=True)
    paths = []
    for name, source in _SOURCES.items():
        path = folder / name
        # a concurrent build (torchrun's other ranks) writes the same text; replaced whole, never half-written, and
        # left alone when it is already there (ninja rebuilds what is newer than its object)
        if not path.is_file() or path.read_text() != source:
            tmp = folder / f"{name}.{os.getpid()}.tmp"
            tmp.write_text(source)
            os.replace(tmp, path)
        paths.append(str(path))
    load_sources(NAMESPACE, sources=paths, extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
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
            warnings.warn(f"hybridzoo's native CPU kernels are unavailable ({_STATE['error']}); the CPU "
                          "inference and training paths keep their ATen code (same outputs, somewhat slower). "
                          "HYBRIDZOO_NATIVE=0 silences this.", RuntimeWarning, stacklevel=2)
            return False
    return True


def available() -> bool:
    """True when the kernels are loaded in this process (after `load`)."""
    return "ops" in _STATE and _enabled()


def channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C): the sum over each channel's pixels of a · b, for two (B, C, H, W) float32 maps of one layout
    (contiguous or channels-last) - `(a * b).sum((2, 3))` in one read of each, without the product's pass."""
    return _STATE["ops"].channel_dot(a, b)


def tiny_linear(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x·wt + b for a product of a few rows, on the calling thread; wt is the transposed weight (K, N), N a
    multiple of 16, x contiguous (..., K)."""
    return _STATE["ops"].tiny_linear(x, wt, b)


def dyrelu_(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """x ← max(s1·x, s2·x) in place, x a float32 map (B, C, H, W), contiguous or channels-last, s1 and s2
    contiguous (B, C)."""
    return _STATE["ops"].dyrelu_(x, s1, s2)


def dyrelu(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """max(s1·x, s2·x) as a new map in x's layout (the training forward); arguments as `dyrelu_`."""
    return _STATE["ops"].dyrelu(x, s1, s2)


def dyrelu_backward(x: torch.Tensor, grad: torch.Tensor, s1: torch.Tensor,
                    s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, ds1, ds2) of max(s1·x, s2·x) given its gradient `grad` (x's shape and strides), in one pass over the
    map: the larger branch takes the gradient, each half of it where the two are equal, as autograd's
    `torch.maximum`."""
    return _STATE["ops"].dyrelu_backward(x, grad, s1, s2)


def attention_supported() -> bool:
    """True when the kernels are loaded and the CPU can run the attention, product, depthwise and token-block
    kernels (AVX-512, or AVX2 with FMA)."""
    if not available():
        return False
    if "attention" not in _STATE:
        _STATE["attention"] = bool(_STATE["ops"].attention_supported())
    return _STATE["attention"]


def isa() -> str:
    """The instruction set those kernels run with: "avx512", "avx2" or "none" ("none" also when not loaded)."""
    return str(_STATE["ops"].isa()) if available() else "none"


def set_isa(name: str) -> str:
    """Run those kernels with `name` ("avx512", "avx2", "none") instead of the CPU's best, or with the best again
    ("best"); for tests and benchmarks (the AVX2 kernels on an AVX-512 machine). Returns the one now in use.
    Layers prepared before keep the weights they packed; they call the kernels with the new set. Raises where the
    CPU lacks `name` or the kernels are not loaded."""
    if not load():
        raise RuntimeError("hybridzoo's native kernels are not loaded (HYBRIDZOO_NATIVE=0, or the build failed)")
    now = str(_STATE["ops"].set_isa(name))
    _STATE["attention"] = now != "none"
    return now


def set_column_split_rows(rows: int) -> int:
    """`rows_linear` on several threads splits a product of fewer than `rows` rows (64 by default; 0: none) by
    its weight's panels instead of its rows, when there are as many panels per thread or at least two: each thread
    then streams its share of the weight, not all of it. Returns the value before; for tests and interleaved A/B benchmarks."""
    if not load():
        raise RuntimeError("hybridzoo's native kernels are not loaded (HYBRIDZOO_NATIVE=0, or the build failed)")
    return int(_STATE["ops"].set_column_split_rows(rows))


def gelu(x: torch.Tensor, grad: torch.Tensor | None = None, quick: bool = False) -> torch.Tensor:
    """Exact GELU of a contiguous float32 x, or with `grad` (x's shape, contiguous) its gradient grad·GELU'(x); a new
    tensor, the values in chunks over the intra-op threads. erf by a rational function (absolute error below 5e-7).
    `quick`: QuickGELU x·σ(1.702x) instead (CvT's activation), σ through a degree-6 e^x (about 2 ulp)."""
    return _STATE["ops"].gelu(x, grad, quick)


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gᵀ·x, a product's weight gradient dW (O, I), for contiguous float32 g (..., O) and x (..., I) of one leading
    shape, I a multiple of 16; both read as they lie (no transposed copy), x's columns in panels of 64 over the
    intra-op threads."""
    return _STATE["ops"].weight_grad(g, x)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """A product's weight (N, K), N a multiple of 16, packed for `token_blocks`: panels of 64 output columns (the
    last narrower), each K × 64 contiguous, flat: K rows of the panel's width, or from K = 256 on strips of 16 columns
    each K × 16."""
    return _STATE["ops"].pack_panels(w)


def scale_panels(panels: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The panels of W·diag(s) from W's (N, K), packed by `pack_panels`; s (K,) float32: the product of x·diag(s)."""
    return _STATE["ops"].scale_panels(panels, s)


def rows_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, act: str = "none",
                algorithm: str = "", residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(x·Wᵀ + b [+ residual]) for float32 x (..., K), W (N, K) packed by `pack_panels`, the rows in blocks over
    the intra-op threads; act as `OneDNNLinear.act` ("none", "gelu" with algorithm "none" or "tanh", "relu",
    "swish"), applied after the residual (contiguous, the output's shape) as oneDNN's sum post-op does."""
    return _STATE["ops"].rows_linear(x, panels, bias, act, algorithm, residual)


def rows_linear_add_(residual: torch.Tensor, x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None,
                     act: str = "none", algorithm: str = "") -> torch.Tensor:
    """`rows_linear` with its residual, written into the residual's own storage (returned): for a caller that owns
    that buffer (a shortcut's fresh output), no new output buffer."""
    return _STATE["ops"].rows_linear_add_(residual, x, panels, bias, act, algorithm)


def depthwise3x3(x: torch.Tensor, w9: torch.Tensor, bias: torch.Tensor | None, stride: int, act: str = "none",
                 algorithm: str = "", multiplier: int = 1) -> torch.Tensor:
    """act(depthwise 3×3 convolution, padding 1, stride 1 or 2, + bias) of a channels-last float32 map x (B, C, H, W),
    C a multiple of 16; w9 (9, m·C): output channel o's weight (o, 0, kh, kw) at row kh·3 + kw; the output
    channels-last. With a channel multiplier m the m·C outputs come in m groups of C, output j·C + g reading input
    channel g (the grouped convolution's output g·m + j: `models.mobile_former._MultiplierDepthwise`'s order)."""
    return _STATE["ops"].depthwise3x3(x, w9, bias, stride, act, algorithm, multiplier)


def depthwise3x3_pooled(x: torch.Tensor, w9: torch.Tensor, bias: torch.Tensor | None, stride: int, act: str = "none",
                        algorithm: str = "", multiplier: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`depthwise3x3`'s output y and each image's channel means of y (B, C), summed as y is stored (a
    squeeze-excitation's pooling without a second pass over y)."""
    return _STATE["ops"].depthwise3x3_pooled(x, w9, bias, stride, act, algorithm, multiplier)


# Winograd's weight transforms G·g·Gᵀ: F(2×2, 3×3) and F(4×4, 3×3)
_WINOGRAD_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
}


def _winograd_kron(tile: int, dtype: torch.dtype) -> torch.Tensor:
    """G⊗G ((tile + 2)², 9): [a·D + b, k·3 + l] = G[a, k]·G[b, l], the 3×3 taps to the transform's positions."""
    g = torch.tensor(_WINOGRAD_G[tile], dtype=dtype)
    return torch.kron(g, g)


def winograd_weight(w: torch.Tensor, tile: int = 2, transposed: bool = False, exact: bool = True) -> torch.Tensor:
    """A 3×3 convolution's weight (Cout, Cin, 3, 3), Cout a multiple of 16, as `winograd3x3` takes it for output tiles
    of `tile`×`tile` (2 or 4): the (tile + 2)² matrices (Cout, Cin) of G·g·Gᵀ, each packed by `pack_panels`, stacked
    ((tile + 2)², Cout, Cin). `transposed`: the weight of the input gradient's convolution, w with its two channel
    axes swapped and its taps flipped (a 3×3 stride-1 padding-1 convolution's dx is that convolution of dy; Cin a
    multiple of 16). `exact`: computed in float64 (the inference copy, once); else in float32 (training, at each
    call). One product of G⊗G with the taps ordered input channel first, so that each matrix comes out as the rows
    of Wᵀ that `pack_panels` copies as they lie (1.2-3x packing it by columns)."""
    out = 1 if transposed else 0
    if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3) or w.shape[out] % 16 or not w.is_floating_point():
        raise ValueError(f"winograd_weight: w must be a floating-point (Cout, Cin, 3, 3) weight with "
                         f"{'Cin' if transposed else 'Cout'} a multiple of 16, got {tuple(w.shape)} {w.dtype}")
    if tile not in _WINOGRAD_G:
        raise ValueError(f"winograd_weight: tile must be 2 or 4, got {tile!r}")
    kron = _winograd_kron(tile, torch.float64 if exact else torch.float32)
    if transposed:
        w, kron = w.transpose(0, 1), kron.flip(1)   # tap (k, l) of the flipped kernel is (2 − k, 2 − l)
    cout, cin, d2 = w.shape[0], w.shape[1], kron.shape[0]
    taps = w.detach().to("cpu", kron.dtype).permute(1, 0, 2, 3).reshape(cin * cout, 9)   # rows (input, output)
    u = torch.mm(kron, taps.t()).view(d2, cin, cout).float()   # each position's Wᵀ, (Cin, Cout)
    return torch.stack([pack_panels(u[e].t()) for e in range(d2)]).view(d2, cout, cin)


def winograd3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, act: str = "none",
                algorithm: str = "") -> torch.Tensor:
    """act(3×3 convolution, stride 1, padding 1, + bias) of a channels-last float32 map x (B, Cin, H, W), Cin a
    multiple of 16, by Winograd's F(2×2, 3×3) or F(4×4, 3×3) (u's tile: 16 or 36 positions from `winograd_weight`):
    2.25x or 4x fewer multiplies than the direct convolution; act as `rows_linear`'s; the output channels-last."""
    return _STATE["ops"].winograd3x3(x, u, bias, act, algorithm)


def winograd_weight_grad(x: torch.Tensor, dy: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """The weight gradient (Cout, Cin, 3, 3) of a 3×3 stride-1 padding-1 convolution of the channels-last float32 map
    x (B, Cin, H, W) whose output's gradient is dy (B, Cout, H, W), channels-last, both channel counts multiples of
    16, by Winograd's F(T×T, 3×3) tiles (`tile` 2 or 4): per position e of the transform one product over the tiles
    of the transformed dy and x, then Gᵀ·M·G (float32; 2.25x fewer multiplies than the direct gradient for 2×2
    tiles, 4x for 4×4)."""
    m = _STATE["ops"].winograd_weight_grad(x, dy, tile)   # ((T+2)², Cout, Cin)
    return torch.mm(_winograd_kron(tile, torch.float32).t(), m.view(m.shape[0], -1)).view(3, 3, m.shape[1], m.shape[2]).permute(2, 3, 0, 1)


def patch_embed(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, ph: int, pw: int) -> torch.Tensor:
    """A convolution with kernel = stride = (ph, pw), no padding, over x (B, C, H, W) float32: its weight (N, C, ph,
    pw) flattened to (N, C·ph·pw) and packed by `pack_panels`; the output tokens first, (B, H//ph · W//pw, N)."""
    return _STATE["ops"].patch_embed(x, panels, bias, ph, pw)


def gather_weight(w: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A convolution's weight (N, C, kh, kw), N a multiple of 16, packed for `gather_conv` over an NCHW map (flattened
    as it lies) or a channels-last one (permuted to (N, kh, kw, C) first)."""
    if w.dim() != 4 or w.shape[0] % 16 or not w.is_floating_point():
        raise ValueError(f"gather_weight: w must be a floating-point (N, C, kh, kw) weight with N a multiple of 16, "
                         f"got {tuple(w.shape)} {w.dtype}")
    w = w.detach().float()
    return pack_panels((w.permute(0, 2, 3, 1) if channels_last else w).reshape(w.shape[0], -1).contiguous())


def gather_conv(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, kernel: tuple[int, int],
                stride: tuple[int, int], padding: tuple[int, int], channels_last: bool, act: str = "none",
                algorithm: str = "") -> torch.Tensor:
    """act(convolution of x (B, C, H, W) float32 + bias), zero padding, no dilation or groups, as a product of the
    patches under the kernel gathered a block of output pixels at a time; panels from `gather_weight` for the same
    `channels_last` (the layout the patches are read in: x is copied to it if it is not); act as `rows_linear`'s; the
    output (B, N, Ho, Wo) channels-last."""
    return _STATE["ops"].gather_conv(x, panels, bias, list(kernel), list(stride), list(padding), channels_last, act,
                                     algorithm)


def token_blocks(x: torch.Tensor, params: list, heads: list[int], scales: list[float], eps: list[float],
                 acts: list[str], algorithms: list[str], pos: list, prefix: int = 0,
                 bias: list | None = None) -> torch.Tensor:
    """Pre-norm transformer blocks (LayerNorm → qkv → attention → proj, + x; LayerNorm → fc1 with its post-op →
    fc2, + x) on one image's tokens x (1, N, C), contiguous float32, every thread of the intra-op team taking a
    share of the rows, the threads meeting once per block (`layers.onednn_tokens`). params: per block norm1's
    weight and bias, the qkv weight (`pack_panels`) and its bias, proj's, norm2's, fc1's and fc2's (biases may be
    None; every vector and every weight's output count a multiple of 16); heads, scales, acts and algorithms one
    per block (fc1's activation: "none", "gelu" with algorithm "none" (erf) or "tanh", "relu", "swish"), eps two
    per block; pos per block a positional map (heads, N, N) added after the softmax, or None. prefix > 0: the last
    block computes its first `prefix` rows alone past the keys and values (the class / distillation tokens), and
    those rows are the result, (1, prefix, C), as a block called with num_queries=prefix; 0: every row. bias: per
    block a relative-position bias (1, heads, N, N) added to the scores before the softmax (CoAtNet's), or None;
    None for every block when not given."""
    bias = [None] * len(heads) if bias is None else bias
    return _STATE["ops"].token_blocks(x, params, heads, scales, eps, acts, algorithms, pos, bias, prefix)


def conv_token_blocks(x: torch.Tensor, params: list, size: tuple[int, int], cls: int, strides: tuple[int, int],
                      heads: list[int], scales: list[float], eps: list[float], acts: list[str],
                      algorithms: list[str], prefix: int = 0) -> torch.Tensor:
    """CvT's blocks (`models.cvt.CvTBlock`, frozen) on one image's tokens x (1, cls + H·W, C), contiguous float32,
    every thread of the intra-op team taking a share of the rows, meeting twice per block (`layers.onednn_tokens`).
    size: the token map's (H, W); cls: 1 when a cls token leads the rows, else 0; strides: the q projection's (1) and
    the k / v projections'. params per block: norm1's weight and bias; the q, k and v depthwise 3×3 taps (9, C)
    (`OneDNNConv2d.depthwise_taps`, BatchNorm folded) and biases; the q, k, v and output products' weights
    (`pack_panels`) and biases; norm2's; fc1's and fc2's (biases may be None; every length a multiple of 16). heads,
    scales, acts and algorithms one per block (fc1's activation, as `token_blocks`), eps two per block. prefix 1
    (with a cls token): the last block computes the cls token's row alone past its keys and values and the result is
    that row (1, 1, C), as `CvTBlock(..., num_queries=1)`; 0: every row, (1, N, C)."""
    return _STATE["ops"].conv_token_blocks(x, params, list(size), cls, list(strides), heads, scales, eps, acts,
                                           algorithms, prefix)


def seg_eval_stats(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation evaluation in one pass over float32 logits (B, K, h, w) and int64 labels (B, H, W), any strides
    (channels-last logits, a slice of a padded batch; logits of another size resized to the labels on the way,
    bilinear as F.interpolate(align_corners=False)): counts (B, 3, K) int64, per class the intersection, predicted
    area and label area of `intersect_and_union` over the pixels labelled in [0, K) (the class map as `class_map`
    takes it), and loss (B, 3) float64, the summed cross-entropy of those pixels (`F.cross_entropy`'s, NaN where a
    pixel's logits hold a NaN or +inf), their number, and the number of labels neither `ignore_index` nor in
    [0, K). About 3x fewer passes over the logits than cross-entropy, class map and counts apart."""
    return _STATE["ops"].seg_eval_stats(logits, labels, ignore_index)


def seg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: float = 1.0,
                      grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's pixel cross-entropy in one pass over float32 logits (B, K, H, W) and int64 labels (B, H, W), any
    strides: loss (B, 3) float64, per image the summed cross-entropy of the pixels labelled in [0, K), their number
    and the number of labels neither `ignore_index` nor in [0, K); and with `grad` the gradient of scale · that sum
    with respect to the logits, in their layout: scale · (softmax − one-hot) at the labelled pixels, 0 at the others
    (else an empty tensor)."""
    return _STATE["ops"].seg_cross_entropy(logits, labels, ignore_index, scale, grad)


def former_tokens(x: torch.Tensor, z: torch.Tensor, params: list[torch.Tensor], sizes: list[int],
                  eps: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mobile-Former's token side of one block in one call, on the calling thread (one image per thread for a
    batch): returns (z after Mobile→Former and the Former, the two dynamic ReLUs' slope MLP outputs, Former→Mobile's
    k|v). x (B, C, H, W) float32, contiguous or channels-last; z (B, T, D) contiguous float32, D a multiple of 16;
    params, sizes and eps as `models.mobile_former._FrozenMobileFormerBlock` prepares them (`_native_tokens`)."""
    return _STATE["ops"].former_tokens(x, z, params, sizes, eps)


# the head dims the attention kernel is built for (one register blocking each)
ATTENTION_HEAD_DIMS = (16, 32, 48, 64)


def attention_ready(head_dim: int) -> bool:
    """For a module switching to the attention kernels when it is prepared: True when they are built for this
    head dim and loaded (compiling them if need be); `attention_applies` still decides at each call."""
    return head_dim in ATTENTION_HEAD_DIMS and load()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None = None,
              scale: float = 1.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale·q·kᵀ [+ bias])·v, or (softmax(scale·q·kᵀ [+ bias]) + pos)·v, without a gradient (`attend` has
    one).

    q (B, heads, n, d), k and v (B, heads, N, d), float32 with unit stride along d (the views of a qkv product), d
    in ATTENTION_HEAD_DIMS; pos (heads, n, N), with unit stride along N: ConViT's gated positional map, or None;
    bias (1 or B, heads, n, N) float32 with unit stride along N, added to the scores before the softmax (SDPA's
    float `attn_mask`: CoAtNet's relative positions), or None. Returns (B, n, heads·d), contiguous: tokens first,
    as the output projection reads them."""
    return _STATE["ops"].attention(q, k, v, pos, scale, bias)


def attention_applies(*heads: torch.Tensor) -> bool:
    """Whether `attend` can take these q, k, v now: the kernels loaded, a CPU with AVX-512 or AVX2 with FMA (the
    kernels' register blockings), plain float32 CPU tensors with a head dim it is built for, and no tracer or compiler watching (to
    them the kernel is an opaque call with no shape function: they keep SDPA). Cheap: the callers ask at every
    call."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not attention_supported():   # (dynamo folds the
        return False                                                                                # first)
    q = heads[0]
    return (q.dtype == torch.float32 and q.device.type == "cpu"
            and q.shape[-1] in ATTENTION_HEAD_DIMS and all(type(t) is torch.Tensor for t in heads))


class _AttentionFn(torch.autograd.Function):
    """softmax(scale·q·kᵀ)·v with the native forward (which keeps each row's log-sum-exp) and backward (the
    probabilities recomputed a tile of rows at a time from those, never stored: the five products of the
    gradient with the scores in cache)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, lse = _STATE["ops"].attention_lse(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _STATE["ops"].attention_backward(grad.contiguous(), q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


class _PackedAttentionFn(torch.autograd.Function):
    """`_AttentionFn` on the heads of a packed product's output: q, k (and v) side by side in one (B, N, S·C) tensor.
    Its backward writes their gradients side by side into one buffer, the packed tensor's gradient: autograd would
    otherwise stack the three head gradients (a pass over them) and copy the stack into the product's layout (a
    second), in the backward of every attention layer. A bias added to the scores before the softmax (CoAtNet's
    relative positions) gets its gradient from the same pass: the scores' own, summed over the images that share
    it, where SDPA would take the math path (the probabilities stored, softmax and its backward as passes of
    their own)."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, v: torch.Tensor | None, bias: torch.Tensor | None, heads: int,
                scale: float) -> torch.Tensor:
        q, k, vh = _packed_heads(packed, v, heads)
        out, lse = _STATE["ops"].attention_lse(q, k, vh, scale, bias)
        ctx.save_for_backward(packed, v, bias, out, lse)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        packed, v, bias, out, lse = ctx.saved_tensors
        q, k, vh = _packed_heads(packed, v, ctx.heads)
        d_packed = torch.empty_like(packed, memory_format=torch.contiguous_format)
        dq, dk, dv = _packed_heads(d_packed, None if v is None else torch.empty_like(v), ctx.heads)
        d_bias = None if bias is None else torch.empty(bias.shape, dtype=bias.dtype)
        _STATE["ops"].attention_backward_(grad.contiguous(), q, k, vh, out, lse, ctx.scale, dq, dk, dv, bias, d_bias)
        if d_bias is not None and not ctx.needs_input_grad[2]:
            d_bias = None
        return d_packed, None if v is None else dv.transpose(1, 2).reshape(v.shape), d_bias, None, None


def _packed_heads(packed: torch.Tensor, v: torch.Tensor | None, heads: int):
    """q, k, v (B, heads, N, d) as views of a packed (B, N, S·C) tensor (S = 3; S = 2 and v (B, N, C) apart)."""
    B, N, W = packed.shape
    S = 2 if v is not None else 3
    parts = packed.view(B, N, S, heads, W // (S * heads)).transpose(1, 3)   # (B, heads, S, N, d)
    vh = parts[:, :, 2] if v is None else v.view(B, N, heads, -1).transpose(1, 2)
    return parts[:, :, 0], parts[:, :, 1], vh


def packed_attention_applies(packed: torch.Tensor, heads: int, v: torch.Tensor | None = None) -> bool:
    """Whether `attend_packed` can take this packed product's output now (see `attention_applies`): also contiguous,
    its width S·C with C = heads · a head dim the kernels are built for, and v (B, N, C) with unit stride where
    given."""
    if packed.dim() != 3 or not packed.is_contiguous() or heads <= 0:
        return False
    S = 3 if v is None else 2
    W = packed.shape[-1]
    if W % (S * heads):
        return False
    if v is not None and (v.shape != (*packed.shape[:2], W // S) or v.stride(-1) != 1
                          or v.stride(-2) != v.shape[-1] or type(v) is not torch.Tensor):
        return False
    return attention_applies(packed.view(*packed.shape[:2], S * heads, W // (S * heads)))


def attend_packed(packed: torch.Tensor, heads: int, scale: float, v: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale·q·kᵀ [+ bias])·v for the heads of a qkv product's output (B, N, 3·C: q, k, v side by side, each
    heads × d), or of a qk product's (B, N, 2·C) with v (B, N, C) apart; tokens first out (B, N, C). bias: (1 or B,
    heads, N, N) float32 with unit stride along its last dimension (`attention_bias_applies`), added to the scores
    before the softmax as SDPA's float `attn_mask`, or None. With a gradient, that of `packed` comes back in its own
    layout, written once, and the bias's from the same pass (`_PackedAttentionFn`). For callers that checked
    `packed_attention_applies`."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (packed, v, bias)):
        return _PackedAttentionFn.apply(packed, v, bias, heads, scale)
    q, k, vh = _packed_heads(packed, v, heads)
    return _STATE["ops"].attention(q, k, vh, None, scale, bias)


def attention_bias_applies(bias: torch.Tensor, packed: torch.Tensor, heads: int) -> bool:
    """Whether `attend_packed` can take `bias` with this packed product's output (B, N, ·): a plain float32 CPU
    tensor of shape (1 or B, heads, N, N) with unit stride along its last dimension."""
    B, N = packed.shape[:2]
    return (type(bias) is torch.Tensor and bias.dtype == torch.float32 and bias.device.type == "cpu"
            and bias.dim() == 4 and bias.shape[0] in (1, B) and tuple(bias.shape[1:]) == (heads, N, N)
            and bias.stride(-1) == 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale·q·kᵀ)·v through the native kernels, tokens first out (B, n, heads·d), with its gradient
    when one is to be taken; for callers that checked `attention_applies(q, k, v)`."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionFn.apply(q, k, v, scale)
    return _STATE["ops"].attention(q, k, v, None, scale)
