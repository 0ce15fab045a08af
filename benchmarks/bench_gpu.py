"""Our models against timm's and transformers' on one CUDA GPU, in one process, interleaved rounds.

Run it with an interpreter that has timm and transformers (this checkout's `src/` is put on the path):

    python benchmarks/bench_gpu.py --out benchmarks/results_gpu.json
    python benchmarks/bench_gpu.py --pairs deit cvt_13 --scenarios train-bf16 --rounds 9

Pairs (random init on both sides, stochastic depth and dropout off on both): deit, convit_small, coatnet_0 and
bot50 against timm as in bench_timm.py; cvt_13 against transformers' CvtForImageClassification (exact GELU where
ours, like the official CvT, has QuickGELU).

Both sides train as `hybridzoo train --device cuda` does: the model as built, autocast where the scenario says,
cross-entropy on fixed random labels, backward, `torch.optim.AdamW` as torch builds it on CUDA. `--levers` times
variants of our step beside it: the trainer's host read of the loss before or after the backward (`LEVERS`), and
AdamW(fused=True). Inference runs
under `torch.inference_mode()`. Each contestant runs its steps between two device synchronisations, the
contestants take turns within a round, and the figures are the per-round medians with the quartiles of the
per-round ratios. The GPU's dense bf16 and fp32 matrix-product rates are measured first; the share of that peak
counts 2 FLOPs per multiply-add, ×3 for a training step (forward, and the backward's two products).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import logits_of, quartiles  # noqa: E402
from hybridzoo.factory import create_model  # noqa: E402
from hybridzoo.profile import count_macs  # noqa: E402

PAIRS = {  # key: (peer builder, ours, label)
    "deit": ("timm:deit_small_patch16_224", "deit_small_patch16_224", "DeiT-S"),
    "convit_small": ("timm:convit_small", "convit_small", "ConViT-S"),
    "coatnet_0": ("timm:coatnet_0_224", "coatnet_0", "CoAtNet-0"),
    "bot50": ("timm-bot50", "botnet_bot50", "BoT50"),
    "cvt_13": ("hf-cvt13", "cvt_13", "CvT-13"),
}
SCENARIOS = {  # name: (training, autocast dtype or None, batch)
    "train-bf16": (True, torch.bfloat16, 128),
    "train-fp32": (True, None, 64),
    "infer-bf16": (False, torch.bfloat16, 256),
}


def build_peer(spec: str):
    if spec.startswith("timm:"):
        import timm
        return timm.create_model(spec[5:], drop_path_rate=0.0, drop_rate=0.0), f"timm {timm.__version__}"
    if spec == "timm-bot50":
        import timm
        from bench_timm import timm_bot50
        return timm_bot50(), f"timm {timm.__version__} ByobNet as BoT50"
    if spec == "hf-cvt13":
        import transformers
        from bench_transformers import hf_cvt13
        return hf_cvt13(), f"transformers {transformers.__version__}"
    raise ValueError(spec)


def make_step(model, x, training: bool, dtype, read: str | None = None, fused: bool = False):
    """One inference call or one training step. `read` ("before" / "after" the backward): a read of the loss's
    finiteness into Python, as the trainer's non-finite check (before session 29 it came before each backward,
    since then once a step after the backward passes are queued); `fused`: AdamW(fused=True)."""
    dev = x.device.type
    if not training:
        model.eval()

        def infer():
            with torch.inference_mode(), torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
                return model(x)
        return infer
    model.train()
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device, generator=torch.Generator(x.device).manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **({"fused": True} if fused else {}))

    def train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(logits_of(model(x)).float(), target)
        if read == "before" and not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError("non-finite loss")
        loss.backward()
        if read == "after" and not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError("non-finite loss")
        opt.step()
        return loss
    return train


LEVERS = {  # name: make_step keywords; timed for ours in the training scenarios
    "read-before-backward": {"read": "before"},
    "read-after-backward": {"read": "after"},
    "fused-adamw": {"fused": True},
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, n: int) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync()
    return (time.perf_counter() - t0) / n


def matmul_peak(dtype, device, n: int = 8192, reps: int = 10) -> float:
    """TFLOP/s of one n×n×n product on random data (the median of `reps` after warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        times.append(timed(lambda: a @ b, 1))
    return 2 * n**3 / statistics.median(times) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--scenarios", nargs="+", default=["train-bf16", "infer-bf16"], choices=list(SCENARIOS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--round-seconds", type=float, default=0.3, help="each contestant's time per round, about")
    ap.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS),
                    help="variants of our training step, each timed beside the plain one (default: all)")
    ap.add_argument("--batch", type=int, default=None, help="one batch for every scenario (default: the scenario's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu: a dry run of the script itself")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (--device cpu for a dry run of the script)")
        return 2
    torch.backends.cudnn.benchmark = True  # both sides: the convolutions' algorithms picked once per shape
    size = 8192 if device.type == "cuda" else 512
    peaks = {"bf16": matmul_peak(torch.bfloat16, device, size), "fp32": matmul_peak(torch.float32, device, size)}
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "peak_tflops": peaks,
           "tf32": torch.backends.cuda.matmul.allow_tf32}
    print(json.dumps(env), flush=True)
    rows = []
    for key in args.pairs:
        peer_spec, ours_name, label = PAIRS[key]
        torch.manual_seed(0)
        peer, peer_note = build_peer(peer_spec)
        ours = create_model(ours_name, drop_path_rate=0.0)
        macs = count_macs(ours, torch.randn(1, 3, 224, 224))
        peer_macs = count_macs(peer, torch.randn(1, 3, 224, 224))
        ours, peer = ours.to(device), peer.to(device)
        for scen in args.scenarios:
            training, dtype, batch = SCENARIOS[scen]
            batch = args.batch or batch
            x = torch.randn(batch, 3, 224, 224, device=device)
            steps = {"ours": make_step(ours, x, training, dtype), "peer": make_step(peer, x, training, dtype)}
            for lever in args.levers if training else []:
                steps[f"ours {lever}"] = make_step(ours, x, training, dtype, **LEVERS[lever])
            n = {}
            for side, step in steps.items():  # warm-up (cudnn's choice, allocator, autocast caches), then size
                timed(step, 3)
                n[side] = max(2, round(args.round_seconds / timed(step, 2)))
            times = {side: [] for side in steps}
            for r in range(args.rounds):
                order = list(steps) if r % 2 == 0 else list(steps)[::-1]
                for side in order:
                    times[side].append(timed(steps[side], n[side]))
            ratios = [p / o for o, p in zip(times["ours"], times["peer"])]
            flops = 2 * macs * batch * (3 if training else 1)
            peak = peaks["bf16" if dtype is torch.bfloat16 else "fp32"] * 1e12
            row = {"pair": label, "scenario": scen, "batch": batch, "peer": peer_note,
                   "ours_ms": statistics.median(times["ours"]) * 1e3, "peer_ms": statistics.median(times["peer"]) * 1e3,
                   "ratio": statistics.median(ratios), "ratio_iqr": quartiles(ratios),
                   "ours_share_of_peak": flops / statistics.median(times["ours"]) / peak,
                   "peer_share_of_peak": 2 * peer_macs * batch * (3 if training else 1)
                   / statistics.median(times["peer"]) / peak,
                   "macs_g": macs / 1e9, "peer_macs_g": peer_macs / 1e9, "steps_per_round": n,
                   "rounds_ms": {side: [t * 1e3 for t in v] for side, v in times.items()}, "levers": {}}
            print(f"{label:10s} {scen:11s} b{batch:<4d} ours {row['ours_ms']:7.1f} ms  peer {row['peer_ms']:7.1f} ms  "
                  f"ours/peer speed {row['ratio']:.2f}× (IQR {row['ratio_iqr'][0]:.2f}–{row['ratio_iqr'][1]:.2f})  "
                  f"share of peak ours {row['ours_share_of_peak']:.0%} peer {row['peer_share_of_peak']:.0%}",
                  flush=True)
            for side in steps:
                if not side.startswith("ours "):
                    continue
                gain = [o / v for o, v in zip(times["ours"], times[side])]  # > 1: the variant is faster
                row["levers"][side[5:]] = {"ms": statistics.median(times[side]) * 1e3,
                                           "speed_vs_plain": statistics.median(gain), "iqr": quartiles(gain)}
                q = quartiles(gain)
                print(f"{'':10s} {'':11s} {'':5s} {side:28s} {statistics.median(times[side]) * 1e3:7.1f} ms  "
                      f"speed vs plain {statistics.median(gain):.3f}× (IQR {q[0]:.3f}–{q[1]:.3f})", flush=True)
            rows.append(row)
            del steps
        del ours, peer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
