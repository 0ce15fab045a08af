"""Pictures that explain these networks (`hybridzoo explain`): attention maps, ConViT's gates and
positional centres, SuperViT's kept tokens and Mobile-Former's bridge attention.

The attention layers compute through fused `scaled_dot_product_attention`, which never forms the
probabilities. `AttentionRecorder` hooks each attention layer and recomputes its probabilities from
the layer's own input and weights, once, for the picture (tests check that the recomputed maps,
multiplied by the layer's values, give the layer's own output).

- class-token attention per head of the last global layer, and attention rollout (Abnar & Zuidema,
  ACL 2020: the product of head-averaged maps with the residual, 0.5·A + 0.5·I) over the trailing
  layers that share the token set — ViT / DeiT / ViT_C / CeiT / ConViT / SuperViT; CvT: the class
  token's attention to the stride-2 keys of its last stage;
- CeiT: the layer-wise class-token attention (which layer's class token the output draws on);
- ConViT: each GPSA head's gate σ(λ) per layer (how much locality it kept) and its positional
  attention from the central patch (where its attention centre sits, the paper's Fig. 5);
- SuperViT: the patches each keep-rate retains, on the image;
- Mobile-Former: where each global token attends in every Mobile→Former bridge;
- SCTNet: how close the student's features are to its SegFormer teacher's at the four places SIAM
  aligns them (logits and fused decoder feature, MiT stages 4 and 3): linear CKA per stage and the
  per-pixel cosine map.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionRecorder", "explain_model", "linear_cka", "sctnet_alignment", "cls_attention_maps", "attention_rollout", "convit_gates",
           "convit_positional_maps", "supervit_kept_tokens", "save_explanations", "EXPLAINABLE"]

# the model families `explain` draws, by the model's module
EXPLAINABLE = ("vit", "vitc", "cvt", "ceit", "convit", "supervit", "mobile_former", "sctnet")


def _softmax_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q.float() @ k.float().transpose(-2, -1) * scale).softmax(dim=-1)


class AttentionRecorder:
    """Forward hooks on every attention layer of a model; `records` holds one dict per call:
    `name`, `kind`, `probs` (B × heads × queries × keys) and kind-specific facts (`grid` of the keys)."""

    def __init__(self, model: nn.Module):
        from hybridzoo.layers.attention import Attention
        from hybridzoo.models.ceit import LCAttention
        from hybridzoo.models.convit import GPSA
        from hybridzoo.models.cvt import ConvAttention
        from hybridzoo.models.mobile_former import MobileToFormer

        self.records: list[dict[str, Any]] = []
        self._handles = []
        kinds = ((GPSA, "gpsa", self._gpsa), (ConvAttention, "conv", self._conv), (LCAttention, "lca", self._lca),
                 (MobileToFormer, "m2f", self._m2f), (Attention, "mhsa", self._mhsa))
        for name, m in model.named_modules():
            for cls, kind, fn in kinds:
                if isinstance(m, cls):
                    self._handles.append(m.register_forward_hook(
                        lambda mod, args, out, name=name, kind=kind, fn=fn: self.records.append(
                            {"name": name, "kind": kind, "output": _first(out).detach(), **fn(mod, *args)})))
                    break

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "AttentionRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- per layer type: recompute q, k exactly as the layer does ----------------------------------
    @staticmethod
    @torch.no_grad()
    def _mhsa(m, x, *_) -> dict[str, Any]:
        B, N, C = x.shape
        q, k, v = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return {"probs": _softmax_scores(q, k, m.scale), "values": v}

    @staticmethod
    @torch.no_grad()
    def _gpsa(m, x, rel) -> dict[str, Any]:
        B, N, C = x.shape
        v = m.v(x).reshape(B, N, m.num_heads, m.head_dim).transpose(1, 2)
        return {"probs": m.get_attention(x, rel).float(), "values": v,
                "gate": torch.sigmoid(m.gating_param).detach().float(),
                "positional": m.positional_attention(rel)[0].float()}

    @staticmethod
    @torch.no_grad()
    def _conv(m, x, h, w) -> dict[str, Any]:
        B, N, C = x.shape
        cls_tok = x[:, :1] if m.with_cls_token else None
        t = x[:, 1:] if m.with_cls_token else x
        img = t.transpose(1, 2).reshape(B, C, h, w)
        q, k, v = m.conv_proj_q(img), m.conv_proj_k(img), m.conv_proj_v(img)
        hk, wk = m.conv_proj_k.conv(img[:, :, :, :]).shape[-2:]
        if cls_tok is not None:
            q, k, v = (torch.cat((cls_tok, s), dim=1) for s in (q, k, v))
        q, k, v = m._heads(m.proj_q(q)), m._heads(m.proj_k(k)), m._heads(m.proj_v(v))
        return {"probs": _softmax_scores(q, k, m.scale), "values": v, "key_grid": (int(hk), int(wk)),
                "query_grid": (h, w), "prefix": 1 if cls_tok is not None else 0}

    @staticmethod
    @torch.no_grad()
    def _lca(m, x) -> dict[str, Any]:
        B, L, C = x.shape
        w, b = m.qkv.weight, m.qkv.bias
        q = F.linear(x[:, -1:], w[:C], None if b is None else b[:C]).reshape(B, 1, m.num_heads, m.head_dim)
        k = F.linear(x, w[C:2 * C], None if b is None else b[C:2 * C]).reshape(B, L, m.num_heads, m.head_dim)
        return {"probs": _softmax_scores(q.transpose(1, 2), k.transpose(1, 2), m.scale)}

    @staticmethod
    @torch.no_grad()
    def _m2f(m, x, z) -> dict[str, Any]:
        B, C, H, W = x.shape
        T = z.shape[1]
        q = m.q(z).view(B, T, m.num_heads, -1).transpose(1, 2)
        kv = x.flatten(2).view(B, m.num_heads, C // m.num_heads, H * W).transpose(-1, -2)
        return {"probs": _softmax_scores(q, kv, m.scale), "key_grid": (H, W)}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _grid_for(n: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid of n patches for an image of this aspect ratio."""
    h, w = image_hw
    gh = max(1, round(math.sqrt(n * h / w)))
    while n % gh:
        gh -= 1
    return gh, n // gh


def cls_attention_maps(rec: dict[str, Any], image_hw: tuple[int, int], prefix: int) -> torch.Tensor:
    """(heads, gh, gw) attention of the class token (query 0) to the patch keys of one layer, first image.

    Each head's full row (prefix tokens included) sums to one; the map shows its patch part."""
    probs = rec["probs"][0]                                   # heads × queries × keys
    row = probs[:, 0, prefix:]
    grid = rec.get("key_grid") or _grid_for(row.shape[-1], image_hw)
    return row.reshape(row.shape[0], *grid)


def attention_rollout(records: list[dict[str, Any]], image_hw: tuple[int, int], prefix: int) -> torch.Tensor:
    """Rollout over the trailing layers whose queries and keys are one token set (the same count):
    R = Π (0.5·mean_h A + 0.5·I), rows renormalised; returns the class token's row over the patches."""
    n = records[-1]["probs"].shape[-1]
    chain = []
    for rec in reversed(records):
        p = rec["probs"]
        if p.shape[-1] != n or p.shape[-2] != n:
            break
        chain.append(p[0].mean(0))
    eye = torch.eye(n)
    r = eye.clone()
    for a in reversed(chain):  # first layer first
        a = 0.5 * a + 0.5 * eye
        r = (a / a.sum(-1, keepdim=True)) @ r
    row = r[0, prefix:]
    return row.reshape(_grid_for(row.numel(), image_hw)), len(chain)


def convit_gates(records: list[dict[str, Any]]) -> torch.Tensor:
    """(GPSA layers, heads) gate σ(λ): 1 = purely positional (local), 0 = purely content."""
    return torch.stack([r["gate"] for r in records if r["kind"] == "gpsa"])


def convit_positional_maps(records: list[dict[str, Any]], image_hw: tuple[int, int]) -> torch.Tensor:
    """(GPSA layers, heads, gh, gw): each head's positional attention from the central patch."""
    maps = []
    for r in records:
        if r["kind"] != "gpsa":
            continue
        pos = r["positional"]                                  # heads × N × N
        gh, gw = _grid_for(pos.shape[-1], image_hw)
        centre = (gh // 2) * gw + gw // 2
        maps.append(pos[:, centre].reshape(-1, gh, gw))
    return torch.stack(maps)


@torch.no_grad()
def supervit_kept_tokens(model: nn.Module, x: torch.Tensor, keep_rate: float, img_size: int | None = None
                         ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Boolean (gh, gw) mask of the patches still present after the last token-keeping layer, first image."""
    import hybridzoo.models.supervit as sv

    kept: list[torch.Tensor] = []
    original = sv.keep_tokens

    def recording(t, score, rate):
        out = original(t, score, rate)
        n = t.shape[1]
        num_keep = min(math.ceil(rate * n), n - 1)
        kept.append(score.topk(num_keep, dim=1).indices[0])
        return out

    sv.keep_tokens = recording
    try:
        model.forward_features(x, keep_rate=keep_rate, img_size=img_size)
    finally:
        sv.keep_tokens = original
    size = img_size or model._resolve(x, img_size, keep_rate)
    p = model.patch_embed.proj.kernel_size[0] if hasattr(model.patch_embed, "proj") else 16
    gh = gw = size // p
    positions = torch.arange(gh * gw)
    for idx in kept:                                           # indices into the surviving patches
        positions = positions[idx]
    mask = torch.zeros(gh * gw, dtype=torch.bool)
    mask[positions] = True
    return mask.reshape(gh, gw), (gh, gw)


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) between two feature maps over their pixels: (N, C, H, W)
    each, any channel counts; 1 for features equal up to an orthogonal map and a scale."""
    x = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double()
    y = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]).double()
    x, y = x - x.mean(0), y - y.mean(0)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(num / den) if den > 0 else 0.0


SIAM_PAIRS = ("logits (SDHA)", "fused decoder feature (SDHA)", "MiT stage 4 (BFA)", "MiT stage 3 (BFA)")


@torch.no_grad()
def sctnet_alignment(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """For each pair SIAM aligns (teacher ← student): linear CKA and the per-pixel cosine map (first image)."""
    if getattr(model, "siam", None) is None:
        raise ValueError("SCTNet's teacher-student picture needs its SIAM teacher: pass --teacher WEIGHTS "
                         "(or a run trained with --teacher)")
    model.eval()
    feat_t, feat_s = model.siam.features(x, model.forward_features(x))
    out = []
    for name, t, st in zip(SIAM_PAIRS, feat_t, feat_s):
        if st.shape[-2:] != t.shape[-2:]:
            st = F.interpolate(st, size=t.shape[-2:], mode="bilinear", align_corners=False)
        out.append({"name": name, "cka": linear_cka(t, st), "cosine": F.cosine_similarity(t, st, dim=1)[0].float()})
    return out


@torch.no_grad()
def explain_model(model: nn.Module, x: torch.Tensor, **forward_kwargs) -> dict[str, Any]:
    """Every map the model's family supports for the first image of `x` (a normalised batch)."""
    model.eval()
    module = type(model).__module__.rsplit(".", 1)[-1]
    image_hw = tuple(x.shape[-2:])
    with AttentionRecorder(model) as rec:
        model(x, **forward_kwargs)
    records = rec.records
    out: dict[str, Any] = {"family": module, "records": records}
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    glob = [r for r in records if r["kind"] in ("mhsa", "conv") and r["probs"].shape[-2] > 1]
    if module == "cvt":
        glob = [r for r in glob if r.get("prefix")]
        prefix = 1
    if module == "convit":
        glob = [r for r in glob if r["kind"] == "mhsa"]
        prefix = 1
    if module == "supervit":
        prefix = 1
    if glob and module != "mobile_former":
        last = glob[-1]
        out["cls_attention"] = cls_attention_maps(last, image_hw, prefix)
        out["cls_attention_layer"] = last["name"]
        if last["kind"] == "mhsa" and module != "supervit":
            out["rollout"], out["rollout_layers"] = attention_rollout(glob, image_hw, prefix)
    if module == "ceit":
        lca = [r for r in records if r["kind"] == "lca"]
        if lca:
            out["layer_attention"] = lca[-1]["probs"][0, :, 0]        # heads × layers
    if module == "convit":
        out["gates"] = convit_gates(records)
        out["positional"] = convit_positional_maps(records, image_hw)
    if module == "sctnet":
        out["alignment"] = sctnet_alignment(model, x)
    if module == "mobile_former":
        out["bridges"] = [(r["name"], r["probs"][0].mean(0).reshape(-1, *r["key_grid"]))   # tokens × H × W
                          for r in records if r["kind"] == "m2f"]
    return out


# -- pictures ------------------------------------------------------------------------------------------

def _show(img: torch.Tensor) -> Any:
    import numpy as np

    a = img.detach().float().cpu()
    a = (a - a.min()) / (a.max() - a.min() + 1e-8)
    return np.ascontiguousarray(a.permute(1, 2, 0).numpy()) if a.shape[0] == 3 else a[0].numpy()


def _overlay(ax, image, amap, title):
    amap = F.interpolate(amap[None, None].float(), size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    ax.imshow(image)
    im = ax.imshow(amap.numpy(), cmap="inferno", alpha=0.6)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return im


def save_explanations(model: nn.Module, name: str, x: torch.Tensor, display: torch.Tensor, out_dir: Path,
                      stem: str) -> list[Path]:
    """Write every picture the model's family supports for one image; returns the files written.

    `x` is the normalised 1×C×H×W input, `display` the same image in [0, 1] for drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    info = explain_model(model, x)
    image = _show(display[0])
    written: list[Path] = []

    def save(fig, suffix):
        path = out_dir / f"{stem}_{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if "cls_attention" in info:
        heads = info["cls_attention"]
        n = heads.shape[0] + 1 + ("rollout" in info)
        cols = min(n, 5)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
        axes = axes.ravel()
        axes[0].imshow(image)
        axes[0].set_title("input", fontsize=8)
        axes[0].axis("off")
        for h in range(heads.shape[0]):
            im = _overlay(axes[h + 1], image, heads[h], f"head {h}")
            fig.colorbar(im, ax=axes[h + 1], fraction=0.046)
        if "rollout" in info:
            im = _overlay(axes[heads.shape[0] + 1], image, info["rollout"],
                          f"rollout over {info['rollout_layers']} layers")
            fig.colorbar(im, ax=axes[heads.shape[0] + 1], fraction=0.046)
        for ax in axes[n:]:
            ax.axis("off")
        fig.suptitle(f"{name}: class-token attention, layer {info['cls_attention_layer']}", fontsize=10)
        save(fig, "attention")
    if "layer_attention" in info:
        la = info["layer_attention"]
        fig, ax = plt.subplots(figsize=(6, 3))
        im = ax.imshow(la.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("class token of layer")
        ax.set_ylabel("head")
        ax.set_title(f"{name}: layer-wise class-token attention (LCA)")
        fig.colorbar(im, ax=ax, label="attention")
        save(fig, "lca")
    if "gates" in info:
        g = info["gates"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        im = ax.imshow(g.numpy(), vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
        ax.set_xlabel("head")
        ax.set_ylabel("GPSA layer")
        ax.set_title(f"{name}: gate σ(λ) (1 = positional/local)")
        fig.colorbar(im, ax=ax)
        save(fig, "gates")
        pos = info["positional"]
        L, H = pos.shape[:2]
        fig, axes = plt.subplots(L, H, figsize=(1.4 * H, 1.4 * L), squeeze=False)
        for i in range(L):
            for h in range(H):
                axes[i, h].imshow(pos[i, h].numpy(), cmap="magma")
                axes[i, h].set_xticks([])
                axes[i, h].set_yticks([])
                if i == 0:
                    axes[i, h].set_title(f"head {h}", fontsize=7)
            axes[i, 0].set_ylabel(f"layer {i}", fontsize=7)
        fig.suptitle(f"{name}: positional attention from the central patch", fontsize=9)
        save(fig, "positional")
    if info["family"] == "supervit":
        rates = [r for r in (1.0, 0.7, 0.5) if r in getattr(model, "keep_rates", (1.0, 0.7, 0.5))] or [1.0]
        fig, axes = plt.subplots(1, len(rates), figsize=(3 * len(rates), 3), squeeze=False)
        for ax, r in zip(axes[0], rates):
            mask, grid = supervit_kept_tokens(model, x, r)
            ax.imshow(image)
            dropped = F.interpolate((~mask)[None, None].float(), size=image.shape[:2], mode="nearest")[0, 0]
            veil = torch.zeros(*dropped.shape, 4)
            veil[..., 3] = 0.7 * dropped                      # black, opaque only over the dropped patches
            ax.imshow(veil.numpy())
            ax.set_title(f"keep rate {r:g}: {int(mask.sum())}/{mask.numel()} patches kept", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{name}: patches retained (dark = dropped)", fontsize=9)
        save(fig, "kept_tokens")
    if info.get("bridges"):
        bridges = info["bridges"]
        tokens = bridges[0][1].shape[0]
        fig, axes = plt.subplots(len(bridges), tokens, figsize=(1.3 * tokens, 1.3 * len(bridges)), squeeze=False)
        for i, (bname, maps) in enumerate(bridges):
            for t in range(tokens):
                ax = axes[i, t]
                ax.imshow(maps[t].numpy(), cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"token {t}", fontsize=7)
            axes[i, 0].set_ylabel(bname.replace(".mobile_former", ""), fontsize=6)
        fig.suptitle(f"{name}: where each global token attends (Mobile→Former, heads averaged)", fontsize=9)
        save(fig, "bridge")
    if info.get("alignment"):
        pairs = info["alignment"]
        fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(3.2 * (len(pairs) + 1), 3.2))
        axes[0].bar(range(len(pairs)), [p["cka"] for p in pairs], color="tab:green")
        axes[0].set_xticks(range(len(pairs)), [p["name"].split(" (")[0] for p in pairs], rotation=30, fontsize=7)
        axes[0].set_ylim(0, 1)
        axes[0].set_ylabel("linear CKA, teacher vs student")
        for ax, p in zip(axes[1:], pairs):
            im = ax.imshow(p["cosine"].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_title(f"{p['name']}\ncosine per pixel", fontsize=7)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046)
        teacher = getattr(model, "explain_teacher", "teacher")
        fig.suptitle(f"{name}: student vs its SegFormer teacher ({teacher}) where SIAM aligns them", fontsize=9)
        save(fig, "teacher_alignment")
    if not written:
        raise ValueError(f"{name}: explain draws {', '.join(EXPLAINABLE)} models; this one has no map it can draw")
    return written


# -- command line ----------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", help="image files to explain")
    p.add_argument("--run", default=None, help="a classification run folder (model and weights from it)")
    p.add_argument("--model", default=None, help="a registered model (with --pretrained for trained weights)")
    p.add_argument("--pretrained", default=None,
                   help="weights for --model: a published tag (`hybridzoo weights`) or a file (converted on load)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the run's or the card's)")
    p.add_argument("--teacher", default=None,
                   help="SCTNet: the SegFormer teacher's weights, to compare the student with (default: the run's)")
    p.add_argument("--output", default="explain", help="folder for the PNGs (default ./explain)")


def _load(args) -> tuple[nn.Module, str, int, list[float], list[float]]:
    """The model, its name, input side and normalisation, from a run folder or a registered name."""
    from hybridzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from hybridzoo.factory import create_model
    from hybridzoo.registry import get_card

    if args.run:
        from hybridzoo.engine.run import load_run

        run = load_run(args.run, device="cpu")
        sct = run.model_name.startswith("sctnet")
        if run.task_name != "classification" and not sct:
            raise ValueError(f"explain draws classification models and SCTNet; {args.run!r} is a {run.task_name} run "
                             f"of {run.model_name}")
        info = run.data_info
        size = int(args.img_size or info.get("img_size") or info.get("crop_size") or run.input_size[-1])
        if sct:
            _attach_teacher(run.model, args.teacher or getattr(run.args, "teacher", None), run.weights)
            mean, std = _seg_norm(info)
            return run.model, run.model_name, size, mean, std
        return (run.model, run.model_name, size, list(info.get("mean", IMAGENET_MEAN)),
                list(info.get("std", IMAGENET_STD)))
    if not args.model:
        raise ValueError("explain needs --run DIR or --model NAME [--pretrained WEIGHTS]")
    card = get_card(args.model)
    if card.module.rsplit(".", 1)[-1] not in EXPLAINABLE:
        raise ValueError(f"{args.model}: explain draws {', '.join(EXPLAINABLE)} models, not {card.module}")
    size = args.img_size or int(card.input_size[-1])
    try:
        model = create_model(args.model, pretrained=args.pretrained, **({"img_size": size} if args.img_size else {}))
    except TypeError:  # a model that takes any input size has no img_size argument
        model = create_model(args.model, pretrained=args.pretrained)
    if card.module.endswith(".sctnet"):
        _attach_teacher(model, args.teacher, None)
        return (model, args.model, size) + _seg_norm({})
    return model, args.model, size, list(IMAGENET_MEAN), list(IMAGENET_STD)


def _seg_norm(info: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Segmentation's mmseg normalisation (on 0..255) expressed on the 0..1 images explain reads."""
    from hybridzoo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD

    mean, std = info.get("mean", IMAGENET_MEAN), info.get("std", IMAGENET_STD)
    return [m / 255.0 for m in mean], [s / 255.0 for s in std]


def _attach_teacher(model: nn.Module, teacher, run_weights) -> None:
    """SIAM with the given teacher weights (else a random teacher, said in the picture's title); a run's
    trained alignment projections are loaded from its weights file when it kept them."""
    model.enable_siam(teacher=teacher)
    model.explain_teacher = "random weights" if teacher is None else Path(str(teacher)).name
    if run_weights is not None:
        from hybridzoo.factory import read_state_dict

        state = {k[len("siam."):]: v for k, v in read_state_dict(run_weights).items()
                 if k.startswith("siam.") and not k.startswith("siam.teacher.")}
        if state:
            model.siam.load_state_dict(state, strict=False)
    model.eval()


def main(args) -> list[Path]:
    from hybridzoo.data.folder import load_image

    model, name, size, mean, std = _load(args)
    model.eval()
    out = Path(args.output)
    written = []
    for path in args.images:
        img = load_image(path)
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        x = (img - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        files = save_explanations(model, name, x, img, out, Path(path).stem)
        written += files
        print(f"{path}: wrote {', '.join(str(f) for f in files)}")
    return written
