"""A `--plugin` can add a task: the known tasks come from the task registry, so the plugin's models
register for it, `list --task` finds them, and `train` runs it through the engine and its metric contract."""

import json
import textwrap

import pytest

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from hybridzoo import register_model
    from hybridzoo.engine.metrics import SumMetric
    from hybridzoo.tasks.base import Task, TaskData, register_task


    @register_task
    class ToyRegression(Task):
        name = "hz-toy-regression"
        default_model = "hz_toy_linear"
        headline_metric = "mse"
        higher_is_better = False
        default_epochs = 2
        default_batch_size = 8

        def build_data(self, args):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(48, 3, generator=g)
            y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
            return TaskData(train=TensorDataset(x[:32], y[:32]), val=TensorDataset(x[32:], y[32:]), info={"dim": 3})

        def build_model(self, args, data_info):
            from hybridzoo.factory import create_model
            return create_model(args.model, dim=data_info["dim"])

        def training_step(self, model, batch, args):
            x, y = batch
            return nn.functional.mse_loss(model(x), y), {}

        def build_metric(self, args, data_info):
            return SumMetric(["mse"])

        def eval_step(self, model, batch, metric, args):
            x, y = batch
            metric.update(len(y), mse=nn.functional.mse_loss(model(x), y, reduction="sum"))


    class Linear(nn.Module):
        def __init__(self, dim=3):
            super().__init__()
            self.fc = nn.Linear(dim, 1)

        def forward(self, x):
            return self.fc(x).squeeze(-1)


    @register_model(paper="plugin test", arxiv=None, task="hz-toy-regression", reported={}, input_size=(3,))
    def hz_toy_linear(**kwargs):
        return Linear(**kwargs)
''')


def test_a_plugin_adds_a_task(tmp_path, capsys):
    from hybridzoo.cli import main
    from hybridzoo.registry import TASKS, list_models

    plugin = tmp_path / "toy_task.py"
    plugin.write_text(PLUGIN)
    assert "hz-toy-regression" not in TASKS
    assert main(["--plugin", str(plugin), "list", "--task", "hz-toy-regression"]) == 0
    assert "hz_toy_linear" in capsys.readouterr().out
    from hybridzoo.registry import TASKS as after

    assert "hz-toy-regression" in after and list_models(task="hz-toy-regression") == ["hz_toy_linear"]
    # the model card names the task: no --task needed
    assert main(["--plugin", str(plugin), "train", "--model", "hz_toy_linear", "--no-progress", "--device", "cpu",
                 "--lr", "0.05", "--output", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "hz-toy-regression" and summary["epochs"] == 2
    assert summary["val_mse"] > 0 and "best_val_mse" in summary


def test_a_model_for_an_unknown_task_is_refused():
    from hybridzoo import register_model

    with pytest.raises(ValueError, match="unknown task 'no-such-task'.*register_task"):
        register_model(paper="x", arxiv=None, task="no-such-task", reported={})
