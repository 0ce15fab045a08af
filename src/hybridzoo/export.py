"""Export the network that is deployed — to ONNX, TorchScript or a torch.export ExportedProgram — and prove it.

What ships is not always the training module: SCTNet ships its single-branch CNN (`deploy()`, no
auxiliary head, no SIAM teacher); SuperViT one (resolution, keep-rate) sub-network of its supernet; a
distilled DeiT the average of its two heads (its eval forward); a recommender the scoring function
item history → one score per item; WetMapFormer its patch classifier. `deployed_network` builds that
module with its example inputs, dynamic axes and the metadata a deployment needs.

Verification is part of the export: the serialised file is loaded back (ONNX Runtime, CPU execution
provider, for ONNX; the loaded module otherwise) and run on random inputs at two batch sizes (when the
batch axis is dynamic), at a second input size (when the spatial axes are), and on a real photograph
where the task takes images; its outputs are compared with eager PyTorch and the export is refused
(`ExportVerificationError`, nothing written) when the max abs difference exceeds `atol`.

    from hybridzoo.export import export_model
    report = export_model(model, "sctnet.onnx", fmt="onnx", name="sctnet_s_seg50")

`hybridzoo export` is the command-line front end (docs/export.md).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["FORMATS", "DeploySpec", "ExportVerificationError", "deployed_network", "export_model",
           "serialize", "load_exported", "verify", "load_for_export", "parse_resolution", "compare_runtimes",
           "add_export_arguments", "cmd_export", "bench_onnx"]

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
DEFAULT_ATOL = 1e-4
MAX_BATCH = 4096


class ExportVerificationError(ValueError):
    """The exported file's outputs differ from eager PyTorch by more than the tolerance."""


# --------------------------------------------------------------------------------------- deployed modules
class SubNetwork(nn.Module):
    """One SuperViT sub-network: the supernet run at a fixed input size and token keep-rate."""

    def __init__(self, supernet: nn.Module, img_size: int, keep_rate: float):
        super().__init__()
        self.supernet, self.img_size, self.keep_rate = supernet, int(img_size), float(keep_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x, keep_rate=self.keep_rate, img_size=self.img_size)


class DetectorOutputs(nn.Module):
    """A detector's inference outputs as a tuple of tensors (exporters take no dicts): RetinaNet's class
    logits, box deltas and anchors, MF-DETR's class logits and boxes (the auxiliary per-block outputs are
    training-only). Decoding (score threshold, RetinaNet's NMS) stays with the caller, as in DETR/RetinaNet
    deployments: `hybridzoo.layers.boxes` has the reference code."""

    KEYS = ("cls_logits", "box_deltas", "anchors", "pred_logits", "pred_boxes")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def output_names(self, example: torch.Tensor) -> list[str]:
        with torch.no_grad():
            out = self.model(example)
        return [k for k in self.KEYS if k in out]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return tuple(out[k] for k in self.KEYS if k in out)


class RecommenderScorer(nn.Module):
    """History → scores: (item_seq (B, L) int64, item_seq_len (B,) int64) → (B, num_items) dot-product scores."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        m = self.model
        # SASRec's forward groups a large batch by history length (an exact shortcut whose branch depends on
        # the batch size); the deployed graph encodes every padded history as the short-batch path does
        if hasattr(m, "_encode"):
            m._check_input(item_seq, item_seq_len)
            h = m._encode(item_seq, item_seq_len)
        else:
            h = m(item_seq, item_seq_len)
        return m.scores(h)


@dataclass
class DeploySpec:
    """The module that ships, how to feed it, and what a deployment needs to know about it."""

    name: str
    task: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    make_inputs: Callable[..., tuple[torch.Tensor, ...]]   # (batch, spatial (H, W) or None, seed) → inputs
    spatial: tuple[int, int] | None                         # the example H, W for image inputs
    dynamic_batch: bool = True
    batch: int = 2                                          # the example (and, when fixed, the only) batch
    dynamic_size_multiple: int | None = None                # spatial axes dynamic, in steps of this
    dynamic_size_min: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


def parse_resolution(value: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """`224`, `512x1024` (H×W) or a pair → (H, W)."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"resolution must be one side or (H, W), got {value!r}")
        return int(value[0]), int(value[1])
    parts = str(value).lower().replace("×", "x").split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) not in (1, 2) or min(hw) < 1:
        raise ValueError(f"--resolution expects a side (224) or H x W (512x1024), got {value!r}")
    return (hw[0], hw[-1])


def _image_maker(in_chans: int, low: float = 0.0, high: float | None = None):
    def make(batch: int, spatial: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if high is None:  # normalised inputs
            return (torch.randn(batch, in_chans, *spatial, generator=g),)
        return (low + (high - low) * torch.rand(batch, in_chans, *spatial, generator=g),)
    return make


def _history_maker(num_items: int, max_len: int):
    def make(batch: int, spatial=None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        # lengths from 1 to max_len so that short and full histories are both compared
        lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
        lengths[0] = 1
        if batch > 1:
            lengths[1] = max_len
        seq = torch.randint(1, num_items, (batch, max_len), generator=g)
        seq = seq.masked_fill(torch.arange(max_len)[None] >= lengths[:, None], 0)
        return seq, lengths
    return make


def deployed_network(model: nn.Module, name: str | None = None, *, resolution: str | int | Sequence[int] | None = None,
                     keep_rate: float | None = None, batch: str | int = "dynamic", dynamic_size: bool | None = None,
                     data_info: dict[str, Any] | None = None, vocabulary: Sequence[str] | None = None) -> DeploySpec:
    """The network a deployment runs, in eval mode, with its inputs and metadata (see the module docstring).

    resolution: input side or (H, W) (default: the training data's, else the model card's).
    keep_rate: SuperViT's token keep-rate of the chosen sub-network (default 1.0).
    batch: "dynamic" or a fixed batch size. dynamic_size: spatial axes dynamic (default: super-resolution only).
    data_info: what the training run recorded (class names, normalisation, vocabulary size ...).
    """
    from hybridzoo import __version__
    from hybridzoo.registry import get_card

    name = name or getattr(model, "model_name", None)
    if not name:
        raise ValueError("the model does not name itself (model.model_name); pass name=")
    card = get_card(name)
    task, info = card.task, dict(data_info or {})
    if batch == "dynamic":
        dynamic_batch, example_batch = True, 2
    else:
        try:
            example_batch = int(batch)
        except (TypeError, ValueError):
            example_batch = 0
        if example_batch < 1:
            raise ValueError(f"--batch expects 'dynamic' or a positive integer, got {batch!r}")
        dynamic_batch = False
    if keep_rate is not None and not hasattr(model, "sub_networks"):
        raise ValueError(f"--keep-rate applies to SuperViT sub-networks, not {name}")
    model = model.eval()
    hw = parse_resolution(resolution)
    meta: dict[str, Any] = {"model": name, "task": task, "paper": card.paper, "arxiv": card.arxiv,
                            "hybridzoo_version": __version__, "torch_version": torch.__version__}
    for key in ("class_names", "num_classes", "weights"):
        if info.get(key) is not None:
            meta[key] = info[key]

    if task == "recommendation":
        if hw is not None:
            raise ValueError(f"{name} takes item histories, not images: --resolution does not apply")
        num_items, max_len = int(model.num_items), int(model.max_len)
        module = RecommenderScorer(model).eval()
        meta["inputs"] = [
            {"name": "item_seq", "shape": ["batch" if dynamic_batch else example_batch, max_len], "dtype": "int64",
             "meaning": f"item ids, oldest first, left-aligned and padded with 0 to {max_len}"},
            {"name": "item_seq_len", "shape": ["batch" if dynamic_batch else example_batch], "dtype": "int64",
             "meaning": "number of real items in each history (1..max_len)"}]
        meta["outputs"] = [{"name": "scores", "shape": ["batch" if dynamic_batch else example_batch, num_items],
                            "meaning": "dot-product score of every item id (0 is padding: mask it, and the history)"}]
        meta["num_items"] = num_items
        if vocabulary is not None:
            meta["item_vocabulary"] = list(vocabulary)
        return DeploySpec(name, task, module, ["item_seq", "item_seq_len"], ["scores"],
                          _history_maker(num_items, max_len), None, dynamic_batch, example_batch, meta=meta)

    in_chans = int(getattr(model, "in_chans", info.get("in_chans", card.input_size[0])))
    if hw is None:
        side = info.get("img_size") or info.get("patch_size")
        hw = parse_resolution(side) if side else tuple(card.input_size[1:3])
    if hasattr(model, "deploy"):  # SCTNet: the single-branch CNN, no auxiliary head, no SIAM teacher
        module = model.deploy()
        meta["deployed"] = "deploy(): backbone + decode head (auxiliary head and SIAM dropped)"
    elif hasattr(model, "sub_networks"):  # SuperViT: one sub-network of the supernet
        sizes = tuple(model.img_size_list)
        if hw[0] != hw[1] or hw[0] not in sizes:
            raise ValueError(f"{name}: --resolution must be one of the supernet's sizes {sizes}, got {hw[0]}x{hw[1]}")
        rate = 1.0 if keep_rate is None else float(keep_rate)
        if rate not in model.keep_rates:
            raise ValueError(f"{name}: --keep-rate must be one of the trained keep-rates {tuple(model.keep_rates)}, "
                             f"got {keep_rate!r}")
        module = SubNetwork(model, hw[0], rate).eval()
        meta["sub_network"] = {"resolution": hw[0], "keep_rate": rate}
    elif task == "detection":
        module = DetectorOutputs(model).eval()
        meta["deployed"] = "the detector's raw outputs (no score threshold, no NMS): decode as hybridzoo's postprocess"
    else:
        module = model
        if getattr(model, "distilled", False):
            meta["deployed"] = "eval forward: the average of the class-token and distillation-token heads' logits"
    if dynamic_size is None:
        dynamic_size = task == "super-resolution"
    multiple, min_side = None, 1
    if dynamic_size:
        if task == "super-resolution":
            # ACT pads other sizes to a multiple of its token size; exported, the sizes it pads are fixed
            k = int(getattr(model, "token_size", 1))
            multiple, min_side = k, 2 * k
        else:
            multiple = int(getattr(model, "divisor", getattr(model, "patch_size", 32)))
            min_side = multiple
        if hw[0] % multiple or hw[1] % multiple:
            hw = (max(min_side, hw[0] // multiple * multiple), max(min_side, hw[1] // multiple * multiple))

    if task == "super-resolution":
        rgb = float(getattr(model, "rgb_range", 255.0))
        make = _image_maker(in_chans, 0.0, rgb)
        meta["normalisation"] = {"range": [0.0, rgb], "layout": "RGB, NCHW, float32", "mean": None, "std": None}
        meta["upscale"] = int(getattr(model, "upscale", 1))
        out_name = "image"
    else:
        make = _image_maker(in_chans)
        if task == "classification":
            from hybridzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
            norm = {"range": [0.0, 1.0], "mean": list(info.get("mean", IMAGENET_MEAN)),
                    "std": list(info.get("std", IMAGENET_STD))}
            out_name = "logits"
        elif task == "segmentation":
            from hybridzoo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD
            norm = {"range": [0.0, 255.0], "mean": list(info.get("mean", IMAGENET_MEAN)),
                    "std": list(info.get("std", IMAGENET_STD))}
            out_name = "logits"
        elif task == "detection":
            from hybridzoo.data.detection import IMAGENET_MEAN, IMAGENET_STD
            norm = {"range": [0.0, 255.0], "mean": list(info.get("mean", IMAGENET_MEAN)),
                    "std": list(info.get("std", IMAGENET_STD)), "letterbox": "resize the longer side, pad bottom/right"}
            out_name = "detections"
        else:  # land-cover: per-band statistics of the training scene
            norm = {"range": None, "mean": info.get("mean"), "std": info.get("std")}
            out_name = "logits"
        norm["layout"] = ("RGB, NCHW, float32" if in_chans == 3 and task != "land-cover" else "NCHW, float32")
        norm["formula"] = "(x - mean) / std per channel" if norm.get("mean") is not None else None
        meta["normalisation"] = norm
    b = "batch" if dynamic_batch else example_batch
    h, w = ("height", "width") if multiple else hw
    meta["inputs"] = [{"name": "input", "shape": [b, in_chans, h, w], "dtype": "float32"}]
    if multiple:
        meta["inputs"][0]["spatial"] = f"height and width: multiples of {multiple}, at least {min_side}"
    out_names = [out_name]
    if task == "detection":
        out_names = module.output_names(make(1, tuple(hw), 0)[0])
    meta["outputs"] = [{"name": n} for n in out_names]
    return DeploySpec(name, task, module, ["input"], out_names, make, tuple(hw), dynamic_batch, example_batch,
                      multiple, min_side, meta)


# --------------------------------------------------------------------------------------- export
def _dynamic_shapes(spec: DeploySpec):
    from torch.export import Dim

    if not spec.dynamic_batch and not spec.dynamic_size_multiple:
        return None
    batch = Dim("batch", min=1, max=MAX_BATCH) if spec.dynamic_batch else None
    shapes = []
    for i, _ in enumerate(spec.input_names):
        axes = {0: batch} if batch is not None else {}
        if spec.dynamic_size_multiple and i == 0:
            k = spec.dynamic_size_multiple
            lo = max(1, math.ceil(spec.dynamic_size_min / k))
            axes[2] = k * Dim("h_steps", min=lo, max=4096) if k > 1 else Dim("height", min=lo, max=4096)
            axes[3] = k * Dim("w_steps", min=lo, max=4096) if k > 1 else Dim("width", min=lo, max=4096)
        shapes.append(axes or None)
    return tuple(shapes)


def _example(spec: DeploySpec) -> tuple[torch.Tensor, ...]:
    return spec.make_inputs(spec.batch, spec.spatial, 0)


def serialize(spec: DeploySpec, fmt: str, opset: int | None = None) -> bytes:
    """The exported file's bytes (held in memory so that only a verified export is ever written)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise ValueError("--opset applies to --format onnx only")
    try:
        return _serialize(spec, fmt, opset)
    except ValueError:
        raise
    except Exception as e:  # the exporters' own error types; the CLI reports a ValueError in one line
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        raise ValueError(f"{spec.name}: {fmt} export failed ({type(e).__name__}: {first}); another --format, "
                         f"--no-dynamic-size or a fixed --batch may avoid the failing construct") from e


def _serialize(spec: DeploySpec, fmt: str, opset: int | None) -> bytes:
    args = _example(spec)
    with torch.no_grad():
        if fmt == "onnx":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(spec.module, args, dynamo=True, dynamic_shapes=_dynamic_shapes(spec),
                                            input_names=spec.input_names, output_names=spec.output_names,
                                            opset_version=opset, optimize=True, verbose=False, report=False)
            proto = program.model_proto
            got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            if opset is not None and got != opset:  # the exporter falls back to its own opset with a warning
                raise ValueError(f"{spec.name}: could not convert the graph to ONNX opset {opset} (the exporter "
                                 f"produced opset {got}); pick an opset the exporter supports, e.g. {got}")
            return proto.SerializeToString()
        buf = io.BytesIO()
        if fmt == "torchscript":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is in maintenance mode; it still loads in C++ (libtorch)
                traced = torch.jit.trace(spec.module, args, check_trace=False)
                torch.jit.save(traced, buf)
        else:
            program = torch.export.export(spec.module, args, dynamic_shapes=_dynamic_shapes(spec))
            torch.export.save(program, buf)
        return buf.getvalue()


def load_exported(data: bytes | str | os.PathLike, fmt: str, threads: int | None = None) -> Callable[..., list[np.ndarray]]:
    """A callable running the exported file: inputs (tensors) → list of numpy outputs."""
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # ONNX Runtime's worker threads otherwise spin after each call, taking the cores from whatever runs
        # next in this process (the eager and oneDNN runs bench --onnx interleaves with it)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*inputs: torch.Tensor) -> list[np.ndarray]:
            return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})
        run_onnx.session = session
        return run_onnx
    if fmt == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    elif fmt == "exported-program":
        module = torch.export.load(io.BytesIO(data)).module()
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")

    def run_torch(*inputs: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*inputs)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in out]
    run_torch.module = module
    return run_torch


def _real_inputs(spec: DeploySpec) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """A photograph (scikit-image's astronaut), prepared as the deployment would, for image models."""
    if spec.task not in ("classification", "segmentation", "super-resolution") or spec.spatial is None:
        return []
    inputs = spec.make_inputs(1, spec.spatial, 0)
    if inputs[0].shape[1] != 3:
        return []
    import skimage.data
    from PIL import Image

    h, w = spec.spatial
    img = Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)[None]
    norm = spec.meta.get("normalisation", {})
    lo, hi = norm.get("range") or (0.0, 255.0)
    x = x / 255.0 * (hi - lo) + lo
    if norm.get("mean") is not None:
        x = (x - torch.tensor(norm["mean"]).view(1, -1, 1, 1)) / torch.tensor(norm["std"]).view(1, -1, 1, 1)
    if not spec.dynamic_batch and spec.batch != 1:
        x = x.expand(spec.batch, -1, -1, -1).contiguous()
    return [("photo", (x,))]


def _checks(spec: DeploySpec) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Every input the exported file is compared on."""
    sp = spec.spatial
    if not spec.dynamic_batch:
        checks = [(f"random batch {spec.batch}", spec.make_inputs(spec.batch, sp, 1))]
    else:
        checks = [("random batch 1", spec.make_inputs(1, sp, 1)), ("random batch 3", spec.make_inputs(3, sp, 2))]
    if spec.dynamic_size_multiple and sp is not None:
        k = spec.dynamic_size_multiple
        other = (sp[0] + k, sp[1] + 2 * k)
        checks.append((f"random {other[0]}x{other[1]}", spec.make_inputs(checks[0][1][0].shape[0], other, 3)))
    return checks + _real_inputs(spec)


def verify(run: Callable[..., list[np.ndarray]], spec: DeploySpec, atol: float = DEFAULT_ATOL) -> list[dict[str, Any]]:
    """Compare the exported file with eager PyTorch on every check input; raise above `atol`."""
    results = []
    for label, inputs in _checks(spec):
        with torch.no_grad():
            ref = spec.module(*inputs)
        ref = [r.detach().float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        try:
            got = run(*inputs)
        except Exception as e:  # a fixed shape baked in, an operator the runtime lacks ...
            raise ExportVerificationError(f"{spec.name}: the exported file failed on {label} "
                                          f"(input shapes {[tuple(t.shape) for t in inputs]}): {e}") from e
        if len(got) != len(ref) or any(tuple(g.shape) != tuple(r.shape) for g, r in zip(got, ref)):
            raise ExportVerificationError(f"{spec.name}: on {label} the exported file returned shapes "
                                          f"{[tuple(g.shape) for g in got]}, eager PyTorch {[tuple(r.shape) for r in ref]}")
        diff = max(float(np.abs(g.astype(np.float64) - r).max()) if r.size else 0.0 for g, r in zip(got, ref))
        scale = max(float(np.abs(r).max()) if r.size else 0.0 for r in ref)
        results.append({"input": label, "shapes": [list(t.shape) for t in inputs], "max_abs_diff": diff,
                        "max_abs_output": scale})
        if not diff <= atol:
            raise ExportVerificationError(
                f"{spec.name}: exported output differs from eager PyTorch by {diff:.3g} (max abs) on {label}, "
                f"above the tolerance {atol:g}; outputs reach {scale:.3g} in magnitude (--atol raises the tolerance)")
    return results


def default_output(name: str, fmt: str) -> Path:
    return Path(f"{name}{SUFFIX[fmt]}")


def export_model(model: nn.Module, output: str | os.PathLike | None = None, fmt: str = "onnx", *,
                 name: str | None = None, opset: int | None = None, atol: float | None = None,
                 log: Callable[[str], None] | None = None, **deploy_kwargs: Any) -> dict[str, Any]:
    """Export, verify, then write the file and its JSON description atomically; return the description.

    deploy_kwargs go to `deployed_network` (resolution, keep_rate, batch, dynamic_size, data_info, vocabulary).
    atol: default 1e-4 on outputs of unit scale; super-resolution outputs are pixel values in [0, rgb_range]
    (255 for ACT), so there it is 1e-4 of that range (0.0255 grey levels, 40x below one uint8 step).
    """
    from hybridzoo.engine.checkpoint import atomic_write

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if atol is not None and not atol > 0:
        raise ValueError(f"--atol must be positive, got {atol!r}")
    spec = deployed_network(model, name, **deploy_kwargs)
    if atol is None:
        rng = (spec.meta.get("normalisation") or {}).get("range") if spec.task == "super-resolution" else None
        atol = DEFAULT_ATOL * (rng[1] - rng[0]) if rng else DEFAULT_ATOL
    output = Path(output) if output is not None else default_output(spec.name, fmt)
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    data = serialize(spec, fmt, opset)
    t_export = time.perf_counter() - t0
    run = load_exported(data, fmt)
    checks = verify(run, spec, atol)
    t_verify = time.perf_counter() - t0 - t_export
    for c in checks:
        say(f"  {c['input']:<22} max abs diff {c['max_abs_diff']:.3g}  (outputs up to {c['max_abs_output']:.3g})")
    meta = dict(spec.meta)
    meta["format"] = fmt
    if fmt == "onnx":
        import onnx

        proto = onnx.load_from_string(data)
        meta["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        meta["runtime_check"] = "onnxruntime CPUExecutionProvider"
    else:
        meta["runtime_check"] = "torch.jit.load" if fmt == "torchscript" else "torch.export.load"
    meta["file"] = output.name
    meta["bytes"] = len(data)
    meta["verification"] = {"atol": atol, "max_abs_diff": max(c["max_abs_diff"] for c in checks), "checks": checks}
    meta["seconds"] = {"export": round(t_export, 2), "verify": round(t_verify, 2)}
    atomic_write(output, lambda f: f.write(data))
    sidecar = output.with_suffix(".json")
    atomic_write(sidecar, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    meta["path"], meta["json"] = os.fspath(output), os.fspath(sidecar)
    return meta


# --------------------------------------------------------------------------------------- loading
def load_for_export(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                    model: str | None = None, pretrained: str | os.PathLike | None = None,
                    **overrides: Any) -> tuple[nn.Module, dict[str, Any], list[str] | None]:
    """(model, data_info, item vocabulary) for `hybridzoo export`.

    A run folder, or a checkpoint written by `hybridzoo train`, is rebuilt as its task built it for
    training (`hybridzoo.engine.run.load_run`, the loader of eval and predict: classes, input channels,
    vocabulary); otherwise `create_model(model, pretrained=checkpoint or pretrained)` (a path or a
    published tag).
    """
    from hybridzoo.engine.checkpoint import CheckpointError, read_run
    from hybridzoo.factory import create_model

    info = None
    if run is not None:
        info = read_run(run, None)
    elif checkpoint is not None:
        try:
            info = read_run(None, checkpoint)
        except CheckpointError:
            if model is None:  # an official checkpoint names no model
                raise
    if info is not None and (info.get("data_info") or model is None):
        # a run, or weights `hybridzoo train` wrote: rebuilt as eval and predict rebuild it
        from hybridzoo.engine.run import load_run

        loaded = load_run(run, None if run is not None else checkpoint, model=model, device="cpu")
        net = loaded.model
        net.model_name = loaded.model_name
        data_info = dict(loaded.data_info)
        return net, data_info, data_info.get("item_tokens")
    if not model:
        raise ValueError("export needs --run DIR, or --model NAME [--checkpoint PATH | --pretrained PATH]")
    if checkpoint is not None and pretrained is not None:
        raise ValueError("give --checkpoint or --pretrained, not both")
    weights = checkpoint or pretrained
    if weights is None:
        torch.manual_seed(0)  # random weights, but the same ones on every call (bench --onnx FILE relies on it)
    return create_model(model, pretrained=weights, **overrides), {"weights": "random (seed 0)"} if weights is None else {}, None


# --------------------------------------------------------------------------------------- runtime comparison
def compare_runtimes(name: str, *, resolution: str | int | None = None, batch_sizes: Sequence[int] = (1, 8),
                     rounds: int = 5, warmup: int = 2, min_round_s: float = 0.2, opset: int | None = None,
                     log: Callable[[str], None] | None = None, model: nn.Module | None = None,
                     onnx_file: str | os.PathLike | None = None, atol: float = DEFAULT_ATOL) -> list[dict[str, Any]]:
    """Eager PyTorch, the frozen oneDNN path and ONNX Runtime (CPU EP, the same thread count) on the deployed
    network, in this process, interleaved: each round times the same number of calls (enough for
    `min_round_s` of eager time) of every runtime in turn, so a load change on a shared machine hits all
    three alike. One row per batch size: the median over rounds of the mean seconds per call, for each
    runtime, its spread (fastest and slowest round), and the ratios.

    onnx_file: an export of the same network (`hybridzoo export`, dynamic batch) to time instead of
    exporting here; it must reproduce the eager outputs within `atol` on a random batch.
    """
    from hybridzoo.factory import create_model
    from hybridzoo.layers.onednn import optimize_for_cpu_inference

    say = log or (lambda s: None)
    if model is None:
        torch.manual_seed(0)  # the weights `hybridzoo export --model NAME` writes without a checkpoint
        model = create_model(name)
    spec = deployed_network(model, name, resolution=resolution, batch="dynamic", dynamic_size=False)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    if onnx_file is None:
        ort_run = load_exported(serialize(spec, "onnx", opset), "onnx", threads=threads)
        say(f"{name}: exported to ONNX in {time.perf_counter() - t0:.1f} s")
    else:
        if not Path(onnx_file).is_file():
            raise FileNotFoundError(f"ONNX file not found: {os.fspath(onnx_file)!r}")
        ort_run = load_exported(onnx_file, "onnx", threads=threads)
        x = spec.make_inputs(2, spec.spatial, 5)
        try:
            got = ort_run(*x)[0]
        except Exception as e:
            raise ValueError(f"{os.fspath(onnx_file)!r} does not take {name}'s inputs "
                             f"{[tuple(t.shape) for t in x]} (exported at another size or batch?): {e}") from e
        with torch.no_grad():
            ref = spec.module(*x).numpy()
        diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        if not diff <= atol:
            raise ValueError(f"{os.fspath(onnx_file)!r} is not an export of {name} with these weights at "
                             f"{spec.spatial}: max abs diff {diff:.3g} against eager PyTorch")
        say(f"{name}: {os.fspath(onnx_file)} reproduces eager PyTorch (max abs diff {diff:.3g})")
    onednn = optimize_for_cpu_inference(spec.module)
    eager = spec.module

    def torch_call(m):
        def call(*x):
            with torch.inference_mode():
                return m(*x)
        return call

    runtimes = {"eager": torch_call(eager), "onednn": torch_call(onednn), "onnxruntime": ort_run}
    rows = []
    for bs in batch_sizes:
        x = spec.make_inputs(bs, spec.spatial, 0)
        for fn in runtimes.values():
            for _ in range(warmup):
                fn(*x)
        t = time.perf_counter()
        runtimes["eager"](*x)
        iters = max(1, min(100, int(min_round_s / max(time.perf_counter() - t, 1e-6))))
        per_round: dict[str, list[float]] = {k: [] for k in runtimes}
        for _ in range(rounds):
            for key, fn in runtimes.items():
                t = time.perf_counter()
                for _ in range(iters):
                    fn(*x)
                per_round[key].append((time.perf_counter() - t) / iters)
        med = {k: float(np.median(v)) for k, v in per_round.items()}
        row = {"model": name, "input_size": [list(t.shape) for t in x], "batch_size": bs, "threads": threads,
               "rounds": rounds, "iters": iters}
        for k, v in med.items():
            row[f"{k}_ms"] = v * 1e3
            row[f"{k}_spread_ms"] = [min(per_round[k]) * 1e3, max(per_round[k]) * 1e3]
        row["onednn_vs_eager"] = med["eager"] / med["onednn"]
        row["onnxruntime_vs_eager"] = med["eager"] / med["onnxruntime"]
        row["onnxruntime_vs_onednn"] = med["onednn"] / med["onnxruntime"]
        rows.append(row)
        say(f"  batch {bs}: eager {row['eager_ms']:.1f} ms, oneDNN {row['onednn_ms']:.1f} ms "
            f"({row['onednn_vs_eager']:.2f}x), ONNX Runtime {row['onnxruntime_ms']:.1f} ms "
            f"({row['onnxruntime_vs_eager']:.2f}x eager, {row['onnxruntime_vs_onednn']:.2f}x oneDNN)")
    return rows


def bench_onnx(args) -> int:
    """`hybridzoo bench NAME --onnx`: `compare_runtimes` at batch 1 and --batch-size, printed as a table."""
    if args.device not in ("auto", "cpu") or args.amp != "none" or args.compile or args.onednn:
        raise ValueError("bench --onnx compares CPU float32 runtimes: leave out --device, --amp, --compile, --onednn")
    sizes = [1] + ([args.batch_size or 8] if (args.batch_size or 8) != 1 else [])
    rows = compare_runtimes(args.name, resolution=args.resolution, batch_sizes=sizes, rounds=args.iters,
                            warmup=args.warmup, log=print, onnx_file=None if args.onnx is True else args.onnx)
    print("\n| model | input | batch | threads | eager ms | oneDNN ms | ONNX Runtime ms | oneDNN / eager | ORT / eager | ORT / oneDNN |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        shape = "×".join(map(str, r["input_size"][0][1:]))
        print(f"| {r['model']} | {shape} | {r['batch_size']} | {r['threads']} | {r['eager_ms']:.1f} | {r['onednn_ms']:.1f} | "
              f"{r['onnxruntime_ms']:.1f} | {r['onednn_vs_eager']:.2f}× | {r['onnxruntime_vs_eager']:.2f}× | "
              f"{r['onnxruntime_vs_onednn']:.2f}× |")
    if args.json:
        from hybridzoo.engine.checkpoint import atomic_write

        atomic_write(args.json, lambda f: f.write((json.dumps(rows, indent=2) + "\n").encode()))
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------- command line
def add_export_arguments(p) -> None:
    """`hybridzoo export` options (registered by hybridzoo.cli)."""
    p.add_argument("--run", default=None, help="a run folder (model, weights, classes / vocabulary from it)")
    p.add_argument("--model", default=None, help="model name (with --checkpoint or --pretrained, or random weights)")
    p.add_argument("--checkpoint", default=None, help="model.safetensors or last.ckpt written by `hybridzoo train`")
    p.add_argument("--pretrained", default=None, help="weights (ours or an official layout)")
    p.add_argument("--format", dest="format", choices=FORMATS, default="onnx")
    p.add_argument("--output", default=None, help="file to write (default: MODEL.onnx / .pt / .pt2); JSON beside it")
    p.add_argument("--resolution", default=None, help="input side or HxW (default: the run's / the model card's)")
    p.add_argument("--keep-rate", type=float, default=None, help="SuperViT: the sub-network's token keep-rate")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    p.add_argument("--dynamic-size", action=argparse.BooleanOptionalAction, default=None,
                   help="dynamic height and width (default: on for super-resolution, off otherwise)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--atol", type=float, default=None,
                   help="max abs difference allowed against eager PyTorch (default 1e-4; for super-resolution "
                        "1e-4 of the pixel range, 0.0255 on 0..255)")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime CPU threads")


def cmd_export(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, data_info, vocab = load_for_export(args.run, args.checkpoint, args.model, args.pretrained)
    name = getattr(model, "model_name", args.model)
    print(f"exporting {name} ({args.format}) ...", flush=True)
    report = export_model(model, args.output, args.format, name=name, opset=args.opset, atol=args.atol,
                          log=print, resolution=args.resolution, keep_rate=args.keep_rate, batch=args.batch,
                          dynamic_size=args.dynamic_size, data_info=data_info, vocabulary=vocab)
    v, s = report["verification"], report["seconds"]
    print(f"wrote {report['path']} ({report['bytes'] / 2**20:.1f} MiB) and {report['json']}: "
          f"max abs diff {v['max_abs_diff']:.3g} <= {v['atol']:g} ({report['runtime_check']}); "
          f"export {s['export']:.1f} s, verification {s['verify']:.1f} s")
    return 0
