"""ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases — d'Ascoli et al.,
ICML 2021, arXiv 2103.10697.

What is hybrid: the first ten blocks use gated positional self-attention (GPSA), in which every head
mixes content attention with a purely positional attention initialised as a convolution: head h
attends to one offset of a k×k neighbourhood, so the network starts as a soft CNN and each head's
gate σ(λ_h) learns how much of that locality to keep. The last two blocks are plain multi-head
self-attention, and the class token joins only then.

Official code: facebookresearch/convit `convit.py` + `models.py` (timm's `convit.py` is a faithful
port with the same parameter names). Deviations from it:
- Without attention dropout, the content softmax goes through `scaled_dot_product_attention` and the
  positional one is applied as a separate product: (1−σ)·softmax(qkᵀ)v + σ·softmax(pos)v. The
  official renormalisation divides by a row sum that is exactly 1, so this is the same function; it
  costs one extra N²·d product per GPSA layer in the MAC count (+5.9% for Ti, +1.3% for B+).
  With attention dropout in training the official explicit mixture is used, dropout applied to it.
- Relative indices are rebuilt for any H×W token grid (the official code assumes a square one) and
  the position embedding is interpolated (bicubic) when the input size differs from `img_size`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from hybridzoo.layers import (Attention, DropPath, Mlp, PatchEmbed, check_image_input, checkpoint_seq,
                              drop_path_rates, init_weights_vit, native, resample_abs_pos_embed,
                              run_blocks_for_prefix, trunc_normal_)
from hybridzoo.registry import register_model

__all__ = ["GPSA", "ConViT", "convert_official", "gpsa_attend", "relative_indices"]


def relative_indices(grid_size: tuple[int, int], device=None) -> torch.Tensor:
    """(1, N, N, 3) tensor of (Δx, Δy, Δx²+Δy²) from query patch to key patch, row-major patches.

    Δx is the column offset and Δy the row offset of the key relative to the query, as the official
    `get_rel_indices` orders them.
    """
    gh, gw = grid_size
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    dx = cols[None, :] - cols[:, None]
    dy = rows[None, :] - rows[:, None]
    rel = torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)
    return rel.unsqueeze(0).float()


def _apply_shared(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`p @ v` for a map shared by the batch, p (1, heads, N, N) and v (B, heads, N, d), as one product per head
    over all images: (heads, N, N)·(heads, N, B·d). The broadcast `p @ v` copies p once per image and, under
    autograd, forms p's gradient once per image before summing them; this takes 1.4× less CPU time for ConViT-S's
    shapes (forward + backward, 1 thread) and gives the same values (p's gradient up to fp32 summation order)."""
    if p.shape[0] != 1:
        return p @ v
    B, H, N, d = v.shape
    out = p[0] @ v.permute(1, 2, 0, 3).reshape(H, N, B * d)
    return out.view(H, N, B, d).permute(2, 0, 1, 3)


class GPSA(nn.Module):
    """Gated positional self-attention.

    attn_h = (1 − σ(λ_h))·softmax(q kᵀ/√d) + σ(λ_h)·softmax(v_posᵀ r_ij), renormalised per row, where
    r_ij = (Δx, Δy, Δx²+Δy²) and v_pos is the row of `pos_proj` for head h.
    """

    native_attention = False   # set by optimize_for_cpu_training: the content attention on layers.native.attend

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, locality_strength: float = 1.0, use_local_init: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.use_local_init = use_local_init

    @torch.no_grad()
    def local_init(self) -> None:
        """Start as a convolution: identity values, head h1 + k·h2 attending to offset (h2−c, h1−c).

        With w = α·(2(h2−c), 2(h1−c), −1), the positional score
        −α·((Δx−(h2−c))² + (Δy−(h1−c))²) + const
        peaks at that offset; α (locality strength) sets how sharply.
        """
        self.v.weight.copy_(torch.eye(self.dim, device=self.v.weight.device))
        k = int(self.num_heads ** 0.5)
        center = (k - 1) / 2 if k % 2 == 0 else k // 2
        rows = [[0.0, 0.0, 0.0] for _ in range(self.num_heads)]
        for h1 in range(k):
            for h2 in range(k):
                rows[h1 + k * h2] = [2.0 * (h2 - center), 2.0 * (h1 - center), -1.0]
        local = torch.tensor(rows, device=self.pos_proj.weight.device, dtype=self.pos_proj.weight.dtype)
        # heads beyond the k×k grid keep their random init, as in the official code
        mask = torch.zeros(self.num_heads, 1, device=local.device, dtype=local.dtype)
        mask[: k * k] = 1.0
        self.pos_proj.weight.copy_(mask * local + (1 - mask) * self.pos_proj.weight)
        self.pos_proj.weight.mul_(self.locality_strength)

    def positional_attention(self, rel_indices: torch.Tensor) -> torch.Tensor:
        """(1, heads, N, N) softmax of the positional scores."""
        return self.pos_proj(rel_indices).permute(0, 3, 1, 2).softmax(dim=-1)

    def get_attention(self, x: torch.Tensor, rel_indices: torch.Tensor) -> torch.Tensor:
        """The full gated, renormalised attention map (B, heads, N, N), as the official code forms it."""
        B, N, C = x.shape
        q, k = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        content = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1.0 - gate) * content + gate * self.positional_attention(rel_indices)
        return attn / attn.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, rel_indices: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        v_rows = self.v(x)
        v = v_rows.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.training and self.attn_drop.p > 0:
            x = self.attn_drop(self.get_attention(x, rel_indices)) @ v
        else:
            # both softmaxes sum to one per row, so the official renormalisation is the identity here
            qk = self.qk(x)
            if self.native_attention and native.packed_attention_applies(qk, self.num_heads, v_rows):
                # the content attention through the native kernels (forward and backward), tokens first: the
                # mix is formed in that layout, so the transpose and copy after it go; q and k read in place from
                # the qk product, whose gradient comes back in its own layout
                gate = torch.sigmoid(self.gating_param).view(1, 1, -1, 1)
                content = native.attend_packed(qk, self.num_heads, self.scale, v_rows)
                content = content.view(B, N, self.num_heads, self.head_dim)
                positional = _apply_shared(self.positional_attention(rel_indices), v).transpose(1, 2)
                x = ((1.0 - gate) * content + gate * positional).reshape(B, N, C)
                return self.proj_drop(self.proj(x))
            q, k = qk.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
            content = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            x = (1.0 - gate) * content + gate * _apply_shared(self.positional_attention(rel_indices), v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def freeze_for_cpu_inference(self, batch_hint: int | None = None) -> nn.Module:
        # a head whose gate rounds to 1 cannot have its values rescaled by 1 − σ(λ): keep this module then
        gate = torch.sigmoid(self.gating_param.detach().double())
        native.attention_ready(self.head_dim)   # builds the frozen module's attention kernel where it can
        return _FrozenGPSA(self) if bool((1.0 - gate).min() > 1e-4) else self


class _FrozenGPSA(nn.Module):
    """GPSA for inference, with the input-independent part computed once.

    With g = σ(λ) per head and P the positional softmax (fixed for a token grid),
    out = (1−g)·softmax(qkᵀ)v + g·P v. The value projection is scaled by (1−g) per head (v' = (1−g)v),
    so out = (softmax(qkᵀ) + P')·v' with P' = g/(1−g)·P cached per grid, computed by the native attention
    kernel where it is built (`layers.native.attention`), else one image at a time by `gpsa_attend`
    (GPSA.freeze_for_cpu_inference keeps the original module when a gate is too close to 1 for this). q, k
    and v' come from one product (`qkv`) whose q rows also carry the attention scale.
    """

    def __init__(self, m: GPSA):
        super().__init__()
        C, d = m.dim, m.head_dim
        self.num_heads, self.head_dim = m.num_heads, d
        self.proj, self.pos_proj = m.proj, m.pos_proj
        gate = torch.sigmoid(m.gating_param.detach().double())
        # per output row of the merged product: the scale for q, 1 for k, 1 − g of its head for v
        rows = torch.cat([torch.full((C,), m.scale, dtype=torch.float64, device=gate.device),
                          torch.ones(C, dtype=torch.float64, device=gate.device), (1.0 - gate).repeat_interleave(d)])
        with torch.no_grad():
            # skip_init: no initial weights drawn from the global generator (they are overwritten next)
            qkv = nn.utils.skip_init(nn.Linear, C, 3 * C, bias=m.qk.bias is not None or m.v.bias is not None,
                                     device=gate.device)
            qkv.weight.copy_((torch.cat([m.qk.weight.detach(), m.v.weight.detach()]).double() * rows[:, None]).float())
            if qkv.bias is not None:
                parts = [lin.bias.detach().double() if lin.bias is not None else
                         torch.zeros(lin.out_features, dtype=torch.float64, device=gate.device) for lin in (m.qk, m.v)]
                qkv.bias.copy_((torch.cat(parts) * rows).float())
        self.qkv = qkv.requires_grad_(False)
        self.register_buffer("ratio", (gate / (1.0 - gate)).float().view(-1, 1, 1), persistent=False)
        self._rel: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._seen: tuple[torch.Tensor, int] | None = None   # the last rel_indices object and its version

    def _positional(self, rel_indices: torch.Tensor) -> torch.Tensor:
        # ConViT passes the same cached tensor at every call: an identity and version check is enough then
        # (torch.equal on an N×N×3 table cost ~3% of a batch-1 forward of ConViT-Ti)
        if self._seen is not None and self._seen[0] is rel_indices and self._seen[1] == rel_indices._version:
            return self._pos
        if self._rel is None or self._rel.shape != rel_indices.shape or not torch.equal(self._rel, rel_indices):
            pos = self.pos_proj(rel_indices).permute(0, 3, 1, 2).softmax(dim=-1)[0]   # heads, N, N
            self._pos, self._rel = (pos * self.ratio).contiguous(), rel_indices.clone()
        self._seen = (rel_indices, rel_indices._version)
        return self._pos

    def forward(self, x: torch.Tensor, rel_indices: torch.Tensor) -> torch.Tensor:
        h, d = self.num_heads, self.head_dim
        if x.dim() != 3 or x.shape[-1] != h * d:
            raise ValueError(f"frozen GPSA: expected tokens B×N×{h * d}, got shape {tuple(x.shape)}")
        B, N, C = x.shape
        pos = self._positional(rel_indices)
        if pos.shape[-1] != N:
            raise ValueError(f"frozen GPSA: rel_indices are for {pos.shape[-1]} tokens, the input has {N}")
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, 3, h, d).permute(2, 0, 3, 1, 4)   # each B × heads × N × d, views
        if native.attention_applies(q, k, v):
            # the same (softmax(q kᵀ) + P′)·v′ with the scores kept in cache, tokens first out
            return self.proj(native.attention(q, k, v, pos, 1.0))
        out = qkv.new_empty(B, N, C)
        o = out.view(B, N, h, d).transpose(1, 2)
        for b in range(B):
            o[b].copy_(gpsa_attend(q[b], k[b], v[b], pos))
        return self.proj(out)


def gpsa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(softmax(q kᵀ) + pos)·v for one image, heads first, q already scaled: q (h, n, d), k and v (h, N, d),
    pos (h, n, N) → (h, n, d).

    The frozen GPSA runs its images through this one at a time: one image's map (h × N × N, 0.6 MB for
    ConViT-Ti at 224²) stays in the core's L2 between the passes, and the positional term P′·v′ rides in the
    second product. Less CPU time than fused SDPA plus the positional product over the whole batch and the add
    and layout copies they need (benchmarks/RESULTS.md, session 8); plain MHSA keeps SDPA, which is faster
    without the positional term."""
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1).add_(pos), v)


class Block(nn.Module):
    """Pre-norm transformer block whose attention is GPSA (local stage) or MHSA (last blocks)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, use_gpsa: bool = True,
                 locality_strength: float = 1.0, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.use_gpsa = use_gpsa
        self.norm1 = norm_layer(dim)
        if use_gpsa:
            self.attn = GPSA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                             locality_strength=locality_strength)
        else:
            self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, rel_indices: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """`num_queries` = n (MHSA blocks): only the first n rows are computed and returned (B×n×C), as in
        `models.vit.Block`."""
        y = self.norm1(x)
        if num_queries is not None:
            if self.use_gpsa:
                raise ValueError("num_queries: a GPSA block computes every token (only the MHSA blocks, which "
                                 "carry the class token, can compute the class token alone)")
            x = x[:, :num_queries]
            y = self.attn(y, num_queries=num_queries)
        else:
            y = self.attn(y, rel_indices) if self.use_gpsa else self.attn(y)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConViT(nn.Module):
    """ViT with `local_up_to_layer` GPSA blocks on patch tokens, then MHSA blocks with the class token."""

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12, num_heads: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, local_up_to_layer: int = 10,
                 locality_strength: float = 1.0, use_pos_embed: bool = True):
        super().__init__()
        if not 0 <= local_up_to_layer <= depth:
            raise ValueError(f"local_up_to_layer must be in [0, depth={depth}], got {local_up_to_layer}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.local_up_to_layer = local_up_to_layer
        self.locality_strength = locality_strength
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # one entry per patch: the class token has no position (it enters after the GPSA blocks)
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim)) if use_pos_embed else None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], use_gpsa=i < local_up_to_layer,
                  locality_strength=locality_strength)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._rel_cache: dict = {}
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights_vit)
        for m in self.modules():
            if isinstance(m, GPSA) and m.use_local_init:
                m.local_init()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.pos_embed is None:
            return x.contiguous()
        pos = resample_abs_pos_embed(self.pos_embed, grid, old_size=self.patch_embed.grid_size, num_prefix_tokens=0)
        # pos first: a sum takes the layout of its first operand, and x is the patch map's transposed view. With
        # x first, every residual add of every block kept the (B, C, N) layout and each LayerNorm copied its input
        # to rows, forward and backward (~2% of a training step of ConViT-S)
        return pos + x

    def _relative_indices(self, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        """relative_indices(grid), built once per grid, device and dtype (a constant, never a parameter)."""
        key = (grid, x.device, x.dtype)
        rel = self._rel_cache.get(key)
        if rel is None:
            # built outside inference mode, so autograd may save it when the model trains later
            with torch.inference_mode(False):
                rel = self._rel_cache[key] = relative_indices(grid, device=x.device).to(x.dtype)
        return rel

    def _tokens(self, x: torch.Tensor, cls_only: bool) -> torch.Tensor:
        p = self.patch_embed.patch_size
        check_image_input(x, self, self.in_chans, divisor=p, min_size=p)
        x = self.patch_embed.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        x = self.pos_drop(self._pos_embed(x.flatten(2).transpose(1, 2), grid))
        rel = self._relative_indices(grid, x)
        local, rest = self._block_halves()
        x = checkpoint_seq(local, x, rel, enabled=self.grad_checkpointing)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if cls_only:
            return run_blocks_for_prefix(rest, x, 1, rel, checkpointing=self.grad_checkpointing)
        return checkpoint_seq(rest, x, rel, enabled=self.grad_checkpointing)

    def _block_halves(self) -> tuple[nn.Module, nn.Module]:
        """(the GPSA blocks, the MHSA blocks): slices of self.blocks. The frozen copy's container
        (`layers.onednn_tokens`) slices into new containers, ~20 µs each; those are kept while the container, its
        blocks, mode and train / eval flag stay the same (`_OneImage`)."""
        blocks, split = self.blocks, self.local_up_to_layer
        if not hasattr(blocks, "native_call_args"):   # the trainable model's ModuleList
            return blocks[:split], blocks[split:]
        return self._one_image_plan().halves

    def _one_image_plan(self) -> _OneImage:
        # one per count of intra-op threads: the batch split's parts call forward with one each
        threads, kept = torch.get_num_threads(), self.__dict__.setdefault("_one_image_kept", {})
        plan = kept.get(threads)
        if plan is None or not plan.fits(self):
            plan = kept[threads] = _OneImage(self)
        return plan

    def _one_image(self, x: torch.Tensor) -> torch.Tensor | None:
        """forward(x) for one image on the frozen CPU copy (`optimize_for_cpu_inference`) as four native calls with
        no module between them — the patch embedding, the GPSA blocks, the MHSA blocks for the class row alone,
        then norm and head — where the general path would make the same calls: its containers' timed choice taken
        (`TokenParallelBlockList.native_call_args`), the image of the size the model was built for, no hook on any
        module. Else None, and forward takes that path. Around its calls the general path spent ~1 ms of
        ConViT-Ti's 14 ms in Python and layout steps, most of it in caches its blocks had just evicted
        (benchmarks/RESULTS.md, session 35). Same values: the same kernels on the same rows."""
        if (not hasattr(self.blocks, "native_call_args") or self.training or type(x) is not torch.Tensor
                or x.dim() != 4 or x.shape[0] != 1 or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_grad_enabled() and x.requires_grad or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or not native.attention_supported()):
            return None
        plan = self._one_image_plan()
        if x.shape[1:] != plan.image or plan.hooked():
            return None
        call = plan.calls(self)
        if call is None:
            return None
        local_args, rest_args = call
        proj = self.patch_embed.proj
        t = native.patch_embed(x, proj._gather_weight(False), proj.packed_bias, *proj.kernel_size)
        if self.pos_embed is not None:
            t += self.pos_embed   # (t is this call's own tensor)
        if local_args is not None:
            t = native.token_blocks(t, *local_args)
        t = native.token_blocks(torch.cat([self.cls_token, t], dim=1), *rest_args)
        return self.head(self.norm(t)[:, 0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self._tokens(x, cls_only=False))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = forward_head(forward_features(x)); the head reads only the class token, so the last MHSA block
        # computes only its row
        y = self._one_image(x)
        return self.forward_head(self.norm(self._tokens(x, cls_only=True))) if y is None else y


class _OneImage:
    """What `ConViT._one_image` keeps for a frozen copy and a count of intra-op threads: the container's two halves
    (sliced once), the image size it takes, every module's hook tables but the model's own (its hooks run around
    forward), and once the halves' timed choices are made, the two `native.token_blocks` calls' arguments after x."""

    def __init__(self, model: ConViT):
        blocks, split = model.blocks, model.local_up_to_layer
        self.blocks, self.members, self.parts = blocks, list(blocks._modules.values()), self._parts(model)
        self.mode, self.training = blocks.mode, blocks.training
        self.halves = (blocks[:split], blocks[split:])
        pe = model.patch_embed
        self.image = torch.Size((model.in_chans, *pe.img_size))
        self.tables = [t for m in model.modules() if m is not model for t in (m._forward_pre_hooks, m._forward_hooks)]
        proj = pe.proj
        self.patchify = getattr(proj, "patchify", False) and hasattr(proj, "_gather_weight")   # (OneDNNConv2d's)
        self.args = None

    @staticmethod
    def _parts(model: ConViT) -> list[nn.Module]:
        return [*model._modules.values(), model.patch_embed.proj]

    def fits(self, model: ConViT) -> bool:
        """Whether this plan is still the model's: the same children, patch projection, blocks and container flags."""
        blocks = model.blocks
        return (blocks is self.blocks and blocks.mode == self.mode and blocks.training == self.training
                and list(blocks._modules.values()) == self.members and self._parts(model) == self.parts)

    def hooked(self) -> bool:
        return any(self.tables) or bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)

    def calls(self, model: ConViT):
        """(the GPSA blocks' arguments or None where there are none, the MHSA blocks') for `native.token_blocks`, or
        None where the general path would not make those calls (yet)."""
        if self.args is None and self.patchify:
            local, rest = self.halves
            n, c = model.patch_embed.num_patches, model.embed_dim
            rel = model._relative_indices(model.patch_embed.grid_size, torch.empty(0))
            tokens = torch.empty(1, n, c)
            local_args = local.native_call_args(tokens, (rel,)) if len(local) else None
            rest_args = rest.native_call_args(torch.empty(1, n + 1, c), (rel,), 1) if len(rest) else None
            if (local_args is not None or not len(local)) and rest_args is not None:
                self.args = (local_args, rest_args)
        return self.args


def convert_official(state_dict: dict[str, torch.Tensor], model: ConViT) -> dict[str, torch.Tensor]:
    """facebookresearch/convit (and timm `convit_*`) checkpoints → ours.

    The parameter names are the same; what changes is the position embedding when the checkpoint was
    trained at another resolution (resampled to this model's grid) and stray non-parameter entries
    (`rel_indices` caches) that some exports carry.
    """
    out = {k: v for k, v in state_dict.items() if not k.endswith("rel_indices")}
    if not any(k.startswith("blocks.0.attn.") for k in out):
        raise ValueError("not a ConViT checkpoint: no 'blocks.0.attn.*' keys")
    pos = out.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        n = pos.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot resample a non-square pos_embed with {n} entries")
        out["pos_embed"] = resample_abs_pos_embed(pos, model.patch_embed.grid_size, old_size=(side, side),
                                                  num_prefix_tokens=0)
    return out


def _convit(dim: int, heads: int, /, **kwargs) -> ConViT:
    return ConViT(**{"embed_dim": dim, "num_heads": heads, **kwargs})


_TEST = dict(test_kwargs=dict(embed_dim=32, num_heads=4, depth=3, local_up_to_layer=2, img_size=64),
             test_input_size=(3, 64, 64))
_NOTE = ("macs_g is the official model measured with FlopCounterMode; our count is 1.3–5.9% higher (most "
         "for Ti) because the positional attention is applied as its own product next to fused SDPA "
         "(same function).")


@register_model(paper="ConViT", arxiv="2103.10697", task="classification",
                reported=dict(params_m=6.0, gflops=1.0, top1=73.1, resolution=224),
                params=5_710_512, macs_g=1.2524, notes=_NOTE, **_TEST)
def convit_tiny(**kwargs) -> ConViT:
    """ConViT-Ti: 4 heads × 48 dims."""
    return _convit(192, 4, **kwargs)


@register_model(paper="ConViT", arxiv="2103.10697", task="classification",
                reported=dict(params_m=10.0, gflops=2.0, top1=76.7, resolution=224),
                params=9_972_912, macs_g=2.1311, notes=_NOTE, **_TEST)
def convit_tiny_plus(**kwargs) -> ConViT:
    """ConViT-Ti+: 4 heads × 64 dims."""
    return _convit(256, 4, **kwargs)


@register_model(paper="ConViT", arxiv="2103.10697", task="classification",
                reported=dict(params_m=27.0, gflops=5.4, top1=81.3, resolution=224),
                params=27_777_322, macs_g=5.7466, notes=_NOTE,
                test_kwargs=dict(embed_dim=36, num_heads=9, depth=3, local_up_to_layer=2, img_size=64),
                test_input_size=(3, 64, 64))
def convit_small(**kwargs) -> ConViT:
    """ConViT-S: 9 heads × 48 dims."""
    return _convit(432, 9, **kwargs)


@register_model(paper="ConViT", arxiv="2103.10697", task="classification",
                reported=dict(params_m=48.0, gflops=10.0, top1=82.2, resolution=224),
                params=48_979_882, macs_g=10.0016, notes=_NOTE,
                test_kwargs=dict(embed_dim=36, num_heads=9, depth=3, local_up_to_layer=2, img_size=64),
                test_input_size=(3, 64, 64))
def convit_small_plus(**kwargs) -> ConViT:
    """ConViT-S+: 9 heads × 64 dims."""
    return _convit(576, 9, **kwargs)


@register_model(paper="ConViT", arxiv="2103.10697", task="classification",
                reported=dict(params_m=86.0, gflops=17.0, top1=82.4, resolution=224),
                params=86_540_040, macs_g=17.5055, notes=_NOTE,
                test_kwargs=dict(embed_dim=32, num_heads=16, depth=3, local_up_to_layer=2, img_size=64),
                test_input_size=(3, 64, 64))
def convit_base(**kwargs) -> ConViT:
    """ConViT-B: 16 heads × 48 dims."""
    return _convit(768, 16, **kwargs)


@register_model(paper="ConViT", arxiv="2103.10697", task="classification",
                reported=dict(params_m=152.0, gflops=30.0, top1=82.5, resolution=224),
                params=153_134_856, macs_g=30.7395, notes=_NOTE,
                test_kwargs=dict(embed_dim=32, num_heads=16, depth=3, local_up_to_layer=2, img_size=64),
                test_input_size=(3, 64, 64))
def convit_base_plus(**kwargs) -> ConViT:
    """ConViT-B+: 16 heads × 64 dims."""
    return _convit(1024, 16, **kwargs)
