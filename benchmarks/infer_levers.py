"""Each lever of the convolutional inference path against the path without it, interleaved in one process.

    python benchmarks/infer_levers.py --models botnet_bot50 coatnet_0 --batch 32 1 --rounds 7 --threads 1

Variants (all but `eager` run the same `optimize_for_cpu_inference` copy; the older behaviours are
restored for their step only):
  eager       the model itself under inference_mode
  before      the path as it was before 2026-11-30's session 5: convolution weights kept plain
              channels-last (oneDNN reorders them inside every call), the residual 1×1 convolutions
              as inner products with a binary-add post-op, a fresh output for every residual block
              and CoAtNet's SE gate multiplying into a new buffer
  no-inplace  today's path but every residual block writes a fresh output (`InplaceChain` off; the SE
              gate still scales in place)
  fast        today's path: weights packed for the actual input shape, the residual add as the
              convolution's sum post-op written into the shortcut's buffer
  1x1-as-conv today's path with the 1×1 convolutions without a residual as shape-packed convolutions too
              (`OneDNNConv2d.INNER_PRODUCT_1X1 = False`; not in the default set)
Mobile-Former (session 6; `--models mobile_former_294m --batch 1 --variants mf-unfrozen mf-serial mf-branches
mf-halves mf-rows8`; the two-thread levers engage with ≥ 2 threads only):
  mf-unfrozen  the path as it was before session 6: the blocks' own modules, one op after the other (a copy
               built without `MobileFormerBlock.freeze_for_cpu_inference`)
  mf-serial    the frozen block (merged token products) without its second thread
  mf-branches  the frozen block's token side on a second thread beside the first convolution, the rest of
               the block with the caller's threads (`SPLIT_ROWS = False`)
  mf-halves    the above, and the rest of the block as two halves of the map, one per thread, on maps of at
               least 7 rows (every block of Mobile-Former-294M at 224²)
  mf-rows8     mf-halves with 7-row maps left whole, run by the caller's threads (`SPLIT_MIN_ROWS = 8`: the
               7×7 stage of Mobile-Former-294M)
  fast         today's path: the frozen block as mf-serial (the two-thread variants lost on the idle machine)
Transformers with a class-token head (session 7; `--models deit_small_patch16_224 convit_small --variants
every-row fast`):
  every-row    today's path with the last block computing every token row (`layers.helpers.every_row`), as
               before session 7; `fast` computes only the class token's row there
CoAtNet's transformer stages at batch 1 (session 8; `--models coatnet_0 --batch 1 --variants map-whole map-tokens
map-first map-auto`; the token split engages with ≥ 2 threads only):
  map-whole    CoAtNet's transformer stages run whole (every op an OpenMP team of the caller's threads): today's
               default (`TokenParallelMapStage.mode = "whole"`), the same as `fast`
  map-tokens   the stride-1 blocks of those stages always as token-row shares, one per thread (mode "tokens")
  map-first    map-tokens in the first transformer stage only (S3, 196 tokens), the last one (S4, 49 tokens) whole
  map-auto     mode "auto": the faster of the two timed at the first call, per stage
Per round every variant runs one step; the figure is the median over rounds of the per-round ratio
(before / variant, on process CPU time and on the wall clock), with its min–max, so load that comes and goes
hits every variant alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

import _common  # noqa: F401  (puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401,I001
from hybridzoo.factory import create_model
from hybridzoo.layers import onednn
from hybridzoo.layers.helpers import every_row
from hybridzoo.layers.onednn import InplaceChain, OneDNNConv2d, optimize_for_cpu_inference
from hybridzoo.layers.onednn_tokens import TokenParallelMapStage
from hybridzoo.models import mobile_former
from hybridzoo.models.coatnet import _FrozenMBConv


def _before_forward(self, x, other=None, inplace=False):
    """OneDNNConv2d.forward as it was: plain channels-last weight, inner product + binary add for 1×1 residuals."""
    x = x.contiguous(memory_format=torch.channels_last)
    if self.pointwise:
        B, _, H, W = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(B * H * W, self.in_channels)
        if other is None:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.packed_bias, self.attr,
                                                   self.scalars, self.algorithm)
        else:
            res = other.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(
                B * H * W, self.out_channels)
            y = torch.ops.mkldnn._linear_pointwise(rows, res, self.packed_weight, self.packed_bias, "add")
            if self.act is not None:
                y = self.act(y)
        return y.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)
    if other is None:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.conv_weight, self.packed_bias, self.padding, self.stride, self.dilation, self.groups,
            self.attr, self.scalars, self.algorithm)
    other = other.contiguous(memory_format=torch.channels_last)
    relu = self.attr == "relu"
    y = torch.ops.mkldnn._convolution_pointwise(
        x, other, self.conv_weight, self.packed_bias, self.padding, self.stride, self.dilation,
        self.groups, "add", 1.0, "relu" if relu else None, [], None)
    return y if relu or self.act is None else self.act(y)


def _before_mbconv(self, x, owned=False):
    """CoAtNet's frozen MBConv as it was: the SE gate multiplies into a new buffer."""
    x, y = self.pooled_inputs(x)
    y = self.se(self.conv2(self.conv1(y)))
    return self.conv3(y, self.shortcut(x))


def _no_inplace_chain(self, x):
    for m in self:
        x = m(x, False) if getattr(m, "reuses_input", False) else m(x)
    return x


@contextlib.contextmanager
def patched(variant: str):
    saved = OneDNNConv2d.forward, InplaceChain.forward, _FrozenMBConv.forward
    inner = OneDNNConv2d.INNER_PRODUCT_1X1
    mf = mobile_former._FrozenMobileFormerBlock
    mf_saved = mf.PARALLEL, mf.SPLIT_ROWS, mf.SPLIT_MIN_ROWS
    map_mode = TokenParallelMapStage.mode
    try:
        if variant in ("map-whole", "map-tokens", "map-auto"):
            TokenParallelMapStage.mode = variant[4:]
        mf.PARALLEL = variant in ("mf-branches", "mf-halves", "mf-rows8")
        mf.SPLIT_ROWS = variant != "mf-branches"
        if variant == "mf-rows8":
            mf.SPLIT_MIN_ROWS = 8
        if variant in ("before", "no-inplace"):
            InplaceChain.forward = _no_inplace_chain
        if variant == "1x1-as-conv":
            OneDNNConv2d.INNER_PRODUCT_1X1 = False
        if variant == "before":
            OneDNNConv2d.forward = _before_forward
            _FrozenMBConv.forward = _before_mbconv
        with every_row() if variant == "every-row" else contextlib.nullcontext():
            yield
    finally:
        OneDNNConv2d.forward, InplaceChain.forward, _FrozenMBConv.forward = saved
        OneDNNConv2d.INNER_PRODUCT_1X1 = inner
        mf.PARALLEL, mf.SPLIT_ROWS, mf.SPLIT_MIN_ROWS = mf_saved
        TokenParallelMapStage.mode = map_mode


def unfrozen_mobile_former(model):
    """The fast path as it was before session 6 for Mobile-Former: no frozen block (its modules one by one)."""
    freeze = mobile_former.MobileFormerBlock.freeze_for_cpu_inference
    del mobile_former.MobileFormerBlock.freeze_for_cpu_inference
    try:
        return optimize_for_cpu_inference(model)
    finally:
        mobile_former.MobileFormerBlock.freeze_for_cpu_inference = freeze


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["botnet_bot50", "coatnet_0"])
    ap.add_argument("--batch", nargs="+", type=int, default=[32, 1])
    ap.add_argument("--variants", nargs="+", default=["eager", "before", "no-inplace", "fast"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {args.threads} threads, {args.rounds} rounds, torch {torch.__version__}, load average "
          f"{os.getloadavg()}, {onednn.__name__}")
    for name in args.models:
        model = create_model(name, drop_path_rate=0.0).eval()
        fast = optimize_for_cpu_inference(model)
        unfrozen = unfrozen_mobile_former(model) if "mf-unfrozen" in args.variants else None
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224)
            steps = args.rounds if batch > 4 else 3 * args.rounds

            def run(v):
                stages = [m for m in fast.modules() if isinstance(m, TokenParallelMapStage)]
                try:
                    if v == "map-first":
                        stages[0].mode = "tokens"
                        for s in stages[1:]:
                            s.mode = "whole"
                    with torch.inference_mode(), patched(v):
                        return (model if v == "eager" else unfrozen if v == "mf-unfrozen" else fast)(x)
                finally:
                    for s in stages:   # back to the class's mode
                        s.__dict__.pop("mode", None)
            ref = run("eager")
            for v in args.variants:   # warm-up (weight packing for this shape) and a check of the outputs
                torch.testing.assert_close(run(v), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
            cpu: dict[str, list[float]] = {v: [] for v in args.variants}
            wall: dict[str, list[float]] = {v: [] for v in args.variants}
            for _ in range(steps):
                for v in args.variants:
                    c0, w0 = time.process_time(), time.perf_counter()
                    run(v)
                    cpu[v].append(time.process_time() - c0)
                    wall[v].append(time.perf_counter() - w0)
            base = next((b for b in ("before", "mf-unfrozen", "every-row", "map-whole") if b in args.variants),
                        args.variants[0])
            print(f"\n## {name}, batch {batch}, {steps} rounds (load average now {os.getloadavg()[0]:.1f})")
            print(f"| variant | CPU ms/step | {base} / variant, CPU: median (min–max) | wall: median (min–max) |")
            print("| --- | ---: | ---: | ---: |")
            for v in args.variants:
                rc = [b / t for b, t in zip(cpu[base], cpu[v])]
                rw = [b / t for b, t in zip(wall[base], wall[v])]
                print(f"| {v} | {1000 * statistics.median(cpu[v]):.0f} | {statistics.median(rc):.2f} "
                      f"({min(rc):.2f}–{max(rc):.2f}) | {statistics.median(rw):.2f} ({min(rw):.2f}–{max(rw):.2f}) |",
                      flush=True)
            chosen = [f"{n or 'model'}: {'tokens' if c else 'whole'} ({k[2]} rows, {k[3]} threads)"
                      for n, m in fast.named_modules() for k, c in m.__dict__.get("_choices", {}).items()]
            if chosen:
                print("auto chose: " + "; ".join(chosen))


if __name__ == "__main__":
    main()
