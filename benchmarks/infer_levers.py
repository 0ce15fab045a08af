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
  isa-avx2    today's path with the native kernels' AVX2 versions on an AVX-512 CPU (`native.set_isa("avx2")` for the
              step; the packed weights are the same): whether the AVX-512 kernels pay on this CPU (Zen 4 runs
              AVX-512 on 256-bit units)
  no-gather   today's path with the image stems and strided convolutions on oneDNN instead of the native product
              of their gathered patches, as before session 22 (`OneDNNConv2d.GATHER_CONV = False`; `--variants
              no-gather fast`: the ratios are the lever's)
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
Mobile-Former (session 8; `--models mobile_former_294m --batch 32 1 --variants mf-s7 mf-grouped mf-f2m-sdpa mf-dyrelu-batch fast`):
  mf-grouped   today's path with the depthwise convolutions that have a channel multiplier (the lite block's
               dw, the downsampling blocks' dw1 / dw2) left as one grouped oneDNN convolution each, as before
               session 8 (`_FrozenMobileFormerBlock.SPLIT_MULTIPLIER = False` while the copy is built)
  mf-f2m-sdpa  today's path with Former→Mobile through SDPA and a separate residual add, as before session 8
               (`F2M_BLOCK_DIAGONAL = False`), instead of two batched products with block-diagonal keys / values
  mf-dyrelu-batch  today's path with the frozen dynamic ReLU's three passes over the whole batch (part) at once,
               as before session 8, instead of one image at a time (`_FrozenDynamicReLU.PER_IMAGE = False`)
  mf-s7        mf-grouped, mf-f2m-sdpa and mf-dyrelu-batch at once: the path as session 7 left it (the base of the ratios when present)
Transformers with a class-token head (session 7; `--models deit_small_patch16_224 convit_small --variants
every-row fast`):
  every-row    today's path with the last block computing every token row (`layers.helpers.every_row`), as
               before session 7; `fast` computes only the class token's row there
ConViT's frozen GPSA (session 8; `--models convit_tiny convit_small --variants gpsa-before fast`):
  gpsa-before  a copy built with the frozen GPSA as it was before session 8 (`_GPSABefore`: fused SDPA over the
               batch plus the positional product P′·v′ as one batched product for all images and an add, from 2
               images; (softmax(qkᵀ)·scale + P′)·v′ through matmul at one image and in the token split); `fast`
               runs every image through `convit.gpsa_attend` (q|k|v′ one product, the scale in q's rows, the
               map kept in cache per image)
Frozen MLPs in row chunks (session 8; `--models cvt_13 --variants mlp-whole fast`):
  mlp-whole    today's path with every frozen MLP run whole (`FrozenMlp.CHUNK_ABOVE` infinite), as before
               session 8; `fast` runs hidden layers above 32 MB in chunks of about 2 MB
  mlp-chunk-N  `fast` with chunks of about N KiB of hidden layer (not in the default set)
  mlp-above-N  `fast` with hidden layers above N KiB in chunks (mlp-above-0: every frozen MLP)
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

from _common import add_malloc_option, apply_malloc  # noqa: I001  (also puts this checkout's src/ on sys.path)

import hybridzoo  # noqa: F401,I001
from hybridzoo.factory import create_model
from hybridzoo.layers import onednn
from hybridzoo.layers.helpers import every_row
from hybridzoo.layers import native, onednn_tokens
from hybridzoo.layers.onednn import FrozenMlp, InplaceChain, OneDNNConv2d, optimize_for_cpu_inference
from hybridzoo.models import convit, mobile_former
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


class _GPSABefore(torch.nn.Module):
    """ConViT's frozen GPSA as it was before session 8: q|k and the gated v as two products, fused SDPA over the
    batch plus the positional product P′·v′ as one batched product for every image and an add (from 2 images),
    (softmax(qkᵀ)·scale + P′)·v′ through matmul at one image."""

    def __init__(self, m):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = m.num_heads, m.head_dim, m.scale
        self.qk, self.proj, self.pos_proj = m.qk, m.proj, m.pos_proj
        gate = torch.sigmoid(m.gating_param.detach().double())
        keep = (1.0 - gate).repeat_interleave(self.head_dim)
        v = torch.nn.Linear(m.v.in_features, m.v.out_features, bias=m.v.bias is not None)
        v.weight.copy_((m.v.weight.detach().double() * keep[:, None]).float())
        if m.v.bias is not None:
            v.bias.copy_((m.v.bias.detach().double() * keep).float())
        self.v = v.requires_grad_(False)
        self.register_buffer("ratio", (gate / (1.0 - gate)).float().view(-1, 1, 1), persistent=False)
        self._rel = self._pos = self._seen = None

    _positional = convit._FrozenGPSA._positional

    def forward(self, x, rel_indices):
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q, k = self.qk(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(B, N, h, d)
        if B == 1:
            attn = torch.matmul(q, k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)
            attn.add_(self._positional(rel_indices))
            return self.proj(torch.matmul(attn, v.transpose(1, 2)).transpose(1, 2).reshape(B, N, C))
        content = torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(1, 2), scale=self.scale)
        pos = torch.bmm(self._positional(rel_indices), v.permute(2, 1, 0, 3).reshape(h, N, B * d))
        x = pos.view(h, N, B, d).permute(2, 1, 0, 3) + content.transpose(1, 2)
        return self.proj(x.reshape(B, N, C))


def _before_gpsa_rows(blk, x, rows, buf, barrier, pos):
    """The token split's GPSA block as it was before session 8."""
    a = blk.attn
    C = x.shape[-1]
    h = blk.norm1(x)
    buf[:, rows, :2 * C] = a.qk(h)
    buf[:, rows, 2 * C:] = a.v(h)
    barrier.wait()
    n = x.shape[1]
    q, k, v = onednn_tokens._heads(buf, rows, n, C, a.num_heads, a.head_dim)
    attn = torch.matmul(q, k.transpose(-2, -1)).mul_(a.scale).softmax(dim=-1)
    attn.add_(pos[:, rows])
    x = a.proj(torch.matmul(attn, v).transpose(1, 2).reshape(1, n, C)).add_(x)
    return blk.mlp(blk.norm2(x)).add_(x)


@contextlib.contextmanager
def patched(variant: str):
    saved = OneDNNConv2d.forward, InplaceChain.forward, _FrozenMBConv.forward
    gpsa_saved = convit._FrozenGPSA, onednn_tokens._gpsa_block_rows
    inner, gather = OneDNNConv2d.INNER_PRODUCT_1X1, OneDNNConv2d.GATHER_CONV
    mf = mobile_former._FrozenMobileFormerBlock
    mf_saved = mf.PARALLEL, mf.SPLIT_ROWS, mf.SPLIT_MIN_ROWS, mf.F2M_BLOCK_DIAGONAL, mf.SPLIT_MULTIPLIER
    per_image = mobile_former._FrozenDynamicReLU.PER_IMAGE
    mlp_saved = FrozenMlp.CHUNK_ABOVE, FrozenMlp.CHUNK_BYTES
    try:
        mobile_former._FrozenDynamicReLU.PER_IMAGE = variant not in ("mf-dyrelu-batch", "mf-s7")
        mf.F2M_BLOCK_DIAGONAL = variant not in ("mf-f2m-sdpa", "mf-s7")
        mf.SPLIT_MULTIPLIER = variant not in ("mf-grouped", "mf-s7")   # read when the copy is built
        if variant == "mlp-whole":
            FrozenMlp.CHUNK_ABOVE = float("inf")
        if variant.startswith("mlp-chunk-"):
            FrozenMlp.CHUNK_BYTES = 1024 * int(variant[len("mlp-chunk-"):])
        if variant.startswith("mlp-above-"):
            FrozenMlp.CHUNK_ABOVE = 1024 * int(variant[len("mlp-above-"):])
        mf.PARALLEL = variant in ("mf-branches", "mf-halves", "mf-rows8")
        mf.SPLIT_ROWS = variant != "mf-branches"
        if variant == "mf-rows8":
            mf.SPLIT_MIN_ROWS = 8
        if variant in ("before", "no-inplace"):
            InplaceChain.forward = _no_inplace_chain
        if variant == "1x1-as-conv":
            OneDNNConv2d.INNER_PRODUCT_1X1 = False
        if variant == "no-gather":
            OneDNNConv2d.GATHER_CONV = False
        if variant == "isa-avx2":
            native.set_isa("avx2")
        if variant == "before":
            OneDNNConv2d.forward = _before_forward
            _FrozenMBConv.forward = _before_mbconv
        if variant == "gpsa-before":
            # the copy built under this variant holds _GPSABefore; the token split must know it as the frozen GPSA
            convit._FrozenGPSA, onednn_tokens._gpsa_block_rows = _GPSABefore, _before_gpsa_rows
        with every_row() if variant == "every-row" else contextlib.nullcontext():
            yield
    finally:
        OneDNNConv2d.forward, InplaceChain.forward, _FrozenMBConv.forward = saved
        OneDNNConv2d.INNER_PRODUCT_1X1, OneDNNConv2d.GATHER_CONV = inner, gather
        if variant == "isa-avx2":
            native.set_isa("best")
        convit._FrozenGPSA, onednn_tokens._gpsa_block_rows = gpsa_saved
        mf.PARALLEL, mf.SPLIT_ROWS, mf.SPLIT_MIN_ROWS, mf.F2M_BLOCK_DIAGONAL, mf.SPLIT_MULTIPLIER = mf_saved
        mobile_former._FrozenDynamicReLU.PER_IMAGE = per_image
        FrozenMlp.CHUNK_ABOVE, FrozenMlp.CHUNK_BYTES = mlp_saved


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
    add_malloc_option(ap)
    ap.add_argument("--models", nargs="+", default=["botnet_bot50", "coatnet_0"])
    ap.add_argument("--batch", nargs="+", type=int, default=[32, 1])
    ap.add_argument("--variants", nargs="+", default=["eager", "before", "no-inplace", "fast"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    args = ap.parse_args()
    apply_malloc(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {args.threads} threads, {args.rounds} rounds, torch {torch.__version__}, malloc {args.malloc}, "
          f"load average {os.getloadavg()}, {onednn.__name__}")
    for name in args.models:
        model = create_model(name, drop_path_rate=0.0).eval()
        fast = optimize_for_cpu_inference(model)
        built = {}
        if "mf-unfrozen" in args.variants:
            built["mf-unfrozen"] = unfrozen_mobile_former(model)
        for v in ("mf-grouped", "mf-s7", "gpsa-before"):   # variants that change what the copy is built from
            if v in args.variants:
                with patched(v):
                    built[v] = optimize_for_cpu_inference(model)
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224)
            steps = args.rounds if batch > 4 else 3 * args.rounds

            def run(v):
                with torch.inference_mode(), patched(v):
                    return (model if v == "eager" else built.get(v, fast))(x)
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
            base = next((b for b in ("before", "mf-unfrozen", "every-row", "mf-s7", "mf-grouped", "gpsa-before",
                                      "mlp-whole") if b in args.variants), args.variants[0])
            print(f"\n## {name}, batch {batch}, {steps} rounds (load average now {os.getloadavg()[0]:.1f})")
            print(f"| variant | CPU ms/step | {base} / variant, CPU: median (min–max) | wall: median (min–max) |")
            print("| --- | ---: | ---: | ---: |")
            for v in args.variants:
                rc = [b / t for b, t in zip(cpu[base], cpu[v])]
                rw = [b / t for b, t in zip(wall[base], wall[v])]
                print(f"| {v} | {1000 * statistics.median(cpu[v]):.0f} | {statistics.median(rc):.2f} "
                      f"({min(rc):.2f}–{max(rc):.2f}) | {statistics.median(rw):.2f} ({min(rw):.2f}–{max(rw):.2f}) |",
                      flush=True)


if __name__ == "__main__":
    main()
