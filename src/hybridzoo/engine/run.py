"""One way to load a trained run, for `eval`, `predict` and `export`.

    run = load_run("runs/20261130-120000-cvt_tiny_demo")          # the run folder alone is enough
    run = load_run(checkpoint="runs/.../last.ckpt")                # or a file the engine wrote
    run = load_run(checkpoint="CvT-13.pth", model="cvt_13", data_info={"num_classes": 1000})  # official weights
    run.model(x)          # eval mode, on run.device, the trained weights
    run.data_info         # class names, normalisation, image size, band statistics, item vocabulary, ...
    run.args              # the training arguments (given options > the run's saved ones > defaults)

A run folder holds `summary.json` (task, model, the training arguments), `model.safetensors` (the
weights; its metadata names model and task and carries the data info), `model_ema.safetensors` with
`--ema`, `last.ckpt`, and task files (`items.json` for recommendation). The model is rebuilt by the
task's own `build_model` from the saved arguments and data info — the code that built it for
training, so num_classes, in_chans, the image or patch size, scale, max_len and num_items all match
— and the weights are loaded strictly: weights that do not fit are an error naming the keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridzoo.engine.checkpoint import CheckpointError, load_checkpoint

__all__ = ["Run", "RunSpec", "read_run", "load_run", "load_run_from_args", "merge_args", "WEIGHTS_CHOICES",
           "read_image_file", "expand_inputs", "output_dir", "report_stream", "IMAGE_SUFFIXES"]

WEIGHTS_CHOICES = ("auto", "model", "ema", "last")

# Saved training options that never carry over to eval/predict: where the run wrote, how it was
# launched, what initialised or taught it (the trained weights replace all of that).
_NOT_INHERITED = {"output", "resume", "device", "workers", "progress", "config", "plugin", "command", "amp",
                  "compile", "pretrained", "limit_train_batches", "limit_val_batches", "stop_after_epochs",
                  "early_stop", "run", "checkpoint", "weights", "json", "teacher", "teacher_checkpoint",
                  "distillation", "channels_last", "images", "inputs", "history", "fast_cpu", "batch_split"}
# Options that only shape training; building the model for inference turns them off.
_INFERENCE_ONLY = {"pretrained": None, "teacher": None, "teacher_checkpoint": None, "teacher_model": None,
                   "distillation": "none"}


@dataclass
class RunSpec:
    """What a run folder or an engine-written file says about a trained model, before anything is built."""

    task: str | None
    model: str | None
    weights: str                              # the file the weights come from
    weights_kind: str                         # "model", "ema", "last" or "file"
    data_info: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)   # the training arguments as saved
    summary: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    state: dict[str, torch.Tensor] | None = None  # weights already read (from a last.ckpt)
    note: str = ""                            # why these weights (e.g. EMA chosen over the raw model)

    def as_dict(self) -> dict[str, Any]:
        """The old `read_run` answer: {model, task, data_info, weights}."""
        return {"model": self.model, "task": self.task, "data_info": self.data_info, "weights": self.weights}


@dataclass
class Run:
    """A trained model ready to use: built from its run's arguments, weights loaded, in eval mode."""

    task: Any                                 # the hybridzoo.tasks.base.Task instance that built the model
    model_name: str
    model: nn.Module
    device: torch.device
    data_info: dict[str, Any]
    args: argparse.Namespace
    weights: str
    weights_kind: str
    run_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def task_name(self) -> str:
        return self.task.name

    @property
    def input_size(self) -> tuple[int, ...]:
        """One sample's input shape as trained — (C, H, W) for images and patches, (max_len,) for item
        sequences — else the model card's."""
        from hybridzoo.registry import get_card

        info = self.data_info
        side = info.get("img_size") or info.get("patch_size")
        if side and "in_chans" in info:
            return (int(info["in_chans"]), int(side), int(side))
        if info.get("max_len"):
            return (int(info["max_len"]),)
        return tuple(get_card(self.model_name).input_size)

    def class_names(self) -> list[str]:
        """The run's class names (their indices as names when it kept none); weights that do not say how
        many classes they predict are an error, not a guess."""
        if "num_classes" not in self.data_info:
            raise ValueError(f"{self.weights!r} does not say its classes; use a run folder or weights written by "
                             f"`hybridzoo train --task {self.task_name}`")
        n = int(self.data_info["num_classes"])
        return list(self.data_info.get("class_names") or [str(i) for i in range(n)])

    def describe(self) -> str:
        """One line: model, task, which weights, device (what eval and predict print first)."""
        return (f"{self.model_name} ({self.task_name}) weights {self.weights}"
                + (f" [{self.note}]" if self.note else "") + f" on {self.device}")


# ------------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.fspath(path)!r} is not readable JSON: {e}") from e


def _safetensors_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable safetensors file: {e}") from e
    info = json.loads(meta["data_info"]) if "data_info" in meta else {}
    return {"model": meta.get("model"), "task": meta.get("task"), "data_info": info}


def _is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in ("summary.json", "model.safetensors", "last.ckpt"))


def _prefer_ema(summary: dict[str, Any], args: dict[str, Any], task: str | None) -> tuple[bool, str]:
    """With --ema, the EMA weights are used when the run's summary scores them at least as well."""
    if not args.get("ema"):
        return False, ""
    headline = None
    if task:
        from hybridzoo.tasks.base import get_task

        try:
            t = get_task(task)
            headline, higher = args.get("valid_metric") or t.headline_metric, t.higher_is_better
        except ValueError:
            pass
    if headline is None:
        return True, "EMA weights (the run used --ema)"
    raw, ema = summary.get(f"val_{headline}"), summary.get(f"val_ema_{headline}")
    if not isinstance(raw, (int, float)) or not isinstance(ema, (int, float)):
        return True, "EMA weights (the run used --ema)"
    better = ema >= raw if higher else ema <= raw
    if better:
        return True, f"EMA weights: val_ema_{headline} {ema:.4g} vs val_{headline} {raw:.4g}"
    return False, f"raw weights: val_{headline} {raw:.4g} beats val_ema_{headline} {ema:.4g}"


def read_run(run_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
             weights: str = "auto") -> RunSpec:
    """Read (without building anything) what a run folder or an engine-written file says.

    `weights`: "auto" (the file `summary.json` names under `weights`; else the EMA weights when the
    run used `--ema` and its summary scores them at least as well as the raw ones; else
    `model.safetensors`), "model", "ema" or "last" (the model in `last.ckpt`). `checkpoint` is an
    explicit file: a `model.safetensors` / `model_ema.safetensors` written by the engine, a
    `last.ckpt`, or any weights file (an official checkpoint; then the caller names the model).
    """
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}")
    if run_dir is None and checkpoint is None:
        raise ValueError("give a run folder (--run DIR) or a weights file (--checkpoint PATH)")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {os.fspath(path)!r}")
        # a file inside a run folder still gets the folder's arguments and task files
        if run_dir is None and (path.parent / "summary.json").is_file():
            run_dir = path.parent
    summary: dict[str, Any] = {}
    saved_args: dict[str, Any] = {}
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir() or not _is_run_dir(run_dir):
            raise FileNotFoundError(f"{os.fspath(run_dir)!r} is not a run folder (expected summary.json, "
                                    "model.safetensors and last.ckpt, as `hybridzoo train` writes them)")
        if (run_dir / "summary.json").is_file():
            summary = _read_json(run_dir / "summary.json")
            saved_args = dict(summary.get("args") or {})

    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix == ".safetensors":
            meta = _safetensors_meta(path)
            kind = "ema" if path.name == "model_ema.safetensors" else "file"
            spec = RunSpec(task=meta["task"], model=meta["model"], weights=os.fspath(path), weights_kind=kind,
                           data_info=meta["data_info"])
        else:
            spec = _from_torch_file(path, weights)
    else:
        spec = _from_run_dir(run_dir, summary, saved_args, weights)
    spec.run_dir = run_dir
    spec.summary = summary
    spec.args = saved_args or spec.args
    spec.task = summary.get("task") or spec.task or saved_args.get("task")
    spec.model = summary.get("model") or spec.model or saved_args.get("model")
    if run_dir is not None and (run_dir / "items.json").is_file() and "item_tokens" not in spec.data_info:
        spec.data_info = dict(spec.data_info, item_tokens=_read_json_list(run_dir / "items.json"))
    return spec


def _read_json_list(path: Path) -> list:
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable JSON list: {e}") from e


def _from_torch_file(path: Path, weights: str) -> RunSpec:
    """A `last.ckpt` (its model or EMA state, arguments, data info), or a foreign checkpoint (weights only)."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        # not ours: an official checkpoint, read (safely) when the model is built
        return RunSpec(task=None, model=None, weights=os.fspath(path), weights_kind="file")
    state, kind = ckpt["model"], "last"
    if weights == "ema":
        if ckpt.get("ema") is None:
            raise ValueError(f"{os.fspath(path)!r} holds no EMA weights (the run was trained without --ema)")
        state, kind = ckpt["ema"], "ema"
    return RunSpec(task=ckpt.get("task"), model=(ckpt.get("args") or {}).get("model"), weights=os.fspath(path),
                   weights_kind=kind, data_info=dict(ckpt.get("data_info") or {}), args=dict(ckpt.get("args") or {}),
                   state=state)


def _from_run_dir(run_dir: Path, summary: dict[str, Any], saved_args: dict[str, Any], weights: str) -> RunSpec:
    model_file, ema_file, last = run_dir / "model.safetensors", run_dir / "model_ema.safetensors", run_dir / "last.ckpt"
    note = ""
    if weights == "auto":
        named = summary.get("weights")
        if isinstance(named, str) and (run_dir / named).is_file():
            chosen, note = run_dir / named, "named by summary.json"
        else:
            use_ema, note = _prefer_ema(summary, saved_args, summary.get("task") or saved_args.get("task"))
            chosen = ema_file if use_ema and ema_file.is_file() else model_file
            if not chosen.is_file() and last.is_file():
                return _last(run_dir, last, "ema" if use_ema else "model")
    elif weights == "model":
        chosen = model_file
    elif weights == "ema":
        if not ema_file.is_file():
            if last.is_file():
                return _last(run_dir, last, "ema")
            raise FileNotFoundError(f"{os.fspath(run_dir)!r} has no EMA weights (model_ema.safetensors); the run "
                                    "was trained without --ema")
        chosen = ema_file
    else:
        return _last(run_dir, last, "model")
    if not chosen.is_file():
        raise FileNotFoundError(f"{os.fspath(run_dir)!r} has no {chosen.name} (a run folder holds the weights "
                                "`hybridzoo train` wrote)")
    meta = _safetensors_meta(chosen)
    kind = "ema" if chosen == ema_file else "model"
    return RunSpec(task=meta["task"], model=meta["model"], weights=os.fspath(chosen), weights_kind=kind,
                   data_info=meta["data_info"], note=note)


def _last(run_dir: Path, last: Path, which: str) -> RunSpec:
    if not last.is_file():
        raise FileNotFoundError(f"{os.fspath(run_dir)!r} has no last.ckpt")
    spec = _from_torch_file(last, which)
    if spec.state is None:
        raise CheckpointError(f"{os.fspath(last)!r} is not a hybridzoo training checkpoint")
    return spec


# ------------------------------------------------------------------------------------------ arguments
def _option_defaults(task) -> dict[str, Any]:
    """The defaults of the task's own command-line options (what `train --help` shows)."""
    p = argparse.ArgumentParser(add_help=False)
    task.add_arguments(p)
    return {a.dest: a.default for a in p._actions if a.dest != argparse.SUPPRESS}


def merge_args(given: argparse.Namespace | dict | None, saved: dict[str, Any], task,
               model: str | None = None) -> argparse.Namespace:
    """Options for eval/predict: given (not None) > the run's saved training options > defaults.

    Launch and initialisation options of the training run (`_NOT_INHERITED`) are not carried over.
    """
    from hybridzoo.engine.trainer import fill_defaults

    given = vars(given) if isinstance(given, argparse.Namespace) else dict(given or {})
    merged = {k: v for k, v in _option_defaults(task).items()}
    merged.update({k: v for k, v in saved.items() if k not in _NOT_INHERITED})
    merged.update({k: v for k, v in given.items() if v is not None})
    if model:
        merged["model"] = model
    args = fill_defaults(argparse.Namespace(**merged), task)
    return args


# ------------------------------------------------------------------------------------------ building
def _resolve_device(device: str | torch.device | None) -> torch.device:
    from hybridzoo.engine.distributed import resolve_device

    if isinstance(device, torch.device):
        return device
    try:
        return resolve_device(device)
    except RuntimeError as e:  # e.g. --device cuda on a machine without CUDA: bad input, not a crash
        raise ValueError(str(e) if "--device" in str(e) else f"--device {device}: {e}") from e


def _drop_empty_slots(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under a training-only submodule the inference build leaves empty (an attribute that is None,
    e.g. SCTNet's `siam` with its teacher) are not part of the deployed model."""
    own = model.state_dict()
    empty = {k.split(".", 1)[0] for k in state if k not in own and "." in k}
    empty = {name for name in empty if getattr(model, name, False) is None}
    if not empty:
        return state
    return {k: v for k, v in state.items() if k.split(".", 1)[0] not in empty}


def load_run(run_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
             model: str | None = None, device: str | torch.device | None = "auto", *, task=None,
             weights: str = "auto", data_info: dict[str, Any] | None = None,
             options: argparse.Namespace | dict | None = None, spec: RunSpec | None = None,
             fast_cpu: bool = False) -> Run:
    """Rebuild a trained model from a run folder or a weights file; see the module docstring.

    model: the model name, needed only for weights that do not name it (an official checkpoint).
    device: "auto" (CUDA when available, else the CPU), "cpu", "cuda:1", or a torch.device.
    task: a Task instance (it keeps state such as the recommendation data between build_data and
        evaluate) or a name; default the run's task, else the model card's.
    weights: which weights of a run folder ("auto", "model", "ema", "last"; see `read_run`).
    data_info: facts about the data for weights that carry none (an official checkpoint); the
        run's own data info wins.
    options: options given now (eval/predict command line); they override the saved ones.
    fast_cpu: on the CPU in fp32 (no `--amp` among the options), `run.model` is `layers.onednn.fastest_cpu_inference`'s frozen copy, which runs each kind
        of input on the faster of the eager model and the oneDNN path (timed on its first calls, the choice
        printed on stderr): what `hybridzoo eval` and `predict` use in fp32. Inference only; the default keeps
        the eager model.
    """
    from hybridzoo.factory import load_weights, read_state_dict
    from hybridzoo.registry import get_card
    from hybridzoo.tasks.base import get_task

    spec = spec or read_run(run_dir, checkpoint, weights)
    name = spec.model or model
    if model and spec.model and model != spec.model:
        raise ValueError(f"{spec.weights!r} holds {spec.model} weights, not {model} (leave out --model)")
    if not name:
        raise ValueError(f"{spec.weights!r} does not name its model; pass --model NAME")
    get_card(name)  # an unknown name is an error that suggests the registered ones
    if task is None or isinstance(task, str):
        task = get_task(task or spec.task or get_card(name).task)
    elif spec.task and spec.task != task.name:
        raise ValueError(f"{spec.weights!r} was trained for {spec.task}, not {task.name} (leave out --task)")
    info = dict(data_info or {})
    info.update(spec.data_info)
    args = merge_args(options, spec.args, task, model=name)
    build_args = argparse.Namespace(**{**vars(args), **_INFERENCE_ONLY})
    try:
        net = task.build_model(build_args, info)
    except KeyError as e:
        raise ValueError(f"{spec.weights!r} lacks the data facts {task.name} needs to rebuild {name} ({e}); "
                         "use a run folder or weights written by `hybridzoo train`") from e
    state = spec.state if spec.state is not None else read_state_dict(spec.weights)
    state = _drop_empty_slots(net, state)
    try:
        load_weights(net, state)
    except ValueError as e:
        built = {k: info[k] for k in ("num_classes", "in_chans", "img_size", "patch_size", "scale", "num_items",
                                      "max_len") if k in info}
        raise ValueError(f"{spec.weights!r} does not fit {name} as built from the run's saved options "
                         f"({', '.join(f'{k}={v}' for k, v in built.items()) or 'no saved data facts'}): "
                         + str(e).replace(":\n  ", ": ").replace("\n  ", "; ")) from e
    dev = _resolve_device(device)
    net = net.to(dev).eval()
    if fast_cpu and dev.type == "cpu" and args.amp in (None, "none"):  # under --amp: eager, in autocast
        from hybridzoo.layers.onednn import fastest_cpu_inference, onednn_available

        if onednn_available():
            net = fastest_cpu_inference(net, report=lambda line: print(line, file=sys.stderr))
    return Run(task=task, model_name=name, model=net, device=dev, data_info=info, args=args, weights=spec.weights,
               weights_kind=spec.weights_kind, run_dir=spec.run_dir, summary=spec.summary, note=spec.note)


def load_run_from_args(args: argparse.Namespace, task) -> Run:
    """`load_run` for a command's arguments (`--run`, `--checkpoint`, `--model [--pretrained TAG]`, `--device`,
    `--weights`)."""
    run_dir, checkpoint, data_info = getattr(args, "run", None), getattr(args, "checkpoint", None), None
    if getattr(args, "pretrained", None) and not run_dir and not checkpoint:
        # published weights (`--model M --pretrained TAG`): the publisher's classes, resolution and normalisation
        from hybridzoo.hub.published import pretrained_run

        if not getattr(args, "model", None):
            raise ValueError("--pretrained TAG needs --model NAME")
        published = pretrained_run(args.model, args.pretrained)
        checkpoint, data_info = published["weights"], published["data_info"]
    return load_run(run_dir, checkpoint, model=getattr(args, "model", None),
                    device=getattr(args, "device", None) or "auto", task=task,
                    weights=getattr(args, "weights", None) or "auto", data_info=data_info, options=args,
                    fast_cpu=getattr(args, "fast_cpu", True))


# ------------------------------------------------------------------------------------------ inputs
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")


def expand_inputs(paths, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, what: str = "image") -> list[Path]:
    """Files as given, folders replaced by their files with `suffixes` (sorted). A missing path, or (for
    images) a file Pillow cannot identify, is an error naming it — before any model is loaded."""
    if not paths:
        raise ValueError(f"predict needs at least one {what} file: hybridzoo predict --run DIR FILE...")
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
            if not found:
                raise FileNotFoundError(f"no {what} files ({', '.join(suffixes)}) in folder {os.fspath(p)!r}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input file not found: {os.fspath(p)!r}")
    if what == "image":
        from PIL import Image, UnidentifiedImageError

        for p in out:
            try:
                with Image.open(p):  # reads the header only
                    pass
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise ValueError(f"{os.fspath(p)!r} is not an image Pillow can read (PNG, JPEG, BMP, TIFF, ...): "
                                 f"{e}") from None
    return out


def output_dir(args: argparse.Namespace, run: Run) -> Path:
    """Where predict writes: `--output`, else `predictions/` in the run folder, else `./predictions`."""
    out = getattr(args, "output", None)
    folder = Path(out) if out else (run.run_dir / "predictions" if run.run_dir is not None else Path("predictions"))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {os.fspath(folder)!r} is a file; expected a folder for the predictions")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def report_stream(args: argparse.Namespace):
    """Where predict reports what it did: stderr when the JSON goes to stdout (`--json -`), else stdout."""
    import sys

    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def read_image_file(path: str | os.PathLike, mode: str = "RGB"):
    """A picture as a Pillow image in `mode`; a file Pillow cannot read is a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"input file not found: {os.fspath(path)!r}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not an image Pillow can read (PNG, JPEG, BMP, TIFF, ...): "
                         f"{e}") from None
