"""SASRec: Self-Attentive Sequential Recommendation — Kang & McAuley, ICDM 2018, arXiv 1808.09781.

The transformer baseline of sequential recommendation (no convolution: it is here as the reference
AdaMCT is compared with). Built as RecBole builds it (`recbole/model/sequential_recommender/sasrec.py`
with `properties/model/SASRec.yaml`): item + learned position embeddings, LayerNorm, dropout, post-norm
transformer layers (attention and FFN each with residual, dropout and LayerNorm, eps 1e-12), a causal
and padding mask, the representation read at the last valid position, and scores by dot product
with the (tied) item embedding table. Parameter names are RecBole's, so its state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers.fused import FastDropout, chunked_attention, linear_cross_entropy, use_fused_cpu
from hybridzoo.registry import register_model

__all__ = ["SASRec", "SequentialRecommender", "recbole_attention_mask"]


def recbole_attention_mask(item_seq: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Additive mask (B, 1, L, L): 0 where a position may attend, −10000 elsewhere (RecBole's value).

    Keys that are padding (item id 0) are masked; with `causal`, so is every later position.
    """
    L = item_seq.shape[1]
    allowed = (item_seq != 0)[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=item_seq.device).tril()
    return torch.zeros(allowed.shape, device=item_seq.device).masked_fill(~allowed, -10000.0)


class SequentialRecommender(nn.Module):
    """Shared contract of the recommendation models.

    forward(item_seq, item_seq_len) -> (B, D) representation of each history, read at the last item.
    `item_seq` holds item ids left-aligned and padded with 0 to exactly `max_len` (RecBole's layout).
    """

    num_items: int
    max_len: int
    item_embedding: nn.Embedding

    def _check_input(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> None:
        name = getattr(self, "model_name", type(self).__name__)
        if not isinstance(item_seq, torch.Tensor) or item_seq.ndim != 2 or item_seq.shape[1] != self.max_len \
                or item_seq.dtype not in (torch.int64, torch.int32):
            got = tuple(item_seq.shape) if isinstance(item_seq, torch.Tensor) else type(item_seq).__name__
            dtype = getattr(item_seq, "dtype", None)
            raise ValueError(f"{name}: expected item_seq of shape (B, {self.max_len}) with integer item ids "
                             f"(padded with 0 to max_len={self.max_len}), got {got} of dtype {dtype}")
        if not isinstance(item_seq_len, torch.Tensor) or item_seq_len.shape != item_seq.shape[:1]:
            raise ValueError(f"{name}: expected item_seq_len of shape ({item_seq.shape[0]},), "
                             f"got {getattr(item_seq_len, 'shape', type(item_seq_len).__name__)}")

    def scores(self, seq_output: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Dot-product scores: over all items (B, num_items), or over given candidates (B, K)."""
        if items is None:
            return seq_output @ self.item_embedding.weight.t()
        return torch.einsum("bd,bkd->bk", seq_output, self.item_embedding(items))

    def calculate_loss(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Full-softmax cross-entropy over every item (RecBole's `loss_type: CE`).

        On the CPU the (B, num_items) logits are never stored (`linear_cross_entropy`, same value and gradient).
        """
        return linear_cross_entropy(self(item_seq, item_seq_len), self.item_embedding.weight, target)

    @staticmethod
    def gather_last(output: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        idx = (item_seq_len - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, output.shape[-1])
        return output.gather(1, idx).squeeze(1)

    def example_input(self, batch_size: int, device: torch.device | str = "cpu"):
        # lengths 1, max_len, 2, max_len - 1, ... so that short and full histories are both exercised
        i = torch.arange(batch_size, device=device)
        lengths = torch.where(i % 2 == 0, i // 2 + 1, self.max_len - i // 2).clamp(1, self.max_len)
        seq = torch.randint(1, self.num_items, (batch_size, self.max_len), device=device)
        seq = seq.masked_fill(torch.arange(self.max_len, device=device)[None] >= lengths[:, None], 0)
        return seq, lengths

    def example_bad_input(self, batch_size: int):
        return torch.randn(batch_size, self.max_len), torch.ones(batch_size, dtype=torch.long)

    def _init_weights(self, module: nn.Module) -> None:
        # RecBole: normal(0, initializer_range) for Linear and Embedding, zero bias, LayerNorm (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class MultiHeadAttention(nn.Module):
    """RecBole's post-norm attention: separate q/k/v, dense, dropout, residual, LayerNorm."""

    def __init__(self, *, n_heads: int, hidden_size: int, hidden_dropout_prob: float, attn_dropout_prob: float,
                 layer_norm_eps: float, residual: bool = True):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout_prob = attn_dropout_prob
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.out_dropout = FastDropout(hidden_dropout_prob)
        self.residual = residual

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # the mask in q's dtype: PyTorch's CPU SDPA given a float32 mask with float64 q, k, v returns wrong
        # values on AVX2 machines (errors of order 1; right on AVX-512 ones)
        attn_mask = attn_mask.to(q.dtype)
        if self.training and torch.is_grad_enabled() and use_fused_cpu(x):
            # CPU training: cache-sized chunks and a cheap dropout mask (same function, ~3x faster here)
            ctx = chunked_attention(q, k, v, attn_mask, self.attn_dropout_prob)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.attn_dropout_prob if self.training else 0.0)
        out = self.dense(ctx.transpose(1, 2).reshape(B, L, D))
        if self.residual:
            return self.LayerNorm(self.out_dropout(out) + x)
        return self.LayerNorm(out)


def _act(name: str):
    acts = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(acts)}")
    return acts[name]


class FeedForward(nn.Module):
    def __init__(self, *, hidden_size: int, inner_size: int, hidden_dropout_prob: float, hidden_act: str,
                 layer_norm_eps: float):
        super().__init__()
        self.dense_1 = nn.Linear(hidden_size, inner_size)
        self.act = _act(hidden_act)
        self.dense_2 = nn.Linear(inner_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = FastDropout(hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense_2(self.act(self.dense_1(x)))) + x)


class TransformerLayer(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.multi_head_attention = MultiHeadAttention(
            n_heads=kw["n_heads"], hidden_size=kw["hidden_size"], hidden_dropout_prob=kw["hidden_dropout_prob"],
            attn_dropout_prob=kw["attn_dropout_prob"], layer_norm_eps=kw["layer_norm_eps"])
        self.feed_forward = FeedForward(hidden_size=kw["hidden_size"], inner_size=kw["inner_size"],
                                        hidden_dropout_prob=kw["hidden_dropout_prob"], hidden_act=kw["hidden_act"],
                                        layer_norm_eps=kw["layer_norm_eps"])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.multi_head_attention(x, attn_mask))


class TransformerEncoder(nn.Module):
    def __init__(self, n_layers: int, **kw):
        super().__init__()
        self.layer = nn.ModuleList([TransformerLayer(**kw) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, attn_mask)
        return x


class SASRec(SequentialRecommender):
    length_groups = 8  # histories are encoded in this many groups of similar length (see forward)

    def __init__(self, *, num_items: int, max_len: int = 50, n_layers: int = 2, n_heads: int = 2,
                 hidden_size: int = 64, inner_size: int = 256, hidden_dropout_prob: float = 0.5,
                 attn_dropout_prob: float = 0.5, hidden_act: str = "gelu", layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02):
        super().__init__()
        self.num_items, self.max_len, self.hidden_size = num_items, max_len, hidden_size
        self.initializer_range = initializer_range
        self.item_embedding = nn.Embedding(num_items, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.trm_encoder = TransformerEncoder(
            n_layers, n_heads=n_heads, hidden_size=hidden_size, inner_size=inner_size,
            hidden_dropout_prob=hidden_dropout_prob, attn_dropout_prob=attn_dropout_prob, hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = FastDropout(hidden_dropout_prob)
        self.apply(self._init_weights)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        self._check_input(item_seq, item_seq_len)
        if item_seq.shape[0] < 2 * self.length_groups:
            return self._encode(item_seq, item_seq_len)
        # Exact shortcut: with a causal mask and per-position FFN/LayerNorm, the output at the last item
        # never depends on later (padding) positions, so each group of similar-length histories is cut to
        # its longest member. Short histories (most of Amazon's) then cost a fraction of max_len.
        order = torch.argsort(item_seq_len)
        out = item_seq.new_empty((item_seq.shape[0], self.hidden_size), dtype=self.item_embedding.weight.dtype)
        for idx in order.tensor_split(self.length_groups):
            width = int(item_seq_len[idx].max().clamp(1, item_seq.shape[1]))
            out[idx] = self._encode(item_seq[idx, :width], item_seq_len[idx])
        return out

    def _encode(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(item_seq.shape[1], device=item_seq.device)
        x = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(pos)[None]))
        x = self.trm_encoder(x, recbole_attention_mask(item_seq))
        return self.gather_last(x, item_seq_len)


@register_model(paper="Self-Attentive Sequential Recommendation", arxiv="1808.09781", task="recommendation",
                reported=dict(params_m=0.877824, gflops=None, resolution=50),
                params=877_824, input_size=(50,),
                test_kwargs=dict(num_items=60, max_len=12, hidden_size=16, inner_size=32),
                notes="RecBole's defaults (2 layers, 2 heads, hidden 64, inner 256, dropout 0.5) at 12,102 items "
                      "(Amazon Beauty 5-core incl. padding); pass num_items= for another dataset.")
def sasrec(**kwargs):
    kwargs.setdefault("num_items", 12102)
    return SASRec(**kwargs)
