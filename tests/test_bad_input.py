"""The bad-input catalogue (docs/bad-input.md, issue 18): each case as a user meets it, and the answer.

Numbers are the issue's cases. Runs are the tiny test model on the built-in digits, two steps an epoch.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridzoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "hz_tiny_models.py")
FAST = ["--model", "hz_tiny_vit", "--batch-size", "16", "--limit-train-batches", "2", "--limit-val-batches", "1",
        "--no-progress"]


def _train(*argv):
    return main(["--plugin", TINY, "train", *FAST, *map(str, argv)])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run; tests that change it work on a copy (`run_copy`)."""
    out = tmp_path_factory.mktemp("bad") / "run"
    assert _train("--epochs", 1, "--output", out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------ data loss
def test_1_output_holding_a_run_is_refused(run_copy, capsys):
    before = (run_copy / "model.safetensors").read_bytes()
    assert _train("--epochs", 1, "--output", run_copy) == 2
    err = capsys.readouterr().err
    assert f"{str(run_copy)!r} already holds a run" in err
    assert f"--resume {run_copy / 'last.ckpt'}" in err and "--overwrite" in err
    assert (run_copy / "model.safetensors").read_bytes() == before  # untouched

    # another seed, so the replacement is visible in the bytes (training is deterministic: the same
    # command would write the same weights)
    assert _train("--epochs", 1, "--output", run_copy, "--overwrite", "--seed", 1) == 0
    assert (run_copy / "model.safetensors").read_bytes() != before  # replaced, as asked


def test_2_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from hybridzoo.engine import rundir
    from hybridzoo.tasks.classification import ClassificationTask

    built = []
    monkeypatch.setattr(ClassificationTask, "build_data", lambda self, args: built.append(1))
    real_open = os.open

    def read_only(path, *a, **k):  # a read-only folder (root ignores chmod, so the refusal is simulated)
        if Path(path).parent == tmp_path / "ro":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(rundir.os, "open", read_only)
    assert _train("--epochs", 1, "--output", tmp_path / "ro") == 2
    assert f"the run folder {str(tmp_path / 'ro')!r} is not writable (Permission denied)" in capsys.readouterr().err
    assert not built  # refused before the data was read
    assert not list((tmp_path / "ro").iterdir())

    (tmp_path / "file").write_text("x")  # a folder that cannot be created: a file is in the way
    assert _train("--epochs", 1, "--output", tmp_path / "file" / "run") == 2
    assert f"cannot create the run folder {str(tmp_path / 'file' / 'run')!r}" in capsys.readouterr().err


def test_3_disk_full_names_the_place_keeps_the_previous_file_and_removes_the_partial(tmp_path, monkeypatch):
    from hybridzoo.engine.checkpoint import DiskFullError, atomic_save, atomic_write, load_checkpoint
    from hybridzoo.engine.checkpoint import shutil as ck_shutil

    target = tmp_path / "last.ckpt"
    atomic_save({"model": {}, "optimizer": {}, "epoch": 1, "step": 3}, target)

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=rf"no space left on {str(tmp_path)!r} while writing last.ckpt "
                                            r"\(the previous last.ckpt is kept; the partial file was removed\)"):
        atomic_write(target, full)
    assert load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    # torch.save loses the errno ("unexpected pos ..."): a failed write on a full file system still says so
    def torch_style(f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(ck_shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(DiskFullError, match="no space left on"):
        atomic_write(target, torch_style)
    # ... but with space left, an ordinary error stays itself
    monkeypatch.setattr(ck_shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(target, torch_style)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_3_disk_full_in_the_cli_is_one_line(run_copy, monkeypatch, capsys):
    from hybridzoo.engine import checkpoint

    real = checkpoint.atomic_write

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_for_checkpoints(path, write):
        return real(path, full if Path(path).name == "last.ckpt" else write)

    monkeypatch.setattr(checkpoint, "atomic_write", full_for_checkpoints)
    before = (run_copy / "last.ckpt").read_bytes()
    assert _train("--epochs", 1, "--output", run_copy, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridzoo: error: no space left on") and "Traceback" not in err
    assert (run_copy / "last.ckpt").read_bytes() == before
    assert not [p for p in run_copy.iterdir() if ".tmp-" in p.name]


def test_4_temp_files_of_killed_runs_are_removed_on_resume(run_copy, capsys):
    dead, alive = _dead_pid(), os.getppid()
    stale = [run_copy / f".last.ckpt.tmp-{dead}", run_copy / f".curves.png.tmp-{dead}"]
    live = run_copy / f".last.ckpt.tmp-{alive}"  # another process still writing: not ours to remove
    for p in [*stale, live]:
        p.write_bytes(b"partial")
    assert _train("--resume", run_copy / "last.ckpt", "--epochs", 1) == 0
    out = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in out and f".last.ckpt.tmp-{dead}" in out
    assert not any(p.exists() for p in stale) and live.exists()


def test_5_extending_a_finished_run_says_so_and_keeps_its_weights(run_copy, capsys):
    from safetensors.torch import load_file

    finished = (run_copy / "model.safetensors").read_bytes()
    assert _train("--resume", run_copy / "last.ckpt", "--epochs", 2) == 0
    out = capsys.readouterr().out
    assert f"{run_copy / 'last.ckpt'} is a finished 1-epoch run; continuing it to 2 epochs" in out
    assert "laid out again over 2 epochs, so epoch 2 starts at lr" in out and "kept as model.epoch1.safetensors" in out
    assert (run_copy / "model.epoch1.safetensors").read_bytes() == finished
    assert (run_copy / "model.safetensors").read_bytes() != finished
    assert json.loads((run_copy / "summary.json").read_text())["epochs"] == 2
    assert load_file(run_copy / "model.epoch1.safetensors")  # a loadable weights file
    # the schedule as announced: the second epoch does not run at the first one's final lr
    rows = (run_copy / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lrs = [float(r.split(",")[header.index("lr")]) for r in rows[1:]]
    assert len(lrs) == 2 and lrs[1] != lrs[0]


# ------------------------------------------------------------------------------ silently wrong results
def _image_folder(root: Path, classes, empty=()) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for c in empty:
        (root / "train" / c).mkdir(parents=True)
    return root


def test_6_eval_on_data_with_other_classes_is_refused(finished_run, tmp_path, capsys):
    data = _image_folder(tmp_path / "abc", ["cat", "dog", "owl"])
    assert main(["--plugin", TINY, "eval", "--run", str(finished_run), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    digits = str([str(i) for i in range(10)])
    assert f"was trained on 10 classes {digits}, but the data has 3 classes ['cat', 'dog', 'owl']" in err
    # the run's own data still evaluates
    assert main(["--plugin", TINY, "eval", "--run", str(finished_run), "--limit-val-batches", "1"]) == 0


def test_6_same_number_of_other_classes_is_refused_too(finished_run, tmp_path):
    from hybridzoo.engine.rundir import check_same_classes

    weights = finished_run / "model.safetensors"
    with pytest.raises(ValueError, match=r"10 classes \['0', .*but the data has 10 classes \['a0'"):
        check_same_classes(weights, {"num_classes": 10, "class_names": [f"a{i}" for i in range(10)]})
    check_same_classes(weights, {"num_classes": 10, "class_names": [str(i) for i in range(10)]})


def test_7_empty_class_folder_is_refused(tmp_path):
    from hybridzoo.data.folder import ImageFolder

    data = _image_folder(tmp_path / "d", ["cat", "dog"], empty=["owl"])
    with pytest.raises(ValueError, match=r"class folder\(s\) without images in .*'.*train/owl'"):
        ImageFolder.splits(data)
    (data / "train" / "owl").rmdir()
    train, val = ImageFolder.splits(data)
    assert train.classes == ["cat", "dog"] and len(val) == 4


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "-3"], ["--batch-size", "0"],
                                  ["--limit-train-batches", "0"], ["--workers", "-1"]])
def test_9_non_positive_counts_are_refused(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv, "--output", str(tmp_path / "run")])
    assert e.value.code == 2
    assert f"argument {argv[0]}: expected" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_9_zero_epochs_from_a_config_or_the_api_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 0\n")
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "run")]) == 2
    assert f"{str(cfg)!r}: epochs: expected a positive integer, got 0" in capsys.readouterr().err

    import argparse

    from hybridzoo.engine.trainer import train
    from hybridzoo.tasks.base import get_task

    with pytest.raises(ValueError, match="--epochs must be a positive integer, got 0"):
        train(argparse.Namespace(task="classification", epochs=0, output=str(tmp_path / "api")),
              get_task("classification"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "api").exists()


def test_11_one_mac_count_in_bench_info_and_the_readme_table(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from model_table import table
    finally:
        sys.path.pop(0)
    from hybridzoo.profile import measure_model

    name = "cvt_tiny_demo"  # attention through SDPA: the fused CPU kernel was invisible to the counter
    macs = measure_model(name)["macs"]
    assert main(["info", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["measured"]["macs_g"] == macs / 1e9
    for extra in ([], ["--onednn"], ["--fast"]):
        out = tmp_path / "b.json"
        assert main(["bench", name, "--batch-size", "1", "--iters", "1", "--warmup", "0", "--no-train",
                     "--threads", "1", "--json", str(out), *extra]) == 0
        assert json.loads(out.read_text())[0]["macs_g"] == macs / 1e9, extra
    assert f"| {macs / 1e9:.3f} |" in table(name)[2]


# ------------------------------------------------------------------------------------------ tracebacks
@pytest.mark.parametrize("task, model, kind", [("recommendation", "cvt_13", "classification"),
                                                ("classification", "segnetr", "segmentation"),
                                                ("land-cover", "sasrec", "recommendation"),
                                                ("segmentation", "cvt_tiny_demo", "classification")])
def test_13_a_model_of_another_task_is_refused(task, model, kind, tmp_path, capsys):
    from hybridzoo import list_models

    assert main(["train", "--task", task, "--model", model, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{model} is a {kind} model, not a {task} one. {task} models: " in err
    assert ", ".join(list_models(task=task)) in err
    assert not (tmp_path / "run").exists()


def test_14_output_is_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert _train("--epochs", 1, "--output", f) == 2
    assert f"--output {str(f)!r} is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_14_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 2\nlr: [0.1\nseed: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridzoo: error: {str(cfg)!r} is not valid YAML, line ") and err.count("\n") == 1
    assert "(while parsing a flow sequence started at line 2)" in err  # where the bracket was opened


def test_14_negative_threads(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "cvt_tiny_demo", "--threads", "-4"])
    assert e.value.code == 2 and "argument --threads: expected a positive integer, got -4" in capsys.readouterr().err


def test_14_out_of_memory_names_the_batch_size(monkeypatch, tmp_path, capsys):
    from hybridzoo import profile
    from hybridzoo.engine import trainer

    alloc = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to " \
            "allocate 5368709120 bytes. Error code 12 (Cannot allocate memory)"

    def oom(*a, **k):
        raise RuntimeError(alloc)

    monkeypatch.setattr(trainer, "train", oom)
    assert main(["train", "--batch-size", "48", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "out of memory while training at --batch-size 48; try --batch-size 24" in err and "Traceback" not in err

    real = profile.benchmark
    monkeypatch.setattr(profile, "benchmark", lambda *a, **k: oom() if k["batch_size"] > 1 else real(*a, **k))
    assert main(["bench", "cvt_tiny_demo", "--batch-size", "32", "--iters", "1", "--warmup", "0"]) == 2
    assert "out of memory benchmarking cvt_tiny_demo [default] at --batch-size 32; try --batch-size 16" in \
        capsys.readouterr().err

    def other(*a, **k):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(trainer, "train", other)  # not every RuntimeError is memory
    with pytest.raises(RuntimeError, match="shapes"):
        main(["train", "--output", str(tmp_path / "run")])


def test_14_list_into_a_closed_pipe_is_quiet():
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader is gone before the first line, as `| head` after its lines
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "hybridzoo", "list"], stdout=w_fd, stderr=subprocess.PIPE, text=True,
                       env=env, timeout=300)
    os.close(w_fd)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_15_bench_announces_each_measurement_and_a_memory_estimate_first(capsys):
    assert main(["bench", "cvt_tiny_demo", "--batch-size", "4", "--iters", "1", "--warmup", "0", "--threads", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[1/1] cvt_tiny_demo [default] input (3, 32, 32): 0.015 GMACs; memory estimate ")
    assert "for a training step at batch 4" in err[0]
    assert [e.split("(")[0].strip() for e in err[1:]] == ["latency at batch 1", "inference throughput at batch 4",
                                                           "training throughput at batch 4"]


def test_15_memory_estimate_counts_what_the_ops_allocate():
    from hybridzoo.profile import estimate_memory, forward_profile

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU())
    prof = forward_profile(model, torch.randn(1, 10))
    assert prof["macs"] == 200 and prof["activation_bytes"] == 2 * 20 * 4  # addmm and relu outputs; no views
    assert estimate_memory(220, prof["activation_bytes"], 8, train=True) == 220 * 4 * 2 + 8 * 160


# ------------------------------------------------------------------------------------ first hour
def test_18_list_shows_a_dash_for_missing_figures(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out
    row = next(line for line in out.splitlines() if line.startswith("botnet_bot50 "))  # its top-1 is not reported
    assert row.split()[-1] == "—"


def test_18_readme_plugin_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- plugin-example:start -->", 1)[1].split("<!-- plugin-example:end -->", 1)[0]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    cmd = block.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    (tmp_path / "my_models.py").write_text(code)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    argv = cmd.split()
    assert argv[0] == "hybridzoo"
    r = subprocess.run([sys.executable, "-m", "hybridzoo", *argv[1:], "--epochs", "1", "--limit-train-batches", "1",
                        "--limit-val-batches", "1", "--no-progress", "--output", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
