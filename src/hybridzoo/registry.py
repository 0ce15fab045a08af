"""The model registry: every architecture variant is a function decorated with `@register_model`.

The decorator records a `ModelCard` — the paper, its arXiv id, the task, the figures the paper
reports and, where an official implementation exists, its exact parameter count — so that
`hybridzoo info`, the parametrized test suite and the benchmarks all read the same facts.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ModelCard", "register_model", "get_card", "list_models", "model_entrypoint", "task_names"]

# the tasks of hybridzoo.tasks, known before that package is imported (model files register first)
_BUILTIN_TASKS = ("classification", "segmentation", "super-resolution", "recommendation", "land-cover", "detection")


def task_names() -> tuple[str, ...]:
    """The built-in tasks and every task registered since (`hybridzoo.tasks.base.register_task`, e.g. by a
    `--plugin`), so a plugin can register a task and then models for it."""
    base = sys.modules.get("hybridzoo.tasks.base")  # not imported here: model files register before the tasks load
    registered = tuple(base.TASK_REGISTRY) if base is not None else ()
    return tuple(dict.fromkeys(_BUILTIN_TASKS + registered))


def __getattr__(name: str) -> Any:
    if name == "TASKS":  # read at use, not import: plugins add tasks
        return task_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelCard:
    """What the paper says about one registered variant, next to how to build and test it.

    reported: the paper's figures — `params_m`, `gflops` (multiply-adds, as papers count them),
    the task's headline metric (`top1`, `miou`, `psnr`, `hr@10`, `oa`, ...) and `resolution`.
    params: the exact parameter count of the official implementation, when one exists; the test
        suite then asserts equality instead of the 1% tolerance on `reported["params_m"]`.
    macs_g: the MACs that `torch.utils.flop_counter.FlopCounterMode` measures on the official model
        (FLOPs / 2), when that differs from the paper's rounded figure; tests compare against it.
    input_size: the full-size input (C, H, W) at the paper's resolution (or (L,) for sequences).
    test_kwargs / test_input_size: a reduced build for the fast forward/backward tests.
    unused_params: parameter-name prefixes that legitimately receive no gradient (documented why
        in the model file, e.g. a convolution the official code builds but never calls).
    """

    name: str
    paper: str
    arxiv: str | None
    task: str
    reported: dict[str, Any]
    params: int | None = None
    params_source: str = "official"   # where `params` comes from; "ours" where no published count exists
    params_rtol: float = 0.01
    macs_g: float | None = None
    flops_rtol: float = 0.10
    input_size: tuple[int, ...] = (3, 224, 224)
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    test_input_size: tuple[int, ...] | None = None
    unused_params: tuple[str, ...] = ()
    demo: bool = False
    notes: str = ""
    module: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "paper": self.paper, "arxiv": self.arxiv, "task": self.task,
            "reported": dict(self.reported), "params_exact": self.params, "params_source": self.params_source,
            "macs_g": self.macs_g,
            "input_size": list(self.input_size), "demo": self.demo, "notes": self.notes,
        }


_ENTRYPOINTS: dict[str, Callable[..., Any]] = {}
_CARDS: dict[str, ModelCard] = {}


def register_model(*, paper: str, arxiv: str | None, task: str, reported: dict[str, Any],
                   **card_fields: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model variant under its function's name, with the paper's figures."""
    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; expected one of {task_names()} (register a new task with "
                         "hybridzoo.tasks.base.register_task first)")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__
        if name in _ENTRYPOINTS and _ENTRYPOINTS[name].__module__ != fn.__module__:
            raise ValueError(f"model {name!r} registered twice ({_ENTRYPOINTS[name].__module__}, {fn.__module__})")
        _ENTRYPOINTS[name] = fn
        _CARDS[name] = ModelCard(name=name, paper=paper, arxiv=arxiv, task=task, reported=dict(reported),
                                 module=fn.__module__, **card_fields)
        return fn

    return decorator


def _ensure_loaded() -> None:
    # Importing the models package runs every @register_model decorator exactly once.
    import hybridzoo.models  # noqa: F401


def unknown_model_error(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `hybridzoo list` to see all models."
    return ValueError(f"unknown model {name!r}.{hint}")


def model_entrypoint(name: str) -> Callable[..., Any]:
    _ensure_loaded()
    if name not in _ENTRYPOINTS:
        raise unknown_model_error(name)
    return _ENTRYPOINTS[name]


def get_card(name: str) -> ModelCard:
    _ensure_loaded()
    if name not in _CARDS:
        raise unknown_model_error(name)
    return _CARDS[name]


def list_models(pattern: str | None = None, task: str | None = None, include_demo: bool = True) -> list[str]:
    """Registered model names, sorted; `pattern` uses fnmatch wildcards (``"cvt*"``)."""
    _ensure_loaded()
    if task is not None and task not in task_names():
        raise ValueError(f"unknown task {task!r}; expected one of {task_names()}")
    names = sorted(_ENTRYPOINTS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if task:
        names = [n for n in names if _CARDS[n].task == task]
    if not include_demo:
        names = [n for n in names if not _CARDS[n].demo]
    return names
