"""The CUDA path end to end, for a machine with an NVIDIA GPU (CI has none, so this is a script, not a test).

    python benchmarks/gpu_check.py --out gpu_check.json                 # everything
    python benchmarks/gpu_check.py --sections models --models cvt_13 coatnet_0

Sections:
  models  every registered model (or --models), built reduced from its card's test kwargs, seeded, weights
          perturbed, on the CPU and on CUDA from the same weights and inputs:
            - eval forward in fp32 (TF32 off): CUDA against the CPU, ‖Δ‖/‖ref‖;
            - gradients of one fixed projection of the eval outputs: CUDA against the CPU, over all parameters;
            - a training-mode forward + backward under bf16 autocast on CUDA: finite, every parameter gets a
              gradient (the card's unused_params excepted), and the bf16 eval outputs against fp32.
  paths   every task's user path through the CLI on CUDA, each task in its own process chain, in parallel:
            train --device cuda --amp bf16 → eval --run → predict --run → train --resume (one more epoch) →
            export --run (ONNX, checked against the PyTorch model by the exporter);
          and for classification also --amp fp16 (gradient scaler), --compile, channels-last, `hybridzoo bench
          --device cuda`, and DDP on NCCL through torchrun (one process per GPU).
A line per check, a summary last; exit 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's weight perturbation, the same here

import hybridzoo  # noqa: E402
import hybridzoo.profile  # noqa: E402
from hybridzoo.profile import _call  # noqa: E402
from hybridzoo.registry import get_card  # noqa: E402
from _helpers import perturb  # noqa: E402

# relative errors above which a check fails: fp32 differs between the devices only by summation order (a deep
# reduced model stays far under 1e-4; the backward's sums are longer); bf16 keeps 8 bits of mantissa
FP32_FORWARD_TOL = 1e-4
FP32_GRAD_TOL = 1e-3
BF16_FORWARD_TOL = 0.1


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float | None, str]:
    """The worst relative error over the outputs both sides produced with the same shapes."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        # detection heads keep a data-dependent number of boxes: rounding can move one across the threshold
        return None, f"outputs differ in number or shape ({[tuple(t.shape) for t in a][:4]} vs " \
                     f"{[tuple(t.shape) for t in b][:4]})"
    return max((_rel(x, y) for x, y in zip(a, b)), default=0.0), ""


def check_model(name: str, device: torch.device) -> dict:
    card = get_card(name)
    row: dict = {"model": name}
    torch.manual_seed(0)
    cpu = hybridzoo.create_model(name, **card.test_kwargs)
    perturb(cpu)
    cpu.eval()
    size = card.test_input_size or card.input_size
    torch.manual_seed(1)
    x_cpu = hybridzoo.profile.example_input(cpu, size, batch_size=2)
    gpu = hybridzoo.create_model(name, **card.test_kwargs)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(device).eval()
    x_gpu = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x_cpu)

    # fp32 eval forward and the gradients of one fixed projection of its outputs
    out_cpu, out_gpu = _tensors(_call(cpu, x_cpu)), _tensors(_call(gpu, x_gpu))
    row["fp32_forward_rel"], note = _compare(out_gpu, out_cpu)
    if note:
        row["note"] = note
    else:
        g = torch.Generator().manual_seed(2)
        weights = [torch.randn(t.shape, generator=g) for t in out_cpu]
        sum((t * w).sum() for t, w in zip(out_cpu, weights)).backward()
        sum((t * w.to(device)).sum() for t, w in zip(out_gpu, weights)).backward()
        pairs = [(pg.grad, pc.grad) for (_, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters())
                 if pc.grad is not None and pg.grad is not None]
        if pairs:
            num = sum(float((a.double().cpu() - b.double()).norm() ** 2) for a, b in pairs) ** 0.5
            den = sum(float(b.double().norm() ** 2) for _, b in pairs) ** 0.5
            row["fp32_grad_rel"] = num / max(den, 1e-30)
    gpu.zero_grad(set_to_none=True)

    # bf16 autocast: eval outputs against fp32, then a training step's forward + backward
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out_bf16 = _tensors(_call(gpu, x_gpu))
    with torch.no_grad():
        out_fp32 = _tensors(_call(gpu, x_gpu))
    row["bf16_forward_rel"], _ = _compare(out_bf16, out_fp32)
    gpu.train()
    torch.manual_seed(3)
    x_train = hybridzoo.profile.example_input(gpu, size, batch_size=2, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = _tensors(_call(gpu, x_train))
    row["bf16_train_finite"] = bool(out) and all(bool(torch.isfinite(t).all()) for t in out)
    sum(t.float().sum() for t in out).backward()
    skip = card.unused_params or ("\0",)
    row["bf16_no_grad"] = [n for n, p in gpu.named_parameters()
                           if p.requires_grad and p.grad is None and not n.startswith(skip)][:5]
    bad_grad = [n for n, p in gpu.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    row["bf16_nonfinite_grad"] = bad_grad[:5]
    fails = []
    if row["fp32_forward_rel"] is not None and not row["fp32_forward_rel"] <= FP32_FORWARD_TOL:
        fails.append(f"fp32 forward {row['fp32_forward_rel']:.2e}")
    if row.get("fp32_grad_rel") is not None and not row["fp32_grad_rel"] <= FP32_GRAD_TOL:
        fails.append(f"fp32 gradients {row['fp32_grad_rel']:.2e}")
    if row["bf16_forward_rel"] is not None and not row["bf16_forward_rel"] <= BF16_FORWARD_TOL:
        fails.append(f"bf16 forward {row['bf16_forward_rel']:.2e}")
    if not row["bf16_train_finite"]:
        fails.append("bf16 training outputs not finite")
    if row["bf16_no_grad"]:
        fails.append(f"no gradient: {row['bf16_no_grad']}")
    if bad_grad:
        fails.append(f"non-finite gradient: {bad_grad[:3]}")
    row["fails"] = fails
    return row


def section_models(names: list[str], device: torch.device) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in names:
        t0 = time.perf_counter()
        try:
            row = check_model(name, device)
        except Exception as e:  # noqa: BLE001 - a failing model is a result, the others still run
            row = {"model": name, "fails": [f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"]}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)

        def fmt(k):
            v = row.get(k)
            return "     -  " if v is None else f"{v:8.1e}"
        print(f"{'FAIL' if row['fails'] else 'ok  '} {name:34s} fp32 fwd {fmt('fp32_forward_rel')} grad "
              f"{fmt('fp32_grad_rel')} bf16 fwd {fmt('bf16_forward_rel')}  {'; '.join(row['fails'])}"
              f"{'  (' + row['note'] + ')' if row.get('note') else ''}", flush=True)
    return rows


# --- the CLI ---------------------------------------------------------------------------------------------------

def _hz() -> list[str]:
    exe = Path(sys.executable).with_name("hybridzoo")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "hybridzoo"]


def _run(cmd: list[str], cwd: str, timeout: float = 600) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        code, out = p.returncode, (p.stdout or "") + (p.stderr or "")
    except subprocess.TimeoutExpired as e:
        code, out = 124, f"timed out after {timeout} s: {e.stdout or ''}{e.stderr or ''}"
    lines = out.strip().splitlines()
    # the trainer's summary line names the device: 'TASK: MODEL (N params) on cuda:0; ...'
    where = [w for line in lines if " params) on " in line for w in [line.split(" params) on ")[1].split(";")[0]]]
    return {"cmd": " ".join(cmd[1:] if cmd[0].endswith("hybridzoo") else cmd), "code": code,
            "seconds": round(time.perf_counter() - t0, 1), "tail": lines[-6:], "trained_on": where[:1]}


def _sample(task: str, d: Path, run_dir: Path) -> list[str]:
    if task == "land-cover":
        path = d / "scene.npy"
        np.save(path, np.random.default_rng(0).random((16, 24, 24)).astype("float32"))
        return [str(path)]
    if task == "recommendation":
        tokens = json.loads((run_dir / "items.json").read_text())[1:4]  # index 0 is padding
        return ["--history", *map(str, tokens)]
    from PIL import Image
    path = d / "sample.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(path)
    return [str(path)]


TASK_MODELS = {"classification": "cvt_tiny_demo", "segmentation": "segnetr", "super-resolution": None,
               "land-cover": None, "recommendation": None, "detection": None}
SHORT = ["--epochs", "1", "--limit-train-batches", "2", "--limit-val-batches", "1", "--no-progress"]


def _report(step: dict, device: str) -> dict:
    """Prints the step as soon as it ends (a run cut short still shows what it did); a train command that says it
    trained on another device than `device` is a failure."""
    if step["code"] == 0 and " train " in f" {step['cmd']} " and device not in str(step["trained_on"]):
        step["code"] = -1  # a run that silently trained on the CPU
        step["tail"].append(f"trained on {step['trained_on'] or 'an unnamed device'}, not {device}")
    print(f"{'ok  ' if step['code'] == 0 else 'FAIL'} {step['task']:16s} {step['seconds']:6.1f} s  {step['cmd'][:110]}"
          + ("" if step["code"] == 0 else "\n      " + "\n      ".join(step["tail"])), flush=True)
    return step


def task_path(task: str, root: Path, device: str) -> list[dict]:
    d = root / task
    d.mkdir()
    run_dir = d / "run"
    model = ["--model", TASK_MODELS[task]] if TASK_MODELS[task] else []
    hz = _hz()
    steps = []

    def run(cmd):
        steps.append(_report(dict(_run(cmd, str(d)), task=task), device))
        return steps[-1]["code"] == 0
    if run([*hz, "train", "--task", task, *model, "--device", device, "--amp", "bf16", *SHORT,
            "--output", str(run_dir)]):
        run([*hz, "eval", "--run", str(run_dir)])
        run([*hz, "predict", "--run", str(run_dir), *_sample(task, d, run_dir)])
        run([*hz, "train", "--task", task, *model, "--device", device, "--amp", "bf16",
             "--resume", str(run_dir / "last.ckpt"), *SHORT[:1], "2", *SHORT[2:], "--output", str(run_dir)])
        run([*hz, "export", "--run", str(run_dir), "--output", str(d / "model.onnx")])
    return steps


def classification_extras(root: Path, device: str) -> list[dict]:
    hz = _hz()
    d = root / "classification-extras"
    d.mkdir()
    base = [*hz, "train", "--task", "classification", "--model", "cvt_tiny_demo", "--device", device, *SHORT]
    cmds = [] if device == "cpu" else [[*base, "--amp", "fp16", "--output", str(d / "fp16")]]
    cmds += [
        [*base, "--amp", "bf16", "--compile", "--output", str(d / "compiled")],
        [*base, "--channels-last", "--output", str(d / "channels-last")],
        [*hz, "bench", "deit_small_patch16_224", "--device", device, "--amp", "bf16", "--batch-size", "64",
         "--iters", "10"],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "hybridzoo",
         "train", "--task", "classification", "--model", "cvt_tiny_demo", "--device", device, *SHORT,
         "--output", str(d / "ddp")],
    ]
    return [_report(dict(_run(cmd, str(d)), task="classification+"), device) for cmd in cmds]


def section_paths(device: str) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="hz-gpu-paths-"))
    try:
        with ThreadPoolExecutor(len(TASK_MODELS) + 1) as pool:
            jobs = [pool.submit(task_path, t, root, device) for t in TASK_MODELS]
            jobs.append(pool.submit(classification_extras, root, device))
            return [s for j in jobs for s in j.result()]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", nargs="+", default=["models", "paths"], choices=["models", "paths"])
    ap.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    ap.add_argument("--out", default=None, help="JSON file for every row")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default); cpu runs the same script against the CPU, a dry run of the script itself")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs an NVIDIA GPU (--device cpu for a dry run of the script)")
        return 2
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability())
    print(json.dumps(env), flush=True)
    result: dict = {"env": env}
    if "models" in args.sections:
        result["models"] = section_models(args.models or hybridzoo.list_models(), device)
    if "paths" in args.sections:
        result["paths"] = section_paths(device.type)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    failed_models = [r["model"] for r in result.get("models", []) if r["fails"]]
    failed_steps = [f"{s['task']}: {s['cmd'][:60]}" for s in result.get("paths", []) if s["code"] != 0]
    print(f"models: {len(result.get('models', [])) - len(failed_models)}/{len(result.get('models', []))} ok"
          + (f" (failed: {', '.join(failed_models)})" if failed_models else ""))
    print(f"CLI steps: {len(result.get('paths', [])) - len(failed_steps)}/{len(result.get('paths', []))} ok"
          + (f" (failed: {'; '.join(failed_steps)})" if failed_steps else ""))
    return 1 if failed_models or failed_steps else 0


if __name__ == "__main__":
    sys.exit(main())
