"""Every task under `torchrun --nproc_per_node=2` (gloo, CPU): it trains and evaluates without hanging, and
its validation metrics equal a single-process evaluation of the same weights on the same whole set.

The processes evaluate disjoint shards of the validation set and the engine reduces the metric's
state once; a task that reduced by itself, or a trainer that evaluated on rank 0 alone, deadlocks here
(segmentation did: rank 0 in the metric's all-reduce, rank 1 in the trainer's broadcast).
"""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import small_sr_val_folder  # tests/conftest.py puts tests/ on sys.path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "hz_tiny_models.py"

# tiny model and data per task; the validation set is cut to 2 batches of 3 (or 2 images), sharded over 2 processes
COMMON = ["--epochs", "2", "--limit-train-batches", "2", "--limit-val-batches", "2", "--batch-size", "4",
          "--eval-batch-size", "3", "--no-progress", "--device", "cpu"]
TASKS = {
    "classification": ["--model", "hz_tiny_vit", "--crop-scale", "1.0"],
    "segmentation": ["--model", "hz_tiny_seg", "--synthetic-size", "32", "--synthetic-train", "16",
                     "--synthetic-val", "6", "--num-classes", "3"],
    "super-resolution": ["--model", "hz_tiny_sr_x2", "--patch-size", "12", "--train-repeat", "2",
                         "--eval-batch-size", "1"],
    "recommendation": ["--model", "hz_tiny_rec", "--max-len", "10"],
    "land-cover": ["--model", "hz_tiny_lc", "--scene-size", "32"],
    "detection": ["--model", "hz_tiny_det", "--img-size", "64", "--synthetic-train", "8", "--synthetic-val", "6"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(task: str, out: Path) -> list[str]:
    # super-resolution validates on small crops written beside the run (small_sr_val_folder), not the photographs
    extra = ["--val-data", str(out.parent / "sr_val")] if task == "super-resolution" else []
    return ["train", "--task", task, *COMMON, *TASKS[task], *extra, "--output", str(out)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_torchrun_two_processes_match_one(task_name, tmp_path):
    out = tmp_path / "ddp"
    if task_name == "super-resolution":
        small_sr_val_folder(tmp_path / "sr_val")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "hybridzoo", "--plugin", str(TINY), *_argv(task_name, out)]
    try:
        r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{task_name} under torchrun did not finish in 300 s (a collective waits on one rank):\n"
                    f"{(e.stderr or b'')[-3000:]}")
    assert r.returncode == 0, f"{task_name} under torchrun failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"

    from hybridzoo.cli import build_parser, load_plugin
    from hybridzoo.engine import distributed
    from hybridzoo.engine.checkpoint import load_checkpoint
    from hybridzoo.engine.trainer import _evaluate, _val_loader, fill_defaults, seed_everything
    from hybridzoo.factory import load_weights
    from hybridzoo.tasks.base import get_task

    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 2
    ddp_row = ckpt["history"][-1]

    # one process, the same whole validation set, the weights the two processes ended with
    load_plugin(str(TINY))
    task = get_task(task_name)
    args = fill_defaults(build_parser(task).parse_args(_argv(task_name, tmp_path / "single")), task)
    seed_everything(args.seed)
    data = task.build_data(args)
    model = task.build_model(args, data.info)
    load_weights(model, str(out / "model.safetensors"))
    one = distributed.DistInfo()
    loader = _val_loader(data, args, one)
    assert len(loader.dataset) == min(len(data.val), 2 * (args.eval_batch_size or 2 * args.batch_size))
    single = _evaluate(task, model, loader, args, one, None, data.info)

    assert {k[4:] for k in ddp_row if k.startswith("val_")} == set(single)
    for k, v in single.items():
        got = ddp_row[f"val_{k}"]
        assert (math.isnan(v) and math.isnan(got)) or got == pytest.approx(v, rel=1e-6, abs=1e-9), \
            f"{task_name}: val_{k} is {got} on 2 processes, {v} on one"
    assert torch.isfinite(torch.tensor(ddp_row["train_loss"]))
