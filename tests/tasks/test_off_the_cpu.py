"""Each task's training step with the model and the batch on another device: `meta` stands in for a GPU (CI has
none), under `OneDevice` refusing what CUDA refuses (a tensor the loss made on the CPU), and refusing, as meta
does, any read of a value into Python, which on a GPU would make the host wait every step (the trainer reads the
logs once an epoch). benchmarks/gpu_check.py runs every task's whole path on a real GPU."""

import pytest
import torch
from torch.utils.data import DataLoader

from hybridzoo.cli import build_parser
from hybridzoo.engine.trainer import fill_defaults, move_to_device
from hybridzoo.registry import task_names
from hybridzoo.tasks.base import get_task
from _helpers import OneDevice  # tests/conftest.py puts tests/ on sys.path

# detection's target matching picks boxes by value (nonzero, Hungarian assignment on the host): it cannot run
# without the values, so it is checked on a real GPU only (benchmarks/gpu_check.py)
TASKS = ["classification", "segmentation", "super-resolution", "recommendation", "land-cover"]


@pytest.mark.parametrize("name", TASKS)
def test_training_step_stays_on_the_device(name):
    task = get_task(name)
    args = fill_defaults(build_parser(task).parse_args(["train", "--task", name, "--no-progress"]), task)
    torch.manual_seed(0)
    data = task.build_data(args)
    model = task.build_model(args, data.info).to("meta").train()
    batch = move_to_device(next(iter(DataLoader(data.train, batch_size=2, collate_fn=data.collate_fn))),
                           torch.device("meta"))
    with OneDevice():
        loss, logs = task.training_step(model, batch, args)
        loss.backward()
    assert loss.device.type == "meta" and loss.ndim == 0
    for k, v in (logs or {}).items():
        assert isinstance(v, torch.Tensor) and v.device.type == "meta" and v.ndim == 0, k
    assert all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())


def test_detection_is_the_only_task_left_out():
    # the tasks hybridzoo ships (other tests register plugin tasks in this process)
    shipped = {t for t in task_names() if type(get_task(t)).__module__.startswith("hybridzoo.tasks.")}
    assert shipped - set(TASKS) == {"detection"}
