"""Attention as convolution: Cordonnier, Loukas & Jaggi, "On the Relationship between Self-Attention and
Convolutional Layers" (ICLR 2020, arXiv 1911.03584).

Their Theorem 1: a multi-head self-attention layer with N_h = K² heads of dimension ≥ C_out and a
*quadratic* relative position encoding can express any K×K convolution. Head h attends only by
position, with scores −α_h·‖δ − Δ_h‖² over the offset δ = key − query; as α_h grows the softmax becomes
one-hot on the pixel at offset Δ_h. Pick the K² shifts of the kernel's footprint as the Δ_h, give head h
the value/output product W_conv[:, :, i, j]ᵀ, and the concatenated heads sum to the convolution.

ConViT (arXiv 2103.10697) builds exactly this into its GPSA layers: its positional scores are
v_posᵀ(Δx, Δy, Δx²+Δy²) and its local initialisation sets v_pos = α(2Δ_h,x, 2Δ_h,y, −1), which is
−α‖δ − Δ_h‖² up to a per-row constant (that the softmax ignores). `gpsa_matches_construction` checks it.

`QuadraticPositionalAttention` is that layer (positional attention only, no content term), and
`from_conv` the constructive proof: the returned layer equals the convolution (zero padding included)
to float precision. `imitate_conv` trains a randomly initialised layer to imitate a convolution and
records how its attention centres move — they settle on the K×K grid, as the paper's figure shows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuadraticPositionalAttention", "from_conv", "kernel_shifts", "gpsa_matches_construction",
           "imitate_conv"]


def kernel_shifts(kernel_size: int, device=None) -> torch.Tensor:
    """(K², 2) offsets (Δrow, Δcol) of a K×K kernel's footprint, kernel index i·K + j ↦ (i − K//2, j − K//2)."""
    r = torch.arange(kernel_size, device=device) - kernel_size // 2
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2).float()


def _grid(h: int, w: int, device=None) -> torch.Tensor:
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([rows, cols], dim=-1).float()  # (N, 2), row-major tokens


class QuadraticPositionalAttention(nn.Module):
    """Multi-head self-attention over an H×W token grid whose heads attend by position only.

    Head h's attention from query q to key k is softmax_k(−α_h·‖(k − q) − Δ_h‖²): a Gaussian-shaped
    window of width 1/√α_h centred at offset Δ_h (the paper's quadratic encoding, Eq. 9). Values are
    projected per head (`value`, C_in → heads·head_dim), the heads concatenated and projected (`out`).
    `padding` zero-pads the input grid before attending and crops after, as a convolution's padding.
    """

    def __init__(self, in_chans: int, out_chans: int, num_heads: int, head_dim: int | None = None,
                 padding: int = 0, alpha: float = 1.0):
        super().__init__()
        head_dim = head_dim or out_chans
        self.num_heads, self.head_dim, self.padding = num_heads, head_dim, padding
        self.value = nn.Linear(in_chans, num_heads * head_dim, bias=False)
        self.out = nn.Linear(num_heads * head_dim, out_chans)
        self.centres = nn.Parameter(torch.randn(num_heads, 2) * 0.1)   # Δ_h = (Δrow, Δcol)
        # α_h = exp(log_alpha): positive, and learnable on a log scale (it spans orders of magnitude)
        self.log_alpha = nn.Parameter(torch.full((num_heads,), math.log(alpha)))

    def attention(self, h: int, w: int) -> torch.Tensor:
        """(heads, N, N) attention probabilities over an h×w grid (rows: queries, summing to one)."""
        pos = _grid(h, w, self.centres.device)
        delta = pos[None, :, :] - pos[:, None, :]                               # (N, N, 2): key − query
        dist2 = ((delta[None] - self.centres[:, None, None, :]) ** 2).sum(-1)   # (heads, N, N)
        return (-self.log_alpha.exp()[:, None, None] * dist2).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"QuadraticPositionalAttention expects (B, C, H, W), got shape {tuple(x.shape)}")
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p))
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)                                   # (B, N, C)
        v = self.value(tokens).reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        y = (self.attention(H, W)[None] @ v).transpose(1, 2).reshape(B, H * W, -1)
        y = self.out(y).transpose(1, 2).reshape(B, -1, H, W)
        return y[:, :, p:H - p, p:W - p] if p else y


@torch.no_grad()
def from_conv(conv: nn.Conv2d, alpha: float = 60.0) -> QuadraticPositionalAttention:
    """The attention layer that computes `conv` (the constructive proof of the paper's Theorem 1).

    K² heads, head h ↔ kernel position (i, j): centre Δ_h = (i − K//2, j − K//2), value projection
    W[:, :, i, j]ᵀ (C_in → C_out), output projection the identity on each head's block plus the bias.
    With α = 60 every off-centre weight is below e^−60 ≈ 1e-26: exact in float32.
    """
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"from_conv needs a square odd kernel, got {conv.kernel_size}")
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError("from_conv handles stride 1, dilation 1, groups 1 (the paper's setting); got "
                         f"stride {conv.stride}, dilation {conv.dilation}, groups {conv.groups}")
    pad = conv.padding if isinstance(conv.padding, tuple) else (conv.padding,) * 2
    if pad[0] != pad[1] or conv.padding_mode != "zeros":
        raise ValueError(f"from_conv handles equal zero padding, got padding {conv.padding} ({conv.padding_mode})")
    k, cin, cout = kh, conv.in_channels, conv.out_channels
    layer = QuadraticPositionalAttention(cin, cout, num_heads=k * k, head_dim=cout, padding=pad[0], alpha=alpha)
    layer = layer.to(conv.weight.device, conv.weight.dtype)
    layer.centres.copy_(kernel_shifts(k, conv.weight.device))
    # value rows for head h = i·K + j are W[:, :, i, j] (C_out × C_in): nn.Linear stores (out, in)
    layer.value.weight.copy_(conv.weight.permute(2, 3, 0, 1).reshape(k * k * cout, cin))
    layer.out.weight.copy_(torch.eye(cout).repeat(1, k * k))
    layer.out.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(cout))
    return layer


@torch.no_grad()
def gpsa_matches_construction(gpsa: nn.Module, grid: tuple[int, int]) -> float:
    """Max |difference| between a locally initialised ConViT GPSA layer's positional attention and
    this construction's attention with the same centres and α = the GPSA's locality strength."""
    from hybridzoo.models.convit import relative_indices

    k = int(gpsa.num_heads ** 0.5)
    if k * k != gpsa.num_heads or k % 2 == 0:
        raise ValueError(f"the comparison needs an odd square number of heads, got {gpsa.num_heads}")
    pos = gpsa.positional_attention(relative_indices(grid))[0]                 # (heads, N, N)
    # ConViT head h1 + k·h2 attends to offset (Δx, Δy) = (h2 − c, h1 − c): (Δrow, Δcol) = (h1 − c, h2 − c)
    c = k // 2
    centres = torch.tensor([[h % k - c, h // k - c] for h in range(gpsa.num_heads)], dtype=torch.float32)
    ours = QuadraticPositionalAttention(1, 1, gpsa.num_heads, alpha=gpsa.locality_strength)
    ours.centres.copy_(centres)
    return float((ours.attention(*grid) - pos).abs().max())


def imitate_conv(kernel_size: int = 3, channels: int = 4, size: int = 12, steps: int = 600, lr: float = 0.05,
                 seed: int = 0, record_every: int = 10) -> dict[str, Any]:
    """Train a randomly initialised K²-head layer to imitate a random K×K convolution.

    Returns the loss curve, the centres every `record_every` steps and the target grid. The centres
    start near the origin; learning moves them out towards the kernel's K² offsets.
    """
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(channels * kernel_size ** 2))
        conv.bias.copy_(torch.randn(channels, generator=g) * 0.1)
    torch.manual_seed(seed)
    layer = QuadraticPositionalAttention(channels, channels, kernel_size ** 2, head_dim=channels,
                                         padding=kernel_size // 2, alpha=1.0)
    with torch.no_grad():  # every head starts near the query pixel: the spread to the K×K grid is learned
        layer.centres.copy_(torch.randn(kernel_size ** 2, 2, generator=g) * 0.2)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses, trail = [], [layer.centres.detach().clone()]
    for step in range(steps):
        x = torch.randn(16, channels, size, size, generator=g)
        with torch.no_grad():
            target = conv(x)
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % record_every == 0:
            trail.append(layer.centres.detach().clone())
    return {"losses": losses, "centres": torch.stack(trail), "target": kernel_shifts(kernel_size),
            "alpha": layer.log_alpha.detach().exp(), "layer": layer, "conv": conv}


def grid_distance(centres: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean and max distance between the centres and the grid points, matched one-to-one (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    d = torch.cdist(centres.float(), target.float())
    i, j = linear_sum_assignment(d.numpy())
    return float(d[i, j].mean()), float(d[i, j].max())


def run(args, out) -> dict[str, Any]:
    """The study: exactness of the construction (K = 3, 5), ConViT's GPSA = the construction, and training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridzoo.models.convit import GPSA
    from hybridzoo.studies import write_table

    torch.manual_seed(args.seed)
    rows = []
    for k in (3, 5):
        conv = nn.Conv2d(8, 16, k, padding=k // 2)
        x = torch.randn(4, 8, 14, 14)
        with torch.no_grad():
            err = float((from_conv(conv)(x) - conv(x)).abs().max())
        gpsa = GPSA(k * k * 4, num_heads=k * k, locality_strength=2.0)
        gpsa.local_init()
        rows.append({"K": k, "heads": k * k, "max abs(attention − conv)": err,
                     "max abs(GPSA local init − construction)": gpsa_matches_construction(gpsa, (7, 7))})
    steps = args.steps or (60 if args.quick else 1500)
    res = imitate_conv(kernel_size=3, steps=steps, size=8, seed=args.seed)
    start, end = grid_distance(res["centres"][0], res["target"]), grid_distance(res["centres"][-1], res["target"])
    rows.append({"K": 3, "heads": 9, "max abs(attention − conv)": res["losses"][-1] ** 0.5,
                 "max abs(GPSA local init − construction)": None})
    note = ("Rows 1–2: the constructed layer against nn.Conv2d (zero padding) on random inputs and kernels, and a "
            "locally initialised ConViT GPSA layer's positional attention against the construction (α = its locality "
            f"strength). Row 3: a layer trained for {steps} steps to imitate a random 3×3 convolution (RMSE, not a max). "
            f"Its 9 attention centres, matched to the 3×3 grid: mean distance {start[0]:.3f} at the start, "
            f"{end[0]:.3f} at the end (max {end[1]:.3f}); learned α (sharpness) {res['alpha'].mean():.2f} on average.")
    md = write_table(out, rows, "Attention as convolution (Cordonnier, Loukas & Jaggi, ICLR 2020)", note)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    trail = res["centres"].numpy()                      # (T, heads, 2) as (Δrow, Δcol)
    for h in range(trail.shape[1]):
        colour = plt.cm.tab10(h % 10)
        ax.plot(trail[:, h, 1], trail[:, h, 0], "-", lw=1, alpha=0.7, color=colour)
        ax.plot(trail[0, h, 1], trail[0, h, 0], "o", color="grey", ms=4)
        ax.plot(trail[-1, h, 1], trail[-1, h, 0], "o", ms=7, color=colour)
    t = res["target"].numpy()
    ax.plot(t[:, 1], t[:, 0], "k+", ms=14, mew=2, label="3×3 kernel offsets")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("Δ column (pixels)")
    ax.set_ylabel("Δ row (pixels)")
    ax.set_title("attention centres (grey: start, colour: end)")
    ax.legend(loc="lower right", fontsize=8)
    ax2.semilogy(res["losses"])
    ax2.set_xlabel("step")
    ax2.set_ylabel("MSE to the convolution's output")
    ax2.set_title("imitation loss")
    fig.tight_layout()
    fig.savefig(out / "attention_centres.png", dpi=120)
    plt.close(fig)
    return {"rows": rows, "grid_distance_start": start, "grid_distance_end": end, "steps": steps, "table": md}
