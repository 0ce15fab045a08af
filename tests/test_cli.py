"""The command line: `python -m hybridzoo` in a subprocess for the entry points and a tiny training run;
the other commands in-process through `hybridzoo.cli.main` (same code, without paying torch's import each time)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridzoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "hz_tiny_models.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _run(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "hybridzoo", *map(str, argv)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=300)


def test_python_m_help():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("list", "info", "train", "eval", "bench", "predict"):
        assert cmd in r.stdout


def test_console_script_list():
    exe = shutil.which("hybridzoo")
    if exe is None:
        pytest.skip("the hybridzoo console script is not installed (pip install -e .)")
    r = subprocess.run([exe, "--plugin", TINY, "list", "hz_tiny"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "hz_tiny_vit " in r.stdout and "classification" in r.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`python -m hybridzoo train` for one short epoch of the tiny model on the built-in digits."""
    out = tmp_path_factory.mktemp("cli") / "run"
    r = _run("--plugin", TINY, "train", "--model", "hz_tiny_vit", "--epochs", 1, "--limit-train-batches", 4,
             "--batch-size", 32, "--output", out)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stdout and "val_top1" in r.stdout
    assert "it/s" in r.stderr or "%|" in r.stderr  # the tqdm bar
    return out


def test_train_writes_run_folder(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "hz_tiny_vit" and summary["task"] == "classification" and summary["epochs"] == 1
    for f in ("metrics.csv", "model.safetensors", "last.ckpt", "curves.png"):
        assert (run_dir / f).is_file()


def test_eval_run_and_checkpoint(run_dir, capsys):
    assert main(["--plugin", TINY, "eval", "--run", str(run_dir), "--limit-val-batches", "2"]) == 0
    by_run = capsys.readouterr().out
    assert "val_top1" in by_run
    assert main(["--plugin", TINY, "eval", "--model", "hz_tiny_vit", "--checkpoint", str(run_dir / "last.ckpt"),
                 "--limit-val-batches", "2"]) == 0
    # the same weights (last.ckpt holds the model.safetensors of the last epoch), the same metrics
    assert capsys.readouterr().out.splitlines()[-1] == by_run.splitlines()[-1]


def test_predict_prints_top5_class_names(run_dir, tmp_path, capsys):
    from hybridzoo.data.digits import load_digits_split

    x = load_digits_split()[2]
    paths = []
    for i in range(2):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    assert main(["--plugin", TINY, "predict", "--run", str(run_dir), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and len(lines) == 12
    probs = [float(line.split()[0]) for line in lines[1:6]]
    assert probs == sorted(probs, reverse=True) and all(line.split()[1] in "0123456789" for line in lines[1:6])
    assert main(["--plugin", TINY, "predict", "--checkpoint", str(run_dir / "model.safetensors"), "--json", "-", paths[1]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == paths[1] and len(out[0]["top"]) == 5


def test_resume_from_cli_takes_options_from_checkpoint(run_dir, tmp_path, capsys):
    shutil.copytree(run_dir, tmp_path / "run")
    assert main(["--plugin", TINY, "train", "--resume", str(tmp_path / "run" / "last.ckpt"), "--epochs", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "hz_tiny_vit" in out and "epoch 2/2" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2


def test_resumed_run_does_not_inherit_stop_after_epochs(tmp_path, capsys):
    """--stop-after-epochs counts epochs of one invocation: the resumed run goes on to --epochs."""
    out = tmp_path / "run"
    assert main(["--plugin", TINY, "train", "--model", "hz_tiny_vit", "--epochs", "3", "--stop-after-epochs", "1",
                 "--limit-train-batches", "2", "--limit-val-batches", "1", "--output", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert main(["--plugin", TINY, "train", "--resume", str(out / "last.ckpt"), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["completed"]


def test_list_and_info(capsys):
    assert main(["--plugin", TINY, "list", "hz_tiny", "--task", "classification"]) == 0
    out = capsys.readouterr().out
    assert "hz_tiny_vit " in out and "hz_tiny_vit_distilled" in out
    assert main(["--plugin", TINY, "info", "hz_tiny_vit"]) == 0
    out = capsys.readouterr().out
    assert "15,018" in out and "MACs" in out


def test_info_cvt_13(capsys):
    import hybridzoo

    if "cvt_13" not in hybridzoo.list_models():
        pytest.skip("cvt_13 is not registered yet")
    assert main(["info", "cvt_13"]) == 0
    out = capsys.readouterr().out
    assert "19,997,480" in out and "2103.15808" in out


def test_unknown_model_suggests_close_names(capsys):
    assert main(["--plugin", TINY, "info", "hz_tiny_vt"]) == 2
    assert "Did you mean: hz_tiny_vit" in capsys.readouterr().err
    assert main(["--plugin", TINY, "train", "--model", "hz_tiny_vt"]) == 2
    assert "unknown model 'hz_tiny_vt'" in capsys.readouterr().err


def test_bench_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--plugin", TINY, "bench", "hz_tiny_vit", "--batch-size", "4", "--iters", "2", "--warmup", "1",
                 "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    for key in ("params", "macs_g", "latency_ms_bs1", "infer_samples_per_s_bs4", "train_samples_per_s_bs4"):
        assert rows[0][key] > 0
    assert "latency_ms_bs1" in capsys.readouterr().out


def test_bench_fast_is_the_cpu_path(tmp_path, monkeypatch, capsys):
    """`bench --fast` (oneDNN) runs on the CPU: "auto" on a machine with a GPU means the CPU, and a GPU named
    outright is refused, saying what to drop."""
    out = tmp_path / "bench.json"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # as on a machine with a GPU
    assert main(["--plugin", TINY, "bench", "hz_tiny_vit", "--fast", "--batch-size", "2", "--iters", "1",
                 "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["device"] == "cpu"
    assert main(["--plugin", TINY, "bench", "hz_tiny_vit", "--fast", "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:1" in err and "drop --fast" in err


def test_bench_configs_hook(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--plugin", TINY, "bench", "hz_tiny_bench", "--batch-size", "2", "--iters", "1", "--warmup", "0",
                 "--no-train", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["pool=mean", "64px cls"]
    assert rows[1]["input_size"] == [3, 64, 64] and rows[1]["macs_g"] > 3 * rows[0]["macs_g"]


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["--plugin", TINY, "train", "--model", "hz_tiny_vit", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "train/<class>" in err
