"""AdaMCT: Adaptive Mixture of CNN-Transformer for Sequential Recommendation — Jiang et al., CIKM 2023,
arXiv 2205.08776.

What is hybrid: every layer runs a global branch (causal multi-head self-attention) and a local branch
(a 1-D convolution over the sequence) side by side, reweights each branch's positions with a
squeeze-excitation attention, and mixes them with one learned gate per sequence and layer.
Official code: juyongjiang/AdaMCT `recbole/model/sequential_recommender/adamct.py` (a RecBole model);
parameter names are the official ones, so its state dicts load unchanged. Deviations: none. Facts kept
from the official code: the squeeze-excitation layers are linear over the *sequence axis*, so inputs are
always padded to exactly `max_len`; the convolution is symmetric (not causal), which leaks nothing
because RecBole trains on every prefix and reads the last valid position; there is no FFN and no
residual inside the attention — the only residual is the mixture unit's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.layers.fused import FastDropout
from hybridzoo.models.sasrec import MultiHeadAttention, SequentialRecommender, _act, recbole_attention_mask
from hybridzoo.registry import register_model

__all__ = ["AdaMCT", "SqueezeExcitationAttention", "LocalConv", "AdaptiveMixtureUnits"]


class SqueezeExcitationAttention(nn.Module):
    """SEAtt: s = σ(W₂·ReLU(W₁·mean_D(X))) over the N sequence positions; X ⊙ s."""

    def __init__(self, seq_len: int, reduction_ratio: int):
        super().__init__()
        self.dense_1 = nn.Linear(seq_len, seq_len // reduction_ratio)
        self.dense_2 = nn.Linear(seq_len // reduction_ratio, seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.dense_2(F.relu(self.dense_1(x.mean(dim=-1)))))  # (B, N)
        return x * s.unsqueeze(-1)


class LocalConv(nn.Module):
    """The local branch: symmetric Conv1d over positions → LayerNorm → activation."""

    def __init__(self, hidden_size: int, kernel_size: int, hidden_act: str, layer_norm_eps: float):
        super().__init__()
        self.conv_1_3 = nn.Conv1d(hidden_size, hidden_size, kernel_size, padding=(kernel_size - 1) // 2)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.act = _act(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The Conv1d over positions, run as a (1, k) conv2d on the (B, L, D) tensor viewed channels-last
        # (B, D, 1, L): oneDNN reads and writes that layout directly, so neither side is transposed in memory.
        conv = self.conv_1_3
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), conv.weight.unsqueeze(2), conv.bias, padding=(0, conv.padding[0]))
        return self.act(self.LayerNorm(y.squeeze(2).transpose(1, 2)))


class AdaptiveMixtureUnits(nn.Module):
    """α = σ(Linear(mean_N(h))), one scalar per sequence; out = LN(Drop(Linear((1−α)G + αL)) + h)."""

    def __init__(self, hidden_size: int, layer_norm_eps: float, hidden_dropout_prob: float):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.linear_out = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = FastDropout(hidden_dropout_prob)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        # The mean runs over all N positions, padding included, as in the official code.
        return torch.sigmoid(self.linear(h.mean(dim=1))).unsqueeze(-1)  # (B, 1, 1)

    def forward(self, h: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
        alpha = self.gate(h)
        mixed = (1 - alpha) * global_out + alpha * local_out
        return self.LayerNorm(self.dropout(self.linear_out(mixed)) + h)


class AdaMCTLayer(nn.Module):
    def __init__(self, *, n_heads: int, hidden_size: int, kernel_size: int, seq_len: int, reduction_ratio: int,
                 hidden_dropout_prob: float, attn_dropout_prob: float, hidden_act: str, layer_norm_eps: float):
        super().__init__()
        self.linear_en = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = FastDropout(hidden_dropout_prob)
        self.multi_head_attention = MultiHeadAttention(
            n_heads=n_heads, hidden_size=hidden_size, hidden_dropout_prob=hidden_dropout_prob,
            attn_dropout_prob=attn_dropout_prob, layer_norm_eps=layer_norm_eps, residual=False)
        self.local_conv = LocalConv(hidden_size, kernel_size, hidden_act, layer_norm_eps)
        self.global_seatt = SqueezeExcitationAttention(seq_len, reduction_ratio)
        self.local_seatt = SqueezeExcitationAttention(seq_len, reduction_ratio)
        self.adaptive_mixture_units = AdaptiveMixtureUnits(hidden_size, layer_norm_eps, hidden_dropout_prob)

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h_en = self.LayerNorm(self.dropout(self.linear_en(h)))
        global_out = self.global_seatt(self.multi_head_attention(h_en, attn_mask))
        local_out = self.local_seatt(self.local_conv(h_en))
        return self.adaptive_mixture_units(h, global_out, local_out)


class AdaMCTEncoder(nn.Module):
    def __init__(self, n_layers: int, **kw):
        super().__init__()
        self.layer = nn.ModuleList([AdaMCTLayer(**kw) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, attn_mask)
        return x


class AdaMCT(SequentialRecommender):
    def __init__(self, *, num_items: int, max_len: int = 50, n_layers: int = 2, n_heads: int = 2,
                 hidden_size: int = 64, kernel_size: int = 3, reduction_ratio: int = 2,
                 hidden_dropout_prob: float = 0.5, attn_dropout_prob: float = 0.5, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12, initializer_range: float = 0.02):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the sequence length, got {kernel_size}")
        if max_len // reduction_ratio < 1:
            raise ValueError(f"reduction_ratio {reduction_ratio} is larger than max_len {max_len}")
        self.num_items, self.max_len, self.hidden_size = num_items, max_len, hidden_size
        self.initializer_range = initializer_range
        self.item_embedding = nn.Embedding(num_items, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.adamct_encoder = AdaMCTEncoder(
            n_layers, n_heads=n_heads, hidden_size=hidden_size, kernel_size=kernel_size, seq_len=max_len,
            reduction_ratio=reduction_ratio, hidden_dropout_prob=hidden_dropout_prob,
            attn_dropout_prob=attn_dropout_prob, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = FastDropout(hidden_dropout_prob)
        self.apply(self._init_weights)

    def mixture_gates(self, item_seq: torch.Tensor) -> torch.Tensor:
        """α of every layer for each sequence, (B, n_layers): the weight of the local (conv) branch."""
        self._check_input(item_seq, torch.ones(item_seq.shape[0], dtype=torch.long))
        pos = torch.arange(item_seq.shape[1], device=item_seq.device)
        x = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(pos)[None]))
        mask = recbole_attention_mask(item_seq)
        gates = []
        for layer in self.adamct_encoder.layer:
            gates.append(layer.adaptive_mixture_units.gate(x).view(-1))
            x = layer(x, mask)
        return torch.stack(gates, dim=1)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        self._check_input(item_seq, item_seq_len)
        pos = torch.arange(item_seq.shape[1], device=item_seq.device)
        x = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(pos)[None]))
        x = self.adamct_encoder(x, recbole_attention_mask(item_seq))
        return self.gather_last(x, item_seq_len)


_TEST = dict(num_items=60, max_len=12, hidden_size=16, n_heads=2, kernel_size=3, reduction_ratio=2)
_PAPER = "AdaMCT: Adaptive Mixture of CNN-Transformer for Sequential Recommendation"


@register_model(paper=_PAPER, arxiv="2205.08776", task="recommendation",
                reported={"params_m": 0.210910, "gflops": None, "hr@10": 0.5178, "ndcg@10": 0.3554,
                          "protocol": "uni100", "resolution": 50},
                params=210_910, input_size=(50,), test_kwargs=_TEST,
                notes="Amazon Beauty configuration (config/Amazon_Beauty.yaml): 12,102 items incl. padding, hidden 16, "
                      "2 heads, kernel 5, reduction 2, dropout 0.43/0.57, swish, lr 0.02. Metrics: leave-one-out, "
                      "100 uniformly sampled negatives.")
def adamct_beauty(**kwargs):
    cfg = dict(num_items=12102, hidden_size=16, n_heads=2, kernel_size=5, reduction_ratio=2,
               hidden_dropout_prob=0.43, attn_dropout_prob=0.57, hidden_act="swish")
    return AdaMCT(**{**cfg, **kwargs})


@register_model(paper=_PAPER, arxiv="2205.08776", task="recommendation",
                reported={"params_m": 0.413022, "gflops": None, "hr@10": 0.5088, "ndcg@10": 0.3511,
                          "protocol": "uni100", "resolution": 50},
                params=413_022, input_size=(50,), test_kwargs=_TEST,
                notes="Amazon Toys_and_Games configuration: 11,925 items, hidden 32, 4 heads, kernel 3, reduction 2, "
                      "dropout 0.5/0.5, gelu, lr 0.001.")
def adamct_toys(**kwargs):
    cfg = dict(num_items=11925, hidden_size=32, n_heads=4, kernel_size=3, reduction_ratio=2,
               hidden_dropout_prob=0.5, attn_dropout_prob=0.5, hidden_act="gelu")
    return AdaMCT(**{**cfg, **kwargs})


@register_model(paper=_PAPER, arxiv="2205.08776", task="recommendation",
                reported={"params_m": 1.258258, "gflops": None, "hr@10": 0.5412, "ndcg@10": 0.3444,
                          "protocol": "uni100", "resolution": 50},
                params=1_258_258, input_size=(50,), test_kwargs=_TEST,
                notes="Amazon Sports_and_Outdoors configuration: 18,358 items, hidden 64, 4 heads, kernel 3, "
                      "reduction 5, dropout 0.76/0.51, gelu, lr 0.001.")
def adamct_sports(**kwargs):
    cfg = dict(num_items=18358, hidden_size=64, n_heads=4, kernel_size=3, reduction_ratio=5,
               hidden_dropout_prob=0.76, attn_dropout_prob=0.51, hidden_act="gelu")
    return AdaMCT(**{**cfg, **kwargs})
