"""CvT-13 training levers of session 6, each against its alternative, interleaved in one process.

    python benchmarks/cvt_train_levers.py                 # all sections, 1 thread, CPU time (~6 min idle)
    python benchmarks/cvt_train_levers.py --only blocks attention

Sections (fwd + bwd at training batch 16 unless said; ratio = alternative / ours, > 1 means ours is faster):
- `blocks`: one stage-3 block (cls token) and stage 1 (embedding + block) through the trainer's path, against the
  same modules run with the session-5 forms (three NCHW copies of the cls stage's map, BatchNorm fed a sliced
  gradient, slices instead of `split`, an NCHW image into the first embedding, QuickGELU's backward into a new
  tensor), kept inline below as `_Session5`;
- `quickgelu`: the activation alone, its backward into its own temporary vs a fresh tensor;
- `attention`: explicit matmul + softmax + matmul vs SDPA, at each stage's shape;
- `kv`: the key and value projections as one depthwise convolution over 2C channels + one BatchNorm vs two;
- `embed`: the stage-2/3 token-embedding convolutions in other forms (NCHW, slow_conv2d, im2col + one GEMM);
- `cls_only` (session 7): `model(x)`, whose last block computes only the cls token's row, against the full
  `forward_head(forward_features(x))`: a training step (fwd + loss + bwd + fused AdamW) at `--batch`, and inference
  through `optimize_for_cpu_inference` at batch 32 and 1.
With one thread the clock is process CPU time (robust to other jobs on the machine); with more, the wall clock.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from _common import add_malloc_option, apply_malloc  # noqa: I001  (also puts this checkout's src/ on sys.path)
import hybridzoo  # noqa: F401
from hybridzoo.factory import create_model
from hybridzoo.layers.helpers import checkpoint_seq
from hybridzoo.layers.mlp import QuickGELU, _QuickGELUFn
from hybridzoo.layers.train_fast import optimize_for_cpu_training
from hybridzoo.models import cvt as cvtm


def _clock():
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def ab(name: str, fns: dict, rounds: int) -> None:
    """Interleave the callables (each runs one fwd + bwd), print medians and the first one's ratio to each other."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = _clock()
            f()
            ts[k].append(_clock() - t0)
    (ref, tref), *others = ts.items()
    cells = [f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in ts.items()]
    for k, v in others:
        rat = sorted(a / b for a, b in zip(v, tref))
        cells.append(f"{k}/{ref} {statistics.median(rat):.2f} ({rat[0]:.2f}-{rat[-1]:.2f})")
    print(f"{name}: " + ", ".join(cells) + f" [{rounds} rounds]", flush=True)


# --- the session-5 forms of what this session changed (for `blocks`) ------------------------------------------------

class _Session5:
    @staticmethod
    def attn_forward(self, x, h, w):
        B, N, C = x.shape
        if self.with_cls_token:
            cls_tok, x = x[:, :1], x[:, 1:]
        x = x.transpose(1, 2).reshape(B, C, h, w)
        q, k, v = self.conv_proj_q(x), self.conv_proj_k(x), self.conv_proj_v(x)
        if self.with_cls_token:
            q, k, v = (torch.cat((cls_tok, t), dim=1) for t in (q, k, v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, -1, C)))

    @staticmethod
    def embed_forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @staticmethod
    def stage_forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = checkpoint_seq(self.blocks, self.pos_drop(x), H, W, enabled=self.grad_checkpointing)
        cls_tok = None
        if self.cls_token is not None:
            cls_tok, x = x[:, :1], x[:, 1:]
        return x.transpose(1, 2).reshape(B, C, H, W), cls_tok

    class QuickGELUFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.mul(x, 1.702).sigmoid_().mul_(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return torch.ops.aten.silu_backward(g, torch.mul(x, 1.702))

    class QuickGELU(nn.Module):
        def forward(self, x):
            return _Session5.QuickGELUFn.apply(x)

    @classmethod
    def apply(cls, model: nn.Module) -> nn.Module:
        for m in list(model.modules()):
            if isinstance(m, cvtm.ConvAttention):
                m.forward = types.MethodType(cls.attn_forward, m)
            elif isinstance(m, cvtm.ConvEmbed):
                m.forward = types.MethodType(cls.embed_forward, m)
            elif isinstance(m, cvtm.CvTStage):
                m.forward = types.MethodType(cls.stage_forward, m)
            elif isinstance(getattr(m, "act", None), QuickGELU):
                m.act = cls.QuickGELU()
        return model


def section_blocks(batch: int, rounds: int) -> None:
    torch.manual_seed(0)
    ours = optimize_for_cpu_training(create_model("cvt_13", drop_path_rate=0.0)).train()
    old = _Session5.apply(copy.deepcopy(ours))
    x3 = torch.randn(batch, 197, 384, requires_grad=True)
    img = torch.randn(batch, 3, 224, 224)
    g3 = torch.randn(batch, 197, 384)
    g1 = torch.randn(batch, 64, 56, 56)
    y_old, y_new = old.stages[2].blocks[0](x3, 14, 14), ours.stages[2].blocks[0](x3, 14, 14)
    assert (y_old - y_new).abs().max() <= 1e-4 * y_old.abs().max()

    def block(m):
        def f():
            m.stages[2].blocks[0](x3, 14, 14).backward(g3)
            x3.grad = None
        return f

    def stage1(m):
        return lambda: m.stages[0](img)[0].backward(g1)
    ab("stage-3 block (cls token)", {"ours": block(ours), "session5": block(old)}, rounds)
    ab("stage 1 (embedding + block)", {"ours": stage1(ours), "session5": stage1(old)}, rounds)


def section_quickgelu(batch: int, rounds: int) -> None:
    for shape in [(batch, 197, 1536), (batch, 784, 768), (batch, 3136, 256)]:
        x = torch.randn(*shape, requires_grad=True)
        g = torch.randn(*shape)

        def run(fn):
            def f():
                fn.apply(x).backward(g)
                x.grad = None
            return f
        ab(f"QuickGELU fwd+bwd {shape}", {"ours": run(_QuickGELUFn), "fresh tensor": run(_Session5.QuickGELUFn)},
           rounds)


def section_attention(batch: int, rounds: int) -> None:
    for heads, lq, lk in [(1, 3136, 784), (3, 784, 196), (6, 197, 50)]:
        q = torch.randn(batch, heads, lq, 64, requires_grad=True)
        k = torch.randn(batch, heads, lk, 64, requires_grad=True)
        v = torch.randn(batch, heads, lk, 64, requires_grad=True)
        g = torch.randn(batch, heads, lq, 64)
        s = (64 * heads) ** -0.5

        def run(explicit):
            def f():
                o = (torch.matmul(torch.matmul(q * s, k.transpose(-2, -1)).softmax(-1), v) if explicit
                     else F.scaled_dot_product_attention(q, k, v, scale=s))
                o.backward(g)
                q.grad = k.grad = v.grad = None
            return f
        ab(f"attention {heads} heads {lq}x{lk}", {"SDPA": run(False), "explicit": run(True)}, rounds)


def section_kv(batch: int, rounds: int) -> None:
    for c, h in [(64, 56), (192, 28), (384, 14)]:
        x = torch.randn(batch, h * h, c).transpose(1, 2).reshape(batch, c, h, h).requires_grad_()  # channels-last
        wk, wv = (torch.randn(c, 1, 3, 3, requires_grad=True) for _ in range(2))
        gk, gv = (torch.ones(c, requires_grad=True) for _ in range(2))
        bk, bv = (torch.zeros(c, requires_grad=True) for _ in range(2))
        rm, rv = torch.zeros(2 * c), torch.ones(2 * c)
        tk = torch.randn(batch, (h // 2) ** 2, c)

        def two():
            k = F.batch_norm(F.conv2d(x, wk, None, 2, 1, 1, c), rm[:c], rv[:c], gk, bk, True)
            v = F.batch_norm(F.conv2d(x, wv, None, 2, 1, 1, c), rm[c:], rv[c:], gv, bv, True)
            return k.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2)

        def one():
            y = F.conv2d(x, torch.stack((wk, wv), 1).reshape(2 * c, 1, 3, 3), None, 2, 1, 1, c)
            y = F.batch_norm(y, rm, rv, torch.stack((gk, gv), 1).reshape(-1), torch.stack((bk, bv), 1).reshape(-1),
                             True)
            t = y.flatten(2).transpose(1, 2).unflatten(2, (c, 2))
            return t[..., 0], t[..., 1]

        def run(fn):
            def f():
                k, v = fn()
                torch.autograd.backward((k.contiguous(), v.contiguous()), (tk, tk))  # the linears read dense tokens
                for p in (x, wk, wv, gk, gv, bk, bv):
                    p.grad = None
            return f
        ab(f"k/v projections C={c} {h}x{h}", {"two convs": run(two), "one 2C conv": run(one)}, rounds)


def _im2col_conv(x, w, b, stride, pad):
    B, C, H, W = x.shape
    O, _, k, _ = w.shape
    ho, wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    cols = F.pad(x, (pad,) * 4).permute(0, 2, 3, 1).unfold(1, k, stride).unfold(2, k, stride)
    cols = cols.permute(0, 1, 2, 4, 5, 3).reshape(B * ho * wo, k * k * C)
    return F.linear(cols, w.permute(0, 2, 3, 1).reshape(O, -1), b).view(B, ho, wo, O).permute(0, 3, 1, 2)


def section_embed(batch: int, rounds: int) -> None:
    for c, o, h in [(64, 192, 56), (192, 384, 28)]:
        xn = torch.randn(batch, c, h, h, requires_grad=True)
        xc = xn.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(o, c, 3, 3, requires_grad=True)
        b = torch.randn(o, requires_grad=True)
        g = torch.randn(batch, o, h // 2, h // 2)

        def run(kind):
            def f():
                xi = xn if kind in ("NCHW", "slow_conv2d") else xc
                with torch.backends.mkldnn.flags(enabled=kind != "slow_conv2d"):
                    y = _im2col_conv(xi, w, b, 2, 1) if kind == "im2col" else F.conv2d(xi, w, b, 2, 1)
                    y.backward(g)
                xi.grad = w.grad = b.grad = None
            return f
        ab(f"embedding conv {c}->{o} at {h}x{h}", {k: run(k) for k in ("channels-last", "NCHW", "slow_conv2d", "im2col")},
           rounds)


def section_cls_only(batch: int, rounds: int) -> None:
    """Session 7: model(x) computes only the cls token's row in the last block; against the full computation
    forward_head(forward_features(x)) of the same model: a training step (trainer's path, fused AdamW) at
    `batch`, and inference through optimize_for_cpu_inference at batch 32 and 1."""
    from hybridzoo.layers.onednn import optimize_for_cpu_inference, split_batch_forward
    torch.manual_seed(0)
    model = optimize_for_cpu_training(create_model("cvt_13", drop_path_rate=0.0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    x, t = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step(full):
        def f():
            opt.zero_grad(set_to_none=True)
            out = model.forward_head(model.forward_features(x)) if full else model(x)
            F.cross_entropy(out, t).backward()
            opt.step()
        return f
    ab(f"training step, batch {batch}", {"cls-only": step(False), "full": step(True)}, rounds)
    frozen = optimize_for_cpu_inference(model.eval())

    def full_rows(t):
        return frozen.forward_head(frozen.forward_features(t))
    for b in (32, 1):
        xb = torch.randn(b, 3, 224, 224)

        def infer(full):
            def f():
                with torch.no_grad():
                    if not full:
                        frozen(xb)
                    elif b > 1 and torch.get_num_threads() > 1:
                        split_batch_forward(full_rows, xb)  # what model(x) did before: the batch split too
                    else:
                        full_rows(xb)
            return f
        ab(f"inference (optimize_for_cpu_inference), batch {b}", {"cls-only": infer(False), "full": infer(True)},
           rounds)


SECTIONS = {"blocks": section_blocks, "quickgelu": section_quickgelu, "attention": section_attention,
            "kv": section_kv, "embed": section_embed, "cls_only": section_cls_only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    add_malloc_option(ap)
    args = ap.parse_args()
    apply_malloc(args)
    torch.set_num_threads(args.threads)
    print(f"# {args.threads} thread(s), batch {args.batch}, torch {torch.__version__}, "
          f"{args.malloc} glibc malloc, load average {os.getloadavg()[0]:.1f}", flush=True)
    for name in args.only:
        SECTIONS[name](args.batch, args.rounds)


if __name__ == "__main__":
    main()
