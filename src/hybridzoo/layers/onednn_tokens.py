"""Token-parallel execution of transformer blocks for one input on the frozen CPU inference path.

The batch split (`onednn.split_batch_forward`) runs one part of a batch per intra-op thread; a single image
has nothing to split along the batch, so at batch 1 every LayerNorm, add and product of a block is an OpenMP
region whose fork/join (and wait for the slower thread) is paid ~10 times per block. Most of a pre-norm
transformer block is row-wise — LayerNorm, the qkv / proj / MLP products, the residual adds — and only
attention needs every token's keys and values. So here each of the threads runs its own share of the token
rows through the whole block with one intra-op thread, and the threads meet once per block: each writes its
rows' q, k, v into a buffer shared for that block and waits at a barrier; attention then takes its own query
rows against all keys and values, and the rest of the block is row-wise again. Two buffers alternate between
consecutive blocks: a thread writing block i+1's rows into the buffer of block i−1 has passed block i's
barrier, which every other thread reaches only after its attention of block i−1, the last read of that buffer.

Two ways to run the shares. Where the native kernels cover every part of the blocks, one call of
`native.token_blocks` runs the whole stack on an OpenMP team, with the products on its own kernel (faster than
oneDNN's on half an image's rows, whose weights are not in cache yet) and no Python between the kernels:
1.07-1.18× the blocks in turn on the EPYC (benchmarks/RESULTS.md, session 13). Otherwise Python threads with
one intra-op thread each call the blocks' own modules on their rows; with the interpreter between every kernel
that way is slower than the blocks in turn on the 2-vCPU machines we measured, and the first call's timing
(`calibrate`) keeps the faster.

CvT's blocks (`ConvTokenBlockList`) project q, k and v by depthwise 3×3 convolutions over the token map, which read
each pixel's neighbours in the other thread's rows: the threads meet twice per block (after norm1, before the
projections; after the keys and values, before attention), and only in one native call (`native.conv_token_blocks`),
which also runs at one thread (no Python between the ~20 kernels of a block): on CvT-13 at batch 1, 1.21× the blocks
in turn on a Zen 3 EPYC (benchmarks/RESULTS.md, session 18). CoAtNet's transformer stages (`RelativeTokenBlocks`)
run their blocks past the first (which pools and widens) in one `token_blocks` call with each block's
relative-position bias before the softmax.

Same function as the sequential blocks: every row of every product, LayerNorm and add is computed on the same
row values (by the same kernels on the Python threads; by a product kernel of its own, to fp32 rounding, in the
native call); attention over the query rows of one thread is the same softmax per row.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers import native
from hybridzoo.layers.onednn import _pool
from hybridzoo.models.convit import gpsa_attend

__all__ = ["ConvTokenBlockList", "RelativeTokenBlocks", "TokenParallelBlockList", "TokenParallelBlocks", "calibrate",
           "conv_token_parallel_forward", "enable_token_parallel", "token_parallel_forward"]

# a guard, not a tuned figure: with fewer rows per thread every product is tiny and the per-op costs dominate
MIN_ROWS_PER_THREAD = 16


def _heads(buf: torch.Tensor, rows: slice, n: int, C: int, H: int, d: int):
    """q of this thread's `n` rows and k, v of every row, heads first, from the shared 1×N×3C buffer."""
    N = buf.shape[1]
    q = buf[:, rows, :C].view(1, n, H, d).transpose(1, 2)
    k = buf[:, :, C:2 * C].view(1, N, H, d).transpose(1, 2)
    v = buf[:, :, 2 * C:].view(1, N, H, d).transpose(1, 2)
    return q, k, v


def _vit_block_rows(blk: nn.Module, x: torch.Tensor, rows: slice, buf: torch.Tensor,
                    barrier: threading.Barrier, pos: torch.Tensor | None) -> torch.Tensor:
    """One frozen pre-norm block with multi-head self-attention (`models.vit.Block`, ConViT's MHSA blocks) on
    the token rows `rows` of the image; x: 1×n×C, buf: 1×N×3C shared by the threads."""
    a = blk.attn
    C = x.shape[-1]
    buf[:, rows] = a.qkv(blk.norm1(x))
    barrier.wait()
    n = x.shape[1]
    q, k, v = _heads(buf, rows, n, C, a.num_heads, a.head_dim)
    if a.native_attention and native.attention_applies(q, k, v):
        o = native.attend(q, k, v, a.scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, scale=a.scale).transpose(1, 2).reshape(1, n, C)
    # the residual adds go into the fresh product outputs (x + y == y + x exactly): no new buffer per add
    x = a.proj(o).add_(x)
    return blk.mlp(blk.norm2(x)).add_(x)


def _gpsa_block_rows(blk: nn.Module, x: torch.Tensor, rows: slice, buf: torch.Tensor,
                     barrier: threading.Barrier, pos: torch.Tensor) -> torch.Tensor:
    """One ConViT block with frozen GPSA on token rows `rows`: (softmax(q kᵀ) + P′[rows])·v′ through the frozen
    GPSA's kernels (the native attention kernel, else `convit.gpsa_attend`; pos = P′, heads × N × N)."""
    a = blk.attn
    C = x.shape[-1]
    buf[:, rows] = a.qkv(blk.norm1(x))
    barrier.wait()
    n = x.shape[1]
    q, k, v = _heads(buf, rows, n, C, a.num_heads, a.head_dim)
    if native.attention_applies(q, k, v):
        o = native.attention(q, k, v, pos[:, rows], 1.0)
    else:
        o = gpsa_attend(q[0], k[0], v[0], pos[:, rows]).transpose(0, 1).reshape(1, n, C)
    x = a.proj(o).add_(x)
    return blk.mlp(blk.norm2(x)).add_(x)


_LOCAL = threading.local()
# one token split at a time in the process: two callers with 3+ threads each could otherwise fill the shared pool
# with one share each and wait at their barriers for shares queued behind the other's (a deadlock)
_ONE_AT_A_TIME = threading.Lock()


def _buffers(N: int, C: int) -> list[torch.Tensor]:
    """The two qkv buffers (1×N×3C) for a call from this thread, kept per calling thread: fresh ones of this
    size (~1 MB) are mmap'd and page-faulted at every call; a model called from several threads at once gets
    one pair per caller."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None or bufs[0].shape != (1, N, 3 * C):
        bufs = _LOCAL.bufs = [torch.empty(1, N, 3 * C), torch.empty(1, N, 3 * C)]
    return bufs


def token_parallel_forward(blocks, x: torch.Tensor, threads: int, *args, num_prefix: int = 0) -> torch.Tensor:
    """`blocks` (frozen blocks of the kinds `TokenParallelBlocks.applies_to` accepts, in order; `args` are what
    each block takes after x, such as ConViT's relative indices) applied to one image's tokens x (1×N×C) by
    `threads` threads, each taking a contiguous share of the N rows through every block with one thread's kernels.

    Where the native kernels run every part of the blocks (`_native_args`: AVX-512 or AVX2, fp32 products packed by
    `optimize_for_cpu_inference`, head dims with an attention kernel, no hooks on the blocks' modules), the whole
    stack is one call of `native.token_blocks`: an OpenMP team of `threads` meeting at one barrier per block, with
    no Python between the kernels. Otherwise Python threads run the shares, one intra-op thread each.

    num_prefix > 0 (the native call only; the last block an attention block): the last block computes the first
    num_prefix rows alone, which are returned (1×num_prefix×C), as the block called with num_queries=num_prefix."""
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"token_parallel_forward takes the tokens of one image, 1×N×C, got shape {tuple(x.shape)}")
    if not 1 <= threads <= x.shape[1]:
        raise ValueError(f"token_parallel_forward: threads must be in [1, N={x.shape[1]}], got {threads}")
    plan = _plan(blocks, args)
    native_args = _native_args(blocks, plan) if x.dtype == torch.float32 and x.device.type == "cpu" else None
    if num_prefix and (native_args is None or plan[-1][0] is not _vit_block_rows):
        raise ValueError("token_parallel_forward: num_prefix needs the native call (see _native_args) and blocks "
                         "whose last is an attention block (a GPSA block computes every row)")
    if native_args is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)   # the team's size
        try:
            return native.token_blocks(x.contiguous(), *native_args, num_prefix)
        finally:
            torch.set_num_threads(before)
    with _ONE_AT_A_TIME:
        return _run_shares(blocks, plan, x, threads)


def _plan(blocks, args) -> list:
    """(row-share kernel, positional map or None) per block: GPSA's map P′ is fetched (and cached) here, once, not
    from every thread."""
    return [(kernel, blk.attn._positional(*args) if kernel is _gpsa_block_rows else None)
            for blk, kernel in zip(blocks, _cached(blocks, "kernels", _kernels))]


def _panels(layer: nn.Module) -> torch.Tensor | None:
    """A frozen product's weight as `native.token_blocks` takes it (`OneDNNLinear.panels`: fp32, packed when the
    layer was made), or None when the product is not one it runs."""
    from hybridzoo.layers.onednn import OneDNNLinear
    return layer.panels if type(layer) is OneDNNLinear else None


def _cached(blocks, what: str, make):
    """make(blocks), made at the first call for this sequence of blocks and kept on its first block: what a call of
    the shares needs that depends only on the frozen blocks (their kernels, the native call's parameters) is not
    worked out again at every image (~0.5 ms a forward of DeiT-S's blocks)."""
    store = blocks[0].__dict__.setdefault("_token_plans", {})
    key = (what, tuple(map(id, blocks)))
    hit = store.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], blocks)):   # (an id reused by another block)
        hit = store[key] = (tuple(blocks), make(blocks))
    return hit[1]


def _kernels(blocks) -> list:
    kernels = [_kernel(blk) for blk in blocks]
    for blk, kernel in zip(blocks, kernels):
        if kernel is None:
            raise ValueError(f"token_parallel_forward: no row-share kernel for {type(blk).__name__} (ViT / DeiT "
                             "blocks and ConViT's frozen GPSA / MHSA blocks are supported)")
    return kernels


def _native_prepared(blocks, what: str, make) -> tuple | None:
    """make(blocks) (cached: every module of the blocks first, then what the native call takes), or None when the
    call cannot run now: compiling or tracing, no kernels for this CPU, a part they do not run (make gives None),
    or forward hooks on a module of the blocks (the kernels would pass them by)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not native.attention_supported():
        return None
    prepared = _cached(blocks, what, make)
    if prepared is None or any(m._forward_hooks or m._forward_pre_hooks for m in prepared[0]):
        return None
    return prepared


def _check_mode(container: nn.Module) -> None:
    if container.mode not in ("auto", "tokens", "whole"):
        raise ValueError(f"{type(container).__name__}.mode must be 'auto', 'tokens' or 'whole', got "
                         f"{container.mode!r}")


_probing = threading.local()


@contextlib.contextmanager
def whole_blocks():
    """Inside it, on this thread, every container runs its blocks in turn and times nothing: for
    `onednn.images_per_call`, whose probe runs one input on one thread to size the batch split's sub-batches. There
    the token split's calibration (8 extra runs of the blocks, for a key the batch's parts never use) cost
    0.3-1 s of the frozen copy's first call (DeiT-S 0.85 s of a 0.9 s probe), and its single native call hid the
    blocks' own tensors from the probe."""
    before = getattr(_probing, "whole", False)
    _probing.whole = True
    try:
        yield
    finally:
        _probing.whole = before


def _prefers_tokens(container: nn.Module, key, run_whole, run_tokens) -> bool:
    """The container's `mode` ("auto", "tokens", "whole") for one call that can run either way: "auto" times both at
    the first call per key (`calibrate`) and keeps the faster, in `_choices` (shared with the container's slices).
    Inside `whole_blocks()`: the blocks in turn."""
    _check_mode(container)
    if getattr(_probing, "whole", False):
        return False
    if container.mode != "auto":
        return container.mode == "tokens"
    choices = container.__dict__.setdefault("_choices", {})
    if key not in choices:
        choices[key] = calibrate(run_whole, run_tokens)
    return choices[key]


def _native_args(blocks, plan) -> tuple | None:
    """The arguments of `native.token_blocks` after x for these blocks, or None where the call cannot run them
    (`_native_prepared`; the Python shares call the products' modules, so their hooks see them). plan: (kernel,
    positional map) per block."""
    prepared = _native_prepared(blocks, "native", _native_params)
    return None if prepared is None else (*prepared[1], [pos for _, pos in plan])


def _native_params(blocks) -> tuple | None:
    """(every module of the blocks, token_blocks' arguments after x but the positional maps), or None when a block
    has a part the kernels do not run: a product that is not an fp32 `OneDNNLinear` with panels, a head dim without
    an attention kernel, a LayerNorm over other shapes."""
    from hybridzoo.layers.onednn import FrozenMlp
    params, heads, scales, eps, acts, algorithms = [], [], [], [], [], []
    for blk, kernel in zip(blocks, _cached(blocks, "kernels", _kernels)):
        a, mlp = blk.attn, blk.mlp
        C = a.num_heads * a.head_dim
        if not (type(mlp) is FrozenMlp and a.head_dim in native.ATTENTION_HEAD_DIMS
                and a.qkv.act == a.proj.act == mlp.fc2.act == "none"
                and all(norm.normalized_shape == (C,) for norm in (blk.norm1, blk.norm2))
                and (kernel is _gpsa_block_rows or a.native_attention)):
            return None
        packed = [_panels(layer) for layer in (a.qkv, a.proj, mlp.fc1, mlp.fc2)]
        if any(w is None for w in packed):
            return None
        params += [blk.norm1.weight, blk.norm1.bias, packed[0], a.qkv.packed_bias, packed[1], a.proj.packed_bias,
                   blk.norm2.weight, blk.norm2.bias, packed[2], mlp.fc1.packed_bias, packed[3], mlp.fc2.packed_bias]
        heads.append(a.num_heads)
        scales.append(1.0 if kernel is _gpsa_block_rows else a.scale)   # GPSA's q rows carry the scale
        eps += [blk.norm1.eps, blk.norm2.eps]
        acts.append(mlp.fc1.act)
        algorithms.append(mlp.fc1.algorithm)
    return [m for blk in blocks for m in blk.modules()], (params, heads, scales, eps, acts, algorithms)


def _run_shares(blocks, plan, x: torch.Tensor, threads: int) -> torch.Tensor:
    N, C = x.shape[1], x.shape[2]
    bounds = [N * t // threads for t in range(threads + 1)]
    shares = [slice(bounds[t], bounds[t + 1]) for t in range(threads)]
    bufs = _buffers(N, C)
    barrier = threading.Barrier(threads)
    inference = torch.is_inference_mode_enabled()

    def run(rows: slice) -> torch.Tensor:
        torch.set_num_threads(1)
        try:
            with torch.inference_mode(inference), torch.no_grad():
                h = x[:, rows]
                for i, (blk, (kernel, pos)) in enumerate(zip(blocks, plan)):
                    h = kernel(blk, h, rows, bufs[i % 2], barrier, pos)
                return h
        except BaseException:
            barrier.abort()   # the other threads would otherwise wait for this one at the barrier forever
            raise

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_pool(threads - 1).submit(run, r) for r in shares[1:]]
        outs, errors = [], []
        try:
            outs.append(run(shares[0]))
        except BaseException as e:   # noqa: BLE001 - re-raised below, after every worker has stopped
            errors.append(e)
        for f in futures:   # wait for every worker before returning or raising
            e = f.exception()
            errors.append(e) if e is not None else outs.append(f.result())
    finally:
        torch.set_num_threads(before)
    if errors:
        # the thread that failed first, not one that found the barrier broken by it
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return torch.cat(outs, dim=1)


def _kernel(blk: nn.Module):
    """The row-share kernel for a frozen block, or None when the block is of no kind this module knows."""
    from hybridzoo.layers.attention import Attention
    from hybridzoo.layers.mlp import Mlp
    from hybridzoo.layers.onednn import FrozenMlp
    from hybridzoo.models import convit, vit
    if type(blk) not in (vit.Block, convit.Block) or not (
            isinstance(blk.drop_path, nn.Identity) and type(blk.mlp) in (Mlp, FrozenMlp)
            and type(blk.norm1) is nn.LayerNorm and type(blk.norm2) is nn.LayerNorm):
        return None   # other models' blocks (CeiT's, ...) have other parts
    if type(blk.attn) is Attention:
        return _vit_block_rows
    if type(blk) is convit.Block and type(blk.attn) is convit._FrozenGPSA:
        return _gpsa_block_rows
    return None


def calibrate(run_whole, run_tokens, rounds: int = 3) -> bool:
    """True when `run_tokens()` is the faster of the two on this machine now: one warm-up call each, then
    `rounds` interleaved timed calls each, medians of the wall clock compared."""
    run_whole(), run_tokens()
    whole, tokens = [], []
    for _ in range(rounds):
        for fn, times in ((run_whole, whole), (run_tokens, tokens)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(tokens) < statistics.median(whole)


class _TokenParallel:
    """Mixin for a container of frozen blocks: calling it on one image (1×N×C) with at least MIN_ROWS_PER_THREAD rows
    per intra-op thread may run `token_parallel_forward` (with one thread, only as the native call:
    `_can_split`); anything else runs the blocks in turn. `checkpoint_seq` calls the container itself
    (`runs_as_one`) instead of iterating over it.

    `mode`: "auto" (default) times both ways at the first such call for each (tokens, threads) and keeps the
    faster (`calibrate`: 8 extra runs of the blocks, once) — whether the token split wins depends on the machine
    and its load (benchmarks/RESULTS.md, session 6); "tokens" always splits; "whole" never does."""

    runs_as_one = True
    mode = "auto"

    @staticmethod
    def applies_to(seq: nn.Module) -> bool:
        return (type(seq) in (nn.Sequential, nn.ModuleList) and len(seq) > 0
                and all(_kernel(b) is not None for b in seq))

    def _whole(self, x: torch.Tensor, *args) -> torch.Tensor:
        for blk in self:
            x = blk(x, *args)
        return x

    def _can_split(self, x: torch.Tensor, args, threads: int) -> bool:
        """Whether the shares can run: on two threads or more always (natively, else on Python threads); on one,
        only as the native call (no Python between its kernels: 1.10× DeiT-S's and 1.15× ConViT-S's blocks in turn
        on Zen 3, benchmarks/RESULTS.md session 18), since one Python share is the blocks in turn."""
        return threads > 1 or (x.device.type == "cpu" and _native_args(self, _plan(self, args)) is not None)

    def _split_tokens(self, x: torch.Tensor, threads: int, args) -> bool:
        _check_mode(self)
        if (self.mode == "whole" or x.dim() != 3 or x.shape[0] != 1 or x.dtype != torch.float32
                or x.shape[1] < threads * MIN_ROWS_PER_THREAD or (torch.is_grad_enabled() and x.requires_grad)
                or not self._can_split(x, args, threads)):
            return False
        # the choices are shared with the slices of this container (ConViT runs `blocks[:10]`, a new one each call)
        return _prefers_tokens(self, (id(self[0]), len(self), x.shape[1], threads),
                               lambda: self._whole(x, *args), lambda: self._parallel(x, threads, args))

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if isinstance(idx, slice):   # a slice keeps the mode, the measured choices and the eval / train mode
            # the flag of the new container alone: its blocks are this container's own, already in their modes.
            # `out.train()` walked every module under them at each call (ConViT slices its blocks twice a forward:
            # ~1 ms of ConViT-Ti's 15 ms at batch 1), and would have overridden a mode set on one block
            out.training = self.training
            out.mode = self.mode
            out.__dict__["_choices"] = self.__dict__.setdefault("_choices", {})
        return out

    def _parallel(self, x: torch.Tensor, threads: int, args, num_prefix: int = 0) -> torch.Tensor:
        return token_parallel_forward(self, x, threads, *args, num_prefix=num_prefix)

    def _prefix_in_one_call(self, x: torch.Tensor, num_prefix: int, threads: int, args) -> bool:
        """The native call can compute the last block's first num_prefix rows alone: it runs these blocks on x, the
        last is an attention block, and the prefix lies in the first thread's share."""
        if not (x.dim() == 3 and 1 <= num_prefix <= x.shape[1] // max(threads, 1)
                and x.dtype == torch.float32 and x.device.type == "cpu"):
            return False
        plan = _plan(self, args)
        return plan[-1][0] is _vit_block_rows and _native_args(self, plan) is not None

    def native_call_args(self, x: torch.Tensor, args, num_prefix: int = 0) -> tuple | None:
        """What `native.token_blocks` takes after x (ending with num_prefix) when calling these blocks on x —
        `forward`, or `forward_prefix` for num_prefix > 0 — would make that one native call now: the choice timed
        for x's rows and the intra-op threads taken (mode "auto"; or mode "tokens"), every part of the blocks on the
        kernels, x one image's fp32 tokens. Else None, also before that choice is made (the first call makes it).
        For a caller that keeps the arguments and makes the call itself (`models.convit`'s one-image path): it
        checks the hooks of the blocks' modules at each call, which `_native_args` checks only now."""
        _check_mode(self)
        threads, N = torch.get_num_threads(), x.shape[1]
        if (not len(self) or self.mode == "whole" or getattr(_probing, "whole", False) or x.dim() != 3
                or x.shape[0] != 1 or x.dtype != torch.float32 or x.device.type != "cpu"
                or N < threads * MIN_ROWS_PER_THREAD):
            return None
        if (self.mode == "auto"
                and self.__dict__.get("_choices", {}).get((id(self[0]), len(self), N, threads)) is not True):
            return None
        plan = _plan(self, args)
        if num_prefix and (plan[-1][0] is not _vit_block_rows or not 1 <= num_prefix <= N // threads):
            return None
        native_args = _native_args(self, plan)
        return None if native_args is None else (*native_args, num_prefix)

    def forward_prefix(self, x: torch.Tensor, num_prefix: int, *args) -> torch.Tensor:
        """`helpers.run_blocks_for_prefix` for these blocks: the last one computes only the `num_prefix` leading rows
        (B×num_prefix×C). In one native call where `forward` would take it for the whole image (its timed choice)
        and the call can compute the prefix alone (`_prefix_in_one_call`); else the blocks but the last as `forward`
        runs them, then the last as a module with num_queries."""
        threads = torch.get_num_threads()
        if (len(self) and self._prefix_in_one_call(x, num_prefix, threads, args)
                and self._split_tokens(x, threads, args)):
            return self._parallel(x, threads, args, num_prefix)
        x = self[:-1](x, *args)
        return self[-1](x, *args, num_queries=num_prefix)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        threads = torch.get_num_threads()
        if len(self) and self._split_tokens(x, threads, args):   # an empty slice (blocks[:-1] of one) is the identity
            return self._parallel(x, threads, args)
        return self._whole(x, *args)


class TokenParallelBlocks(_TokenParallel, nn.Sequential):
    """nn.Sequential of frozen transformer blocks (ViT / DeiT) with the token-parallel call of `_TokenParallel`;
    indexing, slicing and iteration are those of the nn.Sequential."""


class TokenParallelBlockList(_TokenParallel, nn.ModuleList):
    """nn.ModuleList of frozen transformer blocks (ConViT) with the token-parallel call; a slice is one too."""


# ---- CvT's blocks: the native call only -------------------------------------------------------------------------------

def _conv_projection_taps(proj: nn.Module, stride: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A frozen CvT convolutional projection's depthwise 3×3 taps (9, C) and bias (its BatchNorm folded in), or None
    when it is not one `native.conv_token_blocks` runs: the native depthwise kernel's, with no activation, this
    stride."""
    from hybridzoo.layers.onednn import OneDNNConv2d
    from hybridzoo.models.cvt import _FrozenConvProjection
    conv = getattr(proj, "conv", None)
    if not (type(proj) is _FrozenConvProjection and type(conv) is OneDNNConv2d and conv.depthwise_taps is not None
            and conv.attr == "none" and conv.stride == [stride, stride]):
        return None
    return conv.depthwise_taps, conv.packed_bias


def _cvt_block_ok(blk: nn.Module) -> bool:
    """A frozen `models.cvt.CvTBlock` with LayerNorms and the frozen MLP; its stochastic depth (CvT-13's last stage
    has some) is the identity in eval mode, which `ConvTokenBlockList` checks at every call."""
    from hybridzoo.layers.drop import DropPath
    from hybridzoo.layers.onednn import FrozenMlp
    from hybridzoo.models.cvt import CvTBlock
    return (type(blk) is CvTBlock and type(blk.drop_path) in (nn.Identity, DropPath) and type(blk.mlp) is FrozenMlp
            and type(blk.norm1) is nn.LayerNorm and type(blk.norm2) is nn.LayerNorm)


def _conv_native_params(blocks) -> tuple | None:
    """(every module of the blocks, (params, strides, heads, scales, eps, acts, algorithms), cls) for
    `native.conv_token_blocks`, or None when a block has a part it does not run: a projection that is not a native
    depthwise 3×3 (q at stride 1, k and v at one stride for every block), a product that is not an fp32
    `OneDNNLinear` with panels and no activation (fc1 apart), a head dim without an attention kernel, LayerNorms
    over other shapes, blocks that differ in their cls token."""
    if not all(_cvt_block_ok(blk) for blk in blocks):
        return None
    kv_stride = blocks[0].attn.conv_proj_k.conv.stride[0]
    cls = {blk.attn.with_cls_token for blk in blocks}
    if kv_stride not in (1, 2) or len(cls) != 1:
        return None
    params, heads, scales, eps, acts, algorithms = [], [], [], [], [], []
    for blk in blocks:
        a, mlp = blk.attn, blk.mlp
        C = a.proj.in_features
        taps = [_conv_projection_taps(p, s) for p, s in ((a.conv_proj_q, 1), (a.conv_proj_k, kv_stride),
                                                          (a.conv_proj_v, kv_stride))]
        products = (a.proj_q, a.proj_k, a.proj_v, a.proj, mlp.fc1, mlp.fc2)
        packed = [_panels(layer) for layer in products]
        if (any(t is None for t in taps) or any(w is None for w in packed) or not a.native_attention
                or C // a.num_heads not in native.ATTENTION_HEAD_DIMS
                or any(layer.act != "none" for layer in products if layer is not mlp.fc1)
                or not all(norm.normalized_shape == (C,) for norm in (blk.norm1, blk.norm2))):
            return None
        params += [blk.norm1.weight, blk.norm1.bias, *taps[0], *taps[1], *taps[2],
                   packed[0], a.proj_q.packed_bias, packed[1], a.proj_k.packed_bias, packed[2], a.proj_v.packed_bias,
                   packed[3], a.proj.packed_bias, blk.norm2.weight, blk.norm2.bias,
                   packed[4], mlp.fc1.packed_bias, packed[5], mlp.fc2.packed_bias]
        heads.append(a.num_heads)
        scales.append(a.scale)
        eps += [blk.norm1.eps, blk.norm2.eps]
        acts.append(mlp.fc1.act)
        algorithms.append(mlp.fc1.algorithm)
    modules = [m for blk in blocks for m in blk.modules()]
    return modules, (params, (1, kv_stride), heads, scales, eps, acts, algorithms), int(cls.pop())


def conv_token_parallel_forward(blocks, x: torch.Tensor, threads: int, h: int, w: int,
                                num_prefix: int = 0) -> torch.Tensor:
    """Frozen CvT blocks (`ConvTokenBlockList.applies_to`) on one image's tokens x (1 × cls + h·w × C) in one call of
    `native.conv_token_blocks` by a team of `threads`, each taking a contiguous share of the rows; num_prefix 1 (with
    a cls token): the last block computes the cls token's row alone, which is returned (1 × 1 × C), as
    `CvTBlock(..., num_queries=1)`. Raises where that call cannot run them (`ConvTokenBlockList` checks first and
    runs the blocks in turn instead)."""
    args = _conv_native_args(blocks, x)
    if args is None:
        raise ValueError("conv_token_parallel_forward: these blocks need the native kernels (AVX-512 or AVX2), an "
                         "fp32 CPU input and frozen CvT blocks that conv_token_blocks runs, with no hooks")
    params, strides, heads, scales, eps, acts, algorithms, cls = args
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != cls + h * w:
        raise ValueError(f"conv_token_parallel_forward takes one image's tokens, 1×{cls + h * w}×C for a {h}×{w} map"
                         f"{' and a cls token' if cls else ''}, got shape {tuple(x.shape)}")
    if not 1 <= threads <= x.shape[1]:
        raise ValueError(f"conv_token_parallel_forward: threads must be in [1, N={x.shape[1]}], got {threads}")
    if num_prefix not in (0, cls):
        raise ValueError(f"conv_token_parallel_forward: num_prefix must be 0 (every row) or 1 with a cls token (its "
                         f"row alone in the last block), got {num_prefix} for blocks with{'' if cls else 'out'} one")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)   # the team's size
    try:
        return native.conv_token_blocks(x.contiguous(), params, (h, w), cls, strides, heads, scales, eps, acts,
                                        algorithms, num_prefix)
    finally:
        torch.set_num_threads(before)


def _conv_native_args(blocks, x: torch.Tensor) -> tuple | None:
    """conv_token_blocks' arguments after x, size and cls's place (params, strides, heads, scales, eps, acts,
    algorithms, cls), or None where it cannot run these blocks on x (see `_native_args`)."""
    prepared = (_native_prepared(blocks, "conv-native", _conv_native_params)
                if x.dtype == torch.float32 and x.device.type == "cpu" else None)
    return None if prepared is None else (*prepared[1], prepared[2])


class ConvTokenBlockList(_TokenParallel, nn.ModuleList):
    """nn.ModuleList of frozen CvT blocks (`models.cvt.CvTBlock`, called as blk(x, h, w)) whose call on one image
    may run `conv_token_parallel_forward`: the native call only (a block's convolutions read its neighbours' rows,
    so the Python shares of `token_parallel_forward` do not apply), with one thread too (no Python between the
    kernels), chosen as `_TokenParallel` chooses; the blocks in turn otherwise."""

    @staticmethod
    def applies_to(seq: nn.Module) -> bool:
        return type(seq) is nn.ModuleList and len(seq) > 0 and all(_cvt_block_ok(b) for b in seq)

    def _can_split(self, x: torch.Tensor, args, threads: int) -> bool:
        return not self.training and len(args) == 2 and _conv_native_args(self, x) is not None

    def _parallel(self, x: torch.Tensor, threads: int, args, num_prefix: int = 0) -> torch.Tensor:
        return conv_token_parallel_forward(self, x, threads, *args, num_prefix=num_prefix)

    def _prefix_in_one_call(self, x: torch.Tensor, num_prefix: int, threads: int, args) -> bool:
        """The prefix is the cls token, which leads these blocks' rows."""
        prepared = _cached(self, "conv-native", _conv_native_params)
        return num_prefix == 1 and prepared is not None and prepared[2] == 1


def enable_token_parallel(model: nn.Module) -> None:
    """Replace, in place, every plain nn.Sequential / nn.ModuleList of frozen blocks this module knows inside
    `model` by its token-parallel counterpart."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _TokenParallel.applies_to(child):
                new = (TokenParallelBlocks(OrderedDict(child._modules)) if type(child) is nn.Sequential
                       else TokenParallelBlockList(list(child)))
                setattr(parent, name, new.train(child.training))
            elif ConvTokenBlockList.applies_to(child):
                setattr(parent, name, ConvTokenBlockList(list(child)).train(child.training))
            elif RelativeTokenBlocks.applies_to(child):
                setattr(parent, name, RelativeTokenBlocks(OrderedDict(child._modules)).train(child.training))


# ---- CoAtNet's relative-attention stages: the native call only -----------------------------------------------------

def _relative_block_ok(blk: nn.Module, first: bool) -> bool:
    """A frozen `models.coatnet.TransformerBlock` whose attention is the frozen relative one; past a stage's first
    block (the one that may pool and widen) a stride-1 block keeping its width, the kind `token_blocks` runs."""
    from hybridzoo.layers.drop import DropPath
    from hybridzoo.layers.onednn import FrozenMlp
    from hybridzoo.models.coatnet import TransformerBlock, _FrozenRelativeAttention
    if not (type(blk) is TransformerBlock and type(blk.attn) is _FrozenRelativeAttention):
        return False
    return first or (blk.stride == 1 and isinstance(blk.shortcut, nn.Identity) and type(blk.mlp) is FrozenMlp
                     and type(blk.drop_path) in (nn.Identity, DropPath) and type(blk.norm1) is nn.LayerNorm
                     and type(blk.norm2) is nn.LayerNorm)


def _relative_native_params(blocks) -> tuple | None:
    """(every module of the blocks, token_blocks' arguments after x: params, heads, scales, eps, acts, algorithms,
    the relative biases, and the grid (H, W) they hold) for a stage's blocks past its first, or None when one has a
    part the kernels do not run (as `_native_params`)."""
    params, heads, scales, eps, acts, algorithms, biases = [], [], [], [], [], [], []
    grids = {blk.attn.feat_size for blk in blocks}
    if len(grids) != 1:
        return None
    for blk in blocks:
        a, mlp = blk.attn, blk.mlp
        C = a.num_heads * a.dim_head
        products = (a.qkv, a.proj, mlp.fc1, mlp.fc2)
        packed = [_panels(layer) for layer in products]
        if (any(w is None for w in packed) or not a.native_attention or a.dim_head not in native.ATTENTION_HEAD_DIMS
                or any(layer.act != "none" for layer in products if layer is not mlp.fc1)
                or not all(norm.normalized_shape == (C,) for norm in (blk.norm1, blk.norm2))):
            return None
        params += [blk.norm1.weight, blk.norm1.bias, packed[0], a.qkv.packed_bias, packed[1], a.proj.packed_bias,
                   blk.norm2.weight, blk.norm2.bias, packed[2], mlp.fc1.packed_bias, packed[3], mlp.fc2.packed_bias]
        heads.append(a.num_heads)
        scales.append(a.dim_head ** -0.5)
        eps += [blk.norm1.eps, blk.norm2.eps]
        acts.append(mlp.fc1.act)
        algorithms.append(mlp.fc1.algorithm)
        biases.append(a.bias.contiguous())
    modules = [m for blk in blocks for m in blk.modules()]
    return modules, (params, heads, scales, eps, acts, algorithms, biases), grids.pop()


class RelativeTokenBlocks(nn.Sequential):
    """nn.Sequential of a CoAtNet transformer stage's frozen blocks (B×H×W×C maps). For one image its first block
    (which may pool and widen) runs as a module, and the rest, plain pre-norm blocks with a relative-position bias
    before the softmax, may run as one call of `native.token_blocks`: one share of the token rows per thread, the
    threads meeting once per block, no Python between the kernels (with one thread too). Timed against the blocks
    in turn at the first call per token count and thread count, the faster kept (`mode` as `_TokenParallel`'s);
    the blocks in turn with hooks on the later blocks' modules, in training mode, for another grid than the one the
    biases were built for, or off AVX-512 / AVX2."""

    runs_as_one = True
    mode = "auto"

    @staticmethod
    def applies_to(seq: nn.Module) -> bool:
        return (type(seq) is nn.Sequential and len(seq) > 1
                and all(_relative_block_ok(b, i == 0) for i, b in enumerate(seq)))

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self:
            x = blk(x)
        return x

    def _after_first(self, y: torch.Tensor) -> torch.Tensor:
        for blk in list(self)[1:]:
            y = blk(y)
        return y

    def _native_args(self, y: torch.Tensor) -> tuple | None:
        """token_blocks' arguments after x for the blocks past the first on their input y (1×H×W×C), or None."""
        if self.training or y.dtype != torch.float32 or y.device.type != "cpu":
            return None
        prepared = _native_prepared(list(self)[1:], "relative-native", _relative_native_params)
        return None if prepared is None or tuple(y.shape[1:3]) != prepared[2] else prepared[1]

    def _rest_in_one_call(self, y: torch.Tensor, args: tuple, threads: int) -> torch.Tensor:
        params, heads, scales, eps, acts, algorithms, biases = args
        B, H, W, C = y.shape
        before = torch.get_num_threads()
        torch.set_num_threads(threads)   # the team's size
        try:
            out = native.token_blocks(y.reshape(1, H * W, C).contiguous(), params, heads, scales, eps, acts,
                                      algorithms, [None] * len(heads), bias=biases)
        finally:
            torch.set_num_threads(before)
        return out.view(1, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_mode(self)
        threads = torch.get_num_threads()
        if self.mode == "whole" or x.dim() != 4 or x.shape[0] != 1 or (torch.is_grad_enabled() and x.requires_grad):
            return self._whole(x)
        y = self[0](x)
        args = self._native_args(y)
        if (args is None or y.shape[1] * y.shape[2] < threads * MIN_ROWS_PER_THREAD
                or not _prefers_tokens(self, (y.shape[1] * y.shape[2], threads), lambda: self._after_first(y),
                                       lambda: self._rest_in_one_call(y, args, threads))):
            return self._after_first(y)
        return self._rest_in_one_call(y, args, threads)
