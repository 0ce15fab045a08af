"""Land-cover (wetland) mapping: patch-based per-pixel classification of multi-band rasters.

    hybridzoo train --task land-cover                                # wetmapformer_small, built-in SYNTHETIC scene
    hybridzoo train --task land-cover --split block                  # spatially disjoint validation blocks
    hybridzoo train --task land-cover --model cnn2d_landcover        # the plain 2-D CNN baseline
    hybridzoo train --task land-cover --data SA1.mat --label SA1_gt.mat --epochs 100
    hybridzoo predict --task land-cover --run runs/RUN scene.tif     # whole-scene class map (PNG + GeoTIFF)

Every labelled pixel (label raster value > 0) gives one P×P patch (P = 8, the pixel at index (4, 4))
and the model predicts its class (see `hybridzoo.data.land_cover` for formats, padding,
normalisation and the splits). Metrics, as the WetMapFormer notebook computes them with sklearn:
overall accuracy (OA, micro accuracy), average accuracy (AA, mean per-class recall over the classes
present in the reference — sklearn's `balanced_accuracy_score`), Cohen's kappa and per-class F1
(`f1_<class>`). The split is part of every result: "random" (the paper's stratified 70/30 pixel
split, optimistic because neighbouring patches overlap) or "block" (spatially disjoint).

Training defaults follow the notebook: AdamW, lr 1e-3, batch 256, cross-entropy without class
weights. Its `tfa.optimizers.AdamW(weight_decay=1e-4)` subtracts 1e-4·w per step (not scaled by
the learning rate), i.e. torch AdamW weight_decay = 1e-4 / 1e-3 = 0.1. The notebook trains 100
epochs on its (unreleased) scenes; the default here is 10, enough for the built-in scene.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridzoo.data import land_cover as lc
from hybridzoo.engine.metrics import Metric
from hybridzoo.tasks.base import Task, TaskData, register_task, unwrap_model

__all__ = ["LandCoverTask", "LandCoverMetric", "confusion_matrix", "land_cover_metrics", "predict_scene", "save_class_map_png",
           "class_colours", "metric_key"]

# colours for the wetland classes (water blue, marsh light green, bog brown, fen yellow, forested
# wetland dark green, shrub wetland olive, upland tan); other class lists use tab20
_WETLAND_COLOURS = {"water": "#1f5fbf", "marsh": "#7fd17f", "bog": "#8c5a3c", "fen": "#e8d44d",
                    "forested wetland": "#1b6e2e", "shrub wetland": "#9aa84a", "upland": "#d9b98c",
                    "aquatic bed": "#4fb3d9", "freshwater marsh": "#7fd17f"}


# --------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows = reference class, columns = predicted class."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metric_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_") or "class"


def land_cover_metrics(cm: np.ndarray | torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """OA, AA, Cohen's kappa and per-class F1 from a confusion matrix (rows = reference).

    AA averages recall over classes that occur in the reference (a class with no reference pixel has
    no recall). Kappa = (p_o − p_e) / (1 − p_e), taken as 0 when p_e = 1 (all pixels one class on both
    sides: agreement is no better than chance). F1 of a class absent from both reference and
    prediction is 0 (sklearn's zero_division default).
    """
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    K = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(K)]
    n = cm.sum()
    tp = np.diag(cm)
    ref = cm.sum(1)
    pred = cm.sum(0)
    out: dict[str, float] = {}
    out["oa"] = float(tp.sum() / n) if n > 0 else 0.0
    present = ref > 0
    out["aa"] = float((tp[present] / ref[present]).mean()) if present.any() else 0.0
    pe = float((ref * pred).sum() / (n * n)) if n > 0 else 1.0
    out["kappa"] = float((out["oa"] - pe) / (1.0 - pe)) if pe < 1.0 else 0.0
    denom = 2 * tp + (pred - tp) + (ref - tp)
    f1 = np.divide(2 * tp, denom, out=np.zeros(K), where=denom > 0)
    for name, v in zip(names, f1):
        out[f"f1_{metric_key(name)}"] = float(v)
    return out


class LandCoverMetric(Metric):
    """The confusion matrix and the summed cross-entropy over the validation pixels."""

    def __init__(self, num_classes: int | None, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.num_classes, self.class_names = None, class_names
        self.add_state("loss_sums", torch.zeros(2, dtype=torch.float64))  # summed CE, pixels
        if num_classes is not None:
            self.set_num_classes(int(num_classes))

    def set_num_classes(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.add_state("cm", torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64))

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.loss_sums += torch.tensor([float(F.cross_entropy(logits, target, reduction="sum")), float(len(target))],
                                       dtype=torch.float64)
        self.cm += confusion_matrix(logits.argmax(1), target, self.num_classes).cpu()

    def compute(self) -> dict[str, float]:
        if self.num_classes is None or float(self.loss_sums[1]) == 0:
            raise ValueError("land-cover evaluation: the validation set is empty")
        out = land_cover_metrics(self.cm, self.class_names)
        out["loss"] = float(self.loss_sums[0]) / float(self.loss_sums[1])
        return out


# --------------------------------------------------------------------------------------- pictures
def class_colours(class_names: Sequence[str]) -> list:
    import matplotlib

    tab = matplotlib.colormaps["tab20"]
    return [_WETLAND_COLOURS.get(str(n).lower(), tab(i % 20)) for i, n in enumerate(class_names)]


def save_class_map_png(path: str | os.PathLike, panels: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str],
                       title: str = "", max_side: int = 2000) -> None:
    """Class maps (class indices, −1 = no data, shown white) side by side with one legend.

    Maps larger than `max_side` are shown subsampled (the full-resolution map is the GeoTIFF).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = class_colours(class_names)
    cmap = ListedColormap(["#ffffff"] + [matplotlib.colors.to_hex(c) for c in colours])
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels):
        step = max(1, math.ceil(max(m.shape) / max_side))
        ax.imshow(np.asarray(m[::step, ::step]) + 1, cmap=cmap, vmin=0, vmax=len(class_names), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(facecolor=c, edgecolor="k", linewidth=0.3, label=str(nm)) for c, nm in zip(colours, class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------- whole-scene prediction
class _ArraySource:
    """An in-memory (H, W, C) raw scene with the `RasterSource` interface."""

    def __init__(self, image: np.ndarray, geo: Sequence[tuple] = ()):
        self.array, self.geo = image, list(geo)
        self.height, self.width, self.num_bands = image.shape

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        return lc.clean_nodata(self.array[r0:r1])


def _tile(source, r0: int, r1: int, pad: int, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """Rows [r0, r1) with `pad` rows/columns of context (raw zeros beyond the scene), normalised."""
    H, W = source.height, source.width
    buf = np.zeros((r1 - r0 + 2 * pad, W + 2 * pad, source.num_bands), dtype=np.float32)
    a, b = max(0, r0 - pad), min(H, r1 + pad)
    buf[a - (r0 - pad):b - (r0 - pad), pad:pad + W] = source.read_rows(a, b)
    buf -= mean
    buf /= std
    return torch.from_numpy(buf)


@torch.inference_mode()
def predict_scene(model: nn.Module, source, mean: Sequence[float], std: Sequence[float], patch_size: int = 8,
                  batch_size: int = 2048, tile_pixels: int = 1 << 20, device: str | torch.device = "cpu",
                  progress: bool = False) -> tuple[np.ndarray, dict[str, float]]:
    """Classify every pixel of a scene (one patch per pixel), tile by tile with bounded memory.

    `source` has `height`, `width`, `num_bands` and `read_rows(r0, r1) -> (rows, W, C)` raw values
    (`hybridzoo.data.land_cover.RasterSource` memory-maps GeoTIFF/.npy files). At most
    `tile_pixels` pixels (plus a patch-size halo) are normalised at once, and `batch_size` patches go
    through the model at once. Returns (H, W) class indices (uint8 up to 256 classes) and timings.
    """
    device = torch.device(device)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    H, W, pad = source.height, source.width, patch_size // 2
    K = getattr(model, "num_classes", 256)
    out = np.empty((H, W), dtype=np.uint8 if K <= 256 else np.int32)
    rows_per_tile = max(1, int(tile_pixels) // max(1, W))
    offsets = lc.d4_offsets(patch_size)[:1].to(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    tiles = range(0, H, rows_per_tile)
    if progress:
        from tqdm.auto import tqdm

        tiles = tqdm(tiles, desc="predict", unit="tile")
    for r0 in tiles:
        r1 = min(H, r0 + rows_per_tile)
        tile = _tile(source, r0, r1, pad, mean, std).to(device)
        n = (r1 - r0) * W
        flat = torch.empty(n, dtype=torch.long)
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(n, s + batch_size), device=device)
            coords = torch.stack([idx // W, idx % W], 1)
            x = lc.extract_patches(tile, coords, patch_size, pad, offsets)
            flat[s:s + len(idx)] = model(x).argmax(1).cpu()
        out[r0:r1] = flat.reshape(r1 - r0, W).numpy()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return out, {"pixels": float(H * W), "seconds": seconds, "pixels_per_second": H * W / max(seconds, 1e-9)}


# --------------------------------------------------------------------------------------- the task
def _opt(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, None)
    return default if v is None else v


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@register_task
class LandCoverTask(Task):
    name = "land-cover"
    batch_split = True  # training_step: model(x), the loss on the whole batch's logits
    default_model = "wetmapformer_small"
    headline_metric = "oa"
    higher_is_better = True
    default_epochs = 10
    default_batch_size = 256
    default_lr = 1e-3
    default_weight_decay = 0.1   # = the notebook's tfa AdamW weight_decay 1e-4 (not lr-scaled) / lr 1e-3

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("land cover")
        g.add_argument("--label", default=None, metavar="PATH",
                       help="label raster (GeoTIFF/.npy/.mat; 0 = unlabelled) for --data (may be the same "
                            ".mat file; with --label-key and no --label, it is)")
        g.add_argument("--data-key", default=None, metavar="NAME",
                       help="the variable of a .mat --data file that holds the image cube (when it holds several)")
        g.add_argument("--label-key", default=None, metavar="NAME",
                       help="the variable of a .mat file that holds the labels (when it holds several)")
        g.add_argument("--patch-size", type=int, default=None, help="patch side around each pixel (default 8)")
        g.add_argument("--split", choices=("random", "block"), default=None,
                       help="random: the paper's stratified 70/30 pixel split (optimistic: patches overlap); "
                            "block: spatially disjoint blocks (default random)")
        g.add_argument("--val-fraction", type=float, default=None, help="share of labelled pixels for validation (0.3)")
        g.add_argument("--split-seed", type=int, default=None, help="split seed (default 345, the paper's)")
        g.add_argument("--block-size", type=int, default=None, help="block side for --split block (default 32)")
        g.add_argument("--block-buffer", type=int, default=None,
                       help="drop training pixels this close to validation blocks (default: the patch size)")
        g.add_argument("--bands", default=None, help="bands to use, 0-based: '0-11,14' (default all)")
        g.add_argument("--class-names", default=None, help="comma-separated names, one per label value in order")
        g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                       help="no flips/transposes about the labelled pixel during training")
        g.add_argument("--scene-size", type=int, default=None, help="side of the built-in synthetic scene (160)")
        g.add_argument("--scene-seed", type=int, default=None, help="seed of the built-in synthetic scene (0)")
        g.add_argument("--tile-pixels", type=int, default=None,
                       help="predict: pixels normalised at once (bounds memory; default 1,048,576)")
        g.add_argument("--predict-batch-size", type=int, default=None, help="predict: patches per forward (2048)")

    # --- data
    def build_data(self, args: argparse.Namespace) -> TaskData:
        P = int(_opt(args, "patch_size", 8))
        if P < 1:
            raise ValueError(f"--patch-size must be positive, got {P}")
        names = _opt(args, "class_names", None)
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
        data_path = getattr(args, "data", None)
        synthetic = None
        if data_path is None:
            size = int(_opt(args, "scene_size", 160))
            synthetic = dict(height=size, width=size, seed=int(_opt(args, "scene_seed", 0)))
            scene = lc.make_synthetic_scene(**synthetic)
            sel = lc.parse_bands(_opt(args, "bands", None), scene.image.shape[-1])
            if sel is not None:
                scene.image = np.ascontiguousarray(scene.image[..., sel])
                scene.band_names = [scene.band_names[i] for i in sel]
        else:
            label = _opt(args, "label", None)
            label_key = _opt(args, "label_key", None)
            if label is None and label_key is None:
                raise ValueError("--data needs --label PATH (a label raster, 0 = unlabelled), or --label-key NAME "
                                 "for labels stored in the same .mat file")
            scene = lc.load_scene(data_path, label, bands=_opt(args, "bands", None), class_names=names,
                                  data_key=_opt(args, "data_key", None), label_key=label_key)
            sel = lc.parse_bands(_opt(args, "bands", None))
        targets, values = lc.encode_labels(scene.labels)
        K = len(values)
        class_names = scene.class_names or [f"class {v}" for v in values]
        if scene.class_names and synthetic is None and len(class_names) != K:
            raise ValueError(f"--class-names has {len(class_names)} names but the labels hold {K} classes "
                             f"(values {values.tolist()})")
        if synthetic is not None:
            class_names = [scene.class_names[v - 1] for v in values]
        coords, y = lc.labelled_pixels(targets)

        split = _opt(args, "split", "random")
        frac = float(_opt(args, "val_fraction", 0.3))
        seed = int(_opt(args, "split_seed", 345))
        dropped = 0
        if split == "random":
            tr, va = lc.random_split(y, frac, seed)
            note = ("random stratified pixel split (the paper's protocol); neighbouring patches overlap, "
                    "so these scores are optimistic — compare --split block")
        elif split == "block":
            bs = int(_opt(args, "block_size", 32))
            buffer = int(_opt(args, "block_buffer", P))
            tr, va, _ = lc.block_split(coords, y, targets.shape, bs, frac, buffer, seed)
            dropped = len(y) - len(tr) - len(va)
            note = (f"spatially disjoint split: {bs}×{bs} blocks, training pixels within {buffer} px of a "
                    f"validation block dropped ({dropped})")
        else:
            raise ValueError(f"--split must be 'random' or 'block', got {split!r}")
        if len(tr) == 0 or len(va) == 0:
            raise ValueError(f"the {split} split left {len(tr)} training and {len(va)} validation pixels")
        mean, std = lc.band_stats(scene.image, coords[tr])
        padded = lc.pad_and_normalise(scene.image, mean, std, P // 2)
        augment = bool(_opt(args, "augment", True))
        train = lc.PatchDataset(padded, coords[tr], y[tr], P, augment=augment, num_classes=K,
                                class_names=class_names, scene=scene)
        val = lc.PatchDataset(padded, coords[va], y[va], P, augment=False, num_classes=K,
                              class_names=class_names, scene=scene)
        info = {
            "num_classes": K, "in_chans": int(scene.image.shape[-1]), "class_names": list(class_names),
            "class_values": [int(v) for v in values], "patch_size": P, "img_size": P,
            "split": split, "split_note": note, "val_fraction": frac, "split_seed": seed,
            "block_size": int(_opt(args, "block_size", 32)) if split == "block" else None,
            "block_buffer": int(_opt(args, "block_buffer", P)) if split == "block" else None,
            "dropped_buffer_pixels": int(dropped), "augment": augment,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "bands": sel, "band_names": scene.band_names, "scene": scene.name,
            "data_key": _opt(args, "data_key", None), "nodata": scene.nodata or None,
            "scene_shape": [int(s) for s in scene.image.shape], "synthetic": synthetic,
            "train_class_counts": np.bincount(y[tr], minlength=K).tolist(),
            "val_class_counts": np.bincount(y[va], minlength=K).tolist(),
        }
        print(f"land-cover: {scene.name}{' (SYNTHETIC)' if synthetic else ''}, {scene.image.shape[0]}×"
              f"{scene.image.shape[1]}×{scene.image.shape[2]}, {K} classes, {len(tr)} train / {len(va)} val "
              f"patches of {P}×{P}; {note}")
        return TaskData(train=train, val=val, info=info)

    # --- model
    def build_model(self, args: argparse.Namespace, data_info: dict[str, Any]) -> nn.Module:
        from hybridzoo.factory import create_model

        kw = dict(num_classes=data_info["num_classes"], in_chans=data_info["in_chans"],
                  pretrained=getattr(args, "pretrained", None))
        try:
            return create_model(args.model, img_size=data_info.get("patch_size", 8), **kw)
        except TypeError:
            return create_model(args.model, **kw)

    def training_step(self, model: nn.Module, batch: Any,
                      args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        # a tensor, read by the trainer once an epoch: float() here would wait for the device every step
        return loss, {"acc": (logits.detach().argmax(1) == y).float().mean()}

    def build_metric(self, args: argparse.Namespace, data_info: dict[str, Any]) -> "LandCoverMetric":
        return LandCoverMetric(data_info.get("num_classes"), data_info.get("class_names"))

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Any, metric: "LandCoverMetric", args: argparse.Namespace) -> None:
        x, y = batch
        if metric.num_classes is None:
            metric.set_num_classes(unwrap_model(model).num_classes)
        metric.update(model(x).float(), y)

    def baselines(self, data: TaskData, args: argparse.Namespace) -> dict[str, float]:
        """Trivial references on the same validation pixels: the majority class, and a spectral-only
        nearest class centroid on the labelled pixel's own (normalised) bands — no spatial context."""
        tr, va = data.train, data.val
        K = tr.num_classes
        y_tr, y_va = tr.targets.numpy(), va.targets.numpy()
        majority = int(np.bincount(y_tr, minlength=K).argmax())
        out = {f"val_{k}_majority": v for k, v in
               land_cover_metrics(confusion_matrix(torch.full((len(y_va),), majority), va.targets, K)).items()
               if k in ("oa", "aa", "kappa")}
        def centre(ds):
            c = ds.coords + ds.pad
            return ds.padded[c[:, 0], c[:, 1]].double()
        x_tr, x_va = centre(tr), centre(va)
        cent = torch.stack([x_tr[tr.targets == k].mean(0) if (tr.targets == k).any()
                            else torch.full((x_tr.shape[1],), float("inf"), dtype=torch.float64) for k in range(K)])
        pred = torch.cdist(x_va, cent.nan_to_num(posinf=1e30)).argmin(1)
        out.update({f"val_{k}_centroid": v for k, v in land_cover_metrics(confusion_matrix(pred, va.targets, K)).items()
                    if k in ("oa", "aa", "kappa")})
        return out

    def on_train_end(self, run_dir: Path, model: nn.Module, data: TaskData, args: argparse.Namespace) -> dict[str, Any]:
        """`class_map.png`: reference labels, the whole-scene prediction and the validation pixels'
        errors, with a legend; `class_map.tif` (georeferenced when the input was)."""
        scene = data.val.scene
        if scene is None:
            return {}
        model = unwrap_model(model)
        info = data.info
        source = _ArraySource(scene.image, scene.geo)
        predictor, was_training = model, model.training
        if (_model_device(model).type == "cpu" and getattr(args, "fast_cpu", True)
                and getattr(args, "amp", "none") in (None, "none")):
            from hybridzoo.layers.onednn import fastest_cpu_inference, onednn_available

            if onednn_available():
                # as `hybridzoo predict` maps a scene: the faster of the eager model and the frozen oneDNN path
                # (WetMapFormer-S at 2,048 patches a call: 660 pixels/s eager, 1,870 frozen; RESULTS.md session 32)
                predictor = fastest_cpu_inference(model)
        pred, stats = predict_scene(predictor, source, info["mean"], info["std"], info["patch_size"],
                                    batch_size=int(_opt(args, "predict_batch_size", 2048)),
                                    tile_pixels=int(_opt(args, "tile_pixels", 1 << 20)), device=_model_device(model))
        model.train(was_training)
        ref = np.full(pred.shape, -1, dtype=np.int64)
        for ds in (data.train, data.val):
            c = ds.coords.numpy()
            ref[c[:, 0], c[:, 1]] = ds.targets.numpy()
        val_view = np.full(pred.shape, -1, dtype=np.int64)
        c = data.val.coords.numpy()
        val_view[c[:, 0], c[:, 1]] = pred[c[:, 0], c[:, 1]]
        cm = confusion_matrix(torch.from_numpy(pred[c[:, 0], c[:, 1]].astype(np.int64)), data.val.targets,
                              data.val.num_classes)
        m = land_cover_metrics(cm)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        title = (f"{getattr(args, 'model', '')} — {scene.name}{' (SYNTHETIC)' if scene.synthetic else ''} — "
                 f"{info['split']} split: val OA {m['oa']:.3f}, kappa {m['kappa']:.3f}")
        save_class_map_png(run_dir / "class_map.png",
                           [("reference labels (train + val)", ref), ("prediction, whole scene", pred),
                            (f"prediction on the {info['split']}-split validation pixels", val_view)],
                           info["class_names"], title)
        values = np.asarray(info["class_values"])
        lc.write_geotiff(run_dir / "class_map.tif", values[pred].astype(np.uint16 if values.max() > 255 else np.uint8),
                         scene.geo)
        return {"map": str(run_dir / "class_map.png"), "predict_pixels_per_second": stats["pixels_per_second"]}

    # --- predict
    eval_options = ("label", "split", "val_fraction", "split_seed", "block_size", "block_buffer", "data_key",
                    "label_key")
    predict_options = ("tile_pixels", "predict_batch_size", "data_key")

    def predict(self, args: argparse.Namespace) -> None:
        """Whole-scene class maps of rasters: `<stem>_classmap.png` (and `.tif` for georeferenced input), with
        the run's band statistics and patch size; no file (or `builtin`) maps the run's built-in scene."""
        from hybridzoo.engine.run import load_run_from_args, output_dir, report_stream

        run = load_run_from_args(args, self)
        info, model, device, name = run.data_info, run.model, run.device, run.model_name
        for key in ("num_classes", "in_chans", "mean", "std", "patch_size"):
            if key not in info:
                raise ValueError(f"{run.weights!r} lacks the land-cover data facts ({key!r}); predict needs a "
                                 "run folder or weights written by `hybridzoo train --task land-cover`")
        class_names = info.get("class_names") or [str(i) for i in range(info["num_classes"])]
        values = np.asarray(info.get("class_values") or list(range(1, info["num_classes"] + 1)))
        out_dir = output_dir(args, run)
        log = report_stream(args)
        print(run.describe(), file=log)
        results = []
        for path in getattr(args, "inputs", None) or ["builtin"]:
            if str(path) in ("builtin", "synthetic"):
                syn = info.get("synthetic") or dict(height=160, width=160, seed=0)
                scene = lc.make_synthetic_scene(**syn)
                img = scene.image if not info.get("bands") else np.ascontiguousarray(scene.image[..., info["bands"]])
                source, stem = _ArraySource(img), scene.name
            else:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"input raster not found: {os.fspath(path)!r}")
                # the training file's variable name, for another .mat of the same layout (a TIFF has none)
                key = _opt(args, "data_key", None) or (info.get("data_key") if Path(path).suffix.lower() == ".mat" else None)
                source, stem = lc.RasterSource(path, info.get("bands"), key=key), Path(path).stem
            if source.num_bands != info["in_chans"]:
                raise ValueError(f"{path}: {source.num_bands} bands, but {name} was trained on {info['in_chans']}")
            pred, stats = predict_scene(model, source, info["mean"], info["std"], info["patch_size"],
                                        batch_size=int(_opt(run.args, "predict_batch_size", 2048)),
                                        tile_pixels=int(_opt(run.args, "tile_pixels", 1 << 20)), device=device,
                                        progress=bool(getattr(args, "progress", False)))
            png = out_dir / f"{stem}_classmap.png"
            save_class_map_png(png, [(f"{name}: {stem}", pred)], class_names,
                               f"{stem}: {source.height}×{source.width} px, {stats['pixels_per_second']:,.0f} px/s")
            written = {"input": os.fspath(path), "png": str(png), **stats,
                       "class_counts": {str(n): int(c) for n, c in
                                        zip(class_names, np.bincount(pred.ravel(), minlength=len(class_names)))}}
            if source.geo:
                tif = out_dir / f"{stem}_classmap.tif"
                lc.write_geotiff(tif, values[pred].astype(np.uint16 if values.max() > 255 else np.uint8), source.geo)
                written["geotiff"] = str(tif)
            if getattr(source, "nodata", None) and source.nodata["values"]:
                import sys

                written["nodata"] = dict(source.nodata)
                print(lc.nodata_message(os.fspath(path), source.nodata, (source.height, source.width, source.num_bands)),
                      file=sys.stderr)
            results.append(written)
            print(f"{path}: {source.height}×{source.width} px in {stats['seconds']:.1f} s "
                  f"({stats['pixels_per_second']:,.0f} px/s) → {png}"
                  + (f", {written['geotiff']}" if source.geo else ""), file=log)
        if getattr(args, "json", None):
            from hybridzoo.engine.logger import write_json_results

            write_json_results(args.json, results)
