"""What one fused kernel for Mobile-Former's dynamic ReLU would give — a probe for a design decision, not a path.

    python benchmarks/fused_dyrelu_probe.py [--rounds 7] [--batch 32 1]

The frozen dynamic ReLU (`models.mobile_former._FrozenDynamicReLU.apply_slopes`) computes max(s1·x, s2·x) with
per-image, per-channel slopes in two ATen passes over the map (three array passes in all): PyTorch has no CPU
kernel that does it in one. This script JIT-compiles one (`torch.utils.cpp_extension.load_inline`: needs a C++
compiler and ninja; about 25 s the first time, cached afterwards), swaps it into a frozen `mobile_former_294m`,
checks that the outputs are unchanged and times both, interleaved, at each batch size (two threads: the batch
split's parts call it with one intra-op thread each).

Shipping kernels like this one would mean a compiler at install or at first use; benchmarks/RESULTS.md (session 10)
has the measured gain beside the ceilings that motivate it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)
import hybridzoo.models.mobile_former as mobile_former
from hybridzoo.engine.cpu_memory import tune_glibc_malloc
from hybridzoo.factory import create_model
from hybridzoo.layers.onednn import optimize_for_cpu_inference

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

// x (B, C, H, W, channels-last) <- max(s1 * x, s2 * x), s1 and s2 (B, C): one read and one write of the map
torch::Tensor dyrelu_(torch::Tensor x, torch::Tensor s1, torch::Tensor s2) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dyrelu_: x must be a float32 channels-last map");
  TORCH_CHECK(s1.is_contiguous() && s2.is_contiguous() && s1.numel() == x.size(0) * x.size(1)
              && s2.numel() == s1.numel(), "dyrelu_: s1 and s2 must be contiguous (B, C)");
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  float* px = x.data_ptr<float>();
  const float* p1 = s1.data_ptr<float>();
  const float* p2 = s2.data_ptr<float>();
  at::parallel_for(0, x.size(0) * HW, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict row = px + i * C;
      const float* __restrict a = p1 + (i / HW) * C;
      const float* __restrict b = p2 + (i / HW) * C;
      #pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float v = row[c];
        row[c] = std::max(v * a[c], v * b[c]);
      }
    }
  });
  return x;
}
"""


def build():
    from torch.utils.cpp_extension import load_inline
    t0 = time.perf_counter()
    ext = load_inline("hybridzoo_dyrelu_probe", cpp_sources=KERNEL, functions=["dyrelu_"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"])
    print(f"compiled (or loaded from the cache) in {time.perf_counter() - t0:.1f} s", flush=True)
    return ext


def fused_apply_slopes(ext, plain):
    def apply_slopes(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last):
            return plain(self, x, u)
        s1, s2 = self.slopes(u)
        return ext.dyrelu_(x, s1.contiguous(), s2.contiguous())
    return apply_slopes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tune_glibc_malloc()
    torch.set_num_threads(args.threads)
    ext = build()
    cls = mobile_former._FrozenDynamicReLU
    plain = cls.apply_slopes
    variants = {"ATen (two passes)": plain, "fused kernel": fused_apply_slopes(ext, plain)}
    torch.manual_seed(0)
    model = optimize_for_cpu_inference(create_model("mobile_former_294m").eval())
    try:
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224)
            steps = 2 if batch > 1 else 10
            times = {k: [] for k in variants}
            with torch.inference_mode():
                outs = {}
                for k, f in variants.items():
                    cls.apply_slopes = f
                    outs[k] = model(x)
                a, b = outs.values()
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
                for _ in range(args.rounds):
                    for k, f in variants.items():
                        cls.apply_slopes = f
                        model(x)
                        ts = []
                        for _ in range(steps):
                            t0 = time.perf_counter()
                            model(x)
                            ts.append(time.perf_counter() - t0)
                        times[k].append(statistics.median(ts))
            ratios = [p / q for p, q in zip(*times.values())]
            print(f"batch {batch}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items())
                  + f"; speed-up per round {statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f}),"
                  f" outputs equal", flush=True)
    finally:
        cls.apply_slopes = plain


if __name__ == "__main__":
    main()
