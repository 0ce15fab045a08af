"""`hybridzoo list | info | weights | train | eval | bench | predict | export | study | explain` — also
`python -m hybridzoo` (for torchrun).

    hybridzoo list cvt                      # registered models matching *cvt*
    hybridzoo info cvt_13                   # the paper's figures next to what this implementation measures
    hybridzoo train                         # cvt_tiny_demo on the built-in digits, a few minutes on a laptop
    hybridzoo train --model segnetr         # the model card's task (segmentation) on its built-in data
    hybridzoo eval --run runs/20250101-120000-cvt_tiny_demo
    hybridzoo predict --run runs/... img1.png img2.png
    hybridzoo bench cvt_13 --batch-size 32 --json bench.json
    hybridzoo weights deit                  # published weights: tag, source, reported metric, cached or not
    hybridzoo predict --model deit_small_patch16_224 --pretrained fb_in1k cat.jpg
    hybridzoo export --model sctnet_s_seg50 --format onnx      # the deployed network, verified
    torchrun --nproc_per_node=2 -m hybridzoo train --model cvt_13 --data ~/imagenette

`train`, `eval` and `predict` belong to a task (`hybridzoo.tasks`): the task is `--task`, else the
model card's, else classification, and the task adds its own options (`hybridzoo train --task
segmentation --help` lists them). `--plugin MODULE_OR_FILE.py` (repeatable, or the environment
variable HYBRIDZOO_PLUGINS, separated by the path separator) imports code that registers extra
models or tasks before the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "load_plugin"]

PROG = "hybridzoo"


# --------------------------------------------------------------------------------------------- plugins
def load_plugin(spec: str):
    """Import a module by name, or a Python file by path (registered under a name derived from it)."""
    if spec.endswith(".py") or os.sep in spec or (os.altsep and os.altsep in spec):
        path = Path(spec).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"plugin file not found: {spec!r}")
        mod_name = f"hybridzoo_plugin_{path.stem}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _pop_plugins(argv: list[str]) -> tuple[list[str], list[str]]:
    plugins = [p for p in os.environ.get("HYBRIDZOO_PLUGINS", "").split(os.pathsep) if p]
    rest, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--plugin" and i + 1 < len(argv):
            plugins.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--plugin="):
            plugins.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return plugins, rest


# --------------------------------------------------------------------------------------------- parser
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (epochs, batch sizes, threads, ...)."""
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (worker processes, warm-up iterations)."""
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--task", default=None, help="task (default: the model card's task, else classification)")
    g.add_argument("--model", default=None, help="model name (default: the task's demo model)")
    g.add_argument("--data", default=None, help="dataset path (default: the task's built-in dataset)")
    g.add_argument("--epochs", type=positive_int, default=None)
    g.add_argument("--batch-size", type=positive_int, default=None, help="per process")
    g.add_argument("--eval-batch-size", type=positive_int, default=None, help="per process (default: 2 × batch size)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (not scaled by batch size)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up, per step")
    g.add_argument("--output", default=None, help="run folder (default: runs/<time>-<model>); a folder that "
                   "already holds a run is refused unless --overwrite")
    g.add_argument("--overwrite", action="store_true", help="train into an --output folder that already holds a run, "
                   "replacing its files")
    g.add_argument("--resume", default=None, help="last.ckpt of a run to continue exactly")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--workers", type=non_negative_int, default=None, help="data-loading processes")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-fast-cpu", dest="fast_cpu", action="store_false",
                   help="fp32 CPU training with plain nn.Linear and AdamW instead of the default fast path "
                        "(linear layers on native / oneDNN / MKL products, fused AdamW; same function and gradients), "
                        "and validation on the training model only (by default epoch 1 validates eager, epoch 2 on a "
                        "frozen oneDNN copy, and the faster of the two validates from epoch 3 on)")
    g.add_argument("--no-batch-split", dest="batch_split", action="store_false",
                   help="fp32 CPU training of the whole batch at once instead of one share of it per intra-op "
                        "thread (the default for models without batch statistics other than BatchNorm2d's or "
                        "global-generator dropout; "
                        "same gradients and logs, reproducible for a given thread count)")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights (also evaluated)")
    g.add_argument("--ema-decay", type=float, default=0.9998)
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--accum-steps", type=positive_int, default=1, metavar="N",
                   help="accumulate gradients over N batches per optimiser step (effective batch N × batch size)")
    g.add_argument("--pretrained", default=None, metavar="TAG_OR_PATH",
                   help="initial weights: a published tag (`hybridzoo weights`), 'default', or a file (ours or "
                        "an official layout); a different class count resets the head")
    g.add_argument("--layer-decay", type=float, default=None, metavar="D",
                   help="layer-wise lr decay for fine-tuning: block k of K trains at lr × D^(K+1-k), the head at lr")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the model's choice on the fast CPU path, SCTNet's "
                        "and U-Net's; channels-first elsewhere)")
    g.add_argument("--limit-train-batches", type=positive_int, default=None,
                   help="at most this many optimiser steps per epoch (each of --accum-steps batches)")
    g.add_argument("--limit-val-batches", type=positive_int, default=None)
    g.add_argument("--stop-after-epochs", type=positive_int, default=None,
                   help="stop after this many epochs of this invocation (then --resume), e.g. for time-limited jobs")
    g.add_argument("--early-stop", type=positive_int, default=None, metavar="PATIENCE",
                   help="stop when the task's headline metric has not improved for PATIENCE epochs; the best "
                        "epoch's weights are kept (model.safetensors) and used for the final report")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--config", default=None, help="YAML file of option defaults (keys as the long options)")


def build_parser(task=None) -> argparse.ArgumentParser:
    """The full parser; `task` (a Task) adds its options to train / eval / predict."""
    parser = argparse.ArgumentParser(prog=PROG, description="CNN–Transformer hybrid networks, faithful to their papers.",
                                     epilog="Global options (before COMMAND): --plugin MODULE_OR_FILE.py imports extra models/tasks; "
                                            "--malloc tuned|default (docs/performance.md).")
    from hybridzoo import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--plugin", action="append", default=[], help="module or .py file registering models/tasks")
    parser.add_argument("--malloc", choices=["tuned", "default"], default=os.environ.get("HYBRIDZOO_MALLOC", "tuned"),
                        help="tuned (default): glibc keeps freed tensor memory for reuse instead of returning it to "
                             "the kernel, which saves the page faults of every step (docs/performance.md); default: "
                             "glibc as it starts. Also HYBRIDZOO_MALLOC=default. No effect with another allocator "
                             "preloaded or outside glibc")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern or substring (cvt, 'deit_*')")
    p.add_argument("--task", default=None)
    p.add_argument("--no-demo", action="store_true", help="hide demo/test variants")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", help="a model's card: the paper's figures next to what we measure")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-measure", action="store_true", help="skip building the model")

    p = sub.add_parser("weights", help="published trained weights: tag, source, reported metric, cached or not")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern or substring of the tag (deit, 'cvt_13*')")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a model (see --task)")
    _add_engine_arguments(p)
    if task is not None:
        task.add_arguments(p)

    p = sub.add_parser("eval", help="evaluate trained weights on the task's validation set",
                       description="The task's validation metrics for a trained model. --run DIR alone is enough: "
                                   "task, model, data and options are the run's; options given here override them.")
    _add_run_arguments(p, "evaluate")
    p.add_argument("--data", default=None, help="evaluate on this dataset (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (evaluation uses twice this)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    p.add_argument("--limit-val-batches", type=int, default=None, help="at most this many validation batches")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: the run's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    if task is not None:
        _add_task_arguments(p, task, "eval")

    p = sub.add_parser("bench", help="params, MACs, latency and throughput (inference and training)")
    p.add_argument("name")
    p.add_argument("--batch-size", type=positive_int, default=None, help="throughput batch (default 32 on GPU, 8 on CPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--resolution", type=positive_int, default=None, help="input side (default: the card's)")
    p.add_argument("--iters", type=positive_int, default=10)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--pretrained", default=None, metavar="TAG_OR_PATH", help="load these weights first")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--fast", "--onednn", dest="onednn", action="store_true",
                   help="CPU inference through the frozen oneDNN path (hybridzoo.layers.onednn."
                        "optimize_for_cpu_inference: packed weights, BatchNorm folded, activations fused); "
                        "no training row; with --amp bf16 its bf16 variant")
    p.add_argument("--onnx", nargs="?", const=True, default=False, metavar="FILE",
                   help="time eager, the oneDNN path and ONNX Runtime (CPU EP, same threads) interleaved and report "
                        "the ratios; exports the deployed network, or times FILE (written by `hybridzoo export`)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")

    p = sub.add_parser("explain", help="attention maps and other pictures of what a model attends to")
    from hybridzoo import explain

    explain.add_arguments(p)

    p = sub.add_parser("study", help="re-run a paper's comparison (coatnet-layouts, deit-tokens, ...)")
    from hybridzoo import studies

    studies.add_arguments(p)

    p = sub.add_parser("predict", help="run a trained model on files",
                       description="Run a trained model on files and write or print its outputs. --run DIR alone "
                                   "is enough: task, model and options are the run's.")
    _add_run_arguments(p, "run")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="folder for the files predict writes (default: DIR/predictions with --run, else ./predictions)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the predictions as JSON ('-' for stdout)")
    p.add_argument("inputs", nargs="*", metavar="FILE",
                   help="input files or folders (images; land-cover rasters); recommendation takes --history instead")
    if task is not None:
        _add_task_arguments(p, task, "predict")

    from hybridzoo.export import add_export_arguments
    add_export_arguments(sub.add_parser("export", help="ONNX / TorchScript / ExportedProgram of the deployed network, verified"))
    return parser


def _add_run_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """How eval and predict find a trained model (hybridzoo.engine.run.load_run)."""
    from hybridzoo.engine.run import WEIGHTS_CHOICES

    p.add_argument("--run", default=None, metavar="DIR", help="a run folder written by `hybridzoo train`")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a weights file instead: model.safetensors, last.ckpt, or official weights (with --model)")
    p.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                   help="which weights of the run: auto (EMA when the run used --ema and scored it at least as "
                        "well, else model.safetensors), model, ema, last (last.ckpt)")
    p.add_argument("--model", default=None, help="model name, for weights that do not name it")
    p.add_argument("--task", default=None, help="task, for weights that do not name it (default: the model card's)")
    p.add_argument("--device", default="auto", help=f"device to {verb} on: auto (CUDA if available), cpu, cuda:1 ...")
    p.add_argument("--pretrained", default=None, metavar="TAG",
                   help="published weights of --model (`hybridzoo weights`): eval prints the publisher's figure "
                        "beside the measured one; ImageNet weights predict ImageNet class names")
    p.add_argument("--no-fast-cpu", dest="fast_cpu", action="store_false",
                   help="fp32 on the CPU: keep the eager model (by default each kind of input runs on the faster of "
                        "eager and the frozen oneDNN path, timed on its first calls; the same function, fp32 rounding "
                        "apart)")


def _add_task_arguments(p: argparse.ArgumentParser, task, command: str) -> None:
    """The task's options that `command` uses: `task.eval_options` / `task.predict_options` name them (all of
    them for a task that does not say). Their defaults become None so that the run's saved values apply."""
    scratch = argparse.ArgumentParser(add_help=False)
    for a in p._actions:  # options the command defines itself stay its own
        for opt in a.option_strings:
            scratch._option_string_actions[opt] = a
    task.add_arguments(scratch)
    wanted = getattr(task, f"{command}_options", None)
    own = {id(a) for a in p._actions}
    actions = [a for a in scratch._actions if id(a) not in own and a.option_strings
               and (wanted is None or a.dest in wanted)]
    if not actions:
        return
    g = p.add_argument_group(f"{task.name} ({command})")
    for a in actions:
        a.default = None
        g._add_action(a)


def _pre_parse(argv: list[str]) -> argparse.Namespace:
    """Just enough of the command line to know the task (before its options can be added)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    for opt in ("--task", "--model", "--resume", "--run", "--checkpoint", "--config"):
        pre.add_argument(opt, default=None)
    known, _ = pre.parse_known_args(argv)
    return known


def _task_name(pre: argparse.Namespace) -> str:
    if pre.task:
        return pre.task
    if pre.config:
        cfg = _read_config(pre.config)
        if cfg.get("task"):
            return cfg["task"]
        if cfg.get("model") and not pre.model:
            pre.model = cfg["model"]
    if pre.model:
        from hybridzoo.registry import get_card

        return get_card(pre.model).task
    if pre.command == "train" and pre.resume:
        from hybridzoo.engine.checkpoint import load_checkpoint

        return load_checkpoint(pre.resume).get("task") or "classification"
    if pre.command in ("eval", "predict") and (pre.run or pre.checkpoint):
        from hybridzoo.engine.run import read_run

        try:
            return read_run(pre.run, pre.checkpoint).task or "classification"
        except Exception:  # reported properly by the command itself
            return "classification"
    return "classification"


def _read_config(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path!r}")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and ctx_mark is not None:  # where the unclosed bracket or quote began
            what += f" ({ctx} started at line {ctx_mark.line + 1})"
        raise ValueError(f"{path!r} is not valid YAML{where}: {what}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path!r} should hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def _typed_config(cfg: dict[str, Any], parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Config values pass the same type checks as the options they stand for (`epochs: 0` is refused too)."""
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for k, v in cfg.items():
        a = actions.get(k)
        if a is not None and a.type is not None and v is not None:
            try:
                v = a.type(v if isinstance(v, str) else str(v))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                raise ValueError(f"{path!r}: {k}: {e}") from None
        if a is not None and a.choices is not None and v is not None and v not in a.choices:
            raise ValueError(f"{path!r}: {k}: {v!r} is not one of {list(a.choices)}")
        out[k] = v
    return out


def check_model_task(name: str, task) -> None:
    """A model of another task is refused up front, naming its task and this task's models."""
    from hybridzoo.registry import get_card, list_models

    card = get_card(name)
    if card.task == task.name:
        return
    models = [n for n in list_models() if get_card(n).task == task.name]
    raise ValueError(f"{name} is a {card.task} model, not a {task.name} one. {task.name} models: "
                     f"{', '.join(models) if models else '(none registered)'}; or drop --task to use {name} "
                     f"for {card.task}")


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    # the CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory ...")
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))


def _out_of_memory_error(e: BaseException, batch_size: int | None, what: str) -> ValueError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = (f"; try --batch-size {max(1, batch_size // 2)}" if batch_size and batch_size > 1 else "")
    return ValueError(f"out of memory {what} at --batch-size {batch_size}{hint} "
                      f"(the allocator said: {first})")


# --------------------------------------------------------------------------------------------- commands
def cmd_list(args) -> int:
    from hybridzoo.registry import get_card, list_models

    pattern = args.pattern
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = list_models(pattern, task=args.task, include_demo=not args.no_demo)
    if args.json:
        print(json.dumps([get_card(n).as_dict() for n in names], indent=2))
        return 0
    if not names:
        print("no model matches" + (f" {args.pattern!r}" if args.pattern else "") + (f" for task {args.task}" if args.task else ""))
        return 0
    rows = []
    for n in names:
        c = get_card(n)
        rep = c.reported
        # a figure the paper does not give is None on the card: shown as "—", never "None"
        metric = next(((k, v) for k, v in rep.items() if k not in ("params_m", "gflops", "resolution") and v is not None),
                      None)
        rows.append((n, c.task, c.paper, _num(rep.get("params_m"), "M"), _num(rep.get("gflops"), "G"),
                     f"{metric[0]} {metric[1]}" if metric else "—", "demo" if c.demo else ""))
    header = ("model", "task", "paper", "params", "MACs", "reported", "")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"{len(names)} model(s)")
    return 0


def _num(v, unit: str) -> str:
    return "—" if v is None else f"{v:g}{unit}"


def cmd_info(args) -> int:
    from hybridzoo.profile import measure_model
    from hybridzoo.registry import get_card

    card = get_card(args.name)
    measured = None if args.no_measure else measure_model(args.name)
    from hybridzoo.hub.published import describe_metric, get_weight, tags_for

    tags = tags_for(card.name)
    if args.json:
        out = card.as_dict()
        out["weights"] = [get_weight(t).as_dict() for t in tags]
        out["measured"] = None if measured is None else {"params": measured["params"], "macs_g": measured["macs"] / 1e9,
                                                         "input_size": measured["input_size"]}
        print(json.dumps(out, indent=2))
        return 0
    rep = card.reported
    print(f"{card.name} — {card.paper}" + (f" (arXiv {card.arxiv})" if card.arxiv else "") + f"; task {card.task}"
          + ("; demo variant" if card.demo else ""))
    print(f"module {card.module}; input {tuple(card.input_size)}")
    res = rep.get("resolution", card.input_size[-1] if len(card.input_size) == 3 else None)
    rows = [("", "paper", "this implementation")]
    official = ("" if card.params is None else f" (official {card.params:,})" if card.params_source != "ours"
                else " (no published count; pinned to this implementation's)")
    rows.append(("params", _num(rep.get("params_m"), "M"),
                 "—" if measured is None else f"{measured['params']:,} = {measured['params'] / 1e6:.2f}M{official}"))
    ref = (f" (official measured {card.macs_g} G)" if card.macs_g is not None and card.params_source != "ours"
           else "")
    rows.append((f"MACs @{res}" if res else "MACs", _num(rep.get("gflops"), " G"),
                 "—" if measured is None else f"{measured['macs'] / 1e9:.3f} G{ref}"))
    for k, v in rep.items():
        if k not in ("params_m", "gflops", "resolution"):
            rows.append((k, "—" if v is None else str(v), "train/eval to measure"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for r in rows:
        print(f"  {r[0].ljust(w0)}  {r[1].ljust(w1)}  {r[2]}")
    if card.notes:
        print(f"notes: {card.notes}")
    for t in tags:
        w = get_weight(t)
        print(f"weights {t}: {w.source} {w.location}" + (f"; reported {describe_metric(w)}" if w.metric else ""))
    return 0


def cmd_weights(args) -> int:
    """Every published weight matching the pattern: tag, where it lives, the publisher's figure, cached?"""
    from hybridzoo.hub.download import cached_file
    from hybridzoo.hub.published import describe_metric, published_weights

    weights = published_weights(args.pattern)
    if args.json:
        print(json.dumps([dict(w.as_dict(), cached=cached_file(w) is not None) for w in weights], indent=2))
        return 0
    if not weights:
        print("no published weights match" + (f" {args.pattern!r}" if args.pattern else ""))
        return 0
    rows = [(w.tag, w.source + (" (download by hand)" if w.manual else ""), w.location,
             describe_metric(w) or "—", "yes" if cached_file(w) is not None else "no") for w in weights]
    header = ("tag", "source", "location", "reported", "cached")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"{len(weights)} weight(s); `create_model(name, pretrained=TAG)` or `--pretrained TAG` fetches one")
    return 0


class _WithKwargs:
    """Binds forward keyword arguments (a bench config) to a model for hybridzoo.profile.benchmark."""

    @staticmethod
    def wrap(model, kwargs: dict):
        import torch.nn as nn

        if not kwargs:
            return model

        class Bound(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *x):
                return self.model(*x, **kwargs)

        bound = Bound()
        if hasattr(model, "example_input"):
            bound.example_input = model.example_input
        return bound


def _note(msg: str) -> None:
    # progress on stderr, so stdout stays the results (and --json-like piping keeps working)
    print(msg, file=sys.stderr, flush=True)


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def bench_rows(model, name: str, input_size: tuple[int, ...], args, device) -> list[dict[str, Any]]:
    """One row per bench config: the model's `bench_configs()` if it has one, else its default input.

    Each measurement announces itself on stderr (with a memory estimate first), so a long run is never silent.
    """
    import torch

    from hybridzoo.profile import benchmark, count_params, estimate_memory, example_input, forward_profile
    from hybridzoo.engine.trainer import AMP_DTYPES

    configs = model.bench_configs() if hasattr(model, "bench_configs") else [{"input_size": tuple(input_size)}]
    amp = AMP_DTYPES[args.amp]
    bs = args.batch_size or (32 if device.type == "cuda" else 8)
    params = count_params(model)
    rows = []
    for i, cfg in enumerate(configs):
        # config keys: input_size, name, module (another network to time, e.g. a teacher), batch_size,
        # train (False: inference only); the rest are forward keyword arguments
        cfg = dict(cfg)
        size = tuple(cfg.pop("input_size", input_size))
        label = cfg.pop("name", None)
        module = cfg.pop("module", None)
        cfg_bs = cfg.pop("batch_size", None)
        cfg_train = cfg.pop("train", True)
        cfg.update(cfg.pop("forward_kwargs", {}))
        target = module.to(device) if module is not None else model
        runner = _WithKwargs.wrap(target, cfg)
        runner.eval()
        config = label or (", ".join(f"{k}={v}" for k, v in cfg.items()) or "default")
        n = cfg_bs or bs
        train = not args.no_train and cfg_train and not args.onednn
        n_params = count_params(target) if module is not None else params
        # counted on the eager model: the oneDNN path computes the same products through kernels the
        # counter cannot see, so `info`, `bench` and `bench --onednn` report one number
        prof = forward_profile(runner, example_input(runner, size, 1, device=device))
        need = estimate_memory(n_params, prof["activation_bytes"], n, train)
        _note(f"[{i + 1}/{len(configs)}] {name} [{config}] input {size}: {prof['macs'] / 1e9:.3f} GMACs; memory "
              f"estimate {_gb(need)} for {'a training step' if train else 'inference'} at batch {n} (weights "
              f"{_gb(n_params * 4)}, activations up to {_gb(prof['activation_bytes'])} per sample)")
        if args.onednn:
            from hybridzoo.layers.onednn import optimize_for_cpu_inference
            # with --amp bf16: bf16 packed weights, fp32 in and out (the layers.onednn docstring)
            runner = optimize_for_cpu_inference(runner, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float32)
        row: dict[str, Any] = {"model": name, "config": config, "input_size": list(size), "params": n_params,
                               "macs_g": prof["macs"] / 1e9, "device": str(device), "amp": args.amp,
                               "threads": torch.get_num_threads()}
        common = dict(device=str(device), warmup=args.warmup, iters=args.iters, amp_dtype=amp)
        steps = f"{args.warmup} warm-up + {args.iters} timed"
        _note(f"  latency at batch 1 ({steps}) ...")
        lat = benchmark(runner, size, batch_size=1, **common)
        row["latency_ms_bs1"] = lat["seconds_per_iter"] * 1e3
        row["fps_bs1"] = 1.0 / lat["seconds_per_iter"]
        try:
            if n != 1:
                _note(f"  inference throughput at batch {n} ({steps}) ...")
                thr = benchmark(runner, size, batch_size=n, **common)
                row[f"infer_samples_per_s_bs{n}"] = thr["samples_per_second"]
            if train:
                _note(f"  training throughput at batch {n} ({steps}) ...")
                tr = benchmark(runner, size, batch_size=n, train=True, **common)
                row[f"train_samples_per_s_bs{n}"] = tr["samples_per_second"]
        except RuntimeError as e:
            if not _is_out_of_memory(e):
                raise
            raise _out_of_memory_error(e, n, f"benchmarking {name} [{config}]") from None
        rows.append(row)
    return rows


def cmd_bench(args) -> int:
    import torch

    from hybridzoo.engine.distributed import resolve_device
    from hybridzoo.factory import create_model
    from hybridzoo.registry import get_card

    card = get_card(args.name)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.onnx:
        from hybridzoo.export import bench_onnx
        return bench_onnx(args)
    if args.onednn:
        # the frozen oneDNN path is CPU code: on a machine with a GPU, "auto" means the CPU here
        if args.device != "auto" and torch.device(args.device).type != "cpu":
            raise ValueError(f"--fast / --onednn is the CPU inference path (oneDNN); it cannot run on --device "
                             f"{args.device}: drop --fast to benchmark the model on {args.device}")
        args.device = "cpu"
    device = resolve_device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    size = tuple(card.input_size)
    overrides = {}
    if args.resolution and len(size) == 3:
        size = (size[0], args.resolution, args.resolution)
        overrides["img_size"] = args.resolution
    pretrained = getattr(args, "pretrained", None)
    try:
        model = create_model(args.name, pretrained=pretrained, **overrides)
    except TypeError:
        model = create_model(args.name, pretrained=pretrained)  # resolution-agnostic models take no img_size
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    rows = bench_rows(model, args.name, size, args, device)
    for row in rows:
        print(f"{row['model']} [{row['config']}] input {tuple(row['input_size'])} on {row['device']}"
              f" ({row['threads']} threads, amp {row['amp']})")
        for k, v in row.items():
            if k in ("model", "config", "input_size", "device", "amp", "threads"):
                continue
            print(f"  {k:<28} {v:,.3f}" if isinstance(v, float) else f"  {k:<28} {v:,}")
    if len(rows) > 1:  # e.g. SuperViT's 12 (resolution, keep-rate) pairs, SCTNet vs its teacher
        keys = [k for k in rows[0] if k.startswith(("latency", "fps", "infer", "train_samples"))]
        print("\n| config | input | GMACs | " + " | ".join(keys) + " |")
        print("| --- | --- | ---: | " + " | ".join("---:" for _ in keys) + " |")
        for r in rows:
            print(f"| {r['config']} | {'×'.join(map(str, r['input_size'][1:]))} | {r['macs_g']:.3f} | "
                  + " | ".join(f"{r[k]:.2f}" if isinstance(r.get(k), float) else "—" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _merge_resume_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Options not given on the command line are taken from the checkpoint's run."""
    from hybridzoo.engine.checkpoint import load_checkpoint

    saved = load_checkpoint(args.resume).get("args", {})
    # per-invocation options stay this invocation's (a resumed run must not stop again after N epochs)
    keep = {"resume", "output", "overwrite", "device", "workers", "progress", "config", "plugin", "command",
            "stop_after_epochs"}
    for k, v in saved.items():
        if k in keep or not hasattr(args, k):
            continue
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)


def cmd_train(args, task, parser) -> int:
    from hybridzoo.engine.trainer import train

    if args.resume:
        _merge_resume_args(args, parser)
    try:
        train(args, task)
    except RuntimeError as e:
        if not _is_out_of_memory(e):
            raise
        raise _out_of_memory_error(e, args.batch_size or task.default_batch_size, "while training") from None
    return 0


def cmd_eval(args, task) -> int:
    from hybridzoo.engine.trainer import evaluate

    if getattr(args, "baseline", None):  # the task's reference method (super-resolution: bicubic), no weights
        scores = {f"val_{k}": v for k, v in task.evaluate_baseline(args).items()}
        print("  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if args.json:
            Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
        return 0
    published = None
    if getattr(args, "pretrained", None) and not args.run and not args.checkpoint:
        from hybridzoo.hub.published import resolve_pretrained

        if not args.model:
            raise ValueError("eval --pretrained TAG needs --model NAME")
        args.checkpoint, published = resolve_pretrained(args.model, args.pretrained)
    if not args.run and not args.checkpoint:
        raise ValueError("eval needs --run DIR (a run folder), --checkpoint PATH [--model NAME], or --model NAME "
                         "--pretrained TAG")
    metrics = evaluate(args, task)
    print("  ".join(f"val_{k} {v:.4f}" for k, v in metrics.items()))
    if published is not None:
        print(_publisher_vs_measured(published, metrics))
    if args.json:
        from hybridzoo.engine.checkpoint import atomic_write

        text = json.dumps({f"val_{k}": v for k, v in metrics.items()}, indent=2) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode()))
        print(f"wrote {args.json}")
    return 0


def _publisher_vs_measured(w, metrics: dict[str, float]) -> str:
    """The publisher's figure next to ours (ours are fractions where the publisher writes percent)."""
    from hybridzoo.hub.published import describe_metric

    if not w.metric:
        return f"{w.tag}: the publisher states no figure to compare with"
    parts = []
    for k, v in w.metric.items():
        ours = metrics.get(k)
        if ours is None:
            parts.append(f"{k}: publisher {v:g}, not measured by this task")
        else:
            scale = 100.0 if v > 1.0 and ours <= 1.0 else 1.0
            parts.append(f"{k}: publisher {v:g}, measured {ours * scale:.2f} ({ours * scale - v:+.2f})")
    return f"{w.tag} — reported {describe_metric(w)}; " + "; ".join(parts)


def cmd_predict(args, task) -> int:
    if not args.run and not args.checkpoint and not getattr(args, "pretrained", None):
        raise ValueError("predict needs --run DIR (a run folder), --checkpoint PATH [--model NAME], or --model NAME "
                         "--pretrained TAG: hybridzoo predict --run DIR FILE...")
    task.predict(args)
    return 0


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from hybridzoo.engine.checkpoint import CheckpointError, DiskFullError
    from hybridzoo.engine.trainer import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plugins, argv = _pop_plugins(argv)
        for p in plugins:
            load_plugin(p)
        pre = _pre_parse(argv)
        task = None
        if pre.command in ("train", "eval", "predict"):
            from hybridzoo.tasks.base import get_task

            task = get_task(_task_name(pre))
        parser = build_parser(task)
        if pre.command == "train" and pre.config:
            train_parser = parser._subparsers._group_actions[0].choices["train"]
            cfg = _read_config(pre.config)
            known = {a.dest for a in train_parser._actions}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise ValueError(f"{pre.config!r}: unknown options {unknown}")
            train_parser.set_defaults(**_typed_config(cfg, train_parser, pre.config))
        args = parser.parse_args(argv)
        if args.malloc not in ("tuned", "default"):  # an environment default is not checked by argparse
            raise ValueError(f"HYBRIDZOO_MALLOC={args.malloc!r}: expected 'tuned' or 'default'")
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "list":
            return cmd_list(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "weights":
            return cmd_weights(args)
        if args.malloc == "tuned":
            from hybridzoo.engine.cpu_memory import tune_glibc_malloc

            tune_glibc_malloc()
        if getattr(args, "amp", None) == "bf16":
            from hybridzoo.engine.amp import warn_if_bf16_slow

            warn_if_bf16_slow(args.amp, getattr(args, "device", None))
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "export":
            from hybridzoo.export import cmd_export
            return cmd_export(args)
        if args.command in ("train", "eval", "predict") and args.model:
            check_model_task(args.model, task)
        if args.command == "explain":
            from hybridzoo.explain import main as explain_main

            explain_main(args)
            return 0
        if args.command == "study":
            from hybridzoo.studies import run_study

            run_study(args)
            return 0
        if args.command == "train":
            args.task = task.name
            return cmd_train(args, task, parser._subparsers._group_actions[0].choices["train"])
        if args.command == "eval":
            args.task = task.name
            return cmd_eval(args, task)
        if args.command == "predict":
            args.task = task.name
            return cmd_predict(args, task)
    except NonFiniteLossError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, CheckpointError, NotImplementedError, DiskFullError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`hybridzoo list | head`); silence the interpreter's final flush too.
        # Not an error for the listing commands; a run cut short by it is
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0 if argv[:1] in (["list"], ["info"]) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
